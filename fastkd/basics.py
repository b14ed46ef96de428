"""The small helpers fastkd's modules share, at the bottom of the package (it imports no other fastkd module):
what a model predicts, a model briefly in eval mode, a model's placement to put back, the loader a user made, a
sample batch drawn without moving any random generator, a few items of a long list as text, and labels, class
indices and masks as numpy arrays. Internal: `fastkd.all` does not export them."""
from __future__ import annotations

import random
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastai.data.load import DataLoader
from fastai.learner import Learner
from torch import Tensor, nn

__all__ = ['first_output', 'evaluating', 'placement', 'placed_like', 'teacher_model', 'user_loader', 'inputs_of',
           'random_state_kept', 'sample_batch', 'few', 'as_array', 'class_indices', 'mask_indices']


def first_output(output):
    "The prediction in a model's or layer's output: the first element of a tuple or list (fastai's text models)"
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def evaluating(model: nn.Module):
    "`model` in eval mode inside the block, then every submodule back in the mode it had"
    modes = [module.training for module in model.modules()]
    model.eval()
    try: yield model
    finally:
        for module, mode in zip(model.modules(), modes): module.training = mode


def placement(model: nn.Module) -> Callable[[], None]:
    """A function that puts `model`'s parameters and buffers back on the device and in the dtype each has now (moving
    a model to another device or dtype in between, as the callback does with a teacher, is then undone)"""
    places = {name: (t.device, t.dtype) for name, t in chain(model.named_parameters(), model.named_buffers())}
    def put_back():
        for name, t in chain(model.named_parameters(), model.named_buffers()):
            if places.get(name, (t.device, t.dtype)) != (t.device, t.dtype): t.data = t.data.to(*places[name])
    return put_back


@contextmanager
def placed_like(model: nn.Module, param: Tensor):
    "`model` on the device and in the dtype of `param` (a student's parameter) inside the block, then back as it was"
    put_back = placement(model)
    model.to(device=param.device, dtype=param.dtype)
    try: yield model
    finally: put_back()


def teacher_model(teacher) -> nn.Module:
    "The model behind `teacher`, an `nn.Module` or the model of a fastai `Learner`, as the user gave it"
    if isinstance(teacher, Learner): teacher = teacher.model
    if isinstance(teacher, (str, Path)):
        raise TypeError(f'The teacher is a path ({teacher}), not a model: load it first with '
                        f'load_teacher(path, arch, n_out), e.g. load_teacher("{teacher}", resnet34, 43).')
    if not isinstance(teacher, nn.Module):
        raise TypeError(f'A teacher must be a torch `nn.Module` or a fastai `Learner`, got {type(teacher).__name__}. '
                        'Pass the trained model (or the Learner that holds it), or a list of them for an ensemble.')
    return teacher


def user_loader(dl: DataLoader) -> DataLoader:
    "The loader the user made: under `learn.distrib_ctx()`, fastai's `DistributedDL` wraps it in `.dl`"
    inner = vars(dl).get('dl')
    return inner if isinstance(inner, DataLoader) else dl


def inputs_of(dl: DataLoader, batch: tuple) -> tuple:
    """The inputs of `batch`, a batch of `dl`: its first `dl.n_inp` tensors, or all but the last where the loader does
    not say (a plain fastai `DataLoader`), as `Learner` splits a batch"""
    return tuple(batch[:getattr(dl, 'n_inp', 1 if len(batch) == 1 else len(batch) - 1)])


@contextmanager
def random_state_kept(device=None):
    "Draw at will inside the block: torch's generator (and `device`'s, for a GPU), numpy's and Python's are kept"
    python, numpy = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and torch.device(device).type == 'cuda' else []
    try:
        with torch.random.fork_rng(devices=devices): yield
    finally: random.setstate(python); np.random.set_state(numpy)


def sample_batch(dl: DataLoader, n_items: int | None, seed: int = 0, device=None) -> tuple:
    """One batch of `n_items` items of `dl`'s dataset drawn at random with `seed`, through `dl`'s transforms: a
    sample of every class even where the dataset is sorted by class (as image folders are); from a loader of
    ready-made batches (`bs=None`), one of them, whatever `n_items`. No random generator moves, `dl`'s own included,
    so a fit's batches and augmentations stay the same; `device`: where GPU augmentations draw."""
    dl = user_loader(dl)
    with random_state_kept(device):
        bs = None if dl.bs is None else max(1, min(n_items, len(dl.dataset)))
        sample = dl.new(shuffle=True, bs=bs, drop_last=False)
        sample.rng = random.Random(seed)
        return sample.one_batch()


def few(values, n: int = 5) -> str:
    "At most `n` of `values` as text, and how many more; 'none' when there are none"
    values = [str(v) for v in values]
    if not values: return 'none'
    return ', '.join(values[:n]) + (f' (and {len(values) - n} more)' if len(values) > n else '')


def as_array(values) -> np.ndarray:
    "`values` (a tensor, list, Series, set or single value) as a 1-d numpy array"
    if isinstance(values, Tensor): values = values.cpu().numpy()
    if isinstance(values, (set, frozenset)): values = list(values)
    return np.atleast_1d(np.asarray(values))


def _numbers_out_of_order(vocab) -> bool:
    "Whether `vocab` holds numbers (or numbers as text) whose value is not their index, e.g. ['0', '1', '10', ...]"
    try: return [int(label) for label in vocab] != list(range(len(vocab)))
    except (TypeError, ValueError): return False


def class_indices(labels, vocab=None, name: str = 'y_true', predicted: bool = False) -> np.ndarray:
    """`labels` as class indices: integers are indices into `vocab`, anything else is looked up among its labels.
    Integers are ambiguous when the vocab holds numbers in another order, unless they are `predicted` indices."""
    labels = as_array(labels)
    if np.issubdtype(labels.dtype, np.integer):
        if vocab is None: return labels.astype(np.int64)
        outside = sorted(set(labels[(labels < 0) | (labels >= len(vocab))].tolist()))
        if outside:
            raise ValueError(f"{name} has class indices the learner's {len(vocab)} classes do not cover: "
                             f'{few(outside)}. Pass indices into learn.dls.vocab (0 to {len(vocab) - 1}) or labels as '
                             'they appear in it.')
        if not predicted and _numbers_out_of_order(vocab):
            raise ValueError(f'{name} holds integers, which are read as indices into the vocab, but the vocab holds '
                             f'numbers in another order ({few(vocab)}), so they are ambiguous. Pass the labels as they '
                             'appear in the vocab (e.g. `y.astype(str)`), or `np.array(vocab)[indices]`.')
        return labels.astype(np.int64)
    if vocab is None:
        raise ValueError(f'{name} holds labels ({few(labels[:5].tolist())}), not class indices: pass the vocab '
                         '(learn.dls.vocab) to look them up.')
    label_to_index = {label: i for i, label in enumerate(vocab)}
    missing = sorted({label for label in labels.tolist() if label not in label_to_index}, key=str)
    if missing:
        raise ValueError(f"{name} has labels the learner's vocab does not cover: {few(missing)} (vocab: "
                         f'{few(vocab)}). Use a learner trained with these classes, or leave those items out with '
                         '`mask`.')
    return np.array([label_to_index[label] for label in labels.tolist()], dtype=np.int64)


def mask_indices(mask, n_items: int) -> np.ndarray:
    "Indices of the items `mask` selects: a boolean array with one entry per item, or a list of indices"
    if mask is None: return np.arange(n_items)
    mask = as_array(mask)
    if mask.dtype == bool:
        if mask.shape != (n_items,):
            raise ValueError(f'A boolean mask needs one entry per test item ({n_items}), got {len(mask)}.')
        indices = np.flatnonzero(mask)
    elif np.issubdtype(mask.dtype, np.integer) or mask.size == 0: indices = mask.astype(np.int64)
    else: raise TypeError(f'mask must be a boolean array or a list of item indices, got values of type {mask.dtype}.')
    outside = sorted(set(indices[(indices < 0) | (indices >= n_items)].tolist()))
    if outside: raise ValueError(f'mask has item indices outside 0..{n_items - 1}: {few(outside)}.')
    if not indices.size:
        raise ValueError('The mask selects no test items, so there is nothing to score: check the classes given to '
                         '`class_mask` (and `invert`), or pass mask=None to score every item.')
    return indices
