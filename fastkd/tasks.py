"""What a learner predicts, read from its loss function, and what distillation loss fits it.

`task_of(loss_func)` tells single-label classification (cross-entropy over a class axis: images, tabular, text,
and per-pixel segmentation), multi-label classification (BCE with logits) and regression (MSE, L1, ...).
The callback uses it to pick a distillation loss, to refuse one that cannot be right, and to lay dense outputs
out as one item per position before a logit loss sees them. Each kind is a small class in `KINDS`: a new kind of
task is one subclass added there (and the losses that serve it named in `fastkd.losses.LOSSES`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from fastai.callback.mixup import MixHandler
from fastai.losses import BaseLoss, FocalLoss, LabelSmoothingCrossEntropy
from torch import Tensor, nn

from .losses import DistillationLoss, loss_examples, losses_for

__all__ = ['Kind', 'KINDS', 'Task', 'task_of']


class Kind:
    """One kind of prediction: the loss functions that mean it (`matches`, `column`, `axis`), what its outputs turn
    into (`probabilities`: 'classes', 'labels' or None), and how its outputs are laid out, targeted and combined"""
    name, described, probabilities = 'unknown', 'an unknown task', None
    loss_types: tuple = ()
    functions: tuple = ()
    refusal = ''  # why a loss over other probabilities cannot fit: starts with the loss's name

    def matches(self, func) -> bool: return isinstance(func, self.loss_types) or func in self.functions
    def column(self, func) -> str: return 'train_base'
    def axis(self, func, given: int | None = None) -> int: return -1  # `given`: the axis of a fastai loss
    def items(self, logits: Tensor, axis: int) -> Tensor: return logits
    def targets(self, target: Tensor) -> Tensor: return target
    def ignore_index(self, func) -> int | None: return None  # the target value of positions the loss leaves out
    def ensemble(self, logits: list[Tensor], axis: int) -> Tensor: return sum(logits) / len(logits)


class Categorical(Kind):
    "Single-label classification: cross-entropy over a class axis (1, or -1 for fastai's flattened losses)"
    name, described, probabilities = 'categorical', 'classification', 'classes'
    loss_types, functions = (nn.CrossEntropyLoss, LabelSmoothingCrossEntropy, FocalLoss), (F.cross_entropy,)
    refusal = ('{} treats every output as an independent label, but this learner predicts one class '
               '(cross-entropy).')

    def column(self, func) -> str: return 'train_ce'
    def axis(self, func, given: int | None = None) -> int: return 1 if given is None else given  # torch's is dim 1

    def ignore_index(self, func) -> int | None:
        "Cross-entropy's void target (torch's default -100, fastai's CamVid convention 255); none for label smoothing"
        if isinstance(func, LabelSmoothingCrossEntropy): return None  # it smooths over every position
        return getattr(func, 'ignore_index', -100)

    def items(self, logits: Tensor, axis: int) -> Tensor:
        "Rows of classes: the class axis moved last, every other axis (batch, positions) flattened"
        return logits if logits.ndim < 2 else logits.movedim(axis, -1).reshape(-1, logits.shape[axis])

    def targets(self, target: Tensor) -> Tensor: return target.reshape(-1)  # (B, 1) and (B, H, W): one per row

    def ensemble(self, logits: list[Tensor], axis: int) -> Tensor:
        "`log(mean softmax)`, in log space: finite for any finite logits, however confident"
        log_probs = torch.stack([l.log_softmax(dim=axis) for l in logits])
        return log_probs.logsumexp(dim=0) - math.log(len(logits))


class Binary(Kind):
    "Multi-label classification: binary cross-entropy with logits, a sigmoid per label"
    name, described, probabilities = 'binary', 'multi-label', 'labels'
    loss_types, functions = (nn.BCEWithLogitsLoss,), (F.binary_cross_entropy_with_logits,)
    refusal = ('{} takes a softmax across labels, but this learner is multi-label (BCE with logits): labels are not '
               'exclusive.')

    def column(self, func) -> str: return 'train_bce'
    def ensemble(self, logits: list[Tensor], axis: int) -> Tensor:
        "`logit(mean sigmoid)` = `log(mean p) - log(mean (1 - p))`, in log space: finite for any finite logits"
        def log_mean(log_probs): return torch.stack(log_probs).logsumexp(dim=0) - math.log(len(logits))
        return log_mean([F.logsigmoid(l) for l in logits]) - log_mean([F.logsigmoid(-l) for l in logits])


class Regression(Kind):
    "Regression: MSE, L1, smooth L1 or Huber on raw outputs"
    name, described = 'regression', 'regression'
    type_names = {nn.MSELoss: 'mse', nn.L1Loss: 'l1', nn.SmoothL1Loss: 'smooth_l1', nn.HuberLoss: 'huber'}
    function_names = {F.mse_loss: 'mse', F.l1_loss: 'l1'}
    loss_types, functions = tuple(type_names), tuple(function_names)
    refusal = ('{} turns outputs into probabilities, which a regression output (or a single output column) does not '
               'have: distillation would do nothing.')

    def column(self, func) -> str:
        if func in self.functions: return f'train_{self.function_names[func]}'
        return f'train_{next(name for cls, name in self.type_names.items() if isinstance(func, cls))}'


class Unknown(Kind):
    "A loss function fastkd does not know: no loss is picked for it, and any given one is taken as it is"
    def matches(self, func) -> bool: return True
    def axis(self, func, given: int | None = None) -> int: return 1


KINDS = {kind.name: kind for kind in (Categorical(), Binary(), Regression(), Unknown())}  # matched in this order


@dataclass(frozen=True)
class Task:
    "The kind of prediction a loss function expects (a name of `KINDS`), its class axis and its Recorder column"
    kind: str
    axis: int = 1
    column: str = 'train_base'  # the Recorder column of the learner's own loss
    ignore_index: int | None = None  # the target of void positions, which the loss leaves out

    @property
    def known(self) -> bool: return self.kind != 'unknown'

    @property
    def one_class_per_item(self) -> bool:
        "Whether each item (or position) has exactly one true class: the task has an accuracy"
        return KINDS[self.kind].probabilities == 'classes'

    def default_loss(self) -> DistillationLoss:
        "The distillation loss that fits this task: the first of `LOSSES` that serves its kind"
        if not self.known:
            first, *others = [(next(iter(losses_for(k.name).values())).example, k.described)
                              for k in KINDS.values() if k.refusal]
            raise ValueError("fastkd cannot tell what this learner's loss function predicts, so it picks no "
                             f'distillation loss: pass one, e.g. KnowledgeDistillation(teacher, {first[0]}) for '
                             f'{first[1]}, ' + ', '.join(f'{example} for {described}' for example, described in others)
                             + '.')
        return next(iter(losses_for(self.kind).values())).build()

    def check(self, kd_loss: Callable, n_outputs: int | None = None):
        "Refuse a distillation loss that cannot be right for this task (`n_outputs`: size of the class axis)"
        over = getattr(kd_loss, 'over', None)  # a function says nothing: taken as it is
        # one output column has no softmax over classes, but has a sigmoid: a single-logit binary classifier's
        kind = KINDS['regression'] if n_outputs == 1 and over == 'classes' else KINDS[self.kind]
        if not over or not kind.refusal or over == kind.probabilities: return
        raise ValueError(f'{kind.refusal.format(type(kd_loss).__name__)} Use {loss_examples(kind.name)}.')

    def items(self, logits: Tensor) -> Tensor:
        "Logits as rows of classes: the class axis moved last, every other axis (batch, positions) flattened"
        return KINDS[self.kind].items(logits, self.axis)

    def targets(self, target: Tensor) -> Tensor:
        "Class-index targets as one entry per row of `items`: (B, 1) and (B, H, W) flattened"
        return KINDS[self.kind].targets(target)

    def scored(self, target: Tensor) -> Tensor | None:
        """For dense class targets (one per position, as in segmentation): which rows of `items` the loss scores, void
        positions (`ignore_index`) left out; None where every row counts (one target per item: no void to drop)"""
        if self.ignore_index is None or target.is_floating_point() or target.ndim < 2 or target.shape[1:] == (1,):
            return None
        return self.targets(target) != self.ignore_index

    def ensemble(self, logits: list[Tensor]) -> Tensor:
        "One prediction from several teachers': averaged probabilities (as logits) or averaged outputs"
        return logits[0] if len(logits) == 1 else KINDS[self.kind].ensemble(logits, self.axis)


def task_of(loss_func) -> Task:
    "The `Task` of a learner's loss function (fastai's flattened losses, torch losses, `F.cross_entropy`)"
    if isinstance(getattr(loss_func, '__self__', None), MixHandler):  # MixUp/CutMix's loss, swapped in for training
        loss_func = loss_func.__self__.old_lf
    axis = loss_func.axis if isinstance(loss_func, BaseLoss) else None
    func = loss_func.func if isinstance(loss_func, BaseLoss) else loss_func
    kind = next(k for k in KINDS.values() if k.matches(func))
    return Task(kind.name, kind.axis(func, axis), kind.column(func), kind.ignore_index(func))
