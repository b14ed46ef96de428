"""The `KnowledgeDistillation` callback, and `load_teacher`, which builds a frozen teacher from a weights file.

Importing this module wraps two methods of fastai's `Learner` (fastcore `patch_to`; fastai's own stay reachable as
`Learner.fit.__wrapped__` and `Learner.export.__wrapped__`, and importing it again does not wrap them twice):
`export` leaves `KnowledgeDistillation` and fastkd's metrics (`TeacherAgreement`) out of the exported file, which then
loads without fastkd, and `fit` puts back what the callback changed (hint hooks, a cache's view replay, the teachers'
device, dtype and layout) however the fit ends (fastai skips `after_fit` when a fit raises)."""
from __future__ import annotations

import inspect
import json
import pickle
import re
import sys
import warnings
from contextlib import nullcontext
from functools import partial, wraps
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence

import cloudpickle
import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixHandler
from fastai.callback.schedule import LRFinder
from fastai.callback.training import GradientAccumulation
from fastai.data.load import DataLoader
from fastai.distributed import DistributedDL
from fastai.learner import Learner, Recorder
from fastai.torch_core import to_device
from fastai.vision.learner import create_vision_model
from fastcore.basics import patch_to, store_attr
from fastcore.foundation import L
from torch import Tensor, nn

from .basics import evaluating, few, first_output, inputs_of, placement, sample_batch, teacher_model, user_loader
from .cache import TeacherCache
from .hints import Hint, HintHooks
from .losses import loss_examples
from .tasks import task_of
from .teacher_input import adapted, input_stats, teacher_inputs
from .unlabeled import check_unlabeled, joint_loader, labeled_rows, n_unlabeled

__all__ = ['KnowledgeDistillation', 'load_teacher']


def _frozen(model: nn.Module) -> nn.Module:
    "`model` in eval mode without gradients: a teacher that fastkd built and owns"
    for param in model.parameters(): param.grad = None
    return model.eval().requires_grad_(False)


def _to_channels_last(model: nn.Module) -> list[Tensor]:
    "Lay `model`'s 4-d weights out channels-last in place (values and objects unchanged); those converted, to put back"
    converted = [t for t in chain(model.parameters(), model.buffers()) if t.ndim == 4 and t.is_contiguous()]
    for t in converted: t.data = t.data.contiguous(memory_format=torch.channels_last)
    return converted


_CALLING = ('fastkd calls a distillation loss as loss(student_logits, teacher_logits) or '
            'loss(student_logits, teacher_logits, target)')


def _make_loss(loss) -> Callable | None:
    "An instance of `loss` if it is a loss class or a partial of one, else `loss`; refuse what cannot be called so"
    if loss is None: return None
    is_class = isinstance(loss, type) or (isinstance(loss, partial) and isinstance(loss.func, type))
    loss = loss() if is_class else loss
    if isinstance(loss, nn.modules.loss._Loss):
        raise TypeError(f'{type(loss).__name__} is a torch loss of a prediction against a target, not a distillation '
                        f'loss: {_CALLING}. Use {loss_examples()}, or a function such as lambda s, t: '
                        "F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction='batchmean').")
    if not callable(loss) or _n_positional(loss) < 2:
        raise TypeError(f'{loss!r} cannot be a distillation loss: {_CALLING}. Use {loss_examples()}, or a function of '
                        'that form.')
    return loss


def _parameters(loss: Callable) -> list[inspect.Parameter]:
    "The parameters of `loss`: of its `forward` for a module (whose `__call__` takes any arguments)"
    return list(inspect.signature(loss.forward if isinstance(loss, nn.Module) else loss).parameters.values())


def _n_positional(loss: Callable) -> int:
    "How many positional arguments `loss` accepts (3 or more: it takes the target)"
    try: params = _parameters(loss)
    except (TypeError, ValueError): return 3
    if any(p.kind == p.VAR_POSITIONAL for p in params): return 3
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _requires_target(loss: Callable) -> bool:
    "Whether `loss` must be given the target: a third positional parameter without a default"
    try: params = _parameters(loss)
    except (TypeError, ValueError): return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 and positional[2].default is inspect.Parameter.empty


def outputs_differ(teacher_shape: tuple, student_shape: tuple, axis: int, n_data: int | None) -> str:
    "What is wrong where teacher and student outputs have other shapes, and which model to change (`n_data`: dls.c)"
    axis = axis if len(teacher_shape) > 1 else -1
    n_teacher, n_student = teacher_shape[axis], student_shape[axis] if len(student_shape) > 1 else 1
    fix = ('the teacher is the one to change: load or train a teacher for these classes' if n_student == n_data
           else f'the student is the one to change: build it with n_out={n_data}' if n_teacher == n_data
           else 'both models must predict the same classes as the data')
    data = (f'The data has {n_data} classes (dls.c, from its vocab)' if n_data is not None
            else 'The data does not say how many classes it has (no dls.c)')
    return (f'Teacher and student outputs differ: teacher {tuple(teacher_shape)}, student {tuple(student_shape)}. '
            f'{data}, so {fix}.')


class KnowledgeDistillation(Callback):
    """Train the learner's model to follow a frozen `teacher` as well as the labels:
    the training loss becomes `(1 - weight) * loss + weight * distillation_loss(student_logits, teacher_logits, y)`
    (`y`: the first target, for losses that take one).
    `teacher` is an `nn.Module`, a `Learner`, or a list of them (an ensemble: its probabilities are averaged).
    `loss='auto'` picks the distillation loss from the learner's loss function: `SoftTarget` for cross-entropy
    (any class axis, segmentation included), `BinarySoftTarget` for BCE with logits, `LogitMSE` for regression.
    `weight` is a number or a schedule of training progress (e.g. `SchedLin(0, 0.5)`).
    `hints` (a list of `Hint`) add `sum(hint.weight * hint.loss)` on the outputs of named layers; with `loss=None`
    the training loss is the learner's loss plus the hints (no logit term). Their adapters are the parameters of
    `learn.knowledge_distillation.hints`, trained by an optimizer of their own (never the learner's):
    `torch.save(learn.knowledge_distillation.hints.state_dict(), path)` keeps them, and a new callback's
    `hints.load_state_dict(torch.load(path, weights_only=True))` takes them back.
    `cache=True` (or a `TeacherCache`) runs the teacher once per training item and reuses its outputs in later
    epochs: for training inputs without random augmentation; `cache='folder'` (`TeacherCache(path='folder')`) keeps
    them on disk, for later fits, processes, students and seeds with the same teacher and data.
    `unlabeled` (a list of items such as `get_image_files` returns, or a `DataLoader` of inputs only such as
    `dls.test_dl(items)`) joins every training epoch beside the labeled items, through the training loader's item and
    batch transforms (`fastkd.unlabeled.joint_loader`; during a fit it is `dls.train`): the learner's loss and the
    training metrics cover the labeled items only, the distillation loss and hints all of them (for a loss that takes
    a target, such as DKD, an unlabeled item's target is the teacher's class). With MixUp, whose mixed labels would
    take an unlabeled partner's, it needs `weight=1` (function matching: the teacher alone teaches).
    `teacher_input` says what each teacher receives: 'auto' reads it from a `Learner` teacher's own DataLoaders (their
    `Normalize` and image size) or a timm model's `pretrained_cfg`, and leaves the batch as it is for other models; a
    `TeacherInput(size, mean, std)` sets it (a list: one per teacher); None turns it off. The student's images are
    unnormalised with the student's statistics, resized on the device and normalised with the teacher's, in every
    teacher forward (training steps, the check before the first step, the cache's).
    `teacher_channels_last` lays the teachers' 4-d weights out channels-last during each fit, and puts them back when
    it ends: `None` (the default) does so on CPUs, where it makes convolutions faster (ResNet teachers' forwards took
    0.5-0.8x as long); `True` also on GPUs, `False` never.
    The teacher runs in training steps only (plus, with a logit loss, one check on a validation batch as each fit
    starts), in eval mode and without gradients, and is left as it was given; validation, `get_preds`, `tta` and
    `valid_loss` are the learner's own. `learn.export()` leaves this callback out."""
    # after Recorder sets its columns, before ProgressCallback prints them
    order, run_valid, beta = Recorder.order + 1, False, 0.98

    def __init__(self, teacher, loss='auto', weight: float | Callable = 0.5, hints: Sequence[Hint] = (),
                 cache: bool | str | Path | TeacherCache = False, teacher_channels_last: bool | None = None,
                 from_learner: bool | None = None, unlabeled=None, teacher_input='auto', **loss_settings):
        "`from_learner` is accepted for older code and not needed: a `Learner` teacher is detected"
        if loss_settings:
            settings = ', '.join(f'{k}={v!r}' for k, v in loss_settings.items())
            if isinstance(loss, str):  # no loss object given: a misspelt argument, or a loss setting without its loss
                raise TypeError(f'KnowledgeDistillation got {settings}, which it does not take (its arguments: '
                                'teacher, loss, weight, hints, cache, teacher_channels_last, unlabeled, '
                                'teacher_input); settings of a loss go to the loss itself, as in '
                                'KnowledgeDistillation(teacher, SoftTarget(T=4)).')
            raise TypeError(f'KnowledgeDistillation got {settings}: settings of the loss go to the loss itself, as in '
                            f'KnowledgeDistillation(teacher, {getattr(loss, "__name__", type(loss).__name__)}'
                            f'({settings})).')
        teachers = teacher if isinstance(teacher, (list, tuple)) else [teacher]
        self.teachers = [teacher_model(t) for t in teachers]
        self.teacher_inputs = teacher_inputs(teachers, teacher_input)
        # what `repr` shows: given inputs; 'auto' ones once a learner says whether they change its images
        self.shown_inputs = [None] * len(teachers) if isinstance(teacher_input, str) else self.teacher_inputs
        if not callable(weight) and not 0 <= weight <= 1:
            raise ValueError(f'weight must be between 0 and 1 (or a schedule of training progress), got {weight}')
        self.auto_loss = isinstance(loss, str) and loss == 'auto'
        self.kd_loss = None if self.auto_loss else _make_loss(loss)
        if hints and len(self.teachers) > 1:
            raise ValueError('Hints name layers of one teacher, and this is an ensemble of '
                             f"{len(self.teachers)}: which teacher's layer would it be? Distil the ensemble's outputs "
                             'without hints, or give hints with a single teacher.')
        if loss is None and not hints:
            raise ValueError('loss=None leaves nothing to distil: pass a distillation loss, or hints (feature '
                             'distillation without a logit term).')
        if hints and cache:
            raise ValueError("A teacher cache stores outputs, and hints need the teacher's features at every step: "
                             'use cache=True or hints, not both.')
        self.hints = HintHooks(hints) if hints else None
        self.cache = (TeacherCache() if cache is True else TeacherCache(path=cache) if isinstance(cache, (str, Path))
                      else cache or None)
        self.channels_last, self.put_back = [], []  # what `restore` puts back after a fit
        # with unlabeled items: the training loader of both, the user's, and the DataLoaders that hold the first now
        self.joint, self.labeled_loader, self.joined = None, None, None
        store_attr('weight,teacher_channels_last')
        self.unlabeled = check_unlabeled(unlabeled)

    def __repr__(self) -> str:
        loss = 'auto (picked when the fit starts)' if self.auto_loss and self.kd_loss is None else self.kd_loss
        hints = f', hints={self.hints.hints}' if self.hints else ''
        weight = f', weight={self.weight}' if loss is not None else ''  # without a logit term the weight weighs nothing
        unlabeled = f', unlabeled={n_unlabeled(self.unlabeled)} items' if self.unlabeled is not None else ''
        given = self.shown_inputs[0] if len(self.shown_inputs) == 1 else self.shown_inputs
        given = f', teacher_input={given}' if any(i is not None for i in self.shown_inputs) else ''
        return f'{type(self).__name__}(loss={loss}{weight}{hints}{unlabeled}{given})'

    def __getstate__(self):
        "Leave the teachers out of pickles (`learn.export` leaves the whole callback out)"
        return {**self.__dict__, 'teachers': None, 'channels_last': [], 'put_back': [], 'joint': None,
                'labeled_loader': None, 'joined': None}

    def after_create(self):
        """Pick the loss as soon as the learner exists, so `repr` shows it (an unknown task is refused when a fit
        starts), and the teacher inputs that change the learner's images"""
        if task_of(self.learn.loss_func).known: self._pick_loss()
        self.student_stats = input_stats(self.dls.train)
        self.shown_inputs = self._changing_inputs()

    def _pick_loss(self):
        "The task of the learner's loss function, and the distillation loss for it when `loss='auto'`"
        self.task = task_of(self.learn.loss_func)
        if self.auto_loss: self.kd_loss = self.task.default_loss()
        self.kd_loss_takes_target = self.kd_loss is not None and _n_positional(self.kd_loss) >= 3

    def before_fit(self):
        "Pick the loss and add its parts to the Recorder (validation and `get_preds` also start with `before_fit`)"
        if self.teachers is None:
            raise RuntimeError('This KnowledgeDistillation callback was unpickled, and pickles never store the '
                               'teacher: add a new callback instead, learn.add_cb(KnowledgeDistillation(teacher)).')
        if any(isinstance(cb, GradientAccumulation) for cb in self.learn.cbs):
            raise ValueError('KnowledgeDistillation does not support GradientAccumulation yet (it scales the loss '
                             'before the distillation term is mixed in): remove one of them, e.g. use a smaller batch '
                             'size.')
        self._pick_loss()
        self.student_stats = input_stats(self.dls.train)  # read once: on a GPU, reading them waits for it
        self.smooth_parts, self.n_batches, self.checked, self.channels_last, self.put_back = 0., 0, False, [], []
        if hasattr(self.learn, 'recorder') and 'train_loss' in self.recorder.metric_names:
            names = self.recorder.metric_names
            at = names.index('train_loss') + 1
            parts = [self.task.column] + ['train_kd'] * (self.kd_loss is not None) + ['train_hint'] * bool(self.hints)
            self.recorder.metric_names = names[:at] + parts + names[at:]

    def _check_unlabeled(self):
        "Refuse what cannot train on unlabeled items, naming the conflict and the fix"
        if isinstance(self.dls.train, DistributedDL):
            raise ValueError('Unlabeled items are not supported under distributed training yet (each process would '
                             'need its share of them): train in one process, or without unlabeled items.')
        if self.mixers and (callable(self.weight) or self.weight != 1):
            raise ValueError(f'{type(self.mixers[0]).__name__} mixes each item with another, and the mixed label of a '
                             "labeled item whose partner is unlabeled would take that partner's unknown label: pass "
                             'weight=1 (function matching: the teacher alone teaches, the published recipe on '
                             'unlabeled data), or train without MixUp, or without unlabeled items.')
        if self.kd_loss is not None and _requires_target(self.kd_loss) and self.task.kind != 'categorical':
            raise ValueError(f'{self.kd_loss} takes the target, which unlabeled items lack (for single-label '
                             "classification fastkd gives them the teacher's class): use a loss without a target, such "
                             'as the default.')

    @property
    def mixers(self) -> list[Callback]: return [cb for cb in self.learn.cbs if isinstance(cb, MixHandler)]

    def _join_unlabeled(self):
        "Train on the labeled and the unlabeled items: the joint loader is `dls.train` until the fit ends (`restore`)"
        train = self.dls.train
        if train is not self.joint:
            if self.joint is None or self.labeled_loader is not train:
                self.joint, self.labeled_loader = joint_loader(train, self.unlabeled), train
            self.joint.rng = train.rng  # the batch order draws from the user's loader's generator, seeded as it is
            self.joined = self.dls  # a fit's callbacks lose their learner before `restore`
            self.joined.loaders[0] = self.joint
        self.learn.dl = self.joint

    def before_train(self):
        """Move the teachers to the student's device and dtype (put back after the fit); before the fit's first step,
        check them on a validation batch; hook the hinted layers (here, not in `before_fit`, which `get_preds` and
        `validate` also call); prepare the cache and lay the teachers out channels-last (by default on CPUs); pick the
        epoch's views; start recurrent teachers from a fresh state, as `ModelResetter` starts the student"""
        if self.unlabeled is not None:
            if not self.checked: self._check_unlabeled()
            self._join_unlabeled()
        param = next(self.model.parameters())
        if not self.checked: self.put_back = [placement(teacher) for teacher in self.teachers]
        for teacher in self.teachers: teacher.to(device=param.device, dtype=param.dtype)
        if not self.checked:
            self.shown_inputs = self._changing_inputs()
            if self.kd_loss is not None:
                self._check_on_validation_batch()
                self._reset_recurrent(self.model)  # the check ran it: training starts from the state it was given
            if self.cache: self.cache.prepare(self.learn, self.teachers, self.shown_inputs)
            if self.teacher_channels_last or (self.teacher_channels_last is None and param.device.type == 'cpu'):
                self.channels_last = [t for m in self.teachers for t in _to_channels_last(m)]
            self.checked = True
        if self.cache: self.cache.start_epoch(self.learn, self.teacher_output)  # with views: each item's view
        if self.hints and not self.hints.attached:  # lr_find puts back what it explored with: so do the hints
            self.hints.attach(self.model, self.teachers[0], restore=any(isinstance(cb, LRFinder) for cb in self.cbs))
        for teacher in self.teachers: self._reset_recurrent(teacher)
        self.first_nonfinite = torch.tensor(-1, device=param.device)  # this epoch's first batch of non-finite teacher

    def _reset_recurrent(self, model: nn.Module):
        "Reset the hidden state of a recurrent model (fastai's text models have `reset`, which `ModelResetter` calls)"
        if callable(getattr(model, 'reset', None)): model.reset()

    @torch.no_grad()
    def teacher_output(self, xb: tuple) -> Tensor:
        "The teacher's prediction for `xb` in float32; for an ensemble, the teachers' combined"
        autocast = getattr(getattr(self.learn, 'mixed_precision', None), 'autocast', None) or nullcontext()
        stats, outputs = self._student_stats(), []
        for teacher, teacher_input in zip(self.teachers, self.teacher_inputs):
            teacher_xb = adapted(xb, teacher_input, stats)
            with evaluating(teacher), autocast: outputs.append(first_output(teacher(*teacher_xb)).float())
        return self.task.ensemble(outputs)

    def _student_stats(self):
        "The student's normalisation: read when the fit started, or now where `teacher_output` is called outside a fit"
        if 'student_stats' not in vars(self):
            learn = vars(self).get('learn')
            self.student_stats = input_stats(learn.dls.train) if learn is not None else None
        return self.student_stats

    def _checked_loader(self) -> DataLoader:
        "The loader the checks draw from: validation, else the user's training loader (never the unlabeled items)"
        train = self.labeled_loader if self.joint is not None and self.dls.train is self.joint else self.dls.train
        return user_loader(self.dls.valid if len(self.dls.valid) else train)  # a DistributedDL has no one_batch

    def _changing_inputs(self) -> list:
        "The teacher inputs that change the student's images (the others: None), by which the cache keys its outputs"
        dl = self._checked_loader()
        x = inputs_of(dl, sample_batch(dl, 1))[0] if any(self.teacher_inputs) else None
        return [i if i is not None and x.ndim == 4 and i.changes(x.shape, self.student_stats) else None
                for i in self.teacher_inputs]

    def _check_on_validation_batch(self):
        "Before the first step: teacher and student must predict alike, and the teacher should beat chance"
        dl = self._checked_loader()
        device = next(self.model.parameters()).device
        # drawn at random: a validation set sorted by class (image folders) would give one or two classes first
        batch = to_device(sample_batch(dl, dl.bs, device=device), device)
        xb = inputs_of(dl, batch)
        yb = batch[len(xb):]
        teacher_pred = self.teacher_output(xb)
        with torch.no_grad(), evaluating(self.model): student_pred = first_output(self.model(*xb))
        self._check_shapes(teacher_pred, student_pred)
        if not torch.isfinite(teacher_pred).all(): self._refuse_nonfinite('on a validation batch before training')
        n_outputs = teacher_pred.shape[self.task.axis] if teacher_pred.ndim > 1 else 1
        if self.kd_loss is not None: self.task.check(self.kd_loss, n_outputs)
        if self.task.one_class_per_item and yb and not yb[0].is_floating_point():
            targets = self.task.targets(yb[0])
            predicted = self.task.items(teacher_pred).argmax(dim=-1)
            if (scored := self.task.scored(yb[0])) is not None and predicted.shape == targets.shape:
                targets, predicted = targets[scored], predicted[scored]  # void positions have no class
            if predicted.shape == targets.shape and targets.unique().numel() > 1:  # one class: no chance level to beat
                accuracy = (predicted == targets).float().mean().item()
                majority = targets.bincount().max().item() / len(targets)
                if accuracy <= majority: self._refuse_chance(xb, targets, scored, accuracy, majority)

    def _refuse_chance(self, xb: tuple, targets: Tensor, scored: Tensor | None, accuracy: float, majority: float):
        """A teacher no better than chance on the checked batch: an error where the batch as it is would serve it
        (the teacher input is wrong), else a warning naming the teacher input in use"""
        given = [i for i in self.shown_inputs if i is not None]
        if given:  # the same batch unchanged: does the teacher take it as it is?
            inputs, self.teacher_inputs = self.teacher_inputs, [None] * len(self.teachers)
            try: predicted = self.task.items(self.teacher_output(xb)).argmax(dim=-1)
            finally: self.teacher_inputs = inputs
            as_is = ((predicted[scored] if scored is not None else predicted) == targets).float().mean().item()
            if as_is > majority + (1 - majority) / 4:
                raise ValueError(f'The teacher scores {accuracy:.3f} on a validation batch fed as teacher_input='
                                 f'{given[0]} makes it (chance: {majority:.3f}), and {as_is:.3f} on the batch as it '
                                 'is: pass teacher_input=None (or the TeacherInput it was trained with).')
        fed = f' fed as teacher_input={given[0]} makes it' if given else ''
        warnings.warn(f'The teacher is no better than chance on a validation batch{fed} (accuracy {accuracy:.3f}, '
                      f'against {majority:.3f} for always predicting the most common class): check that it was '
                      'trained on these classes, in the same order, with the same input normalisation and size.')

    def _check_shapes(self, teacher_pred: Tensor, student_pred: Tensor):
        "A clear error for outputs that cannot be compared: shapes that differ (host data: no wait for the device)"
        if teacher_pred.shape != student_pred.shape:
            raise ValueError(outputs_differ(teacher_pred.shape, student_pred.shape, self.task.axis,
                                            getattr(self.dls, 'c', None)))

    def _refuse_nonfinite(self, where: str):
        raise ValueError(f'The teacher gave non-finite logits (nan or inf) {where}: check its weights and the input '
                         'normalisation.')

    def _check_finite(self):
        """After training steps: the error for the first batch of the epoch whose teacher output was not finite (its
        distillation term was left out). One wait for the device per epoch, not one per step"""
        if (first := int(self.first_nonfinite)) >= 0:
            self._refuse_nonfinite(f'at training batch {first} of epoch {self.epoch}')

    def after_pred(self):
        """Keep the student's output for every row; with unlabeled items, leave the learner's loss and the training
        metrics the labeled rows (the first of the batch)"""
        self.student_pred = first_output(self.pred)
        self.n_labeled = labeled_rows(self.learn.dl, self.iter)
        if self.n_labeled is None or self.n_labeled == len(self.student_pred): return
        self.learn.pred = _first_rows(self.pred, self.n_labeled, len(self.student_pred))
        self.learn.yb = tuple(y[:self.n_labeled] for y in self.yb)
        for mixer in self.mixers:  # weight=1: their own labels, logged and not learned from
            mixer.yb1, mixer.lam = self.learn.yb, mixer.lam[:self.n_labeled]

    def after_loss(self):
        "Mix the distillation loss and the hints into the loss that is backpropagated"
        if not len(self.yb): return
        if self.cache: teacher_pred = self.cache(self.learn, self.xb, self.teacher_output)
        else: teacher_pred = self.teacher_output(self.xb)
        student_pred = self.student_pred  # every row; hints captured the teachers' features during its forward
        base_loss = self.learn.loss  # the loss function's value: what callbacks added since (AR/TAR) keeps its weight
        parts, scored, targets = [base_loss], self.task.scored(self.yb[0]), self.task.targets(self.yb[0])
        if (unlabeled := len(student_pred) - len(self.yb[0])) > 0:  # rows without labels: all scored, teacher's class
            if scored is not None:
                scored = torch.cat([scored, scored.new_ones(len(scored) * unlabeled // len(self.yb[0]))])
            if self.kd_loss_takes_target and self.task.kind == 'categorical':
                targets = torch.cat([targets, self.task.targets(teacher_pred[-unlabeled:].argmax(self.task.axis))])
        if self.kd_loss is not None:
            self._check_shapes(teacher_pred, student_pred)
            finite = torch.isfinite(teacher_pred).all()  # stays on the device: checked once per epoch
            self.first_nonfinite = torch.where(finite | (self.first_nonfinite >= 0), self.first_nonfinite, self.iter)
            rows = [self.task.items(student_pred), self.task.items(teacher_pred.nan_to_num(0., 0., 0.))]
            if self.kd_loss_takes_target and len(targets) == len(rows[0]): rows.append(targets)  # one per row
            kd_loss = self.kd_loss(*rows) if scored is None else self._without_void(rows, scored)
            weight = self.weight(self.pct_train) if callable(self.weight) else self.weight
            self.learn.loss_grad = self.loss_grad + weight * finite * (kd_loss - base_loss)
            parts.append(kd_loss)
        if self.hints:
            if scored is not None and not scored.all():
                raise ValueError(f'Training batch {self.iter} has void positions (target {self.task.ignore_index}, '
                                 "the loss function's ignore_index), and hints compare whole feature maps, void "
                                 'included: distil the logits alone (no hints) for data with void positions.')
            parts.append(self.hints.loss(self.opt))
            self.learn.loss_grad = self.loss_grad + parts[-1]
        self.learn.loss = self.loss_grad.clone()
        self.n_batches += 1  # debiased moving average of the parts, as Recorder smooths train_loss
        self.smooth_parts = self.beta * self.smooth_parts + (1 - self.beta) * torch.stack(parts).detach().float()

    def _without_void(self, rows: list[Tensor], scored: Tensor) -> Tensor:
        "The distillation loss on the `scored` rows only: void positions leave it (0 for a batch of void alone)"
        return torch.where(scored.any(), self.kd_loss(*[r[scored] for r in rows]), 0.)

    def after_backward(self):
        "Under DDP, average the hint adapters' gradients across processes (DDP averages only the student's)"
        if self.hints: self.hints.average_gradients()

    def before_step(self):
        """Step the hint adapters' own optimizer with the learner's hyper-parameters (after `MixedPrecision`, whose
        scaler unscales their gradients; a step it skips skips them too)"""
        if self.hints: self.hints.step(self.opt, getattr(self.learn, 'scaler', None))

    def after_train(self):
        "Refuse a teacher that gave non-finite outputs; log the smoothed loss parts right after `train_loss`"
        self._check_finite()
        if hasattr(self.learn, 'recorder') and not self.recorder.cancel_train and self.n_batches:
            at = self.recorder.metric_names.index('train_loss') + 1  # before the training metrics (train_metrics)
            log = self.recorder.log
            self.recorder.log = log[:at] + (self.smooth_parts / (1 - self.beta**self.n_batches)).tolist() + log[at:]

    def after_fit(self):
        """Refuse non-finite teacher outputs of a fit cut short (`lr_find`); put everything back (`restore`)"""
        try:
            if self.checked: self._check_finite()
        finally: self.restore()

    def restore(self):
        """Remove the hint hooks (after `lr_find`, the adapters are put back as it puts the model back); give the
        teachers back their memory layout, device and dtype, and the training loader its own items (after views).
        `Learner.fit` calls it however a fit ends (fastai skips `after_fit` when a fit raises)"""
        if self.hints: self.hints.detach()
        if self.cache: self.cache.release()
        if self.joined is not None and self.joined.loaders[0] is self.joint:
            self.joined.loaders[0] = self.labeled_loader
        self.joined = None
        for t in self.channels_last: t.data = t.data.contiguous()
        for put_back in self.put_back: put_back()
        self.channels_last, self.put_back = [], []


def _first_rows(pred, n: int, bs: int):
    "`pred` (a tensor, or a tuple of them as some models return) with its first `n` of `bs` rows"
    if isinstance(pred, Tensor): return pred[:n] if len(pred) == bs else pred
    if isinstance(pred, (tuple, list)): return type(pred)(_first_rows(p, n, bs) for p in pred)
    return pred


def _fastai_original(name: str) -> Callable:
    "fastai's own `Learner.<name>`, also when this module is imported again and the attribute holds fastkd's wrapper"
    method = getattr(Learner, name)
    return method.__wrapped__ if getattr(method, 'fastkd_patch', False) else method


_fastai_export, _fastai_fit = _fastai_original('export'), _fastai_original('fit')


@patch_to(Learner)
@wraps(_fastai_export)
def export(self: Learner, *args, **kwargs):
    """fastai's `Learner.export` without `KnowledgeDistillation` and fastkd's metrics (`TeacherAgreement` holds the
    teacher; the learner's metrics are put back after), and with the fastkd functions the learner still holds (a
    `default_split` splitter) stored by value, so that the file loads where fastkd is not installed"""
    package, metrics = sys.modules[__package__], self.metrics
    by_reference = package not in cloudpickle.list_registry_pickle_by_value()
    if by_reference: cloudpickle.register_pickle_by_value(package)
    self.metrics = metrics.filter(lambda metric: type(metric).__module__.partition('.')[0] != __package__)
    distillers = self.cbs.filter(lambda cb: isinstance(cb, KnowledgeDistillation))
    joined = [cb for cb in distillers if cb.joint is not None and self.dls.loaders[0] is cb.joint]
    for cb in joined: self.dls.loaders[0] = cb.labeled_loader  # exported during a fit with unlabeled items
    try:
        with self.removed_cbs(distillers): return _fastai_export(self, *args, **kwargs)
    finally:
        for cb in joined: self.dls.loaders[0] = cb.joint
        self.metrics = metrics
        if by_reference: cloudpickle.unregister_pickle_by_value(package)


@patch_to(Learner)
@wraps(_fastai_fit)
def fit(self: Learner, *args, **kwargs):
    """fastai's `Learner.fit`, after which no hint hook remains and no training loader replays a cache's views, even
    when it raises (which skips `after_fit`)"""
    fit_cbs = inspect.signature(_fastai_fit).bind(self, *args, **kwargs).arguments.get('cbs')
    distillers = [cb for cb in L(self.cbs) + L(fit_cbs) if isinstance(cb, KnowledgeDistillation)]
    try: return _fastai_fit(self, *args, **kwargs)
    finally:
        for cb in distillers: cb.restore()


Learner.export.fastkd_patch = Learner.fit.fastkd_patch = True  # `_fastai_original` finds fastai's beneath them


# What `learn.save`'s optimizer state holds besides tensors: fastcore's list, and the numpy scalars (with their dtype)
# that schedulers such as fit_one_cycle leave in its hyper-parameters. Plain data: nothing here runs code when loaded.
_OPTIMIZER_STATE_GLOBALS = [L, (np._core if hasattr(np, '_core') else np.core).multiarray.scalar, np.dtype,
                            *{type(np.dtype(t)) for t in 'fdlib?'}]


def load_teacher(path: str | Path, arch: Callable | nn.Module, n_out: int | None = None, **kwargs) -> nn.Module:
    """A frozen teacher: `arch` (a model, or an architecture such as `resnet34` built by
    `create_vision_model(arch, n_out, pretrained=False, **kwargs)`) with the weights of the state dict at `path`.
    Loads with `torch.load(weights_only=True)`; files from `learn.save` (weights and optimizer) work too. A file that
    holds no state dict (JSON, an exported Learner, a cut-short file) raises a ValueError that says what it holds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No teacher weights at {path}: pass the path of a saved state dict.')
    if isinstance(arch, nn.Module): model = arch
    elif n_out is None:
        raise ValueError('n_out is needed to build the teacher from an architecture: pass its class count.')
    else: model = create_vision_model(arch, n_out, pretrained=False, **kwargs)
    try:
        with torch.serialization.safe_globals(_OPTIMIZER_STATE_GLOBALS):
            state = torch.load(path, map_location='cpu', weights_only=True)
    except PermissionError: raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(_not_weights(path, e)) from None
    if isinstance(state, dict) and set(state) == {'model', 'opt'}: state = state['model']  # learn.save(with_opt=True)
    if not isinstance(state, dict):
        raise ValueError(f'{path} holds a {type(state).__name__}, not a state dict (a dict of tensors by name): save '
                         '`model.state_dict()`.')
    try: result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f'The weights in {path} do not fit the teacher architecture (is n_out right?): {e}') from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f'The weights in {path} do not match the teacher architecture. '
                         f'Missing keys: {few(result.missing_keys)}. Unexpected keys: {few(result.unexpected_keys)}.')
    return _frozen(teacher_model(model))


def _not_weights(path: Path, error: Exception) -> str:
    "What the file at `path` holds, which `torch.load(weights_only=True)` refused with `error`, and the fix"
    try: json.loads(path.read_text())
    except ValueError: pass
    else: return f'{path} holds JSON text, not weights: pass the .pth file of the state dict.'
    unsafe = re.search(r'Unsupported global: GLOBAL (\S+)', str(error))
    if unsafe and unsafe.group(1) == 'fastai.learner.Learner':
        return (f'{path} holds an exported fastai Learner (`learn.export`), not a state dict: load it with '
                '`load_learner` and pass `learn.model`, or save `learn.model.state_dict()`.')
    if unsafe:
        return (f'{path} holds pickled objects ({unsafe.group(1)}), not a state dict: loading them would run their '
                'code, which weights_only=True refuses. Save `model.state_dict()` instead.')
    if path.stat().st_size == 0: return f'{path} is empty: save the weights again.'
    reason = str(error).split('WeightsUnpickler error:')[-1].strip().split('\n')[0]  # torch's is pages long
    return (f'{path} is not a PyTorch weights file, or one cut short or damaged ({type(error).__name__}: {reason}): '
            'save or copy it again.')
