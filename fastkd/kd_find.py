"""`learn.kd_find(teacher)`: which way of distilling pays for this learner, as `lr_find` tells the learning rate.

Every candidate (a set of `KnowledgeDistillation` arguments, plus callbacks such as `MixUp`) and the student alone
train from the learner's current weights on the same batches (`Reseed`), and are scored on the validation set only.
Successive halving spends the budget where it matters: all candidates at a short schedule, the best `keep` share
(at least two) at the next, ..., the last rung at the planned schedule on seeds that chose nothing, with more seeds
while the verdict is open; the verdict is the main job's (the interval of the mean per-seed gain above zero). Trials
fed the same batch share the teacher's forward (`TeacherMemo`). A positive gain means better under any metric:
lower-is-better ones (mse, error_rate, names with 'loss' or 'error') count a fall as a gain.
`TeacherAgreement` is the metric of how often student and teacher predict the same class."""
from __future__ import annotations

import functools
import itertools
import time
import warnings
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import fastai.callback.schedule  # noqa: F401  (adds lr_find and fit_one_cycle to Learner)
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.callback.progress import CSVLogger, ShowGraphCallback
from fastai.callback.tracker import TrackerCallback
from fastai.learner import AvgMetric, Learner, Metric
from fastai.losses import BaseLoss
from fastai.metrics import accuracy
from fastai.torch_core import to_device
from fastcore.basics import noop, patch
from fastcore.meta import delegates
from fastprogress.fastprogress import progress_bar
from matplotlib.figure import Figure
from torch import Tensor, nn

from .basics import evaluating, first_output, inputs_of, placed_like, random_state_kept, teacher_model
from .callback import KnowledgeDistillation, outputs_differ
from .hints import FitNet, Hint, match_layers
from .losses import DIST, DKD, SoftTarget
from .memo import TeacherMemo
from .tasks import task_of
from .teacher_input import RAW, TeacherInput, adapted, input_stats, teacher_inputs
from .unlabeled import joint_loader
from .workflow import Reseed, Schedule, scratch_learner, seed_gain

__all__ = ['TeacherAgreement', 'kd_candidates', 'kd_find', 'KDFindResult', 'StaleRecord', 'frozen_first', 'frozen_at',
           'kd_find_for_job']

Fit = Callable[[Learner, int, float, list], None]
RULE = 3  # the verdict's rule, kept in records: 2 judged the finalists on held-out seeds, by intervals (issue 36);
# 3 spends the error on the lower ends only, a quarter at the first look
FIRST_LOOK = 0.25  # the share of each finalist's error spent at the first of two looks


class StaleRecord(ValueError):
    "A kept kd_find result measured under an older rule: measure again"
# Parts of names of what falls as a model learns: fastai's trackers' rule ('loss', 'error'), fastai's regression
# metrics, and other errors and losses by their usual names
_FALLING = ('loss', 'error', 'mse', 'rmse', 'mae', 'msle', 'rmspe', 'perplexity', 'cross_entropy', 'kl_div')
_SHARES = ('accuracy', 'error_rate', 'f1', 'fbeta', 'precision', 'recall', 'roc_auc', 'rocauc', 'dice', 'jaccard',
           'matthews', 'kappa', 'agreement', 'top_k')  # scores that are shares in [0, 1]: their gains read in points


def _metric_name(metric) -> str:
    """The name of `metric` in lower case, without a leading underscore: a fastai `Metric`'s `name`, a function's (or a
    partial's function's) `__name__`, a loss object's class (`CrossEntropyLossFlat()`: its `CrossEntropyLoss`), or the
    name given"""
    while isinstance(metric, partial): metric = metric.func
    if isinstance(metric, str): name = metric
    elif isinstance(metric, BaseLoss): name = type(metric.func).__name__  # MSELossFlat() holds an MSELoss
    elif isinstance(metric, nn.Module): name = type(metric).__name__
    else: name = getattr(metric, 'name', None) or getattr(metric, '__name__', None) or type(metric).__name__
    return name.lstrip('_').lower()


def _lower_is_better(metric) -> bool | None:
    """Whether `metric` falls as the model gets better, by its name: fastai's trackers' rule (names holding 'loss' or
    'error'), fastai's regression metrics, perplexity and cross-entropy; a share such as accuracy rises; None for a
    name that says neither (a lambda, 'score')"""
    name = _metric_name(metric)
    if any(part in name for part in _FALLING): return True
    if any(part in name for part in _SHARES): return False
    return None


def _in_points(metric, scores: pd.Series) -> bool:
    "Whether gains read in points (100 x the score): known shares in [0, 1], such as accuracy or error_rate"
    name = _metric_name(metric)
    return (name == 'error_rate' or not any(part in name for part in _FALLING)) and \
        any(part in name for part in _SHARES) and bool(scores.between(0, 1).all())


def _agreement(student_logits: Tensor, teacher_logits: Tensor, axis: int = 1,
               gather: Callable[[Tensor], Tensor] = noop) -> tuple[int, int]:
    """How many items (positions, for dense outputs) have the same top-1 class for student and teacher, and of how many;
    `gather` collects the items of every process first (a learner's `to_detach`, as fastai's `AccumMetric` does)"""
    axis = axis if student_logits.ndim > 1 else -1
    same = gather(student_logits.argmax(dim=axis) == teacher_logits.to(student_logits.device).argmax(dim=axis))
    return int(same.sum()), same.numel()


class TeacherAgreement(Metric):
    """The share of validation items whose top-1 class for the student equals the teacher's (big_vision logs it during
    distillation). A metric for `metrics=`: it runs `teacher` (a model or a `Learner`) in eval mode without gradient on
    validation batches only, so training, and what the teacher runs there, stay as they were. Under DDP it counts the
    items of every process (each once, as fastai's metrics do). `learn.export()` leaves it out: it holds the teacher.
    `teacher_input`: what the teacher receives, as `KnowledgeDistillation` takes it ('auto', a `TeacherInput`, None)."""
    def __init__(self, teacher, teacher_input='auto'):
        self.teacher, self.teacher_input = teacher_model(teacher), teacher_inputs([teacher], teacher_input)[0]

    def reset(self):
        "Before each validation: no count yet, and a recurrent teacher (with `reset`) from a fresh state"
        self.same, self.total, self.student_stats = 0, 0, None  # the student's normalisation: read at the first batch
        if callable(getattr(self.teacher, 'reset', None)): self.teacher.reset()

    def accumulate(self, learn: Learner):
        if learn.training: return
        student = first_output(learn.pred)
        if self.teacher_input is not None and self.student_stats is None:
            self.student_stats = input_stats(learn.dls.valid) or RAW
        with torch.no_grad(), placed_like(self.teacher, next(learn.model.parameters())), evaluating(self.teacher):
            # on the student's device, in its dtype; then put back
            teacher = first_output(self.teacher(*adapted(learn.xb, self.teacher_input, self.student_stats)))
        gather = partial(learn.to_detach, cpu=False)  # under DDP: all processes' items, without the padding
        same, total = _agreement(student, teacher, task_of(learn.loss_func).axis, gather)
        self.same, self.total = self.same + same, self.total + total

    @property
    def value(self): return self.same / self.total if self.total else None

    @property
    def name(self) -> str: return 'teacher_agreement'


def kd_candidates(learn: Learner, teacher, unlabeled=None, teacher_input='auto') -> dict[str, dict]:
    """fastkd's default candidates for `learn`'s task. Single-label classification: SoftTarget at T=4 and T=2,
    SoftTarget on standardised logits (T=2), DIST, DKD, function matching (SoftTarget T=4 on batches mixed by `MixUp`,
    which teacher and student share; with `unlabeled` items at weight 1, as the recipe has it) and, where
    `match_layers` finds a pair, DIST with a FitNet hint from the student's deepest feature map to the teacher's
    deepest one of the same spatial size (for the teacher fed `teacher_input`). Other tasks: the callback's own loss."""
    if task_of(learn.loss_func).kind != 'categorical': return {'auto': dict(loss='auto')}
    candidates = {'softtarget T4': dict(loss=SoftTarget(T=4.), weight=0.5),
                  'softtarget T2': dict(loss=SoftTarget(T=2.), weight=0.5),
                  'softtarget-std T2': dict(loss=SoftTarget(T=2., standardize=True), weight=0.5),
                  'dist': dict(loss=DIST(), weight=0.5),
                  'dkd': dict(loss=DKD(), weight=0.5),
                  'fm (mixup)': dict(loss=SoftTarget(T=4.), weight=0.5 if unlabeled is None else 1., cbs=[MixUp])}
    pair = _hint_pair(learn, teacher, teacher_inputs([teacher], teacher_input)[0])
    if pair: candidates['dist + hint'] = dict(loss=DIST(), weight=0.5, hints=[Hint(*pair, FitNet())])
    return candidates


def _hint_pair(learn: Learner, teacher, teacher_input: TeacherInput | None = None) -> tuple[str, str] | None:
    """The student's deepest feature map (larger than 1x1) and the teacher's deepest layer of the same spatial size, the
    teacher fed its `teacher_input`"""
    dl = learn.dls.valid if len(learn.dls.valid) else learn.dls.train
    xb = inputs_of(dl, dl.one_batch())
    with torch.random.fork_rng(devices=[]):
        pairs = match_layers(learn.model, teacher_model(teacher), xb, teacher_x=adapted(xb, teacher_input,
                                                                                       input_stats(dl)))
    pairs = pairs[[np.prod(shape[2:]) > 1 for shape in pairs.student_shape]]
    if not len(pairs): return None
    deepest = pairs[pairs.student_layer == pairs.student_layer.iloc[-1]].iloc[-1]
    return deepest.student_layer, deepest.teacher_layer


def frozen_first(freeze_epochs: int = 1) -> Fit:
    """A `fit` for `kd_find` that trains as the main job does: `freeze_epochs` with the body frozen (`freeze_to(1)`),
    then the rung's epochs unfrozen, each `fit_one_cycle` at the same learning rate and with the trial's callbacks"""
    def fit(learn: Learner, epochs: int, lr: float, cbs: list):
        if freeze_epochs:
            learn.freeze_to(1)
            learn.fit_one_cycle(freeze_epochs, lr, cbs=cbs)
        learn.unfreeze()
        learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return fit


def _one_cycle(learn: Learner, epochs: int, lr: float, cbs: list): learn.fit_one_cycle(epochs, lr, cbs=cbs)


def frozen_at(epochs: int, freeze_epochs: int = 1) -> Fit:
    """A `fit` for `kd_find` that trains as the main job does (`frozen_first(freeze_epochs)`) at the planned schedule
    of `epochs`, and the shorter, early rungs unfrozen from the start: they only rank the candidates, and each frozen
    epoch would add 1/(1 + `epochs`) of a student run per trial (on the digits demo, 8.6 student runs became 7.4)"""
    def fit(learn: Learner, rung_epochs: int, lr: float, cbs: list):
        frozen_first(freeze_epochs if rung_epochs >= epochs else 0)(learn, rung_epochs, lr, cbs)
    return fit


def _rungs(epochs: int) -> list[int]:
    """Epochs of each rung: half the planned schedule, then all of it. On the digits demo (bench/kd_find.py) rungs of
    1 epoch ranked the methods at random (spreads of 15 points between seeds) and dropped the test split's winner;
    half the schedule ranked them in the test split's order"""
    return [epochs // 2, epochs] if epochs >= 2 else [epochs]


def _fresh(cb) -> Callback:
    "A new callback for a trial: a class or factory is called, an instance copied"
    return deepcopy(cb) if isinstance(cb, Callback) else cb()


_ABSENT = object()  # an attribute a learner did not have
# callbacks of the user's that sit out the trials: a distiller would distil in every one; trackers would stop a trial
# early, score its best epoch or save over the user's files (SaveModelCallback); loggers would write or draw each trial
SITTING_OUT = (KnowledgeDistillation, TrackerCallback, CSVLogger, ShowGraphCallback)


@contextmanager
def _random_kept(learn: Learner):
    """Every random state kd_find moves, put back on exit: torch's, numpy's and Python's, each loader's own generator
    (`Reseed` and fastai's `randomize` replace it; a loader without one is left without one) and cudnn's flags (which
    `set_seed(reproducible=True)` sets)"""
    loaders = [(dl, getattr(dl, 'rng', None)) for dl in learn.dls.loaders]
    states = [rng.getstate() if rng is not None else None for _, rng in loaders]
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        with random_state_kept(next(learn.model.parameters()).device): yield
    finally:
        for (dl, rng), state in zip(loaders, states):
            if rng is None: vars(dl).pop('rng', None)
            else:
                rng.setstate(state)
                dl.rng = rng
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def _keeps_random_states(find: Callable) -> Callable:
    "`find(learn, ...)` within `_random_kept(learn)`: what it draws, from its first step on, moves no random state"
    @functools.wraps(find)
    def _find(learn: Learner, *args, **kwargs):
        with _random_kept(learn): return find(learn, *args, **kwargs)
    return _find


_HISTORY = ('lrs', 'iters', 'losses', 'values', 'metric_names')  # what a Recorder keeps of the fits before


class _Restored:
    """What trials change in `learn`, kept on entry and put back on exit: weights, trainability, optimizer, modes, log
    (attributes absent on entry are taken away again) and callbacks (`SITTING_OUT` leave for the trials)"""
    def __init__(self, learn: Learner): self.learn = learn

    def __enter__(self):
        learn = self.learn
        self.weights = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
        self.trainable = [p.requires_grad for p in learn.model.parameters()]
        self.modes = [m.training for m in learn.model.modules()]
        self.opt, self.cbs, self.metrics = learn.opt, list(learn.cbs), learn.metrics
        self.kept = [(owner, k, vars(owner).get(k, _ABSENT)) for owner, names in
                     [(getattr(learn, 'recorder', None), _HISTORY), (learn, ('final_record',))] if owner is not None
                     for k in names]
        learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, SITTING_OUT)))
        return self

    def reset(self, weights: dict | None = None):
        "The learner as it was on entry (or with `weights`), with a new optimizer (created by the next fit)"
        self.learn.model.load_state_dict(self.weights if weights is None else weights)
        for p, trainable in zip(self.learn.model.parameters(), self.trainable): p.requires_grad_(trainable)
        self.learn.opt = None

    def __exit__(self, *exc):
        learn = self.learn
        self.reset()
        for m, mode in zip(learn.model.modules(), self.modes): m.training = mode
        learn.opt, learn.metrics = self.opt, self.metrics
        learn.cbs.clear()
        learn.add_cbs(self.cbs)  # in their order, those that sat out included
        for owner, k, value in self.kept:
            if value is _ABSENT: vars(owner).pop(k, None)
            else: setattr(owner, k, value)


@dataclass
class KDFindResult:
    """What `kd_find` measured: `trials` (one row per training run), `table` (one row per candidate at the last rung it
    reached, best first, its `stage`: 'final' or the rung it was dropped at), `best` (a candidate name, or None when
    no finalist's interval of the mean gain lies above zero), `candidates` and `teacher` (to build `callback()`),
    `seconds` and `runs` (the cost, in student-alone runs of the planned schedule), whether the metric is
    `lower_is_better` (gains are then falls of the metric) and whether its changes read in `points` (of 100)"""
    trials: pd.DataFrame
    table: pd.DataFrame
    best: str | None
    candidates: dict
    teacher: object
    metric: str
    seconds: float
    runs: float
    lr: float
    message: str = field(default='')
    lower_is_better: bool = False
    points: bool = True
    unlabeled: object = field(default=None, repr=False)  # what joined the candidates' training, for `callback()`
    teacher_input: TeacherInput | None = field(default=None, repr=False)  # what the teacher received
    confidence: float = 0.95  # 1 - the chance of a false pick, over all finalists and looks
    looks: int = 1  # verdicts planned: on the first held-out seeds, and after the added ones
    look: int = 1  # the look `best` was decided at: `looks` where seeds were added

    @property
    def top(self) -> str:
        "The candidate with the highest gain at the last rung, whether or not it counts"
        return next(name for name in self.table.index if name != 'alone')

    def callback(self, name: str | None = None) -> list[Callback]:
        "A fresh `KnowledgeDistillation` of candidate `name` (default: `best`) and its extra callbacks, for `cbs=`"
        name = name or self.best
        if name is None:
            raise ValueError(f'{self.message} Train the student alone, or take a candidate anyway: '
                             f'res.callback({self.top!r}).')
        if name not in self.candidates:
            raise KeyError(f'No candidate {name!r}: choose one of {", ".join(self.candidates)}.')
        kwargs = deepcopy(self.candidates[name])
        extra = [_fresh(cb) for cb in kwargs.pop('cbs', [])]
        if self.unlabeled is not None: kwargs.setdefault('unlabeled', self.unlabeled)
        kwargs.setdefault('teacher_input', self.teacher_input)
        return [KnowledgeDistillation(self.teacher, **kwargs), *extra]

    @property
    def figsize(self) -> tuple[float, float]: return 7, 0.45 * (len(self.table) - 1) + 1.5

    def plot(self, ax=None) -> Figure:
        """Gain over the student alone per candidate (the mean over the seeds of its last rung; bars: their std; rows
        dropped early hatched), on `ax` (default: a new figure); returns the figure"""
        rows = self.table.drop(index='alone')
        if ax is None: ax = Figure(figsize=self.figsize).subplots()
        colors = ['tab:green' if name == self.best else 'tab:blue' if gain > 0 else 'tab:red'
                  for name, gain in rows.gain.items()]
        labels = [f'{name} ({int(e)} ep, {int(s)} seed{"s" * (s > 1)}{", dropped" * (stage != "final")})'
                  for name, e, s, stage in zip(rows.index, rows.epochs, rows.seeds, rows.stage)]
        bars = ax.barh(labels[::-1], rows.gain[::-1], xerr=rows.gain_std.fillna(0)[::-1], color=colors[::-1], capsize=3)
        for bar, stage in zip(bars, rows.stage[::-1]): bar.set_hatch('//' if stage != 'final' else None)
        ax.axvline(0, color='black', lw=1)
        ax.set(xlabel=f'gain over the student alone (validation {self.metric}; right is better)', title='kd_find')
        ax.figure.tight_layout()
        return ax.figure

    def record(self) -> dict:
        "What `from_record` rebuilds this result from without training, as JSON-able values: trials, verdict, cost"
        return dict(trials=self.trials.to_dict('list'), best=self.best, metric=self.metric, seconds=self.seconds,
                    runs=self.runs, lr=self.lr, message=self.message, lower_is_better=self.lower_is_better,
                    points=self.points, confidence=self.confidence, looks=self.looks, look=self.look, rule=RULE)

    @classmethod
    def from_record(cls, record: dict, candidates: dict, teacher, unlabeled=None, teacher_input='auto') -> KDFindResult:
        """The result `record()` kept, with the `candidates` (the same names) and `teacher` that `callback()` builds
        from; for records kept before the metric's direction was recorded, it is read from the metric's name"""
        if record.get('rule') != RULE:
            raise StaleRecord('This kd_find result was kept by an older fastkd, under another verdict rule: measure '
                              'again (the job does so by itself).')
        trials = pd.DataFrame(record['trials'])
        unknown = sorted(set(trials.name) - {'alone', *candidates})
        if unknown:
            raise ValueError(f'The kept kd_find result tried {", ".join(unknown)}, which the candidates lack: pass the '
                             'candidates it was measured with, or measure again.')
        lower = record.get('lower_is_better', _lower_is_better(record['metric']) or False)  # older records: by name
        points = record.get('points', _in_points(record['metric'], trials.score))
        confidence, looks, look = record['confidence'], record['looks'], record['look']
        return cls(trials, _table(trials, lower, confidence, looks, look), record['best'], candidates, teacher,
                   record['metric'], record['seconds'], record['runs'], record['lr'], record['message'], lower, points,
                   unlabeled, teacher_inputs([teacher], teacher_input)[0], confidence, looks, look)

    def __repr__(self) -> str: return f'{self.message}\n{self.table.to_string(float_format="{:.4g}".format)}'

    def _repr_markdown_(self) -> str:
        header = ['candidate', *self.table.columns]
        cells = [[str(name), *(f'{v:.4g}' if isinstance(v, float) else str(v) for v in row)]
                 for name, row in zip(self.table.index, self.table.itertuples(index=False))]
        lines = [header, ['---'] * len(header), *cells]
        return f'**{self.message}**\n\n' + '\n'.join('| ' + ' | '.join(line) + ' |' for line in lines)


def _scores(learn: Learner, teacher_logits: Tensor, metric: Callable) -> tuple[float, float]:
    """The learner's `metric` on the validation set, and its agreement with the teacher's logits there: a function of
    (predictions, targets) on the whole set at once, given the model's outputs as fastai gives its metrics (before the
    loss's activation: `accuracy_multi` applies its own sigmoid; for a mean over items, such as accuracy, the same as
    fastai's average over batches); a `Metric` (`F1Score()`, `rmse`, `Perplexity()`) through `validate`, which runs
    its own accumulation (an argmax, a sigmoid, the loss). Outputs of another shape than the teacher's are refused."""
    preds, targs = learn.get_preds(dl=learn.dls.valid, act=noop)
    axis = task_of(learn.loss_func).axis
    if preds.shape != teacher_logits.shape:
        raise ValueError(outputs_differ(teacher_logits.shape, preds.shape, axis, getattr(learn.dls, 'c', None)))
    same, total = _agreement(preds, teacher_logits, axis)
    if not isinstance(metric, Metric): return _one_number(metric(preds, targs), metric), same / total
    recorder = learn.recorder
    metrics, shown, learn.metrics, recorder.valid_metrics = learn.metrics, recorder.valid_metrics, [metric], True
    try: learn.validate(dl=learn.dls.valid)
    finally: learn.metrics, recorder.valid_metrics = metrics, shown
    return _one_number(metric.value, metric), same / total


def _one_number(value, metric) -> float:
    "`value` as a float, or an error naming `metric`: candidates are compared on one number per run"
    try: return float(value)
    except (TypeError, ValueError):
        raise ValueError(f'kd_find compares candidates on one number per run, and {_metric_name(metric)!r} gave '
                         f'{type(value).__name__} {str(value)[:60]}: pass a metric that gives one, e.g. '
                         "F1Score(average='macro') rather than average=None.") from None


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, learn: Learner, teacher_input: TeacherInput | None = None) -> Tensor:
    "The teacher's logits for every validation batch (fed its `teacher_input`), on the CPU"
    param, dl = next(learn.model.parameters()), learn.dls.valid
    stats = input_stats(dl)
    def logits(batch):
        xb = adapted(to_device(inputs_of(dl, batch), param.device), teacher_input, stats)
        return first_output(teacher(*xb)).float().cpu()
    with placed_like(teacher, param), evaluating(teacher):  # the teacher is left where it was given
        return torch.cat([logits(batch) for batch in dl])


def _sign(lower_is_better: bool) -> int: return -1 if lower_is_better else 1


def _finalists(trials: pd.DataFrame) -> list[str]:
    "The candidates that reached the last rung, in the order they trained there"
    last = trials[trials.rung == trials.rung.max()]
    return [name for name in last.name.unique() if name != 'alone']


def _level(trials: pd.DataFrame, confidence: float, looks: int = 1, look: int = 1) -> float:
    """The two-sided confidence of each finalist's interval at `look` of `looks`, such that a false pick (a finalist
    that gains nothing whose interval lies above zero) has a chance of at most 1 - `confidence` over all k finalists
    and looks (Bonferroni; a pick rests on the lower end alone, so the error is all spent there): each finalist's
    (1 - confidence) / k, a quarter of it at the first of two looks (two seeds show only a clear gain) and the rest
    at the second, where the added seeds give power"""
    error = (1 - confidence) / max(1, len(_finalists(trials)))
    if looks > 1: error *= FIRST_LOOK if look == 1 else 1 - FIRST_LOOK
    return 1 - 2 * error


def _judged(gain: dict) -> dict:
    """`seed_gain`'s answer, with no interval where the per-seed gains are the same (beyond float32 rounding): a
    validation score counted in items ties often on kd_find's few seeds, and a tie says nothing of the spread"""
    if gain['seeds'] < 2 or gain['std'] > 1e-6 * abs(gain['mean']): return gain
    return {**gain, 'ci_low': np.nan, 'ci_high': np.nan, 'shown': False}


def _gains(trials: pd.DataFrame, lower_is_better: bool, confidence: float, scale: float = 1., looks: int = 1,
           look: int = 1) -> dict[str, dict]:
    "Per finalist, `seed_gain` of its last-rung scores over the student alone's of the same seeds (positive: better)"
    sign, last = _sign(lower_is_better), trials[trials.rung == trials.rung.max()]
    alone, level = sign * last[last.name == 'alone'].set_index('seed').score, _level(trials, confidence, looks, look)
    return {name: _judged(seed_gain(alone, sign * last[last.name == name].set_index('seed').score, level, scale))
            for name in _finalists(trials)}


def _table(trials: pd.DataFrame, lower_is_better: bool = False, confidence: float = 0.95, looks: int = 1,
           look: int = 1) -> pd.DataFrame:
    """Per candidate, its last rung: mean score and agreement over seeds, gain over the student alone of that rung
    (positive: better), its std over the seeds and, for finalists, the interval of the mean gain (`ci_low`, `ci_high`,
    at `look` of `looks`, `_level`); its `stage`: 'final', or the rung where it was dropped"""
    rows, n_rungs = {}, trials.rung.max() + 1
    intervals = _gains(trials, lower_is_better, confidence, looks=looks, look=look)
    for name, runs in trials.groupby('name', sort=False):
        rung = runs.rung.max()
        last = runs[runs.rung == rung].set_index('seed')
        alone = trials[(trials.name == 'alone') & (trials.rung == rung)].set_index('seed').score
        gains = _sign(lower_is_better) * (last.score - alone.reindex(last.index))
        interval = intervals.get(name, dict(ci_low=np.nan, ci_high=np.nan))
        rows[name] = dict(score=last.score.mean(), epochs=last.epochs.iloc[0], seeds=len(last), gain=gains.mean(),
                          gain_std=gains.std(), ci_low=interval['ci_low'], ci_high=interval['ci_high'],
                          agreement=last.agreement.mean(), seconds=runs.seconds.sum(), rung=rung,
                          stage='final' if rung == n_rungs - 1 else f'dropped at rung {rung + 1} of {n_rungs}')
    table = pd.DataFrame.from_dict(rows, orient='index')
    table.index.name = 'candidate'
    return table.sort_values(['rung', 'gain'], ascending=False)


def _survivors(trials: pd.DataFrame, rung: int, n: int, lower_is_better: bool = False) -> list[str]:
    "The `n` candidates with the highest gain over the student alone at `rung` (ties in the candidates' order)"
    here = _sign(lower_is_better) * trials[trials.rung == rung].groupby('name', sort=False).score.mean()
    gains = here.drop(index='alone') - here['alone']
    return list(gains.sort_values(ascending=False, kind='stable').index[:n])


def _undecided(trials: pd.DataFrame, lower_is_better: bool, confidence: float, looks: int = 1) -> list[str]:
    """The finalists worth more seeds after the first look (of `looks`): none once one of them has shown a gain; else
    those whose mean gain is positive (`_gaining`)"""
    gains = _gains(trials, lower_is_better, confidence, looks=looks)
    return [] if any(gain['shown'] for gain in gains.values()) else _gaining(trials, lower_is_better)


def _gaining(trials: pd.DataFrame, lower_is_better: bool) -> list[str]:
    """The finalists whose mean gain is positive: between the two looks, the others get no more seeds (stopping for
    futility, which cannot make a false verdict likelier)"""
    gains = _gains(trials, lower_is_better, 0.95)
    return [name for name, gain in gains.items() if gain['mean'] > 0]


def _verdict(trials: pd.DataFrame, table: pd.DataFrame, metric: str, lower_is_better: bool = False,
             points: bool = True, confidence: float = 0.95, looks: int = 1, look: int = 1) -> tuple[str | None, str]:
    """The finalist with the highest mean gain among those whose interval of the mean gain lies above zero (the main
    job's kind of rule, `VERDICT_RULE`, at `look` of `looks`: `_level`), and why, in words: the change
    of the metric itself, in points (of 100) for shares in [0, 1], else in the metric's units"""
    gains = _gains(trials, lower_is_better, confidence, 100 if points else 1, looks, look)
    if not gains: return None, 'No candidate reached the last rung.'
    shown = [name for name, gain in gains.items() if gain['shown']]
    name = max(shown or gains, key=lambda name: gains[name]['mean'])
    gain, sign, level = gains[name], _sign(lower_is_better), _level(trials, confidence, looks, look)
    epochs, seeds, form = int(table.epochs[name]), gain['seeds'], '.1f' if points else '.3g'
    units = f'{"points" if points else metric}{" (lower is better)" * lower_is_better}'
    last_rung = trials.rung == trials.rung.max()
    early, judged = set(trials[~last_rung].seed), set(trials[last_rung].seed)
    held_out = f' (not the seed{"s" * (len(early) > 1)} {", ".join(map(str, sorted(early)))} that chose the ' \
        'finalists)' if early and not early & judged else ''
    spread = f' +- {gain["std"]:{form}}' * (seeds > 1)
    said = (f'{name} changed validation {metric} by {sign * gain["mean"]:+{form}}{spread} {units} over '
            f'{seeds} seed{"s" * (seeds > 1)}{held_out} at {epochs} epoch{"s" * (epochs > 1)}')
    if gain['mean'] <= 0 and (seeds < 2 or np.isnan(gain['ci_low'])):  # no finalist gained: more seeds cannot help
        return None, (f'No candidate showed a gain over the student alone: at best, {said}'
                      f'{", the same on every seed" * (seeds > 1)}.')
    if seeds < 2:
        return None, f'No verdict: {said}; one seed gives no interval of the mean gain (pass more seeds).'
    if np.isnan(gain['ci_low']):
        return None, (f'No verdict: {said}, the same gain on every seed, which gives no interval of the mean gain '
                      '(pass more seeds, or a larger max_seeds).')
    shared = ' and '.join([f'{len(gains)} finalists'] * (len(gains) > 1) + [f'{looks} looks'] * (looks > 1))
    low, high = sorted((sign * gain['ci_low'], sign * gain['ci_high']))  # of the change of the metric
    when = f'look {look} of {looks}; ' * (looks > 1)
    interval = (f'{level:.1%} interval of the mean change ({when}false picks at most {1 - confidence:.0%}, from its '
                f'end on the gain\'s side alone{f", shared by {shared}" * bool(shared)}): '
                f'{low:+{form}} to {high:+{form}}')
    if name in shown: return name, f'Distil with {said} ({interval}).'
    where = 'which lies wholly on the side of a loss' if gain['ci_high'] < 0 else 'which includes zero'
    return None, f'No candidate showed a gain over the student alone: at best, {said} ({interval}, {where}).'


def _default_metric(learn: Learner) -> Callable:
    """What kd_find scores when told nothing: the learner's first metric (not `TeacherAgreement`, which distillation
    raises by itself), else accuracy for a classifier"""
    metric = next((m for m in learn.metrics if not isinstance(m, TeacherAgreement)), None)
    if metric is not None: return metric
    if task_of(learn.loss_func).kind == 'categorical': return accuracy
    loss = type(getattr(learn.loss_func, 'func', learn.loss_func)).__name__  # MSELossFlat() holds an MSELoss
    raise ValueError(f'kd_find needs a metric to compare candidates on, and this learner has none and does not '
                     f'classify (its loss: {loss}): pass metric=, e.g. metric=rmse for a regression (or build the '
                     'learner with metrics=).')


def _start(start_weights: Callable[[int], dict] | None) -> Callable[[int], dict | None]:
    "The weights a trial of a seed starts from, each drawn once: `start_weights(seed)`, or None (the learner's own)"
    return (lambda seed: None) if start_weights is None else functools.cache(start_weights)


@_keeps_random_states
def kd_find(learn: Learner, teacher, candidates: dict[str, dict] | None = None, epochs: int | None = None,
            lr: float | None = None, seeds: Sequence[int] = (0, 1, 2), metric: Callable | None = None,
            fit: Fit | None = None, rungs: Sequence[int] | None = None, keep: float = 0.25, early_seeds: int = 1,
            show_progress: bool = True, lower_is_better: bool | None = None, show_plot: bool = True,
            unlabeled=None, teacher_input='auto', max_seeds: int = 8, confidence: float = 0.95,
            start_weights: Callable[[int], dict] | None = None, share_teacher: bool | None = None) -> KDFindResult:
    """Which way of distilling `teacher` (a model or a `Learner`) into `learn`'s model pays, measured on the validation
    set. `candidates`: name -> `KnowledgeDistillation` keyword arguments (default: `kd_candidates(learn, teacher)`),
    e.g. `{'soft T4': dict(loss=SoftTarget(T=4)), 'dist': dict(loss=DIST(), weight=0.8)}`; a candidate's `cbs` entry
    lists extra callbacks that train beside it, as classes, factories or instances (copied), e.g. function matching:
    `dict(loss=SoftTarget(T=4), cbs=[MixUp])` (teacher and student see the same mixed batch). The student alone is
    always measured, as 'alone'. Every trial starts from the learner's current weights (or `start_weights(seed)`, a
    state dict: seeds then draw the starting weights too) with a new optimizer and sees the batches of its seed
    (`Reseed`); it trains with `fit(learn, epochs, lr, cbs)` (default: `fit_one_cycle`; `frozen_first(1)` trains as
    the main job) at `lr` (default: `lr_find`'s valley for the student alone, found once).
    Successive halving: rungs of `rungs` epochs (default: half of `epochs`, then `epochs`) on the first `early_seeds`
    of `seeds` (gains averaged), the best `keep` share of the candidates (at least two, where there are two) going on
    to the next. The last rung (`epochs`, the planned schedule: default 4, or the last of `rungs`, which must end there)
    trains the finalists and the student alone on the other seeds, which chose nothing (with two candidates or fewer,
    nothing is dropped: one rung, every seed judges). The verdict is the main job's kind of rule: `best` is the
    finalist with the highest mean gain among those whose interval of the mean per-seed gain (Student t: per-seed gains
    roughly normal) lies above zero, else None. Where no finalist shows a gain there, the finalists that gain on average
    train on further seeds (the next integers; a finalist whose mean gain falls to zero or below stops) up to
    `max_seeds` at the last rung, and the verdict is taken once more. A false pick (a finalist that gains nothing,
    picked) has a chance of at most 1 - `confidence` over all k finalists and both looks (Bonferroni on the lower ends,
    on which a pick rests: each finalist's share spent a quarter at the first look, the rest at the second; for two
    finalists, intervals at 98.75% then 96.25%; with one held-out seed, which gives no interval, one look after the
    added seeds). Scores are `metric` on the validation set (default: the learner's first metric other than
    `TeacherAgreement`, else `accuracy` for a classifier): a `Metric` as `validate` computes it, a function on the whole
    set's outputs at once; lower is better for fastai's `mse`, `rmse`, `mae`, `msle`, `exp_rmspe`, `error_rate` and
    names holding 'loss' or 'error' (as fastai's trackers decide), else higher, unless `lower_is_better` says. `gain`
    is the candidate's improvement over the student alone, same rung and seeds, in the metric's units: positive is
    better.
    `share_teacher`: trials fed the same batch (trials of one seed, until MixUp or training makes their inputs differ)
    share the teacher's forward (`TeacherMemo`: exact, keyed by the bytes of the batch); hint trials run it anyway.
    None (the default): where the student trains on the CPU; on a GPU the key's copy to the host waits at every step.
    `show_plot` draws `plot()` on a pyplot figure, as `lr_find` does. The learner is left as it was: weights,
    trainability, optimizer, callbacks (trackers and loggers sit out the trials: `SaveModelCallback` would save over
    your model), modes, the Recorder's history and every random state (the next fit sees the batches it would have
    seen). `unlabeled` (items, or a DataLoader of inputs) joins the training of every distilled candidate
    (`KnowledgeDistillation`'s `unlabeled`); the student alone, which has no teacher to learn them from, trains on the
    labeled items. `teacher_input`: what the teacher receives (`KnowledgeDistillation`'s), in every trial and for the
    agreement."""
    if isinstance(teacher, (list, tuple)):
        raise TypeError(f'kd_find compares ways of distilling one teacher, and got a {type(teacher).__name__} of '
                        f'{len(teacher)}: pass one model or Learner (an ensemble is for KnowledgeDistillation itself, '
                        'e.g. with the loss kd_find chose for the best of them).')
    given_input = teacher_inputs([teacher], teacher_input)[0]
    candidates = kd_candidates(learn, teacher, unlabeled, given_input) if candidates is None else dict(candidates)
    if 'alone' in candidates: raise ValueError("'alone' is the student without a teacher, always measured: rename it.")
    if not candidates: raise ValueError('No candidates to try: pass a dict name -> KnowledgeDistillation arguments.')
    for kwargs in candidates.values():  # a misspelt argument is refused now, not after the first trials
        KnowledgeDistillation(teacher, **{k: v for k, v in kwargs.items() if k != 'cbs'})
    if epochs is None: epochs = rungs[-1] if rungs else 4
    rungs, seeds, fit = list(rungs or _rungs(epochs)), list(seeds), fit or _one_cycle
    if rungs != sorted(rungs) or rungs[0] < 1:
        raise ValueError(f'rungs are epochs per rung, at least 1 and increasing, got {rungs}.')
    if rungs[-1] != epochs:
        raise ValueError(f'The last rung is the planned schedule, epochs={epochs}, and rungs={rungs} ends at '
                         f'{rungs[-1]}: pass epochs={rungs[-1]}, or rungs ending at {epochs}.')
    if len(set(seeds)) < len(seeds):
        raise ValueError(f'seeds must differ, got {seeds}: a repeated seed trains the same run again, and its copy '
                         'would count as another seed in the interval of the mean gain.')
    metric = _default_metric(learn) if metric is None else metric
    if isinstance(metric, AvgMetric): metric = metric.func  # a function fastai wrapped: computed on the whole set
    if not 0 < keep < 1: raise ValueError(f'keep is the share of candidates kept at each rung, in (0, 1), got {keep}.')
    if not 0.5 < confidence < 1:
        raise ValueError(f'confidence is 1 - the chance of a false pick, in (0.5, 1), e.g. 0.95: got {confidence}.')
    sizes = [len(candidates)]
    for _ in rungs[1:]: sizes.append(max(min(2, sizes[-1]), int(sizes[-1] * keep)))  # two finalists to compare
    if sizes[-1] == len(candidates): rungs, sizes = rungs[-1:], sizes[-1:]  # nothing to drop: every seed judges
    if len(rungs) > 1 and early_seeds < 1:
        raise ValueError(f'early_seeds is how many seeds train the early rungs, at least 1: got {early_seeds}.')
    early, final = (seeds[:early_seeds], seeds[early_seeds:]) if len(rungs) > 1 else ([], seeds)
    if not final:
        raise ValueError(f'The last rung judges on seeds the early rungs did not choose with: pass more seeds than '
                         f'early_seeds={early_seeds}, e.g. seeds=(0, 1, 2).')
    lower = _lower_is_better(metric) if lower_is_better is None else lower_is_better
    if lower is None:
        warnings.warn(f'kd_find cannot tell from its name whether {_metric_name(metric)!r} rises or falls as the '
                      'student gets better, and takes higher as better: pass lower_is_better=True for an error or a '
                      'loss (lower_is_better=False says higher is better and silences this).')
        lower = False
    # a verdict on the first seeds (where two or more can give an interval), and one more after the added seeds
    looks = 2 if max_seeds > len(final) > 1 else 1
    n_trials = sum(size + 1 for size in sizes[:-1]) * len(early) + (sizes[-1] + 1) * len(final)
    frozen_teacher, rows, start, starting = teacher_model(teacher), [], time.perf_counter(), _start(start_weights)
    joint = joint_loader(learn.dls.train, unlabeled) if unlabeled is not None else None  # made once for all trials
    if share_teacher is None: share_teacher = next(learn.model.parameters()).device.type == 'cpu'
    memo, memo_for = TeacherMemo(frozen_teacher) if share_teacher else None, None  # (rung, seed) of its batches
    with _Restored(learn) as restored, learn.no_bar(), learn.no_logging(), memo or nullcontext():
        counted = memo is not None and memo.active  # a recurrent teacher's forwards are never kept, nor counted
        restored.reset()
        teacher_logits = _teacher_logits(frozen_teacher, learn, given_input)
        _scores(learn, teacher_logits, metric)  # outputs of another shape, or no single number: refused before training
        if lr is None:  # from the first seed's batches, so that the same call finds the same lr whatever ran before
            with learn.added_cbs(Reseed(seeds[0])): lr = float(learn.lr_find(show_plot=False).valley)
        bar = progress_bar(range(n_trials), display=show_progress, leave=False)
        bar.update(0)

        def trial(name: str, rung: int, seed: int):
            "Train candidate `name` (or the student alone) for rung `rung` from `seed`, and keep its scores"
            nonlocal memo_for
            restored.reset(starting(seed))
            kwargs = deepcopy(candidates.get(name, {}))
            extra = [_fresh(cb) for cb in kwargs.pop('cbs', [])]
            if unlabeled is not None: kwargs.setdefault('unlabeled', unlabeled)
            kwargs.setdefault('teacher_input', given_input)
            distil = [KnowledgeDistillation(teacher, **kwargs), *extra] if name != 'alone' else []
            if memo and (rung, seed) != memo_for: memo.forget()  # later trials never see the batches kept so far
            memo_for = rung, seed
            computed, reused = (memo.computed, memo.reused) if memo else (0, 0)
            trial_start = time.perf_counter()
            fit(learn, rungs[rung], lr, [Reseed(seed), *distil])
            seconds = time.perf_counter() - trial_start
            score, agreement = _scores(learn, teacher_logits, metric)
            rows.append(dict(name=name, rung=rung, epochs=rungs[rung], seed=seed, score=score, agreement=agreement,
                             seconds=seconds, teacher_computed=memo.computed - computed if counted else np.nan,
                             teacher_reused=memo.reused - reused if counted else np.nan))
            bar.comment = f'{name}, {rungs[rung]} epochs, seed {seed}'
            bar.update(len(rows))

        names, last = list(candidates), len(rungs) - 1
        for i, size in enumerate(sizes[:-1]):
            for seed in early:
                for name in ['alone', *names[:size]]: trial(name, i, seed)
            names = _survivors(pd.DataFrame(rows), i, sizes[i + 1], lower)
        for seed in final:
            for name in ['alone', *names[:sizes[-1]]]: trial(name, last, seed)
        # the first look; without a verdict, the finalists gaining on average train up to max_seeds for the second
        gaining = _undecided(pd.DataFrame(rows), lower, confidence, looks)
        look = 1
        for seed in itertools.islice(itertools.count(max(seeds) + 1), max(0, max_seeds - len(final))):
            if not gaining: break
            look = looks
            bar.total += len(gaining) + 1
            for name in ['alone', *gaining]: trial(name, last, seed)
            gaining = [name for name in gaining if name in _gaining(pd.DataFrame(rows), lower)]
        bar.on_iter_end()
    trials, name = pd.DataFrame(rows), _metric_name(metric)
    table, points = _table(trials, lower, confidence, looks, look), _in_points(metric, trials.score)
    best, message = _verdict(trials, table, name, lower, points, confidence, looks, look)
    alone_seconds = trials[(trials.name == 'alone') & (trials.rung == trials.rung.max())].seconds.mean()
    seconds = time.perf_counter() - start
    res = KDFindResult(trials, table, best, candidates, teacher, name, seconds, seconds / alone_seconds, lr, message,
                       lower, points, unlabeled, given_input, confidence, looks, look)
    if show_plot: res.plot(ax=plt.subplots(figsize=res.figsize)[1])
    return res


@patch
@delegates(kd_find)
def kd_find(self: Learner, teacher, candidates: dict[str, dict] | None = None, epochs: int | None = None,
            lr: float | None = None, **kwargs) -> KDFindResult:
    "`kd_find(learn, teacher, ...)`: which way of distilling `teacher` pays for this learner (`fastkd.kd_find.kd_find`)"
    return kd_find(self, teacher, candidates, epochs, lr, **kwargs)  # `patch` leaves the module's kd_find the function


def kd_find_for_job(dls, student_arch: Callable, teacher, schedule: Schedule, metric: Callable = accuracy,
                    candidates: dict[str, dict] | None = None, seeds: Sequence[int] = (0, 1, 2),
                    record: dict | None = None, **kwargs) -> dict:
    """`kd_find` for the main job (`--method auto`): a student built as the job builds it (`scratch_learner`), its
    starting weights drawn from each trial's seed (the spread then holds the initialisation's, as the job's seeds do),
    trained as the job trains it at the planned schedule (`frozen_first(schedule.freeze_epochs)`, then
    `schedule.epochs`) and without the frozen epochs at the earlier rungs (`frozen_at`), at `schedule.lr`
    (lr_find's valley, from the weights of `schedule.seed`, when None). With `record` (what an earlier call returned as
    `record`), nothing trains: the result is rebuilt from it (a record kept by an older fastkd, under another rule, is
    measured again: `remeasured`). Returns the result (`table`, `plot()`, `seconds`, `runs`),
    the chosen candidate `name` (`best`, else `top` with `paid=False`), its `loss`, `weight`, `hints`, `mix` (a factory
    of its one extra callback, e.g. MixUp, else None), `callbacks`: a function that makes a fresh list of all its
    callbacks (distillation with hints, and extras) for each student, and `record` (JSON-able, for `RunStore`).
    Other keyword arguments (`rungs`, `keep`, `max_seeds`, `show_progress`) go to `kd_find`."""
    rungs = kwargs.get('rungs')
    if rungs and rungs[-1] != schedule.epochs:
        raise ValueError(f"The last rung is the job's planned schedule, schedule.epochs={schedule.epochs} (the command "
                         f"line's --epochs), and rungs={list(rungs)} ends at {rungs[-1]}: end the rungs there.")
    learn, res = scratch_learner(dls, student_arch, schedule.seed), None
    teacher_input, unlabeled = kwargs.get('teacher_input', 'auto'), kwargs.get('unlabeled')
    if record is not None:
        kept = kd_candidates(learn, teacher, unlabeled, teacher_input) if candidates is None else candidates
        try: res = KDFindResult.from_record(record, dict(kept), teacher, unlabeled, teacher_input)
        except StaleRecord: pass  # measured again, under today's rule
    remeasured = record is not None and res is None
    if res is None:
        def start_weights(seed: int) -> dict: return scratch_learner(dls, student_arch, seed).model.state_dict()
        res = kd_find(learn, teacher, candidates, epochs=schedule.epochs, lr=schedule.lr, seeds=seeds, metric=metric,
                      fit=frozen_at(schedule.epochs, schedule.freeze_epochs), start_weights=start_weights,
                      **{'show_plot': False, **kwargs})
    name = res.best or res.top
    chosen = res.candidates[name]
    extra = chosen.get('cbs', [])
    return dict(result=res, name=name, paid=res.best is not None, loss=chosen.get('loss', 'auto'),
                weight=chosen.get('weight', 0.5), hints=chosen.get('hints', ()),
                mix=(lambda: _fresh(extra[0])) if len(extra) == 1 else None, callbacks=lambda: res.callback(name),
                table=res.table, figure=res.plot(), seconds=res.seconds, runs=res.runs, message=res.message,
                record=res.record(), remeasured=remeasured)
