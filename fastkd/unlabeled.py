"""Unlabeled items in training: `joint_loader` makes a training loader whose epochs hold them beside the labeled ones.

Distillation needs no label: the teacher gives the target. `KnowledgeDistillation(teacher, unlabeled=items)` trains
on `joint_loader(dls.train, items)`: a loader over the labeled dataset followed by the unlabeled inputs
(`JointDataset`), made by the training loader's own item and batch transforms (augmentation included). Every item
is drawn once per epoch (`drop_last` drops the last unlabeled ones). Each batch holds its labeled items first, at
least one and otherwise in proportion to the batch, then its unlabeled ones, and the loader keeps how many of each
batch are labeled (`labeled_counts`), known on the host: the callback scores the learner's loss on the labeled rows
and the distillation loss on all of them without waiting for the device.
"""
from __future__ import annotations

from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Sequence

import weakref

import numpy as np
import torch
from fastai.data.core import DataLoaders, Datasets, TfmdDL, test_set
from fastai.data.load import DataLoader
from fastai.text.data import LMDataLoader
from torch import Tensor

from .memory import InMemoryDL

__all__ = ['JointDataset', 'joint_loader', 'keep_labels']


class JointDataset:
    """The items of `labeled` (a dataset whose items hold `n_inp` inputs, then targets), then the inputs of
    `unlabeled`, each given the targets of the first labeled item as a placeholder that the loss never sees"""
    def __init__(self, labeled, unlabeled, n_inp: int):
        self.labeled, self.unlabeled, self.n_inp = labeled, unlabeled, n_inp
        self.n_labeled = len(labeled)
        self.placeholder = tuple(labeled[0])[n_inp:]
        self.split_idx = getattr(labeled, 'split_idx', None)  # training transforms (augmentation) apply to all
        self.tfms = getattr(labeled, 'tfms', [])
        items = [getattr(part, 'items', None) for part in (labeled, unlabeled)]
        if all(i is not None for i in items): self.items = [*items[0], *items[1]]  # what a teacher store is keyed by

    def __len__(self) -> int: return self.n_labeled + len(self.unlabeled)

    def __getitem__(self, i: int) -> tuple:
        if i < self.n_labeled: return self.labeled[i]
        item = self.unlabeled[i - self.n_labeled]
        inputs = tuple(item)[:self.n_inp] if isinstance(item, (tuple, list)) else (item,)
        return (*inputs, *self.placeholder)


class _LabeledFirst:
    """A joint loader's order for an epoch (its `get_idxs`): the labeled and the unlabeled items each shuffled with the
    loader's generator, batches of `bs` items whose first `labeled_counts[i]` are labeled"""
    def __init__(self, dl: DataLoader, n_labeled: int):
        self.dl, self.n_labeled, self.labeled_counts = dl, n_labeled, []

    def batch_sizes(self) -> list[int]:
        n, bs = len(self.dl.dataset), self.dl.bs
        return [bs] * (n // bs) + ([n % bs] if n % bs and not self.dl.drop_last else [])

    def __call__(self) -> list[int]:
        dl, n_labeled = self.dl, self.n_labeled
        labeled, unlabeled = list(range(n_labeled)), list(range(n_labeled, len(dl.dataset)))
        if dl.shuffle: labeled, unlabeled = (dl.rng.sample(items, len(items)) for items in (labeled, unlabeled))
        sizes = self.batch_sizes()
        # one labeled item per batch, the others spread in proportion to the rest of each batch
        used = min(n_labeled, sum(sizes)) - len(sizes)
        ends = np.cumsum([0] + [size - 1 for size in sizes])
        counts = 1 + np.diff(ends * used // max(ends[-1], 1))
        order, at_labeled, at_unlabeled = [], 0, 0
        for size, count in zip(sizes, counts.tolist()):
            order += labeled[at_labeled:at_labeled + count] + unlabeled[at_unlabeled:at_unlabeled + size - count]
            at_labeled, at_unlabeled = at_labeled + count, at_unlabeled + size - count
        self.labeled_counts = counts.tolist()
        return order


def check_unlabeled(unlabeled):
    "`unlabeled` if it is items or a `DataLoader` of inputs (or None), else an error that says what to pass"
    if unlabeled is None or isinstance(unlabeled, DataLoader): return unlabeled
    if isinstance(unlabeled, (str, Path)):
        raise TypeError(f'unlabeled is a path ({unlabeled}), not items: pass the items, e.g. '
                        f'unlabeled=get_image_files({str(unlabeled)!r}).')
    if isinstance(unlabeled, DataLoaders):
        raise TypeError('unlabeled is a DataLoaders: pass one DataLoader of the unlabeled inputs, e.g. '
                        'dls.test_dl(items), or the items themselves.')
    if not isinstance(unlabeled, Sized) or not isinstance(unlabeled, Iterable):
        raise TypeError(f'unlabeled must be a list of items (e.g. get_image_files(folder)) or a DataLoader of inputs, '
                        f'not a {type(unlabeled).__name__}.')
    if not len(unlabeled): raise ValueError('unlabeled holds no items: pass a non-empty list or DataLoader, or None.')
    return unlabeled


def n_unlabeled(unlabeled) -> int:
    "How many unlabeled items `unlabeled` (items, or a `DataLoader` of inputs) holds"
    return len(unlabeled.dataset) if isinstance(unlabeled, DataLoader) else len(unlabeled)


def _inputs_dataset(train: DataLoader, unlabeled):
    "The dataset of the unlabeled inputs: a `DataLoader`'s, or `unlabeled` items through the training inputs' types"
    if isinstance(unlabeled, DataLoader): return unlabeled.dataset
    return test_set(train.dataset, unlabeled if hasattr(unlabeled, 'iloc') else list(unlabeled))  # a DataFrame whole


def _decoded_unlabeled(train: InMemoryDL, unlabeled, joint: JointDataset) -> tuple[Tensor, ...]:
    "The unlabeled inputs as `train.decoded` holds its items (after the item pipeline), with placeholder targets"
    n = len(joint.unlabeled)
    if isinstance(unlabeled, InMemoryDL):  # inputs made once already
        inputs = unlabeled.decoded[:joint.n_inp]
        return (*inputs, *(type(part)(part[[0] * n]) for part in train.decoded[joint.n_inp:]))
    part = torch.utils.data.Subset(joint, range(joint.n_labeled, len(joint)))
    return InMemoryDL.from_dl(train.new(part, cls=TfmdDL)).decoded


# joint loaders still in use, by (training loader, unlabeled items, their count): kd_find's trials share one, made
# (decoded) once; an entry goes when no callback holds its loader, and a list that grew gets a new one
_made: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def joint_loader(train: DataLoader, unlabeled: Sequence | DataLoader) -> DataLoader:
    """A loader like `train` (same class of items, transforms, batch size, device) over `train`'s items followed by
    `unlabeled` (a list of items such as `get_image_files` returns, or a `DataLoader` of inputs only, as
    `dls.test_dl(items)` makes), whose batches hold labeled items first: `labeled_counts[i]` of batch `i`, at least
    one each. For an `InMemoryDL`, the unlabeled inputs are made once too. The same `train` and `unlabeled` objects
    (of the same length) get the loader made before while something still holds it."""
    key = (id(train), id(unlabeled), n_unlabeled(unlabeled))
    dl = _made.get(key)
    if dl is None or dl.dataset.labeled is not train.dataset or dl.dataset.unlabeled_given is not unlabeled:
        dl = _made[key] = _joint_loader(train, unlabeled)
    return dl


def _joint_loader(train: DataLoader, unlabeled: Sequence | DataLoader) -> DataLoader:
    "`joint_loader`, made anew"
    if isinstance(train, LMDataLoader):
        raise ValueError("Unlabeled items join a loader of items, and a language model's loader cuts its texts into "
                         'sequences with targets made from the text itself: train on the unlabeled texts as texts.')
    if not getattr(train, 'indexed', False) or train.bs is None:
        raise ValueError('Unlabeled items join the training items by index: the training loader must be a fastai '
                         'DataLoader over an indexed dataset, with a batch size.')
    if type(train).get_idxs is not DataLoader.get_idxs or train.n != len(train.dataset):
        raise ValueError(f'The training loader ({type(train).__name__}) draws its own choice of items each epoch, '
                         'and unlabeled items join a loader that draws every item once: use a plain DataLoader '
                         '(no weights, no partial epochs) with unlabeled items.')
    if not isinstance(train.dataset, Datasets):
        raise ValueError(f'Unlabeled items join a fastai Datasets (what DataBlock and ImageDataLoaders make), and the '
                         f'training set is a {type(train.dataset).__name__}: train without unlabeled items, or make '
                         'the data with a DataBlock.')
    inputs = _inputs_dataset(train, unlabeled)
    if not len(inputs): raise ValueError('unlabeled holds no items: pass a non-empty list or DataLoader, or None.')
    joint = JointDataset(train.dataset, inputs, getattr(train, 'n_inp', 1))
    joint.unlabeled_given = unlabeled
    if isinstance(train, InMemoryDL):
        decoded = tuple(type(a)(torch.cat([a, b])) for a, b in zip(train.decoded, _decoded_unlabeled(train, unlabeled,
                                                                                                       joint)))
        dl = InMemoryDL(joint, decoded, bs=train.bs, shuffle=train.shuffle, drop_last=train.drop_last, num_workers=0,
                        device=train.device, after_item=train.after_item, before_batch=train.before_batch,
                        after_batch=train.after_batch, do_setup=False)
        for name in ('_n_inp', '_types'):
            if hasattr(train, name): setattr(dl, name, getattr(train, name))
    else: dl = train.new(joint)
    dl.get_idxs = order = _LabeledFirst(dl, len(train.dataset))
    sizes = order.batch_sizes()
    if len(train.dataset) < len(sizes):
        raise ValueError(f'{len(train.dataset)} labeled items for {len(sizes)} training batches of {train.bs} items '
                         f'({len(inputs)} unlabeled): every batch needs a labeled item for the loss to score. Use '
                         f'batches of at least {-(-len(joint) // len(train.dataset))} items, or fewer unlabeled ones.')
    dl.labeled_first = order
    return dl


def labeled_rows(dl: DataLoader, i: int) -> int | None:
    "How many of batch `i` of `dl` are labeled (the first ones), None where `dl` is not a joint loader"
    order = getattr(dl, 'labeled_first', None)
    return None if order is None else order.labeled_counts[i]



def keep_labels(dls: DataLoaders, fraction: float, seed: int = 0) -> tuple[DataLoaders, list]:
    """`dls` whose training set keeps `fraction` of its items, drawn with `seed` within each label (at least one per
    label), and the others' items without their labels: to measure what `unlabeled` gains, as `--labels` does.
    Validation is unchanged. The training set must be a fastai `Datasets` (a `DataBlock`'s, `ImageDataLoaders`')."""
    if not 0 < fraction <= 1:
        raise ValueError(f'fraction is the share of training labels kept, in (0, 1], got {fraction}.')
    dataset = dls.train_ds
    if not isinstance(dataset, Datasets):
        raise TypeError(f'keep_labels splits a fastai Datasets by its items, and this training set is a '
                        f'{type(dataset).__name__}: split the items before making the DataLoaders.')
    targets = dataset.tls[dataset.n_inp]
    by_label: dict[str, list[int]] = {}
    for i in range(len(dataset)): by_label.setdefault(repr(targets[i]), []).append(i)
    rng = np.random.default_rng(seed)
    kept = sorted(int(i) for label in sorted(by_label) for i in
                  rng.choice(by_label[label], max(1, round(fraction * len(by_label[label]))), replace=False))
    items = dataset.items
    def take(idxs): return items.iloc[idxs] if hasattr(items, 'iloc') else [items[i] for i in idxs]  # a DataFrame too
    train = Datasets(tls=[tl._new(take(kept), split_idx=0) for tl in dataset.tls], n_inp=dataset.n_inp)
    held = sorted(set(range(len(items))) - set(kept))
    return (DataLoaders(dls.train.new(train), *dls.loaders[1:], path=dls.path, device=dls.device),
            take(held))
