"""The main job: a teacher trained once, the same student trained alone and distilled for each seed (same seed, same
schedule, same batches), each scored with a TTA sweep on the test set, and a report folder that says whether
distillation paid beyond the seed-to-seed spread."""
from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd
import fastai.callback.schedule  # noqa: F401  (adds lr_find and fit_one_cycle to Learner)
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from matplotlib.figure import Figure
from sklearn.metrics import f1_score
from torch import nn

from .callback import KnowledgeDistillation
from .files import atomic_write
from .losses import DIST, DKD, SoftTarget
from .report import compare_models, compression_summary
from .split import default_split
from .tta import plot_tta, test_time_aug

__all__ = ['weighted_f1', 'scratch_learner', 'train_schedule', 'Schedule', 'kd_method', 'Reseed', 'distillation_job',
           'seed_summary', 'seed_gain', 'distillation_verdict', 'write_report']


def weighted_f1(y_true, y_pred) -> float:
    "F1 averaged over classes, weighted by their support in `y_true`"
    return f1_score(y_true, y_pred, average='weighted')


@dataclass
class Schedule:
    "How every model of the job trains: `lr_find` over `lr_find_iters` steps (unless `lr`), `freeze_epochs` with the body frozen, then `epochs`"
    freeze_epochs: int = 1
    epochs: int = 4
    lr: float | None = None
    lr_find_iters: int = 100
    seed: int = 42


def train_schedule(learn: Learner, schedule: Schedule) -> dict:
    """The reference notebook's schedule: `lr_find` (when `schedule.lr` is None), `fit_one_cycle` with the body
    frozen (`freeze_to(1)`), `unfreeze`, `fit_one_cycle` again, each fit drawing from `schedule.seed` (`Reseed`).
    Returns the learning rate, the seconds it took, the Recorder's rows of every epoch and its smoothed loss at every
    step (evaluation resets the Recorder: keep these)."""
    start = time.perf_counter()
    lr = schedule.lr or learn.lr_find(num_it=schedule.lr_find_iters, show_plot=False).valley
    epochs, losses = [], []
    for frozen, n_epochs in ((True, schedule.freeze_epochs), (False, schedule.epochs)):
        if not n_epochs: continue
        if frozen: learn.freeze_to(1)
        else: learn.unfreeze()
        with learn.added_cbs(Reseed(schedule.seed)): learn.fit_one_cycle(n_epochs, lr)
        epochs.append(pd.DataFrame(learn.recorder.values, columns=list(learn.recorder.metric_names[1:-1])))
        losses += learn.recorder.losses
    return dict(lr=lr, seconds=time.perf_counter() - start, epochs=pd.concat(epochs, ignore_index=True),
                losses=[float(loss) for loss in losses])


def scratch_learner(dls: DataLoaders, arch: Callable, seed: int = 42, **kwargs) -> Learner:
    "A from-scratch vision learner split into body and head, its weights drawn from `seed`"
    set_seed(seed, reproducible=True)
    return vision_learner(dls, arch, pretrained=False, splitter=default_split, metrics=accuracy, **kwargs)


KD_METHODS = {'softtarget': SoftTarget, 'dkd': DKD, 'dist': DIST, 'fm': SoftTarget}
MIXES = {'mixup': MixUp, 'cutmix': CutMix}


def kd_method(method: str = 'softtarget', mix: str = 'mixup', mix_alpha: float | None = None,
              **loss_kwargs) -> tuple[nn.Module, Callable[[], Callback] | None]:
    """The distillation loss of `method` (a key of `KD_METHODS`, built with `loss_kwargs`, e.g. `T=2`) and, for `fm`
    (function matching: Beyer et al., CVPR 2022), a factory of the `mix` callback (`MixUp` or `CutMix`, Beta
    parameter `mix_alpha`, fastai's default when None) that makes teacher and student see the same mixed batch."""
    if method not in KD_METHODS: raise ValueError(f'Unknown method {method!r}: choose one of {", ".join(KD_METHODS)}.')
    if mix not in MIXES: raise ValueError(f'Unknown mix {mix!r}: choose one of {", ".join(MIXES)}.')
    mix_cb = None
    if method == 'fm': mix_cb = partial(MIXES[mix], mix_alpha) if mix_alpha is not None else MIXES[mix]
    return KD_METHODS[method](**loss_kwargs), mix_cb


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
        for dl in self.dls.loaders: dl.rng = random.Random(self.seed)


def _train_students(dls: DataLoaders, teacher: Learner, student_arch: Callable, schedule: Schedule, kd_loss,
                    kd_weight: float, mix: Callable[[], Callback] | None) -> tuple[dict, dict]:
    """The student alone and the distilled student (with `mix()` when given) from `schedule.seed`, trained with the
    same schedule: the distilled student reuses the learning rate found for the student alone"""
    learners = {'student': scratch_learner(dls, student_arch, schedule.seed)}
    training = {'student': train_schedule(learners['student'], schedule)}
    cbs = [KnowledgeDistillation(teacher, kd_loss, weight=kd_weight), *([mix()] if mix else [])]
    learners['distilled student'] = scratch_learner(dls, student_arch, schedule.seed, cbs=cbs)
    training['distilled student'] = train_schedule(learners['distilled student'],
                                                   replace(schedule, lr=training['student']['lr']))
    return learners, training


def distillation_job(dls: DataLoaders, test_dl, y_true, teacher_arch: Callable, student_arch: Callable,
                     schedule: Schedule = Schedule(), teacher: nn.Module | None = None, kd_loss=SoftTarget(T=4),
                     kd_weight: float = 0.5, n_augs: list[int] = [4, 8], mask=None,
                     metric: Callable = weighted_f1, seeds: Sequence[int] | None = None,
                     mix: Callable[[], Callback] | None = None, teacher_epochs: int | None = None) -> dict:
    """Train (or take) a teacher once (`schedule`, with `teacher_epochs` after unfreezing when given), then for each of `seeds` (default: `schedule.seed` alone) the student alone and
    with `KnowledgeDistillation` (plus the augmentation callback `mix()` makes, for function matching), both from
    that seed with the same schedule, and score each on `test_dl` with a TTA sweep of `n_augs` (plain predictions
    always included) over the items `mask` selects.
    Returns the learners, training histories and TTA results of the first seed by model name, the teacher/student
    size report, `table` (a row per model and seed), `summary` (mean and spread per model) and `verdict`."""
    seeds, n_augs = list(seeds or [schedule.seed]), sorted({0, *n_augs})
    learners, training = {'teacher': scratch_learner(dls, teacher_arch, schedule.seed)}, {}
    if teacher is None:
        training['teacher'] = train_schedule(learners['teacher'], replace(schedule, epochs=teacher_epochs or schedule.epochs))
    else: learners['teacher'].model.load_state_dict(teacher.state_dict())
    score = partial(test_time_aug, test_dataloader=test_dl, y_true=y_true, metric=metric, n_augs=n_augs, mask=mask)
    tta = {'teacher': score(learners['teacher'])}
    rows = [_row('teacher', schedule.seed, learners['teacher'], tta['teacher'], training.get('teacher'))]
    for seed in seeds:
        students, students_training = _train_students(dls, learners['teacher'], student_arch,
                                                      replace(schedule, seed=seed), kd_loss, kd_weight, mix)
        students_tta = {name: score(learn) for name, learn in students.items()}
        rows += [_row(name, seed, learn, students_tta[name], students_training[name])
                 for name, learn in students.items()]
        if seed == seeds[0]:  # the first seed's models are the ones the report plots and saves
            learners.update(students)
            training.update(students_training)
            tta.update(students_tta)
    sizes = compare_models(learners['teacher'], learners['student'], input_size=tuple(dls.one_batch()[0].shape[1:]))
    table = pd.DataFrame(rows).set_index('model')
    side = ['teacher' if name == 'teacher' else 'student' for name in table.index]
    table.insert(1, 'parameters', sizes.loc['parameters', side].astype(int).values)
    table.insert(2, 'latency_ms', sizes.loc['latency_ms', side].values)
    return dict(learners=learners, training=training, tta=tta, sizes=sizes, seeds=seeds, table=table,
                summary=seed_summary(table), verdict=distillation_verdict(table))


def _row(name: str, seed: int, learn: Learner, tta: pd.DataFrame, training: dict | None) -> dict:
    "One line of the results table: the model's validation accuracy, its test scores, its epochs and training time"
    return {'model': name, 'seed': seed, 'valid_accuracy': float(learn.validate()[1]), 'test_f1': tta.score.iloc[0],
            f'test_f1_tta{tta.n_aug.iloc[-1]}': tta.score.iloc[-1],
            'epochs': len(training['epochs']) if training else float('nan'),
            'train_s': training['seconds'] if training else float('nan')}


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model of `table` (a row per model and seed): the number of seeds, and the mean and sample standard deviation
    of each score"""
    scores = [c for c in table.columns if c == 'valid_accuracy' or c.startswith('test_f1')] + ['train_s']
    stats = table.groupby(level='model', sort=False)[scores].agg(['mean', 'std'])
    stats.columns = [f'{score}_{stat}' for score, stat in stats.columns]
    stats.insert(0, 'seeds', table.groupby(level='model', sort=False).size())
    return stats


VERDICT_RULE = ('A gain is claimed only when the mean of the per-seed gains (distilled student minus student alone, '
                'same seed) is above zero, above the standard deviation of those gains, and above the standard '
                "deviation of the student alone's scores across seeds (sample standard deviations).")


def seed_gain(alone: pd.Series, distilled: pd.Series) -> dict:
    """The gain of distillation in points (100 x the score) over seeds: `alone` and `distilled` hold one score per
    seed (indexed by seed), paired by seed. Returns the number of seeds, the mean and sample standard deviation of the
    per-seed gains, the student alone's standard deviation, and whether the gain counts by `VERDICT_RULE`."""
    gains = 100 * (distilled - alone.reindex(distilled.index))
    mean, std, alone_std = gains.mean(), gains.std(), 100 * alone.std()
    return dict(seeds=len(gains), mean=mean, std=std, alone_std=alone_std,
                beyond_spread=bool(len(gains) > 1 and mean > 0 and mean > std and mean > alone_std))


def distillation_verdict(table: pd.DataFrame, score: str = 'test_f1') -> str:
    """Whether distillation paid on `score` over the seeds of `table` (rows 'student' and 'distilled student', a
    `seed` column), by `VERDICT_RULE`: 'distillation gained X +- Y points' (mean and standard deviation of the
    per-seed gains, in points of 100), else 'no gain beyond seed-to-seed spread'"""
    alone, distilled = (table.loc[[name]].set_index('seed')[score] for name in ('student', 'distilled student'))
    gain = seed_gain(alone, distilled)
    if gain['seeds'] < 2:
        return (f'Distillation changed the student\'s {score} by {gain["mean"]:+.1f} points on one seed: with no '
                'seed-to-seed spread to compare with, this says nothing yet (run with --seeds 3 or more).')
    if gain['beyond_spread']:
        return (f'Distillation gained {gain["mean"]:.1f} +- {gain["std"]:.1f} points of {score} over '
                f'{gain["seeds"]} seeds.')
    return (f'No gain beyond seed-to-seed spread: distillation changed {score} by {gain["mean"]:+.1f} +- '
            f'{gain["std"]:.1f} points over {gain["seeds"]} seeds (student alone: +- {gain["alone_std"]:.1f}).')


def _loss_figure(training: dict) -> Figure:
    "Smoothed training loss per step of each model trained, and the distilled student's loss parts per epoch"
    fig = Figure(figsize=(10, 4))
    steps_ax, parts_ax = fig.subplots(1, 2)
    for name, history in training.items(): steps_ax.plot(history['losses'], label=name)
    steps_ax.set(xlabel='training step', ylabel='smoothed training loss', title='Training loss')
    steps_ax.legend()
    epochs = training['distilled student']['epochs']
    parts = [c for c in epochs.columns if c.startswith('train_') and c != 'train_loss'] + ['valid_loss']
    for column in parts: parts_ax.plot(epochs[column], 'o-', label=column)
    parts_ax.set(xlabel='epoch', title='Distilled student: loss parts')
    parts_ax.legend()
    fig.tight_layout()
    return fig


def write_report(job: dict, dest: str | Path, title: str = 'fastkd distillation report') -> Path:
    """Write `dest/report.md` (scores per model over the seeds, the verdict, every run, compression), `results.csv`
    (a row per model and seed), `losses.png`, `tta.png` and the distilled student's weights `student.pth` (a state
    dict: `load_teacher`/`load_state_dict` read it back); plots and weights are those of the first seed."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    table, learners = job['table'], job['learners']
    atomic_write(dest/'results.csv', lambda tmp: table.to_csv(tmp))
    atomic_write(dest/'losses.png', lambda tmp: _loss_figure(job['training']).savefig(tmp, format='png', dpi=100))
    atomic_write(dest/'tta.png', lambda tmp: plot_tta(job['tta']['distilled student']).savefig(tmp, format='png', dpi=100))
    atomic_write(dest/'student.pth', lambda tmp: torch.save(learners['distilled student'].model.state_dict(), tmp))
    tta_column = table.columns[table.columns.str.startswith('test_f1_tta')][0]
    text = '\n'.join([
        f'# {title}', '',
        f'**{job["verdict"]}**', '', f'- {VERDICT_RULE}',
        f'- test_f1: weighted F1 on the test set without TTA; {tta_column}: with that many augmented passes. Mean and '
        'sample standard deviation (std) over the seeds; the teacher is trained or loaded once.',
        f'- {compression_summary(job["sizes"])}', '',
        '## Per model', '', _markdown(job['summary']), '',
        '## Every run', '', _markdown(table), '',
        f'Plots and `student.pth` (the distilled student\'s weights) are from seed {job["seeds"][0]}.', '',
        '![training losses](losses.png)', '', '![TTA sweep of the distilled student](tta.png)', ''])
    atomic_write(dest/'report.md', lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return dest/'report.md'


def _markdown(table: pd.DataFrame) -> str:
    "`table` as a Markdown table, numbers to 4 significant digits, missing ones as '-'"
    cells = [[str(index)] + [('-' if pd.isna(v) else f'{v:.4g}') if isinstance(v, float) else str(v) for v in row]
             for index, row in zip(table.index, table.itertuples(index=False))]
    header = [table.index.name or ''] + list(table.columns)
    return '\n'.join('| ' + ' | '.join(line) + ' |' for line in [header, ['---'] * len(header), *cells])
