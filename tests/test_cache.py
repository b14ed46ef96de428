"The teacher-output cache on real fastai Learners over the digits image folder: shuffled, with workers, lr_find, refusals."
import pickle

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import fastai.callback.schedule  # noqa: F401  (Learner.lr_find)
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.data.transforms import IntToFloatTensor
from fastai.learner import Learner
from fastai.torch_core import set_seed

from conftest import tiny_cnn
from fastkd.cache import TeacherCache
from fastkd.digits import digits_dls


@pytest.fixture(scope='module')
def dls(digits_path):
    "Deterministic inputs and shuffled training batches (fastai's default)"
    return digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)


@pytest.fixture
def teacher():
    "A teacher whose outputs differ from item to item (a random CNN does: the cache need not know what it learnt)"
    set_seed(1, reproducible=True)
    return tiny_cnn(16).eval()


class CachedTeacher(Callback):
    "Drive the cache as `KnowledgeDistillation` does, and keep each training batch's inputs and cached outputs"
    run_valid = False
    def __init__(self, teacher, cache): self.teacher, self.cache, self.batches, self.items_forwarded = teacher, cache, [], 0
    def before_fit(self): self.cache.before_fit(self.learn, [self.teacher])
    @torch.no_grad()
    def forward(self, xb):
        self.items_forwarded += len(xb[0])
        return self.teacher(*xb)
    def after_loss(self): self.batches.append((self.epoch, self.xb[0], self.cache(self.learn, self.xb, self.forward)))


def fit(dls, teacher, epochs=2, cache=None, **kwargs) -> tuple[Learner, CachedTeacher]:
    driver = CachedTeacher(teacher, cache or TeacherCache(**kwargs))
    learn = Learner(dls, tiny_cnn(8), cbs=driver)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-3)
    return learn, driver


@torch.no_grad()
def assert_outputs_of_their_inputs(batches, teacher, dtype=torch.float32):
    "Each batch's cached outputs are a live forward of the teacher on that batch, to the stored precision"
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    for _, inputs, cached in batches: torch.testing.assert_close(cached, teacher(inputs).to(dtype).float(), **tolerance)


def test_shuffled_epochs_get_each_items_own_outputs(digits_path, teacher):
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=2)  # worker processes load the batches
    learn, driver = fit(dls, teacher, epochs=2)
    later = [b for b in driver.batches if b[0] > 0]
    assert len(later) == len(dls.train)
    assert_outputs_of_their_inputs(later, teacher)
    first, second = driver.batches[0], driver.batches[len(dls.train)]
    assert not torch.equal(first[1], second[1])  # shuffled: the first batches of two epochs hold other items
    n_items = len(dls.train.dataset)
    assert n_items - dls.bs < driver.items_forwarded <= n_items  # once per item (the partial last batch is dropped)


def test_float16_storage(dls, teacher):
    _, driver = fit(dls, teacher, dtype=torch.float16)
    assert_outputs_of_their_inputs(driver.batches, teacher, torch.float16)


def test_lr_find_leaves_outputs_for_the_items_it_saw_only(digits_path, teacher):
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)
    driver = CachedTeacher(teacher, TeacherCache())
    learn = Learner(dls, tiny_cnn(8), cbs=driver)
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=5, show_plot=False)
        assert 0 < int(driver.cache.stored.sum()) < len(dls.train.dataset) / 2
        learn.fit(2, 1e-3)
    assert_outputs_of_their_inputs(driver.batches, teacher)
    assert driver.items_forwarded <= len(dls.train.dataset)


def test_a_changed_teacher_or_dataset_refills_the_cache(digits_path, teacher):
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)
    learn, driver = fit(dls, teacher, epochs=1)
    with torch.no_grad(): teacher[1].weight.mul_(2)  # new weights in the same module
    driver.items_forwarded, driver.batches = 0, []
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert driver.items_forwarded > len(dls.train.dataset) - dls.bs
    assert_outputs_of_their_inputs(driver.batches, teacher)
    learn.dls = digits_dls(digits_path, size=32, bs=32, augment=False, num_workers=0, valid_pct=None)
    driver.items_forwarded = 0
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert driver.items_forwarded > len(learn.dls.train.dataset) - 32


def test_inputs_changed_in_place_stop_training(digits_path, teacher):
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)
    learn, _ = fit(dls, teacher, epochs=1)
    to_float = next(t for t in dls.train.after_batch.fs if isinstance(t, IntToFloatTensor))
    to_float.div = 128.  # every input doubles, behind the cache's back
    with pytest.raises(RuntimeError, match=r'inputs of training items \[.*changed.*allow_random'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)


def test_random_augmentation_is_refused_by_name(digits_path, teacher):
    augmented = digits_dls(digits_path, size=32, bs=64, num_workers=0)
    with pytest.raises(ValueError, match=r'Rotate \(dls\.train\.after_batch\).*allow_random=True'): fit(augmented, teacher)
    plain = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)
    learn = Learner(plain, tiny_cnn(8), cbs=[CachedTeacher(teacher, TeacherCache()), MixUp()])
    with pytest.raises(ValueError, match=r'MixUp \(callback\)'), learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)


def test_allow_random_reuses_the_first_view(digits_path, teacher):
    augmented = digits_dls(digits_path, size=32, bs=64, num_workers=0)
    _, driver = fit(augmented, teacher, epochs=2, allow_random=True)
    assert driver.items_forwarded <= len(augmented.train.dataset)


def test_memory_bound_and_pickles(dls, teacher):
    with pytest.raises(MemoryError, match=r'max_gib=1e-06.*float16'): fit(dls, teacher, epochs=1, max_gib=1e-6)
    _, driver = fit(dls, teacher, epochs=1)
    assert driver.cache.stored.any()
    copy = pickle.loads(pickle.dumps(driver.cache))
    assert copy.outputs is None and copy.stored is None and copy.allow_random is False
