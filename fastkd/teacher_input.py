"""`TeacherInput`: a teacher's own input size and normalisation, whatever the student's.

A user's teacher is rarely trained on the student's inputs: a timm or torchvision model pretrained at 224 px with
ImageNet statistics, or a `Learner` trained at 64 px, while the student runs at the smallest size that serves.
`TeacherInput(size, mean, std).adapt(xb, student_stats)` makes the student's batch what the teacher takes: it undoes
the student's normalisation (the statistics of its DataLoaders' `Normalize`), resizes the images on their device
(bilinear, antialiased when shrinking) and normalises them with the teacher's statistics.
`teacher_input_of(teacher)` reads them from a `Learner` teacher's own DataLoaders (its `Normalize` and the size of its
inputs) or from a timm model's `pretrained_cfg` (`input_size`, `mean`, `std`; timm itself is never imported), and is
None for other teachers: they get the student's batch as it is.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from fastai.data.load import DataLoader
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from torch import Tensor, nn

from .basics import sample_batch, user_loader

__all__ = ['TeacherInput', 'teacher_input_of', 'input_stats', 'AdaptedTeacher']

Stats = tuple[tuple[float, ...], tuple[float, ...]]
RAW: Stats = ((0.,), (1.,))  # images in [0, 1], not normalised


def input_stats(dl: DataLoader) -> Stats | None:
    "The (mean, std) per channel of the `Normalize` among `dl`'s batch transforms, or None where it has none"
    pipeline = getattr(user_loader(dl), 'after_batch', None)
    norm = next((t for t in getattr(pipeline, 'fs', []) if isinstance(t, Normalize)), None)
    if norm is None or getattr(norm, 'mean', None) is None: return None
    return tuple(torch.as_tensor(norm.mean).flatten().tolist()), tuple(torch.as_tensor(norm.std).flatten().tolist())


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    "Whether two tuples of statistics are equal (a single value stands for every channel), to float32 rounding"
    n = max(len(a), len(b))
    a, b = a * n if len(a) == 1 else a, b * n if len(b) == 1 else b
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-7) for x, y in zip(a, b))


class TeacherInput:
    """What a teacher takes: images of `size` (an int or (height, width); None: the student's size) normalised with
    `mean` and `std` per channel (None: the student's normalisation; `mean=0, std=1`: images in [0, 1], unnormalised).
    `adapt(x, student_stats)` turns a batch of the student's images into that."""
    def __init__(self, size: int | Sequence[int] | None = None, mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None):
        if (mean is None) != (std is None):
            raise ValueError('TeacherInput takes both mean and std (the normalisation the teacher was trained with), '
                             'or neither (the student\'s).')
        self.size = None if size is None else (int(size), int(size)) if isinstance(size, (int, float)) else \
            tuple(int(s) for s in size)[-2:]
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f'size is the teacher\'s image size, an int or (height, width), got {size!r}.')
        def stats(v): return None if v is None else tuple(float(x) for x in ([v] if isinstance(v, (int, float)) else v))
        self.mean, self.std, self._tensors = stats(mean), stats(std), {}
        if self.std is not None and (len(self.mean) != len(self.std) or min(self.std) <= 0):
            raise ValueError(f'mean and std have one value per channel (std above 0): got {self.mean} and {self.std}.')

    def __repr__(self) -> str:
        def short(v): return tuple(round(x, 4) for x in v)
        parts = ([f'size={self.size}'] if self.size is not None else []) + \
                ([f'mean={short(self.mean)}, std={short(self.std)}'] if self.mean is not None else [])
        return f'TeacherInput({", ".join(parts)})'

    def __getstate__(self): return {**self.__dict__, '_tensors': {}}  # pickles and copies make theirs again

    @property
    def identity(self) -> dict:
        """What it is, as JSON holds it (lists), the statistics to 6 decimals: those a `Normalize` keeps in float32 are
        the same as those given"""
        def listed(v, digits=None): return None if v is None else [x if digits is None else round(x, digits) for x in v]
        return dict(size=listed(self.size), mean=listed(self.mean, 6), std=listed(self.std, 6))

    def __eq__(self, other) -> bool: return isinstance(other, TeacherInput) and self.identity == other.identity

    def __hash__(self) -> int: return hash(repr(self.identity))

    def changes(self, shape: Sequence[int], student_stats: Stats | None) -> bool:
        "Whether images of `shape` normalised with `student_stats` (None: not normalised) differ from the teacher's"
        mean, std = student_stats or RAW
        resize = self.size is not None and tuple(shape[-2:]) != self.size
        return resize or (self.mean is not None and not (_same(self.mean, mean) and _same(self.std, std)))

    def adapt(self, x: Tensor, student_stats: Stats | None = None) -> Tensor:
        """The student's images `x` (batch, channels, height, width), normalised with `student_stats` (mean, std; None:
        not normalised), as the teacher takes them: unnormalised, resized (bilinear, antialiased when shrinking) and
        normalised with the teacher's statistics; `x` itself when nothing changes"""
        if not self.changes(x.shape, student_stats): return x
        if x.ndim != 4:
            raise ValueError(f'TeacherInput resizes and normalises images (batch, channels, height, width), and the '
                             f'teacher\'s input has shape {tuple(x.shape)}: pass teacher_input=None for other inputs.')
        images = x.float()
        if student_stats is not None: images = images * self._per_channel(student_stats[1], x) + \
            self._per_channel(student_stats[0], x)
        if self.size is not None and tuple(images.shape[-2:]) != self.size:
            shrink = self.size[0] < images.shape[-2] or self.size[1] < images.shape[-1]
            images = F.interpolate(images, size=self.size, mode='bilinear', align_corners=False, antialias=shrink)
        mean, std = (self.mean, self.std) if self.mean is not None else student_stats or (None, None)
        if mean is not None: images = (images - self._per_channel(mean, x)) / self._per_channel(std, x)
        return images.to(x.dtype)

    def _per_channel(self, values: tuple[float, ...], x: Tensor) -> Tensor:
        """`values` as a (1, channels, 1, 1) tensor on `x`'s device (one value: every channel), made once per device: a
        copy to a GPU at every step would wait for it"""
        if len(values) not in (1, x.shape[1]):
            raise ValueError(f'The normalisation has {len(values)} values per channel and the images {x.shape[1]} '
                             'channels: pass the statistics the teacher was trained with, one per channel.')
        key = (values, x.device)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(values, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return self._tensors[key]


def _loader_size(dl: DataLoader) -> tuple[int, int] | None:
    "The height and width of `dl`'s images: one item through its pipelines, or the `size` of its item transforms"
    dl = user_loader(dl)
    if len(dl.dataset):
        x = sample_batch(dl, 1)[0]
        return tuple(x.shape[-2:]) if x.ndim == 4 else None
    # an exported Learner's empty loaders: the last size its transforms give, batch transforms (aug_transforms(size=))
    # after item ones; fastai's item transforms keep theirs as (width, height)
    sizes = [(tuple(t.size[::-1]) if isinstance(t.size, tuple) else t.size) if name == 'after_item' else t.size
             for name in ('after_item', 'after_batch') for t in getattr(getattr(dl, name, None), 'fs', [])
             if getattr(t, 'size', None) is not None]
    if not sizes: return None
    return (sizes[-1], sizes[-1]) if isinstance(sizes[-1], int) else tuple(sizes[-1])[-2:]


def teacher_input_of(teacher) -> TeacherInput | None:
    """What `teacher` takes: a `Learner`'s own DataLoaders (the normalisation of its `Normalize`, none meaning images
    in [0, 1], and the size of its validation images), or a model's timm `pretrained_cfg` (`input_size`, `mean`,
    `std`); None for other models, and for inputs that are not images"""
    if isinstance(teacher, Learner):
        dl = teacher.dls.valid if len(teacher.dls.valid.dataset) else teacher.dls.train
        size = _loader_size(dl)
        return None if size is None else TeacherInput(size, *(input_stats(dl) or RAW))  # None: not images
    cfg = getattr(teacher, 'pretrained_cfg', None) or getattr(teacher, 'default_cfg', None)
    if isinstance(cfg, dict) and cfg.get('input_size'):
        return TeacherInput(cfg['input_size'][-2:], cfg.get('mean'), cfg.get('std'))
    return None


class AdaptedTeacher(nn.Module):
    """`model` behind its `TeacherInput`: it takes the student's images (normalised with `student_stats`) and adapts
    them first. For scoring or predicting with a teacher on the student's data, as the main job scores its teacher"""
    def __init__(self, model: nn.Module, teacher_input: TeacherInput, student_stats: Stats | None):
        super().__init__()
        self.model, self.teacher_input, self.student_stats = model, teacher_input, student_stats

    def forward(self, x: Tensor, *args): return self.model(self.teacher_input.adapt(x, self.student_stats), *args)


def teacher_inputs(teachers: Sequence, teacher_input) -> list[TeacherInput | None]:
    """One `TeacherInput` (None: the student's batch as it is) per teacher of `teachers` (models or `Learner`s), from
    `teacher_input`: 'auto' (`teacher_input_of` each), None, a `TeacherInput` for all, or a list of one per teacher"""
    if isinstance(teacher_input, str):
        if teacher_input != 'auto':
            raise ValueError(f"teacher_input is 'auto', None, a TeacherInput or a list of them, got {teacher_input!r}.")
        return [teacher_input_of(t) for t in teachers]
    given = list(teacher_input) if isinstance(teacher_input, (list, tuple)) else [teacher_input] * len(teachers)
    if len(given) != len(teachers):
        raise ValueError(f'teacher_input lists {len(given)} inputs for {len(teachers)} teachers: give one per teacher, '
                         'or one for all.')
    if not all(t is None or isinstance(t, TeacherInput) for t in given):
        raise TypeError("teacher_input is 'auto', None, a TeacherInput (e.g. TeacherInput(size=224, "
                        'mean=imagenet_stats[0], std=imagenet_stats[1])) or a list of them.')
    return given


def adapted(xb: tuple, teacher_input: TeacherInput | None, student_stats: Stats | None) -> tuple:
    "The inputs `xb` as the teacher takes them: the first (the images) adapted by `teacher_input`, the others as given"
    return xb if teacher_input is None else (teacher_input.adapt(xb[0], student_stats), *xb[1:])
