"""`TeacherMemo`: a frozen teacher's outputs kept by the exact bytes of what it was fed, so that runs that feed it the
same batches (`kd_find`'s trials of one seed) pay for its forward once.

The key of a forward is a BLAKE2 digest of every tensor it receives (bytes, dtype, shape), of its other arguments, of
the autocast dtype and of the layout of the teacher's weights (dtype, device, strides: channels-last convolutions
round differently). Any other input (a MixUp draw, another augmentation) is another key: its output is the teacher's
own, never a neighbour's. Forwards in training mode or with gradients, and recurrent teachers (with `reset`), whose
output hangs on a state, are never kept."""
from __future__ import annotations

import hashlib

import torch
from fastai.torch_core import apply
from torch import Tensor, nn

from .basics import teacher_model

__all__ = ['TeacherMemo']


def _digested(digest, value) -> bool:
    "Feed `value` (tensors, numbers, strings and lists, tuples and dicts of them) to `digest`; False for anything else"
    if isinstance(value, Tensor):
        digest.update(repr((value.dtype, tuple(value.shape))).encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # on a GPU: a copy, a wait
        return True
    if value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f'{type(value).__name__}:{value!r};'.encode())
        return True
    if isinstance(value, dict): value = [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple)):
        digest.update(f'{type(value).__name__}[{len(value)}]'.encode())
        return all(_digested(digest, v) for v in value)
    return False


def _copied(output):
    "A copy of the tensors of `output`, detached, in the same structure"
    return apply(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, output)


def _n_bytes(output) -> int:
    "Bytes held by the tensors of `output`"
    sizes = []
    apply(lambda t: sizes.append(t.numel() * t.element_size()) if isinstance(t, Tensor) else None, output)
    return sum(sizes)


class TeacherMemo:
    """While entered, `teacher` (a model or a `Learner`) answers a forward it has seen from its memory: at most `max_gib`
    of outputs are kept (beyond that, forwards run and are not kept). `compute_always=True` runs every forward (hooks on
    the teacher's layers then fire, as hints need) and still keeps the outputs. `computed` and `reused` count forwards"""
    def __init__(self, teacher, max_gib: float = 2.):
        self.teacher, self.max_bytes = teacher_model(teacher), max_gib * 2**30
        self.outputs, self.n_bytes, self.computed, self.reused, self.compute_always = {}, 0, 0, 0, False

    def __enter__(self) -> TeacherMemo:
        self.own_forward = vars(self.teacher).get('forward')  # a forward set on the instance, put back on exit
        self.forward = self.own_forward or type(self.teacher).forward.__get__(self.teacher)
        if not callable(getattr(self.teacher, 'reset', None)): self.teacher.forward = self._forward
        return self

    def __exit__(self, *exc):
        if self.own_forward is not None: self.teacher.forward = self.own_forward
        else: vars(self.teacher).pop('forward', None)
        self.outputs, self.n_bytes = {}, 0

    def _key(self, args: tuple, kwargs: dict) -> bytes | None:
        "The digest of this forward, or None where its output may not be kept"
        if self.teacher.training or torch.is_grad_enabled(): return None
        digest = hashlib.blake2b(digest_size=20)
        weights = next(self.teacher.parameters(), None)
        layout = None if weights is None else (weights.dtype, weights.device.type, weights.stride())
        autocast = torch.get_autocast_dtype(weights.device.type) if weights is not None and \
            torch.is_autocast_enabled(weights.device.type) else None
        digest.update(repr((layout, autocast)).encode())
        return digest.digest() if _digested(digest, [list(args), kwargs]) else None

    def _forward(self, *args, **kwargs):
        key = self._key(args, kwargs)
        if key in self.outputs and not self.compute_always:
            self.reused += 1
            return _copied(self.outputs[key])  # a loss that changes its input in place changes a copy
        self.computed += 1
        output = self.forward(*args, **kwargs)
        if key is not None and key not in self.outputs and self.n_bytes + _n_bytes(output) <= self.max_bytes:
            self.outputs[key] = _copied(output)
            self.n_bytes += _n_bytes(output)
        return output
