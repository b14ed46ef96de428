"""`TeacherMemo`: a frozen teacher's outputs kept by the exact bytes of what it was fed, so that runs that feed it the
same batches (`kd_find`'s trials of one seed) pay for its forward once.

The key of a forward is a BLAKE2 digest of every tensor it receives (bytes, dtype, shape), of its other arguments, of
the autocast dtype and of the layout of the teacher's weights and of the inputs (dtype, device, strides:
channels-last convolutions round differently). Any other input (a MixUp draw, another augmentation) is another key:
its output is the teacher's own, never a neighbour's. Forwards in training mode or with gradients, and recurrent
teachers (with `reset`), whose output hangs on a state, are never kept."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .basics import teacher_model

__all__ = ['TeacherMemo']


def _digested(digest, value) -> bool:
    "Feed `value` (tensors, numbers, strings and lists, tuples and dicts of them) to `digest`; False for anything else"
    if isinstance(value, Tensor):
        digest.update(repr((value.dtype, value.device.type, tuple(value.shape), value.stride())).encode())  # layout
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
    "A copy of the tensors of `output`, detached, in the same structure (named tuples, lists, dicts of them)"
    if isinstance(output, Tensor): return output.detach().clone()
    if isinstance(output, tuple) and hasattr(output, '_fields'): return type(output)(*map(_copied, output))
    if isinstance(output, (list, tuple)): return type(output)(map(_copied, output))
    if isinstance(output, dict): return type(output)((k, _copied(v)) for k, v in output.items())
    return output


def _n_bytes(output) -> int:
    "Bytes held by the tensors of `output`"
    if isinstance(output, Tensor): return output.numel() * output.element_size()
    if isinstance(output, dict): output = list(output.values())
    return sum(map(_n_bytes, output)) if isinstance(output, (list, tuple)) else 0


class TeacherMemo:
    """While entered, `teacher` (a model or a `Learner`) answers a forward it has seen from memory: at most `max_gib`
    of outputs are kept (beyond that, forwards run and are not kept). While a hook is on the teacher or one of its
    layers (hints, a user's callback), every forward runs, so the hook sees it, and is kept. The key holds the version
    of every weight and buffer, so a teacher changed in place (an EMA step, `load_state_dict`) is another key; values
    swapped in through `.data` keep their version and are not seen. `computed` and `reused` count forwards; `active`
    says whether it is installed (never for a recurrent teacher). The key copies each input to the host: on a GPU, a
    wait per forward, which a large teacher's forward repays and a small one's may not."""
    def __init__(self, teacher, max_gib: float = 2.):
        self.teacher, self.max_bytes = teacher_model(teacher), max_gib * 2**30
        self.outputs, self.n_bytes, self.computed, self.reused = {}, 0, 0, 0

    def __enter__(self) -> TeacherMemo:
        self.own_forward = vars(self.teacher).get('forward')  # a forward set on the instance, put back on exit
        self.forward = self.own_forward or type(self.teacher).forward.__get__(self.teacher)
        self.active = not callable(getattr(self.teacher, 'reset', None))  # a recurrent teacher: never kept
        if self.active: self.teacher.forward = self._forward
        return self

    def forget(self):
        "Drop the kept outputs (e.g. when no later forward will see their inputs again)"
        self.outputs, self.n_bytes = {}, 0

    def __exit__(self, *exc):
        if self.own_forward is not None: self.teacher.forward = self.own_forward
        else: vars(self.teacher).pop('forward', None)
        self.forget()

    def _key(self, args: tuple, kwargs: dict) -> bytes | None:
        "The digest of this forward, or None where its output may not be kept"
        if self.teacher.training or torch.is_grad_enabled(): return None
        digest = hashlib.blake2b(digest_size=20)
        weights = [*self.teacher.parameters(), *self.teacher.buffers()]
        # their layout (channels-last convolutions round otherwise) and the version of their values (in-place changes)
        layout = [(w.dtype, w.device.type, w.stride(), w._version) for w in weights]
        device = weights[0].device.type if weights else 'cpu'
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        digest.update(repr((layout, autocast)).encode())
        return digest.digest() if _digested(digest, [list(args), kwargs]) else None

    def _hooked(self) -> bool:
        "Whether a hook reads the teacher's layers as it runs (hints, a user's callback): then it must run"
        return bool(_global_forward_hooks or _global_forward_pre_hooks) or any(
            m._forward_hooks or m._forward_pre_hooks for m in self.teacher.modules())

    def _forward(self, *args, **kwargs):
        key = self._key(args, kwargs)
        if key in self.outputs and not self._hooked():
            self.reused += 1
            return _copied(self.outputs[key])  # a loss that changes its input in place changes a copy
        self.computed += 1
        output = self.forward(*args, **kwargs)
        n_bytes = _n_bytes(output)
        if key is not None and key not in self.outputs and self.n_bytes + n_bytes <= self.max_bytes:
            self.outputs[key], self.n_bytes = _copied(output), self.n_bytes + n_bytes
        return output
