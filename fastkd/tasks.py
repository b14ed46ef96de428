"""What a learner predicts, read from its loss function, and what distillation loss fits it.

`task_of(loss_func)` tells single-label classification (cross-entropy over a class axis: images, tabular, text,
and per-pixel segmentation), multi-label classification (BCE with logits) and regression (MSE, L1, ...).
The callback uses it to pick a distillation loss, to refuse one that cannot be right, and to lay dense outputs
out as one item per position before a logit loss sees them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from fastai.callback.mixup import MixHandler
from fastai.losses import BaseLoss, FocalLoss, LabelSmoothingCrossEntropy
from torch import Tensor, nn

from .losses import BinarySoftTarget, LogitMSE, SoftTarget

__all__ = ['Task', 'task_of']

_CATEGORICAL = (nn.CrossEntropyLoss, LabelSmoothingCrossEntropy, FocalLoss)
_BINARY = (nn.BCEWithLogitsLoss,)
_REGRESSION = {nn.MSELoss: 'mse', nn.L1Loss: 'l1', nn.SmoothL1Loss: 'smooth_l1', nn.HuberLoss: 'huber'}


@dataclass(frozen=True)
class Task:
    "The kind of prediction a loss function expects (`categorical`, `binary`, `regression` or `unknown`), and its class axis"
    kind: str
    axis: int = 1
    column: str = 'train_base'  # the Recorder column of the learner's own loss

    def default_loss(self) -> nn.Module:
        "The distillation loss that fits this task"
        if self.kind == 'unknown':
            raise ValueError("fastkd cannot tell what this learner's loss function predicts, so it picks no "
                             "distillation loss: pass one, e.g. KnowledgeDistillation(teacher, SoftTarget(T=4)) for "
                             "classification, BinarySoftTarget() for multi-label, LogitMSE() for regression.")
        return {'categorical': SoftTarget, 'binary': BinarySoftTarget, 'regression': LogitMSE}[self.kind]()

    def check(self, kd_loss: Callable, n_outputs: int | None = None):
        "Refuse a distillation loss that cannot be right for this task (`n_outputs`: size of the class axis)"
        over = getattr(kd_loss, 'over', None)  # what a fastkd loss normalises over: 'classes', 'labels' or None
        name = type(kd_loss).__name__
        if over and (self.kind == 'regression' or n_outputs == 1):
            raise ValueError(f'{name} turns outputs into probabilities, which a regression output (or a single '
                             'output column) does not have: distillation would do nothing. Use LogitMSE().')
        if over == 'classes' and self.kind == 'binary':
            raise ValueError(f'{name} takes a softmax across labels, but this learner is multi-label (BCE with '
                             'logits): labels are not exclusive. Use BinarySoftTarget() (per-label sigmoid) or LogitMSE().')
        if over == 'labels' and self.kind == 'categorical':
            raise ValueError(f'{name} treats every output as an independent label, but this learner predicts one '
                             'class (cross-entropy). Use SoftTarget(), DKD() or DIST().')

    def items(self, logits: Tensor) -> Tensor:
        "Logits as rows of classes: the class axis moved last, every other axis (batch, positions) flattened"
        if self.kind != 'categorical' or logits.ndim < 2: return logits
        return logits.movedim(self.axis, -1).reshape(-1, logits.shape[self.axis])

    def targets(self, target: Tensor) -> Tensor:
        "Class-index targets as one entry per row of `items`: (B, 1) and (B, H, W) flattened"
        return target.reshape(-1) if self.kind == 'categorical' else target

    def ensemble(self, logits: list[Tensor]) -> Tensor:
        "One prediction from several teachers': averaged probabilities (as logits) or averaged outputs"
        if len(logits) == 1: return logits[0]
        if self.kind == 'categorical': return sum(l.softmax(dim=self.axis) for l in logits).div(len(logits)).log()
        if self.kind == 'binary': return sum(l.sigmoid() for l in logits).div(len(logits)).logit()
        return sum(logits) / len(logits)


def task_of(loss_func) -> Task:
    "The `Task` of a learner's loss function (fastai's flattened losses, torch losses, `F.cross_entropy`)"
    if isinstance(getattr(loss_func, '__self__', None), MixHandler):  # MixUp/CutMix's loss, swapped in for training
        loss_func = loss_func.__self__.old_lf
    axis = loss_func.axis if isinstance(loss_func, BaseLoss) else None
    func = loss_func.func if isinstance(loss_func, BaseLoss) else loss_func
    if isinstance(func, _CATEGORICAL) or func is F.cross_entropy:
        default_axis = -1 if isinstance(func, LabelSmoothingCrossEntropy) else 1
        return Task('categorical', default_axis if axis is None else axis, 'train_ce')
    if isinstance(func, _BINARY) or func is F.binary_cross_entropy_with_logits: return Task('binary', -1, 'train_bce')
    for cls, name in _REGRESSION.items():
        if isinstance(func, cls): return Task('regression', -1, f'train_{name}')
    if func in (F.mse_loss, F.l1_loss): return Task('regression', -1, f'train_{func.__name__[:-5]}')
    return Task('unknown')
