"""`TeacherCache`: offline distillation, the teacher's output for each training item computed once and reused.

When the training inputs are the same every epoch (no random augmentation), the teacher's output for an item
never changes: the cache stores it on the CPU the first time the item is seen and hands it back in later epochs,
so a heavy teacher costs one pass over the training set instead of one per epoch.
Outputs are keyed by the item's index in the dataset, read from the order fastai's `DataLoader` drew for the
epoch, and each is stored with a fingerprint of its input that is checked when the output is reused.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from fastai.callback.mixup import MixHandler
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.torch_core import find_bs
from fastai.vision.augment import RandTransform, Resize
from fastcore.basics import store_attr
from torch import Tensor, nn

from .basics import user_loader

__all__ = ['TeacherCache', 'random_augmentations']

_PIPELINES = ('after_item', 'before_batch', 'after_batch')


def _transforms(dl: DataLoader) -> list[tuple[str, object]]:
    "The item and batch transforms of `dl`, each with the name of its pipeline"
    return [(name, tfm) for name in _PIPELINES for tfm in getattr(getattr(user_loader(dl), name, None), 'fs', [])]


def random_augmentations(learn: Learner) -> list[str]:
    """What gives an item a different input from one training epoch to the next: fastai `RandTransform`s of the
    training loader (with a probability above 0), and `MixHandler` callbacks (MixUp, CutMix).
    `Resize` is left out: it only crops or pads at a random place when an image is not of its aspect ratio."""
    found = [f'{type(tfm).__name__} (dls.train.{name})' for name, tfm in _transforms(learn.dls.train)
             if isinstance(tfm, RandTransform) and not isinstance(tfm, Resize) and tfm.p > 0]
    return found + [f'{type(cb).__name__} (callback)' for cb in learn.cbs if isinstance(cb, MixHandler)]


def _fingerprints(xb: tuple) -> Tensor:
    "One number per item of `xb` that changes when its input does: the input's projection on a fixed random direction"
    total = 0.
    for x in xb:
        x = x.flatten(1).float()
        direction = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0)).to(x.device)
        total = total + x @ direction / math.sqrt(x.shape[1])
    return total.cpu()


def _teachers_signature(teachers: list[nn.Module]) -> list:
    "Which teachers these are and what their weights sum to, tensor by tensor: it changes when a teacher does"
    return [(id(t), [float(v.double().sum()) for v in t.state_dict().values() if v.is_floating_point()])
            for t in teachers]


def _same_teachers(a: list, b: list) -> bool:
    "Whether two `_teachers_signature`s match (the sums allow for the rounding of another device)"
    return len(a) == len(b) and all(id_a == id_b and len(sa) == len(sb) and all(map(math.isclose, sa, sb))
                                    for (id_a, sa), (id_b, sb) in zip(a, b))


class TeacherCache:
    """The teacher's output for each training item, computed at the item's first training step and reused after.

    Outputs are stored on the CPU in float32 by default: exactly what the teacher gave, so a cached run trains
    as an uncached one does, for 4 bytes per output value (GTSRB, 39,209 items x 43 classes: 6.7 MB;
    ImageNet-1k: 5.1 GB, where `dtype=torch.float16` halves it at about 3 significant digits, fine for
    temperatures of 1 and above). An item's output is computed with the teacher once, when a batch holds it
    and it is not stored yet, so `lr_find` or a cancelled epoch leave valid outputs for the items they saw and
    nothing for the others. The cache refills after a change of the training dataset (its object or length),
    of the transform objects, or of a teacher (its object or its weights). With `allow_random=False`, a random
    augmentation is refused before training, and an item whose input differs from the one its output was
    computed from stops training with an error: that catches in-place changes of data or transforms.
    `allow_random=True` reuses the output of each item's first view for all its later views instead.
    `max_gib` bounds the memory the stored outputs may take."""

    def __init__(self, allow_random: bool = False, dtype: torch.dtype = torch.float32, max_gib: float = 8.):
        store_attr()
        self.reset()

    def reset(self):
        "Forget every stored output"
        self.outputs = self.stored = self.inputs = self.source = None

    def __getstate__(self):
        "Pickles (`learn.export`) keep the settings and no stored output"
        return {**self.__dict__, 'outputs': None, 'stored': None, 'inputs': None, 'source': None}

    def prepare(self, learn: Learner, teachers: list[nn.Module]):
        "Before a fit's first step: refuse random augmentation; forget the outputs stored for other data or teachers"
        randoms = random_augmentations(learn)
        if randoms and not self.allow_random:
            raise ValueError(
                f'The teacher cache needs each training item to have the same input in every epoch, but these draw '
                f'random numbers: {", ".join(randoms)}. A cached output would be paired with views the teacher never '
                'saw. Train without them to use the cache (e.g. no `batch_tfms`, no MixUp), or keep cache=False to run '
                'the teacher on every view, or pass cache=TeacherCache(allow_random=True) to reuse the output of '
                "each item's first view.")
        dl = user_loader(learn.dls.train)
        if not dl.indexed or dl.bs is None:
            raise ValueError('The teacher cache keys outputs by dataset index: it needs a training DataLoader over an '
                             'indexed dataset, with a batch size. Use cache=False for iterable or pre-batched data.')
        data = id(dl.dataset), len(dl.dataset), [id(tfm) for _, tfm in _transforms(dl)]
        teachers = _teachers_signature(teachers)
        if self.source is None or self.source[0] != data or not _same_teachers(self.source[1], teachers): self.reset()
        self.source = data, teachers

    def batch_items(self, learn: Learner, n: int) -> Tensor:
        "Dataset indices of the `n` items of training batch `learn.iter`, from the order the loader drew this epoch"
        dl = learn.dl
        order = getattr(dl, '_DataLoader__idxs', None)  # set by `DataLoader.__iter__` before the first batch
        items = order[learn.iter * dl.bs:learn.iter * dl.bs + n] if order is not None else []
        if len(items) != n:
            raise RuntimeError(f'The teacher cache cannot tell which items training batch {learn.iter} holds: it '
                               f'follows the item order of fastai DataLoaders. Use cache=False with this loader.')
        return torch.as_tensor(items, dtype=torch.long)

    def _allocate(self, n_items: int, shape: torch.Size):
        "Room for an output of `shape` per item"
        gib = n_items * math.prod(shape) * self.dtype.itemsize / 2**30
        if gib > self.max_gib:
            raise MemoryError(f'Caching the teacher outputs would take {gib:.1f} GiB ({n_items} items x '
                              f'{tuple(shape)} in {self.dtype}), more than max_gib={self.max_gib}: pass '
                              'TeacherCache(dtype=torch.float16) or a larger max_gib, or use cache=False.')
        self.outputs = torch.zeros(n_items, *shape, dtype=self.dtype)
        self.stored, self.inputs = torch.zeros(n_items, dtype=torch.bool), torch.zeros(n_items)

    def __call__(self, learn: Learner, xb: tuple, forward: Callable[[tuple], Tensor]) -> Tensor:
        "The teacher's output for the training batch `xb`: stored outputs, and `forward` on the items not stored yet"
        if self.source is None: raise RuntimeError('TeacherCache.prepare must run before the cache is used.')
        n = find_bs(xb)
        items, fingerprints = self.batch_items(learn, n), _fingerprints(xb)
        stored = self.stored[items] if self.outputs is not None else torch.zeros(n, dtype=torch.bool)
        if stored.any() and not self.allow_random: self._check_inputs(items[stored], fingerprints[stored])
        if not stored.all():
            new = ~stored
            output = forward(xb if new.all() else tuple(x[new.to(x.device)] for x in xb))
            if self.outputs is None: self._allocate(len(learn.dl.dataset), output.shape[1:])
            self.outputs[items[new]] = output.detach().to('cpu', self.dtype)
            self.stored[items[new]], self.inputs[items[new]] = True, fingerprints[new]
        return self.outputs[items].to(xb[0].device, torch.float32)

    def _check_inputs(self, items: Tensor, fingerprints: Tensor):
        "An error if the inputs of stored `items` differ from those their outputs were computed from"
        changed = ~torch.isclose(fingerprints, self.inputs[items], rtol=1e-4, atol=1e-4)
        if changed.any():
            raise RuntimeError(
                f'The inputs of training items {items[changed][:5].tolist()} changed since the teacher output was '
                'cached for them: a transform draws random numbers (e.g. Resize cropping images of another aspect '
                'ratio at random; use ResizeMethod.Squish), or the data or its transforms were changed in place. '
                'Remove the randomness, or call `cache.reset()` after changing data, or pass '
                'cache=TeacherCache(allow_random=True) to reuse the first output of each item.')
