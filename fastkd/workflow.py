"""The main job: a teacher trained once, the same student trained alone and distilled for each seed (same seed, same
schedule, same batches), each scored with a TTA sweep on the test set, and a report folder that says whether
distillation paid: whether the confidence interval of the mean per-seed gain lies above zero (`VERDICT_RULE`)."""
from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import fastai.callback.schedule  # noqa: F401  (adds lr_find and fit_one_cycle to Learner)
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.data.core import DataLoaders
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from scipy.stats import t as t_distribution
from sklearn.metrics import f1_score
from torch import Tensor, nn

from .basics import evaluating, first_output, sample_batch
from .callback import KnowledgeDistillation
from .compression import compare_models
from .losses import LOSSES, SoftTarget, losses_for
from .runs import RunStore, fingerprint
from .split import default_split
from .teacher_input import AdaptedTeacher, TeacherInput, input_stats
from .tta import test_time_aug

__all__ = ['weighted_f1', 'scratch_learner', 'train_schedule', 'Schedule', 'kd_method', 'Reseed', 'distillation_job',
           'validation_accuracy', 'check_on_validation', 'InputSizeError', 'seed_summary', 'seed_gain',
           'distillation_verdict']


def weighted_f1(y_true, y_pred) -> float:
    "F1 averaged over classes, weighted by their support in `y_true`"
    return f1_score(y_true, y_pred, average='weighted')


@dataclass
class Schedule:
    """How every model of the job trains: `lr_find` over `lr_find_iters` steps (unless `lr`), `freeze_epochs` with the
    body frozen, then `epochs`"""
    freeze_epochs: int = 1
    epochs: int = 4
    lr: float | None = None
    lr_find_iters: int = 100
    seed: int = 42


def train_schedule(learn: Learner, schedule: Schedule) -> dict:
    """The reference notebook's schedule: `lr_find` (when `schedule.lr` is None), `fit_one_cycle` with the body
    frozen (`freeze_to(1)`), `unfreeze`, `fit_one_cycle` again, each drawing from `schedule.seed` (`Reseed`), so that
    a run does not depend on what the process ran before it. Returns the learning rate, the seconds it took and the
    Recorder's rows of every epoch (evaluation resets the Recorder: keep these)."""
    start = time.perf_counter()
    if schedule.lr: lr = schedule.lr
    else:
        with learn.added_cbs(Reseed(schedule.seed)):
            lr = learn.lr_find(num_it=schedule.lr_find_iters, show_plot=False).valley
    epochs = []
    for frozen, n_epochs in ((True, schedule.freeze_epochs), (False, schedule.epochs)):
        if not n_epochs: continue
        if frozen: learn.freeze_to(1)
        else: learn.unfreeze()
        with learn.added_cbs(Reseed(schedule.seed)): learn.fit_one_cycle(n_epochs, lr)
        epochs.append(pd.DataFrame(learn.recorder.values, columns=list(learn.recorder.metric_names[1:-1])))
    return dict(lr=float(lr), seconds=time.perf_counter() - start, epochs=pd.concat(epochs, ignore_index=True))


def scratch_learner(dls: DataLoaders, arch: Callable, seed: int = 42, **kwargs) -> Learner:
    "A from-scratch vision learner split into body and head, its weights drawn from `seed`"
    set_seed(seed, reproducible=True)
    return vision_learner(dls, arch, pretrained=False, splitter=default_split, metrics=accuracy, **kwargs)


KD_METHODS = losses_for('categorical')  # what the job distils a classifier with: names of `LOSSES`
MIXES = {'mixup': MixUp, 'cutmix': CutMix}


def kd_method(method: str = 'softtarget', mix: str = 'mixup', mix_alpha: float | None = None,
              **loss_kwargs) -> tuple[nn.Module, Callable[[], Callback] | None]:
    """The distillation loss of `method` (a name of `LOSSES`, built with its settings updated by `loss_kwargs`, e.g.
    `T=2`) and, for a method on mixed batches (`fm`, function matching: Beyer et al., CVPR 2022), a factory of the
    `mix` callback (`MixUp` or `CutMix`, Beta parameter `mix_alpha`, fastai's default when None) that makes teacher
    and student see the same mixed batch."""
    if method not in LOSSES: raise ValueError(f'Unknown method {method!r}: choose one of {", ".join(LOSSES)}.')
    if mix not in MIXES: raise ValueError(f'Unknown mix {mix!r}: choose one of {", ".join(MIXES)}.')
    mix_cb = None
    if LOSSES[method].mixed: mix_cb = partial(MIXES[mix], mix_alpha) if mix_alpha is not None else MIXES[mix]
    return LOSSES[method].build(**loss_kwargs), mix_cb


class Reseed(Callback):
    """Reset every random state training draws from to `seed` just before each fit's first training batch: torch,
    numpy and Python, and the batch order of each DataLoader (which keeps its own generator). It runs after the other
    callbacks' `before_train` (checks that draw a batch included), so that runs from one seed see the same batches
    and augmentations whatever ran before"""
    order = KnowledgeDistillation.order + 1

    def __init__(self, seed: int): self.seed = seed

    def before_train(self):
        if self.epoch: return
        set_seed(self.seed, reproducible=True)
        for dl in self.dls.loaders:
            if hasattr(dl, 'rng'): dl.rng = random.Random(self.seed)  # a plain torch loader draws from torch's


def _name(thing) -> str:
    "A name for an architecture, a loss or a callback factory that stays the same from process to process"
    if isinstance(thing, partial):
        settings = ', '.join([*map(repr, thing.args), *(f'{k}={v!r}' for k, v in thing.keywords.items())])
        return f'{_name(thing.func)}({settings})'
    return getattr(thing, '__name__', None) or repr(thing)


def _data_fingerprint(dls: DataLoaders, test_dl, y_true, mask) -> str:
    "A short hash of the items of the training, validation and test sets, the test labels and the mask"
    digest = hashlib.sha256()
    for part in (*[getattr(dl, 'items', len(dl.dataset)) for dl in (dls.train, dls.valid, test_dl)], y_true, mask):
        digest.update(str(list(part) if part is not None and not isinstance(part, int) else part).encode())
    return digest.hexdigest()[:12]


def _data_fingerprint_of(unlabeled) -> str:
    "How many unlabeled items there are, and a short hash of them (of a DataLoader's dataset items)"
    items = getattr(getattr(unlabeled, 'dataset', None), 'items', unlabeled)
    items = list(items) if items is not None else []
    return f'{len(items)} items, {hashlib.sha256(str(items).encode()).hexdigest()[:12]}'


def _job_settings(dls, test_dl, y_true, teacher_arch, student_arch, schedule, teacher, kd_loss, kd_weight, n_augs, mask,
                  metric, mix, teacher_epochs) -> dict:
    "Every setting the results of a job depend on (its seeds aside: each run is kept per seed)"
    return dict(teacher_arch=_name(teacher_arch), student_arch=_name(student_arch),
                **asdict(schedule), teacher_epochs=teacher_epochs or schedule.epochs,
                teacher=fingerprint(teacher) if teacher is not None else 'trained by the job', kd_loss=repr(kd_loss),
                kd_weight=kd_weight, mix=_name(mix) if mix else None, n_augs=n_augs, metric=_name(metric),
                data_fingerprint=_data_fingerprint(dls, test_dl, y_true, mask))


def _run(name: str, seed: int, learn: Learner, train: Callable[[], dict | None], score: Callable,
         store: RunStore | None, keep_weights: bool = True) -> dict:
    """Train (`train()`) and score (`score(learn)`, its random draws from `seed`) run `name` of `seed`, then keep it in
    `store`; or, when `store` holds that run already, load its weights into `learn` and take its record.
    Returns the record: `row` (for the results table), `tta` (the sweep), `training` (or None) and `reused`."""
    record = store.load(name, seed, learn.model if keep_weights else None) if store else None
    if record is None:
        training = train()
        set_seed(seed, reproducible=True)
        tta = score(learn)
        record = dict(row=_row(name, seed, learn, tta, training), tta=tta.to_dict('list'), training=training and
                      {**training, 'epochs': training['epochs'].to_dict('list')})
        if store: store.save(name, seed, record, learn.model if keep_weights else None)
        return {**record, 'tta': tta, 'training': training, 'reused': False}
    training = record['training'] and {**record['training'], 'epochs': pd.DataFrame(record['training']['epochs'])}
    return {**record, 'tta': pd.DataFrame(record['tta']), 'training': training, 'reused': True}


def distillation_job(dls: DataLoaders, test_dl, y_true, teacher_arch: Callable, student_arch: Callable,
                     schedule: Schedule = Schedule(), teacher: nn.Module | None = None, kd_loss=SoftTarget(T=4),
                     kd_weight: float = 0.5, n_augs: list[int] = [4, 8], mask=None,
                     metric: Callable = weighted_f1, seeds: Sequence[int] | None = None,
                     mix: Callable[[], Callback] | None = None, teacher_epochs: int | None = None,
                     runs: str | Path | None = None, settings: dict | None = None,
                     choose: Callable[..., dict] | None = None, unlabeled=None,
                     teacher_input: TeacherInput | None = None) -> dict:
    """Train (or take) a teacher once (`schedule`, with `teacher_epochs` after unfreezing when given), then for each
    of `seeds` (default: `schedule.seed` alone) the student alone and with `KnowledgeDistillation` (plus the
    augmentation callback `mix()` makes, for function matching), both from that seed with the same schedule, and score
    each on `test_dl` with a TTA sweep of `n_augs` (plain predictions always included) over the items `mask` selects.
    With `runs` (a folder), each model is kept there as soon as it is trained and scored (`RunStore`), and a job run
    again with the same settings takes the runs that ended instead of training them again; `settings` adds what the
    caller knows (the command, the data folder) to the settings the job records and compares.
    With `choose` (`--method auto`), the distillation is not `kd_loss`, `kd_weight` and `mix` but what
    `choose(teacher_learner, record=None)` returns once the teacher is ready, e.g. `partial(kd_find_for_job, dls,
    student_arch, schedule=schedule)`: a dict with `paid` (False: no method paid, the students train alone and there
    is no distilled student), `callbacks()` (a fresh list for each distilled student), `message` and `record`
    (JSON-able: kept in `runs` as run 'kd_find', and passed back as `record` when the job resumes, so that it chooses
    the same without training again). With `unlabeled` (items, or a DataLoader of inputs), the distilled students also
    learn from them (`KnowledgeDistillation`'s `unlabeled`); the teacher and the students alone train on the labeled
    items, and `choose` is called with `unlabeled=` too. With `teacher_input`, the given `teacher` works at another
    input size or normalisation: it is scored, timed and distilled from behind it (`AdaptedTeacher`), so it receives
    the students' images resized and normalised as it takes them.
    Returns the learners, training histories and TTA results of the first seed by model name, the teacher/student
    size report, `table` (a row per model and seed), `summary` (mean and spread per model), `verdict`, `settings`,
    `reused` (the runs taken from `runs`) and `kd_find` (what `choose` returned, or None)."""
    seeds, n_augs = list(seeds or [schedule.seed]), sorted({0, *n_augs})
    if choose: kd_loss, kd_weight, mix = 'chosen by kd_find', None, None
    settings = {**(settings or {}), **_job_settings(dls, test_dl, y_true, teacher_arch, student_arch, schedule, teacher,
                                                     kd_loss, kd_weight, n_augs, mask, metric, mix, teacher_epochs),
                **({'unlabeled_items': _data_fingerprint_of(unlabeled)} if unlabeled is not None else {}),
                **({'teacher_input': repr(teacher_input)} if teacher_input is not None else {})}
    if teacher_input is not None and teacher is None:
        raise ValueError('teacher_input says what a given teacher takes, and this job trains its teacher on the '
                         "students' data: pass the teacher, or no teacher_input.")
    if unlabeled is not None and choose: choose = partial(choose, unlabeled=unlabeled)
    store = RunStore(runs, {k: v for k, v in settings.items() if k not in _UNCOMPARED}) if runs else None
    score = partial(test_time_aug, test_dataloader=test_dl, y_true=y_true, metric=metric, n_augs=n_augs, mask=mask)
    learners = {'teacher': scratch_learner(dls, teacher_arch, schedule.seed)}
    if teacher is not None: learners['teacher'].model.load_state_dict(teacher.state_dict())
    if teacher_input is not None:
        learners['teacher'].model = AdaptedTeacher(learners['teacher'].model, teacher_input, input_stats(dls.train))
    teacher_schedule = replace(schedule, epochs=teacher_epochs or schedule.epochs)
    train_teacher = partial(train_schedule, learners['teacher'], teacher_schedule) if teacher is None else lambda: None
    runs_done = {('teacher', schedule.seed): _run('teacher', schedule.seed, learners['teacher'], train_teacher, score,
                                                   store, keep_weights=teacher is None)}
    chosen = _chosen(choose, learners['teacher'], store, schedule.seed) if choose else None
    for seed in seeds:
        student = scratch_learner(dls, student_arch, seed)
        train_alone = partial(train_schedule, student, replace(schedule, seed=seed))
        alone = runs_done[('student', seed)] = _run('student', seed, student, train_alone, score, store)
        if seed == seeds[0]: learners['student'] = student  # the first seed's models: those the report plots and saves
        if chosen and not chosen['paid']: continue  # the students alone are what kd_find advises
        cbs = (chosen['callbacks']() if chosen else
               [KnowledgeDistillation(learners['teacher'], kd_loss, weight=kd_weight, unlabeled=unlabeled),
                *([mix()] if mix else [])])
        distilled = scratch_learner(dls, student_arch, seed, cbs=cbs)
        train_distilled = partial(train_schedule, distilled, replace(schedule, seed=seed, lr=alone['training']['lr']))
        runs_done[('distilled student', seed)] = _run('distilled student', seed, distilled, train_distilled, score,
                                                      store)
        if seed == seeds[0]: learners['distilled student'] = distilled
    first = {name: runs_done[(name, schedule.seed if name == 'teacher' else seeds[0])] for name in learners}
    sizes = compare_models(learners['teacher'], learners['student'], input_size=tuple(dls.one_batch()[0].shape[1:]))
    table = pd.DataFrame([run['row'] for run in runs_done.values()]).set_index('model')
    side = ['teacher' if name == 'teacher' else 'student' for name in table.index]
    table.insert(1, 'parameters', sizes.loc['parameters', side].astype(int).values)
    table.insert(2, 'latency_ms', sizes.loc['latency_ms', side].values)
    verdict = (distillation_verdict(table) if 'distilled student' in learners else
               f'kd_find: {chosen["message"]} So the students trained alone.')
    reused = [f'{name} seed {seed}' for (name, seed), run in runs_done.items() if run['reused']]
    return dict(learners=learners, training={name: run['training'] for name, run in first.items() if run['training']},
                tta={name: run['tta'] for name, run in first.items()}, sizes=sizes, seeds=seeds, table=table,
                summary=seed_summary(table), verdict=verdict, settings=settings, kd_find=chosen,
                reused=[*(['kd_find'] if chosen and chosen['reused'] else []), *reused])


def _chosen(choose: Callable[..., dict], teacher: Learner, store: RunStore | None, seed: int) -> dict:
    "What `choose` picks for `teacher`, or what it picked before: the record `store` keeps as run 'kd_find' of `seed`"
    kept = store.load('kd_find', seed) if store else None
    chosen = choose(teacher, record=kept and kept['record'])
    fresh = kept is None or chosen.get('remeasured', False)  # a record of an older rule is measured again
    if store and fresh: store.save('kd_find', seed, {'record': chosen['record']})
    return {**chosen, 'reused': not fresh}


_UNCOMPARED = ('command', 'out', 'threads', 'seeds', 'teacher_weights')  # recorded, but not what makes a run


def _row(name: str, seed: int, learn: Learner, tta: pd.DataFrame, training: dict | None) -> dict:
    "One line of the results table: the model's validation accuracy, its test scores, its epochs and training time"
    return {'model': name, 'seed': seed, 'valid_accuracy': float(learn.validate()[1]),
            'test_f1': float(tta.score.iloc[0]),
            f'test_f1_tta{tta.n_aug.iloc[-1]}': float(tta.score.iloc[-1]),
            'epochs': len(training['epochs']) if training else float('nan'),
            'train_s': training['seconds'] if training else float('nan')}


def validation_accuracy(model: nn.Module, dls: DataLoaders, n_items: int = 256, seed: int = 0) -> tuple[float, float]:
    """`model`'s top-1 accuracy on `n_items` validation items drawn with `seed` (no augmentation), and chance on them:
    the share of their most common class. Leaves every random generator and the model's mode as they were."""
    xb, yb = sample_batch(dls.valid, n_items, seed)
    return _accuracy(model, xb, yb), (yb.bincount().max() / len(yb)).item()




def _accuracy(model: nn.Module, xb: Tensor, yb: Tensor) -> float:
    device = next(model.parameters()).device
    with torch.no_grad(), evaluating(model): predicted = first_output(model(xb.to(device))).argmax(dim=1).cpu()
    return (predicted == yb.cpu()).float().mean().item()


def _clearly_above(accuracy: float, chance: float) -> bool:
    "An accuracy a quarter of the way from chance to perfect, or more: a model that works on these inputs"
    return accuracy >= chance + (1 - chance) / 4


class InputSizeError(ValueError):
    "`check_on_validation`'s error for a model that works at another image size: `size`"
    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


def check_on_validation(model: nn.Module, dls: DataLoaders, name: str = 'the teacher', size: int | None = None,
                        resized: Callable[[int], DataLoaders] | None = None,
                        sizes: Sequence[int] = (32, 48, 64, 96, 128, 224)) -> tuple[float, float]:
    """Refuse a `model` no better than chance on validation items of `dls` (`validation_accuracy`), before anything
    trains: the error says what it scored and what was tried to find the cause. With `resized` (a function of an
    image size that returns the same data at that size) `sizes` are tried, nearest first, and the first at which the
    model beats chance is named (an `InputSizeError`, whose `size` it is); inputs without `dls`'s normalisation are
    tried too. Returns the accuracy and chance."""
    accuracy, chance = validation_accuracy(model, dls)
    if accuracy > chance: return accuracy, chance
    at = f' at --size {size}' if size else ''
    found = [f'{name.capitalize()} scores {accuracy:.3f} on {min(256, len(dls.valid.dataset))} validation images{at}, '
             f'no better than chance ({chance:.3f}, always predicting their most common class).']
    for other in sorted((s for s in sizes if s != size), key=lambda s: abs(s - (size or s))) if resized else []:
        other_accuracy, other_chance = validation_accuracy(model, resized(other))
        if _clearly_above(other_accuracy, other_chance):  # the nearest size that works, not every one: each costs
            found.append(f'It was likely trained at another image size: at --size {other} it scores '
                         f'{other_accuracy:.3f}. Run again with --size {other}, or give it that size with '
                         f'--teacher-size {other}.')
            raise InputSizeError(' '.join(found), other)
    norm = next((t for t in dls.after_batch.fs if isinstance(t, Normalize)), None)
    if norm is not None:
        xb, yb = sample_batch(dls.valid, 256)
        raw_accuracy = _accuracy(model, norm.decode(xb), yb)
        if _clearly_above(raw_accuracy, chance):
            found.append(f'On inputs without the data\'s normalisation it scores {raw_accuracy:.3f}: it was trained on '
                         'unnormalised images; normalise its training data as these are (ImageNet statistics).')
            raise ValueError(' '.join(found))
    tried = f'sizes {", ".join(map(str, sizes))} and ' if resized else ''
    found.append(f'It fails at {tried}without normalisation too, so check that it was trained on these classes, in the '
                 'same order (class index = label of the data\'s vocab), and that these are its weights.')
    raise ValueError(' '.join(found))


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model of `table` (a row per model and seed): the number of seeds, and the mean and sample standard deviation
    of each score"""
    scores = [c for c in table.columns if c == 'valid_accuracy' or c.startswith('test_f1')] + ['train_s']
    stats = table.groupby(level='model', sort=False)[scores].agg(['mean', 'std'])
    stats.columns = [f'{score}_{stat}' for score, stat in stats.columns]
    stats.insert(0, 'seeds', table.groupby(level='model', sort=False).size())
    return stats


VERDICT_RULE = ('A gain is claimed only when the 95% confidence interval of the mean per-seed gain (distilled student '
                'minus student alone, same seed; Student t with one degree of freedom fewer than seeds) lies above '
                'zero, and a loss only when it lies below. More seeds narrow the interval, so a real gain is shown '
                'more surely, and a verdict does not hinge on the rounding of one run.')
SPREAD_RULE = ('Rule for "beyond spread": the mean of the per-seed gains is above zero, above the standard deviation '
               "of those gains, and above the standard deviation of the student alone's scores across seeds (sample "
               'standard deviations).')


def seed_gain(alone: pd.Series, distilled: pd.Series, confidence: float = 0.95, scale: float = 100.) -> dict:
    """The gain of distillation in points (`scale` x the score; `scale=1`: in the score's units) over seeds: `alone`
    and `distilled` hold one score per seed (indexed by seed), paired by seed. Returns the number of seeds, the mean
    and sample standard deviation of the per-seed gains, the student alone's standard deviation, the `confidence`
    interval of the mean gain (`ci_low`, `ci_high`), whether it lies above zero (`shown`, `VERDICT_RULE`) and whether
    the gain is `beyond_spread` (`SPREAD_RULE`)."""
    gains = scale * (distilled - alone.reindex(distilled.index))
    n, mean, std, alone_std = len(gains), gains.mean(), gains.std(), scale * alone.std()
    half = t_distribution.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return dict(seeds=n, mean=mean, std=std, alone_std=alone_std, ci_low=mean - half, ci_high=mean + half,
                shown=bool(mean - half > 0), beyond_spread=bool(n > 1 and mean > 0 and mean > std and mean > alone_std))


def distillation_verdict(table: pd.DataFrame, score: str = 'test_f1') -> str:
    """Whether distillation paid on `score` over the seeds of `table` (rows 'student' and 'distilled student', a
    `seed` column), by `VERDICT_RULE`: 'distillation gained X +- Y points' (mean and standard deviation of the
    per-seed gains, in points of 100) with the confidence interval of the mean gain: 'Distillation gained: ...',
    'Distillation cost: ...' or 'No gain shown: ...'"""
    alone, distilled = (table.loc[[name]].set_index('seed')[score] for name in ('student', 'distilled student'))
    gain = seed_gain(alone, distilled)
    if gain['seeds'] < 2:
        return (f'Distillation changed the student\'s {score} by {gain["mean"]:+.1f} points on one seed: with no '
                'seed-to-seed spread to compare with, this says nothing yet (run with --seeds 3 or more).')
    changed = (f'changed {score} by {gain["mean"]:+.1f} +- {gain["std"]:.1f} points over {gain["seeds"]} seeds (95% '
               f'confidence interval of the mean gain: {gain["ci_low"]:+.1f} to {gain["ci_high"]:+.1f}')
    if gain['shown']: return f'Distillation gained: it {changed}).'
    if gain['ci_high'] < 0: return f'Distillation cost: it {changed}).'
    return f'No gain shown: distillation {changed}, which includes zero; student alone: +- {gain["alone_std"]:.1f}).'
