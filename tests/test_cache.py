"KnowledgeDistillation(cache=...) on real fastai Learners over the digits image folder: shuffled, with workers, a whole schedule, refusals."
import pickle
from copy import copy

import fastai.callback.schedule  # noqa: F401  (Learner.lr_find, fit_one_cycle)
import pytest
import torch
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.mixup import MixUp
from fastai.data.core import DataLoaders
from fastai.data.transforms import IntToFloatTensor
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastai.vision.all import FlipItem, ImageDataLoaders, Resize

from conftest import Doubled, RecordFirstBatch, changed_inputs, double_inputs, ready_made, tiny_cnn, whole
from fastkd.cache import TeacherCache, random_augmentations
from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls
from fastkd.losses import SoftTarget
from fastkd.split import default_split
from test_mixed_precision import CPUAutocast


@pytest.fixture(scope='module')
def dls(digits_path):
    "Deterministic inputs and shuffled training batches (fastai's default)"
    return digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)


@pytest.fixture
def teacher():
    "A teacher whose outputs differ from item to item (a random CNN does: the cache need not know what it learnt)"
    set_seed(1, reproducible=True)
    return tiny_cnn(16).eval()


class Record:
    "The distillation loss of these tests (SoftTarget): keeps each training step's epoch, inputs and teacher output"
    def __init__(self, teacher):
        self.loss, self.batches, self.items = SoftTarget(), [], 0
        teacher.register_forward_hook(lambda module, inputs, output: setattr(self, 'items', self.items + len(inputs[0])))
    def __call__(self, student_logits, teacher_logits):
        self.batches.append((self.learn.epoch, self.learn.xb[0], teacher_logits))
        return self.loss(student_logits, teacher_logits)


def distilled(dls, teacher, cache=True, cbs=()) -> tuple[Learner, Record]:
    "A student distilled from `teacher` with a cache, and the record of its training steps"
    record = Record(teacher)
    learn = Learner(dls, tiny_cnn(8), splitter=default_split,
                    cbs=[KnowledgeDistillation(teacher, record, cache=cache), *cbs])
    record.learn = learn
    return learn, record


def fit(learn: Learner, epochs: int = 2):
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-3)


@torch.no_grad()
def assert_outputs_of_their_inputs(batches, teacher, dtype=torch.float32):
    "Each batch's teacher outputs are a live forward of the teacher on that batch, to the stored precision"
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    for _, inputs, cached in batches: torch.testing.assert_close(cached, teacher(inputs).to(dtype).float(), **tolerance)


def test_shuffled_epochs_get_each_items_own_outputs(digits_path, teacher):
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=2)  # worker processes load the batches
    learn, record = distilled(dls, teacher)
    fit(learn, epochs=2)
    n_items = len(dls.train.dataset)
    assert n_items - dls.bs < record.items <= 1.2 * n_items  # once per item seen, and one check batch per fit
    second = [b for b in record.batches if b[0] == 1]
    assert len(second) == len(dls.train)
    assert_outputs_of_their_inputs(second, teacher)
    assert not torch.equal(record.batches[0][1], second[0][1])  # shuffled: the epochs' first batches hold other items


def test_a_whole_schedule_runs_the_teacher_once_per_item_and_exports_no_cache(dls, teacher, tmp_path):
    learn, record = distilled(dls, teacher)
    learn.path = tmp_path
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=5, show_plot=False)
        assert 0 < int(learn.knowledge_distillation.cache.rows.stored.sum()) < len(dls.train.dataset) / 2  # half epoch
        learn.freeze_to(1)
        learn.fit_one_cycle(1, 1e-2)
        learn.unfreeze()
        learn.fit_one_cycle(2, 1e-3)
    assert record.items <= 1.2 * len(dls.train.dataset)
    assert_outputs_of_their_inputs(record.batches, teacher)
    learn.export('student.pkl')
    assert not any(isinstance(cb, KnowledgeDistillation) for cb in load_learner(tmp_path/'student.pkl').cbs)


def test_float16_storage(dls, teacher):
    learn, record = distilled(dls, teacher, cache=TeacherCache(dtype=torch.float16))
    fit(learn)
    assert learn.knowledge_distillation.cache.rows.arrays['outputs'].dtype == torch.float16
    assert record.items <= 1.2 * len(dls.train.dataset)  # the second epoch came from the cache
    second = [b for b in record.batches if b[0] == 1]
    assert_outputs_of_their_inputs(second, teacher, torch.float16)
    reused = torch.cat([cached for _, _, cached in second])
    assert reused.dtype == torch.float32 and torch.equal(reused, reused.half().float())  # float16 values, handed back
    with torch.no_grad(): live = torch.cat([teacher(inputs) for _, inputs, _ in second])
    assert not torch.equal(reused, live)  # rounded: not the float32 outputs


def test_a_changed_teacher_or_dataset_refills_the_cache(digits_path, dls, teacher):
    learn, record = distilled(dls, teacher)
    fit(learn, epochs=1)
    with torch.no_grad(): teacher[1].weight.mul_(2)  # new weights in the same module
    record.items, record.batches = 0, []
    fit(learn, epochs=1)
    assert record.items > len(dls.train.dataset) - dls.bs
    assert_outputs_of_their_inputs(record.batches, teacher)
    learn.dls = digits_dls(digits_path, size=32, bs=32, augment=False, num_workers=0, valid_pct=None)
    record.items = 0
    fit(learn, epochs=1)
    assert record.items > len(learn.dls.train.dataset) - 32


def test_another_teacher_with_the_same_weights_refills_the_cache(dls, teacher):
    "A teacher of another class with the same weights computes other outputs: the cache tells it by object, not by sums"
    cache = TeacherCache()
    fit(distilled(dls, teacher, cache)[0], epochs=1)
    doubled = Doubled(*teacher).eval()
    learn, record = distilled(dls, doubled, cache)
    fit(learn, epochs=1)
    assert record.items > len(dls.train.dataset) - dls.bs
    assert_outputs_of_their_inputs(record.batches, doubled)


def test_another_dataset_object_or_other_transform_objects_refill_the_cache(dls, teacher):
    "In memory the cache keys on the objects: a copy of the dataset, or new transforms of the loader, start afresh"
    learn, record = distilled(dls, teacher)
    fit(learn, epochs=1)
    other_transforms = dls.train.new(after_batch=[IntToFloatTensor(div=128.)])  # the same dataset object
    same_transforms = other_transforms.new(dataset=copy(dls.train.dataset))  # the same items, another object
    for train in other_transforms, same_transforms:
        learn.dls = DataLoaders(train, dls.valid)
        record.items, record.batches = 0, []
        fit(learn, epochs=1)
        assert record.items > len(dls.train.dataset) - dls.bs
        assert_outputs_of_their_inputs(record.batches, teacher)


def test_another_compute_precision_refills_the_cache(dls, teacher):
    "Outputs computed in float32 are not those of a fit under bfloat16 autocast (to_bf16, pointed at the CPU)"
    learn, record = distilled(dls, teacher)
    fit(learn, epochs=1)
    learn.add_cbs([MixedPrecision('bf16'), CPUAutocast()])
    record.items, record.batches = 0, []
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=RecordFirstBatch())
    assert record.items == 2 * dls.bs  # the check on a validation batch, then the whole first batch: nothing reused
    ((_, inputs, handed),) = record.batches
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16): live = teacher(inputs).float()
    assert torch.equal(handed, live)


def test_inputs_changed_in_place_stop_training(digits_path, teacher):
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)
    learn, _ = distilled(dls, teacher)
    fit(learn, epochs=1)
    double_inputs(dls.train)
    with pytest.raises(RuntimeError, match=changed_inputs()): fit(learn, epochs=1)


def test_a_cache_called_out_of_order_says_what_must_run_first(dls, teacher):
    "Code that drives a TeacherCache itself (not through the callback) is told which step it skipped"
    learn = Learner(dls, tiny_cnn(8))
    learn.dl, learn.iter = dls.train, 0
    xb = next(iter(dls.train))[:1]  # the loader draws this epoch's order
    with pytest.raises(RuntimeError, match=whole('TeacherCache.prepare must run before the cache is used.')):
        TeacherCache()(learn, xb, teacher)
    learn.dl = dls.train.new()  # a loader that has drawn no order yet
    with pytest.raises(RuntimeError, match=whole('The teacher cache cannot tell which items batch 0 holds: it follows the '
                                                 'item order of fastai DataLoaders. Use cache=False with this loader.')):
        TeacherCache().batch_items(learn, 4)
    learn.dl = dls.train
    cache = TeacherCache(views=2)
    cache.prepare(learn, [teacher])
    with pytest.raises(RuntimeError, match=whole('TeacherCache.start_epoch must run before each training epoch.')):
        cache(learn, xb, teacher)


def test_pre_batched_data_is_refused(dls, teacher):
    "A loader of ready-made batches (bs=None) has no item order to key outputs by"
    pre_batched, _ = ready_made(dls)
    with pytest.raises(ValueError, match=whole(
            'The teacher cache keys outputs by dataset index: it needs a training DataLoader over an indexed '
            'dataset, with a batch size. Use cache=False for iterable or pre-batched data.')):
        Learner(pre_batched, tiny_cnn(8), loss_func=CrossEntropyLossFlat(),
                cbs=KnowledgeDistillation(teacher, cache=True)).fit(1)


def test_a_random_transform_that_never_draws_is_no_augmentation(digits_path):
    "A fastai RandTransform with p=0 leaves every input as it is: the cache takes it, a p above 0 it names"
    for p, named in (0., []), (0.5, ['FlipItem (dls.train.after_item)']):
        flips = ImageDataLoaders.from_folder(digits_path, train='train', valid='valid', item_tfms=[Resize(32), FlipItem(p)],
                                             bs=64, num_workers=0)
        assert random_augmentations(Learner(flips, tiny_cnn(8))) == named


def test_random_augmentation_is_refused_by_name(digits_path, dls, teacher):
    augmented = digits_dls(digits_path, size=32, bs=64, num_workers=0)
    refusal = ('The teacher cache needs each training item to have the same input in every epoch, but these draw '
               'random numbers: {}. A cached output would be paired with views the teacher never saw. Train without '
               'them to use the cache (e.g. no `batch_tfms`, no MixUp), or keep cache=False to run the teacher on '
               "every view, or pass cache=TeacherCache(allow_random=True) to reuse the output of each item's first "
               'view.')
    with pytest.raises(ValueError, match=whole(refusal.format(
            'Rotate (dls.train.after_batch), Brightness (dls.train.after_batch)'))):
        fit(distilled(augmented, teacher)[0])
    with pytest.raises(ValueError, match=whole(refusal.format('MixUp (callback)'))):
        fit(distilled(dls, teacher, cbs=[MixUp()])[0])
    learn, record = distilled(augmented, teacher, cache=TeacherCache(allow_random=True))
    fit(learn, epochs=2)
    assert record.items <= 1.2 * len(augmented.train.dataset)  # the first view's output, reused


def test_memory_bound_and_pickles(dls, teacher):
    cache = TeacherCache()  # the defaults its docstring gives
    assert (cache.allow_random, cache.dtype, cache.max_gib, cache.path, cache.top_k, cache.views, cache.view_seed) == (
        False, torch.float32, 8., None, None, None, 0)
    with pytest.raises(MemoryError, match=whole(
            f'Caching the teacher outputs would take 0.0 GiB ({len(dls.train.dataset)} items x (10,) in '
            'torch.float32), more than max_gib=1e-06: pass TeacherCache(dtype=torch.float16), top_k, a path on disk '
            'or a larger max_gib, or use cache=False.')):
        fit(distilled(dls, teacher, cache=TeacherCache(max_gib=1e-6))[0])
    need = len(dls.train.dataset) * (10 * 4 + 4) / 2**30  # float32 outputs and a float32 input fingerprint per item
    with pytest.raises(MemoryError): fit(distilled(dls, teacher, cache=TeacherCache(max_gib=need * 0.99))[0])
    fit(distilled(dls, teacher, cache=TeacherCache(max_gib=need))[0], epochs=1)  # exactly enough
    learn, _ = distilled(dls, teacher)
    fit(learn, epochs=1)
    cache = learn.knowledge_distillation.cache
    assert cache.rows.stored.any()
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.rows.arrays is None and copy.rows.stored is None and copy.allow_random is False


def test_lookup_is_kept_for_older_code_with_a_deprecation_warning(dls, teacher):
    "The public `lookup(items, xb, forward, n_items)` of earlier versions: it warns, and reads what the fit stored"
    learn, _ = distilled(dls, teacher)
    cache, model = learn.knowledge_distillation.cache, getattr(teacher, 'model', teacher)
    with pytest.warns(DeprecationWarning, match='TeacherCache.lookup is deprecated'):
        with pytest.raises(RuntimeError, match='TeacherCache.prepare must run before the cache is used.'):
            TeacherCache().lookup(torch.arange(2), (torch.zeros(2, 3, 32, 32),), model, 2)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    xb, _ = dls.train.new(shuffle=False).one_batch()
    computed = []
    def forward(x):
        computed.append(len(x))
        with torch.no_grad(): return model.eval()(*x)
    with pytest.warns(DeprecationWarning):
        got = cache.lookup(torch.arange(len(xb)), (xb,), forward, len(dls.train.dataset))
    assert sum(computed) < len(xb) / 4  # the items the epoch saw were read from the cache (drop_last skips a few)
    with torch.no_grad(): torch.testing.assert_close(got, model.eval()(xb), rtol=1e-4, atol=1e-4)
