"""The main job: a teacher, the same student trained alone and distilled (same seed, same schedule), each scored
with a TTA sweep on the test set, and a report folder that says whether distillation paid."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd
import fastai.callback.schedule  # noqa: F401  (adds lr_find and fit_one_cycle to Learner)
import torch
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
from .losses import SoftTarget
from .report import compare_models, compression_summary
from .split import default_split
from .tta import plot_tta, test_time_aug

__all__ = ['weighted_f1', 'scratch_learner', 'train_schedule', 'Schedule', 'distillation_job', 'write_report']


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
    frozen (`freeze_to(1)`), `unfreeze`, `fit_one_cycle` again. Returns the learning rate, the seconds it took, the
    Recorder's rows of every epoch and its smoothed loss at every step (evaluation resets the Recorder: keep these)."""
    start = time.perf_counter()
    lr = schedule.lr or learn.lr_find(num_it=schedule.lr_find_iters, show_plot=False).valley
    epochs, losses = [], []
    for frozen, n_epochs in ((True, schedule.freeze_epochs), (False, schedule.epochs)):
        if not n_epochs: continue
        if frozen: learn.freeze_to(1)
        else: learn.unfreeze()
        learn.fit_one_cycle(n_epochs, lr)
        epochs.append(pd.DataFrame(learn.recorder.values, columns=list(learn.recorder.metric_names[1:-1])))
        losses += learn.recorder.losses
    return dict(lr=lr, seconds=time.perf_counter() - start, epochs=pd.concat(epochs, ignore_index=True),
                losses=[float(loss) for loss in losses])


def scratch_learner(dls: DataLoaders, arch: Callable, seed: int = 42, **kwargs) -> Learner:
    "A from-scratch vision learner split into body and head, its weights drawn from `seed`"
    set_seed(seed, reproducible=True)
    return vision_learner(dls, arch, pretrained=False, splitter=default_split, metrics=accuracy, **kwargs)


def distillation_job(dls: DataLoaders, test_dl, y_true, teacher_arch: Callable, student_arch: Callable,
                     schedule: Schedule = Schedule(), teacher: nn.Module | None = None, kd_loss=SoftTarget(T=4),
                     kd_weight: float = 0.5, n_augs: list[int] = [4, 8], mask=None,
                     metric: Callable = weighted_f1) -> dict:
    """Train (or take) a teacher, then the student alone and with `KnowledgeDistillation`, from the same seed with
    the same schedule (the distilled student reuses the learning rate found for the student alone), and score each
    on `test_dl` with a TTA sweep of `n_augs` (plain predictions always included) over the items `mask` selects.
    Returns the learners by name, their TTA results, the teacher/student size report, and a results table."""
    learners, training = {'teacher': scratch_learner(dls, teacher_arch, schedule.seed)}, {}
    if teacher is None: training['teacher'] = train_schedule(learners['teacher'], schedule)
    else: learners['teacher'].model.load_state_dict(teacher.state_dict())
    learners['student'] = scratch_learner(dls, student_arch, schedule.seed)
    training['student'] = train_schedule(learners['student'], schedule)
    kd = KnowledgeDistillation(learners['teacher'], kd_loss, weight=kd_weight)
    learners['distilled student'] = scratch_learner(dls, student_arch, schedule.seed, cbs=kd)
    training['distilled student'] = train_schedule(learners['distilled student'],
                                                   replace(schedule, lr=training['student']['lr']))
    n_augs = sorted({0, *n_augs})
    tta = {name: test_time_aug(learn, test_dl, y_true, metric, n_augs, mask=mask) for name, learn in learners.items()}
    sizes = compare_models(learners['teacher'], learners['student'], input_size=tuple(dls.one_batch()[0].shape[1:]))
    rows = [{'model': name, 'parameters': int(sizes.at['parameters', 'teacher' if name == 'teacher' else 'student']),
             'latency_ms': sizes.at['latency_ms', 'teacher' if name == 'teacher' else 'student'],
             'valid_accuracy': float(learn.validate()[1]), 'test_f1': tta[name].score.iloc[0],
             f'test_f1_tta{n_augs[-1]}': tta[name].score.iloc[-1], 'train_s': training[name]['seconds'] if name in training else float('nan')}
            for name, learn in learners.items()]
    return dict(learners=learners, training=training, tta=tta, sizes=sizes, table=pd.DataFrame(rows).set_index('model'))


def _loss_figure(training: dict) -> Figure:
    "Smoothed training loss per step of each model trained, and the distilled student's loss parts per epoch"
    fig = Figure(figsize=(10, 4))
    steps_ax, parts_ax = fig.subplots(1, 2)
    for name, history in training.items(): steps_ax.plot(history['losses'], label=name)
    steps_ax.set(xlabel='training step', ylabel='smoothed training loss', title='Training loss')
    steps_ax.legend()
    epochs = training['distilled student']['epochs']
    for column in ('train_ce', 'train_kd', 'valid_loss'): parts_ax.plot(epochs[column], 'o-', label=column)
    parts_ax.set(xlabel='epoch', title='Distilled student: loss parts')
    parts_ax.legend()
    fig.tight_layout()
    return fig


def write_report(job: dict, dest: str | Path, title: str = 'fastkd distillation report') -> Path:
    """Write `dest/report.md` (results table, compression, verdict), `results.csv`, `losses.png`, `tta.png` and the
    distilled student's weights `student.pth` (a state dict: `load_teacher`/`load_state_dict` read it back)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    table, learners = job['table'], job['learners']
    atomic_write(dest/'results.csv', lambda tmp: table.to_csv(tmp))
    atomic_write(dest/'losses.png', lambda tmp: _loss_figure(job['training']).savefig(tmp, format='png', dpi=100))
    atomic_write(dest/'tta.png', lambda tmp: plot_tta(job['tta']['distilled student']).savefig(tmp, format='png', dpi=100))
    atomic_write(dest/'student.pth', lambda tmp: torch.save(learners['distilled student'].model.state_dict(), tmp))
    tta_column = table.columns[table.columns.str.startswith('test_f1_tta')][0]
    gain = 100 * (table.loc['distilled student', 'test_f1'] - table.loc['student', 'test_f1'])
    text = '\n'.join([
        f'# {title}', '',
        _markdown(table), '',
        f'- test_f1: weighted F1 on the test set without TTA; {tta_column}: with that many augmented passes.',
        f'- {compression_summary(job["sizes"])}',
        f'- Distillation changed the student\'s test F1 by {gain:+.1f} points (one seed: seed-to-seed spread '
        'is often a point or more, so compare over several seeds before concluding).', '',
        '![training losses](losses.png)', '', '![TTA sweep of the distilled student](tta.png)', ''])
    atomic_write(dest/'report.md', lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return dest/'report.md'


def _markdown(table: pd.DataFrame) -> str:
    "`table` as a Markdown table, numbers to 4 significant digits"
    cells = [[str(index)] + [f'{v:.4g}' if isinstance(v, float) else str(v) for v in row]
             for index, row in zip(table.index, table.itertuples(index=False))]
    header = [table.index.name or ''] + list(table.columns)
    return '\n'.join('| ' + ' | '.join(line) + ' |' for line in [header, ['---'] * len(header), *cells])
