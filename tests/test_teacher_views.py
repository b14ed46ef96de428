"""`TeacherCache(views=K)` on real Learners over the digits image folders: K replayed augmented views per item, one
per epoch, the teacher run once per (item, view); in memory and on disk; refusals of what cannot be replayed."""
import json
import random
import re

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.learner import Learner
from fastai.torch_core import set_seed
from fastai.vision.all import FlipItem, ImageDataLoaders, RandomResizedCrop, RandTransform, TensorImage, aug_transforms

from conftest import double_inputs, tiny_cnn, whole
from fastkd.cache import TeacherCache, fill_teacher_cache
from fastkd.callback import KnowledgeDistillation
from fastkd.losses import SoftTarget
from fastkd.memory import in_memory
from fastkd.store import TeacherStore


def augmented_dls(path, bs: int = 32, num_workers: int = 0, more_tfms=(), **kwargs):
    "The digits with random item transforms only: a crop of 60-100% of each image, flipped half the time, `more_tfms`"
    return ImageDataLoaders.from_folder(path, train='train', valid='valid', bs=bs, num_workers=num_workers,
                                       item_tfms=[RandomResizedCrop(32, min_scale=0.6), FlipItem(0.5), *more_tfms],
                                       **kwargs)


class Jitter(RandTransform):
    "A brightness offset drawn from numpy plus one drawn from torch (fastai's own transforms draw from Python's random)"
    order = 10  # after ToTensor: the image is a uint8 TensorImage
    def encodes(self, x: TensorImage) -> TensorImage:
        offset = int(np.random.randint(0, 32)) + int(torch.randint(0, 32, ()))
        return TensorImage((x.int() + offset).clamp(0, 255).to(x.dtype))


class Steps(Callback):
    """Each training step's epoch, dataset items, views, inputs and the teacher outputs the loss was handed, and how
    many items the teacher ran on in training (its steps, and the missing views filled as an epoch starts), not in the
    check before the first step (the fit's first teacher forward)"""
    order = KnowledgeDistillation.order + 1
    def __init__(self, teacher: torch.nn.Module):
        self.steps, self.forwards = [], []
        teacher.register_forward_hook(self.count)
    def count(self, module, inputs, output): self.forwards.append(len(inputs[0]))
    @property
    def teacher_items(self) -> int: return sum(self.forwards[1:])
    def after_loss(self):
        if not self.training: return
        cache = self.learn.knowledge_distillation.cache
        items = cache.batch_items(self.learn, len(self.xb[0]))
        self.steps.append(dict(epoch=self.epoch, items=items, views=cache.keying.replay.views[items].clone(),
                               inputs=self.xb[0].detach().clone(), targets=self.yb[0].clone(),
                               handed=self.loss_func_kd.handed, forwards=len(self.forwards)))


class HandedLoss(SoftTarget):
    "SoftTarget that keeps the teacher outputs it was handed last"
    def forward(self, student_logits, teacher_logits, target=None):
        self.handed = teacher_logits.detach().clone()
        return super().forward(student_logits, teacher_logits, target)


def distil(dls, teacher: torch.nn.Module, cache: TeacherCache, epochs: int = 4, seed: int = 0, cbs=()):
    "A student of `seed` distilled from `teacher` with `cache` for `epochs`: its learner and the record of its steps"
    set_seed(seed, reproducible=True)
    loss, steps = HandedLoss(), Steps(teacher)
    learn = Learner(dls, tiny_cnn(8), cbs=[KnowledgeDistillation(teacher, loss, cache=cache), steps, *cbs])
    steps.loss_func_kd = loss
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-3)
    return learn, steps


def by_item_and_view(steps) -> dict:
    "(item, view) -> the inputs it had at each step that held it, in order"
    seen = {}
    for step in steps:
        for item, view, x in zip(step['items'].tolist(), step['views'].tolist(), step['inputs']):
            seen.setdefault((item, view), []).append(x)
    return seen


@torch.no_grad()
def assert_handed_live_outputs(steps, teacher: torch.nn.Module):
    "The outputs handed to the loss are a live forward of the teacher on the inputs of their step"
    for step in steps: torch.testing.assert_close(step['handed'], teacher.eval()(step['inputs']), rtol=1e-5, atol=1e-5)


def test_views_run_the_teacher_once_per_item_and_view_and_augment_every_epoch(few_digits, teacher):
    dls, views = augmented_dls(few_digits), 3
    cache = TeacherCache(views=views)
    learn, record = distil(dls, teacher.model, cache, epochs=4)
    n_items = len(dls.train.dataset)
    stored = int(cache.rows.stored.sum())
    assert cache.rows.stored.shape == (n_items * views,) and record.teacher_items == stored <= n_items * views
    assert stored > n_items * 1.5  # the views of later epochs were stored too, not only the first epoch's
    # after the first K epochs, the views their dropped last batches missed are filled as the epoch starts, in whole
    # batches: no training step of epoch K runs the teacher
    last_cycle = [step['forwards'] for step in record.steps if step['epoch'] == views]
    before = [step['forwards'] for step in record.steps if step['epoch'] == views - 1][-1]
    assert last_cycle[0] > before and len(set(last_cycle)) == 1
    assert len(record.steps) == 4 * len(dls.train)
    assert_handed_live_outputs(record.steps, teacher.model)
    labels = torch.tensor([int(label) for _, label in dls.train.dataset])
    assert all(torch.equal(step['targets'], labels[step['items']]) for step in record.steps)  # each item made itself
    # each epoch draws its own views, the same for every learner, from the seed and the epoch alone: every item goes
    # through its K views once in each K epochs
    first_cycle = torch.stack([cache.epoch_views(epoch, n_items) for epoch in range(views)], 1)
    assert cache.keys(torch.tensor([0, 0, 5]), torch.tensor([0, 2, 1])).tolist() == [0, 2, 16]  # item * K + view
    assert cache.keys(n_items, 0) == n_items * views == len(cache.rows.stored)
    assert TeacherCache().keys(torch.tensor([0, 5]), 0).tolist() == [0, 5]  # without views: the item itself
    assert (first_cycle.sort(1).values == torch.arange(views)).all()
    epoch_views = [torch.cat([s['views'] for s in record.steps if s['epoch'] == e]) for e in range(4)]
    assert all(len(v.unique()) == views for v in epoch_views)
    for epoch in range(4):
        items = torch.cat([s['items'] for s in record.steps if s['epoch'] == epoch])
        assert torch.equal(epoch_views[epoch], cache.epoch_views(epoch, n_items)[items])
    # augmentation happens: items change inputs between epochs; a view seen again has its first input again
    seen = by_item_and_view(record.steps)
    per_item = {}
    for (item, view), inputs in seen.items(): per_item.setdefault(item, []).append(inputs[0])
    assert sum(not all(torch.equal(xs[0], x) for x in xs[1:]) for xs in per_item.values() if len(xs) > 1) > n_items / 2
    repeated = [inputs for inputs in seen.values() if len(inputs) > 1]
    assert len(repeated) > n_items / 2 and all(torch.equal(xs[0], x) for xs in repeated for x in xs[1:])
    # the loader is given back after the fit, and a replayed item moves no random generator
    assert 'do_item' not in vars(dls.train)
    cache.start_epoch(learn)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first, again = dls.train.do_item(3), dls.train.do_item(3)
    assert torch.equal(first[0], again[0])
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    cache.release()
    assert 'do_item' not in vars(dls.train)


def test_views_replay_item_transforms_that_draw_from_numpy_and_torch(few_digits, teacher):
    _, record = distil(augmented_dls(few_digits, more_tfms=[Jitter()]), teacher.model, TeacherCache(views=2), epochs=3)
    repeated = [inputs for inputs in by_item_and_view(record.steps).values() if len(inputs) > 1]
    assert len(repeated) > 100 and all(torch.equal(xs[0], x) for xs in repeated for x in xs[1:])
    assert_handed_live_outputs(record.steps, teacher.model)


def test_a_view_whose_input_changed_stops_training_naming_items_and_views(few_digits, teacher):
    dls = augmented_dls(few_digits)
    learn, _ = distil(dls, teacher.model, TeacherCache(views=2), epochs=2)  # both views of every item stored
    double_inputs(dls.train)
    items = r'\d+ \(view [01]\)'
    with pytest.raises(RuntimeError, match=rf'(?:^|\n\t)The inputs of training items {items}(?:, {items}){{4}} ' + re.escape(
            'are not those their teacher outputs were cached for: a view did not replay. A transform draws random '
            'numbers outside the item transforms (or from a generator of its own), or the data or its transforms '
            "were changed in place. Draw from Python's random module in item transforms, or call `cache.reset()` "
            "after changing data (on disk, delete the store's folder), or keep cache=False.") + '$'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)


def test_worker_processes_make_the_views_of_each_epoch(few_digits, teacher):
    "Workers are copies of the loader started by each epoch's iterator: their items are the epoch's views"
    dls = augmented_dls(few_digits, num_workers=2)
    cache = TeacherCache(views=2)
    learn, record = distil(dls, teacher.model, cache, epochs=2)
    assert_handed_live_outputs(record.steps, teacher.model)
    dl = dls.train  # its items made again here, in the main process (its pipelines set for training by the fit)
    for epoch in range(2):
        learn.epoch = epoch
        cache.start_epoch(learn)
        for step in [s for s in record.steps if s['epoch'] == epoch][:4]:
            made = dl.after_batch(dl.do_batch([dl.do_item(int(item)) for item in step['items']]))[0]
            assert torch.equal(made, step['inputs'])
    cache.release()
    with pytest.raises(ValueError, match=whole('TeacherCache(views=2) picks new views at each epoch, which persistent '
                                               'workers would not see: pass persistent_workers=False to the '
                                               'DataLoaders.')):
        distil(augmented_dls(few_digits, num_workers=1, persistent_workers=True), teacher.model,
               TeacherCache(views=2), epochs=1)
    _, record = distil(augmented_dls(few_digits, num_workers=0, persistent_workers=True), teacher.model,
                       TeacherCache(views=2), epochs=1)  # no worker to persist: accepted
    assert_handed_live_outputs(record.steps, teacher.model)


def test_a_store_with_views_is_reused_by_another_learner(few_digits, teacher, tmp_path):
    first, _ = distil(augmented_dls(few_digits), teacher.model, TeacherCache(path=tmp_path, views=2, view_seed=7),
                      epochs=3)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    n_items = len(first.dls.train.dataset)
    store = TeacherStore(folder)
    assert store.n_items == 2 * n_items and store.manifest['identity']['storage'] == dict(
        dtype='torch.float32', top_k=None, views=2, view_seed=7)
    filled_in_training = int(np.asarray(store.filled).sum())
    calls = []
    hook = teacher.model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    assert fill_teacher_cache(teacher.model, augmented_dls(few_digits), tmp_path, views=2, view_seed=7) == folder
    hook.remove()
    assert sum(calls) == 2 * n_items - filled_in_training and np.asarray(store.filled).all()  # only what was missing
    dls = augmented_dls(few_digits)  # another loader over the same items and transforms, another student
    _, record = distil(dls, teacher.model, TeacherCache(path=tmp_path, views=2, view_seed=7), epochs=3, seed=1)
    assert record.teacher_items == 0  # every (item, view) from the store, its replayed input checked
    assert_handed_live_outputs(record.steps, teacher.model)
    _, record = distil(dls, teacher.model, TeacherCache(path=tmp_path, views=3), epochs=1)
    assert record.teacher_items > 0 and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # other K: own store
    folders = {p for p in tmp_path.iterdir() if p.is_dir()}
    assert {json.loads((p/'manifest.json').read_text())['n_items'] for p in folders} == {2 * n_items, 3 * n_items}
    assert fill_teacher_cache(teacher.model, dls, tmp_path, views=3) in folders  # the same default view_seed


def test_views_of_items_held_in_memory_are_refused(few_digits, teacher, tmp_path):
    "An in_memory loader made each item once and never makes it again: K views would be K teacher passes on one input"
    dls = in_memory(augmented_dls(few_digits))
    refusal = whole('TeacherCache(views=2) replays the random item transforms of each view, but the training loader is '
                    'an InMemoryDL (in_memory): its items were made once and are never made again, so every view of '
                    'an item would be the same input, run through the teacher 2 times. Pass the DataLoaders without '
                    'in_memory to get views, or keep in_memory with cache=True (no views).')
    with pytest.raises(ValueError, match=refusal): distil(dls, teacher.model, TeacherCache(views=2), epochs=1)
    with pytest.raises(ValueError, match=refusal): fill_teacher_cache(teacher.model, dls, tmp_path, views=2)


def test_what_cannot_be_replayed_is_refused_by_name(few_digits, teacher, tmp_path):
    unreplayable = ('TeacherCache(views=2) replays the random item transforms of each view, but these draw random '
                    'numbers once per batch, which cannot be replayed: {}. Augment with item transforms instead '
                    '(item_tfms, e.g. RandomResizedCrop, FlipItem, RandomCrop) and no random batch_tfms (e.g. '
                    'aug_transforms, or augment=False) nor MixUp/CutMix, or keep cache=False to run the teacher on '
                    'every batch.')
    batch_augmented = augmented_dls(few_digits, batch_tfms=aug_transforms(do_flip=False, size=32))
    batch_randoms = whole(unreplayable.format('Warp (dls.train.after_batch), Brightness (dls.train.after_batch)'))
    with pytest.raises(ValueError, match=batch_randoms):
        distil(batch_augmented, teacher.model, TeacherCache(views=2), epochs=1)
    with pytest.raises(ValueError, match=whole(unreplayable.format('MixUp (callback)'))):
        distil(augmented_dls(few_digits), teacher.model, TeacherCache(views=2), epochs=1, cbs=[MixUp()])
    with pytest.raises(ValueError, match=batch_randoms):
        fill_teacher_cache(teacher.model, batch_augmented, tmp_path, views=2)
    for views in 0, True, 1.5:
        with pytest.raises(ValueError, match=whole(f'views is the number of augmented views kept per item, at least 1: '
                                                   f'got {views}.')):
            TeacherCache(views=views)
    with pytest.raises(ValueError, match=whole("allow_random=True reuses each item's first output for all its views and "
                                               'views=K stores the output of each of K views: pass one of them.')):
        TeacherCache(views=2, allow_random=True)


def generator_states() -> tuple:
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def test_a_replayed_epoch_moves_no_random_generator_and_keeps_them_once_per_batch(few_digits):
    """The replay seeds each item, and keeps Python's and numpy's states (and torch's) around each batch rather than
    each item: a replayed epoch leaves them as it found them (torch's DataLoader draws a base seed from torch's)"""
    dls = augmented_dls(few_digits, more_tfms=[Jitter()])
    cache = TeacherCache(views=2)
    learn = Learner(dls, tiny_cnn(8))
    learn.epoch = 0  # as a fit sets it before its first training epoch
    cache.start_epoch(learn)
    set_seed(3)
    before = generator_states()
    assert len([xb for xb, _ in dls.train]) == len(dls.train)
    after = generator_states()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    cache.release()
    assert 'do_item' not in vars(dls.train) and 'chunkify' not in vars(dls.train)


def test_views_of_a_partial_epoch_loader_are_not_filled_ahead(few_digits, teacher):
    "A loader that draws part of the dataset each epoch (PartialDL): the teacher runs on the items drawn, no more"
    from fastai.callback.data import PartialDL
    dls = augmented_dls(few_digits)
    dls.train = PartialDL(dls.train.dataset, bs=32, partial_n=64, shuffle=True, drop_last=True, num_workers=0,
                          after_item=dls.train.after_item, after_batch=dls.train.after_batch)
    _, record = distil(dls, teacher.model, TeacherCache(views=2), epochs=4)
    assert 0 < record.teacher_items <= 4 * 64
