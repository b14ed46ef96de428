"""The `KnowledgeDistillation` callback and `load_teacher`, which builds a frozen teacher from a weights file."""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner, Recorder
from fastai.vision.learner import create_vision_model
from fastcore.basics import store_attr
from fastcore.foundation import L
from torch import Tensor, nn

from .losses import SoftTarget

__all__ = ['KnowledgeDistillation', 'load_teacher']


def _teacher_model(teacher) -> nn.Module:
    "The frozen model behind `teacher`: an `nn.Module`, or the model of a fastai `Learner`"
    if isinstance(teacher, Learner): teacher = teacher.model
    if not isinstance(teacher, nn.Module):
        raise TypeError(f'A teacher must be a torch `nn.Module` or a fastai `Learner`, got {type(teacher).__name__}. '
                        'Pass the trained model (or the Learner that holds it), or a list of them for an ensemble.')
    for param in teacher.parameters(): param.grad = None  # gradients left from its own training
    return teacher.eval().requires_grad_(False)


def _make_loss(loss) -> Callable:
    "An instance of `loss` if it is a loss class or a partial of one, else `loss` itself"
    is_class = isinstance(loss, type) or (isinstance(loss, partial) and isinstance(loss.func, type))
    return loss() if is_class else loss


def _takes_target(loss: Callable) -> bool:
    "Whether `loss` accepts a third positional argument, the target"
    try: params = inspect.signature(loss).parameters.values()
    except (TypeError, ValueError): return True
    if any(p.kind == p.VAR_POSITIONAL for p in params): return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


class KnowledgeDistillation(Callback):
    """Train the learner's model to follow a frozen `teacher` as well as the labels:
    the training loss becomes `(1 - weight) * loss + weight * distillation_loss(student_logits, teacher_logits, y)`.
    `teacher` is an `nn.Module`, a `Learner`, or a list of them (an ensemble: its probabilities are averaged).
    `weight` is a number or a schedule of training progress (e.g. `SchedLin(0, 0.5)`).
    The teacher runs in training steps only; validation, `get_preds`, `tta` and `valid_loss` are the learner's own."""
    order, run_valid, beta = Recorder.order + 1, False, 0.98  # after Recorder sets its columns, before ProgressCallback prints them

    def __init__(self, teacher, loss=SoftTarget, weight: float | Callable = 0.5, from_learner: bool | None = None):
        "`from_learner` is accepted for older code and not needed: a `Learner` teacher is detected"
        teachers = teacher if isinstance(teacher, (list, tuple)) else [teacher]
        self.teachers = [_teacher_model(t) for t in teachers]
        if not callable(weight) and not 0 <= weight <= 1:
            raise ValueError(f'weight must be between 0 and 1 (or a schedule of training progress), got {weight}')
        self.kd_loss = _make_loss(loss)
        self.kd_loss_takes_target = _takes_target(self.kd_loss)
        store_attr('weight')

    def __getstate__(self):
        "Leave the teachers out of pickles: `learn.export` stores the student alone"
        return {**self.__dict__, 'teachers': None}

    def before_fit(self):
        "Add the loss parts to the Recorder's columns"
        self.smooth_parts, self.n_batches = 0., 0
        if hasattr(self.learn, 'recorder') and 'train_loss' in self.recorder.metric_names:
            names = self.recorder.metric_names
            at = names.index('train_loss') + 1
            self.recorder.metric_names = names[:at] + ['train_ce', 'train_kd'] + names[at:]

    def before_train(self):
        "Move the teachers to the student's device and dtype"
        if any(isinstance(cb, GradientAccumulation) for cb in self.learn.cbs):
            raise ValueError('KnowledgeDistillation does not support GradientAccumulation yet (it scales the loss before '
                             'the distillation term is mixed in): remove one of them, e.g. use a smaller batch size.')
        if self.teachers is None:
            raise RuntimeError('This KnowledgeDistillation callback came from an exported learner, which never stores '
                               'the teacher: set `learn.knowledge_distillation.teachers = [teacher_model]` to train again.')
        param = next(self.model.parameters())
        for teacher in self.teachers: teacher.to(device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def teacher_logits(self, xb: tuple) -> Tensor:
        "Logits of the teacher for `xb`; for an ensemble, the log of its averaged probabilities"
        autocast = getattr(getattr(self.learn, 'mixed_precision', None), 'autocast', None) or nullcontext()
        with autocast: logits = [teacher.eval()(*xb).float() for teacher in self.teachers]
        if len(logits) == 1: return logits[0]
        return torch.stack([l.softmax(dim=-1) for l in logits]).mean(dim=0).log()

    def after_loss(self):
        "Mix the distillation loss into the loss that is backpropagated"
        teacher_logits = self.teacher_logits(self.xb)
        if teacher_logits.shape != self.pred.shape:
            raise ValueError(f'Teacher and student outputs differ: teacher {tuple(teacher_logits.shape)}, student '
                             f'{tuple(self.pred.shape)}. Both must predict the same classes: build the student with '
                             f'n_out={teacher_logits.shape[-1]} (or use a teacher trained on these classes).')
        if not torch.isfinite(teacher_logits).all():
            raise ValueError(f'The teacher gave non-finite logits (nan or inf) at training batch {self.iter} of epoch '
                             f'{self.epoch}: check its weights and the input normalisation.')
        base_loss = self.loss_grad
        kd_loss = self.kd_loss(self.pred, teacher_logits, *(self.yb if self.kd_loss_takes_target else ()))
        weight = self.weight(self.pct_train) if callable(self.weight) else self.weight
        self.learn.loss_grad = (1 - weight) * base_loss + weight * kd_loss
        self.learn.loss = self.loss_grad.clone()
        self.n_batches += 1  # debiased moving average of both parts, as Recorder smooths train_loss
        parts = torch.stack([base_loss, kd_loss]).detach().float()
        self.smooth_parts = self.beta * self.smooth_parts + (1 - self.beta) * parts

    def after_train(self):
        "Log the smoothed loss parts next to `train_loss`"
        if hasattr(self.learn, 'recorder') and not self.recorder.cancel_train and self.n_batches:
            self.recorder.log += (self.smooth_parts / (1 - self.beta**self.n_batches)).tolist()


def load_teacher(path: str | Path, arch: Callable | nn.Module, n_out: int | None = None, **kwargs) -> nn.Module:
    """A frozen teacher: `arch` (a model, or an architecture such as `resnet34` built by
    `create_vision_model(arch, n_out, pretrained=False, **kwargs)`) with the weights of the state dict at `path`.
    Loads with `torch.load(weights_only=True)`; files from `learn.save` (weights and optimizer) work too."""
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f'No teacher weights at {path}: pass the path of a saved state dict.')
    if isinstance(arch, nn.Module): model = arch
    elif n_out is None: raise ValueError('n_out is needed to build the teacher from an architecture: pass its class count.')
    else: model = create_vision_model(arch, n_out, pretrained=False, **kwargs)
    with torch.serialization.safe_globals([L]):  # fastcore's list, in the optimizer state that learn.save adds
        state = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and set(state) == {'model', 'opt'}: state = state['model']  # learn.save(with_opt=True)
    try: result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f'The weights in {path} do not fit the teacher architecture (is n_out right?): {e}') from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f'The weights in {path} do not match the teacher architecture. '
                         f'Missing keys: {_few(result.missing_keys)}. Unexpected keys: {_few(result.unexpected_keys)}.')
    return _teacher_model(model)


def _few(keys: list[str], n: int = 5) -> str:
    "At most `n` of `keys`, and how many more"
    if not keys: return 'none'
    return ', '.join(keys[:n]) + (f' (and {len(keys) - n} more)' if len(keys) > n else '')
