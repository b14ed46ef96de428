"""Benchmark: how much of the teacher's accuracy a small student gets back on GTSRB 32x32, for each distillation method.

Data: the whole 32x32 training set of ../shared/data/gtsrb/gtsrb32.tar.gz, split by whole tracks with
`prepare_gtsrb`'s defaults (20% of tracks to validation, seed 42: the split the shared teacher was trained on, so
it never saw a validation track), scored on the 3,789-image test part (all 43 classes): weighted F1 and accuracy,
plain and with the number of TTA passes that scored best on the validation split.
Teacher: the ResNet-34 of ../shared/data/gtsrb/teachers/resnet34-gtsrb32.pth, loaded with `load_teacher`.
Student: a 4-layer CNN (`student_model`); the run stops unless `compare_models` finds it at most 1/5 of the
teacher's parameters and at least 2x faster at batch 1.
Rows (`ROWS`): the teacher, the student alone, the student distilled with SoftTarget, DKD, DIST, SoftTarget on
standardized logits, DIST plus a FitNet hint (the student's last convolution, 4x4, trained through a 1x1 adapter
to match the output of the teacher's `layer2`, 4x4), and function matching (MixUp on the student's batches, the teacher
seeing the same mixed images, plus SoftTarget); then, at the longer `--patient-epochs` schedule, the student alone,
function matching and the hinted DIST again, and function matching's control: the student alone on the same MixUp
batches, without a teacher (its gain is MixUp's alone). Every run of a row trains with the same schedule and learning
rate; runs of one seed start from the same weights and see the same batches.
Settings: each distillation row lists candidate settings (temperature, weight, ...). Every candidate is trained from
the first seed, and the one with the best weighted F1 on the validation split is kept and trained from the other
seeds; a patient row reuses the setting kept for its row. The TTA setting of each row is chosen the same way, on
the validation split. The test part is scored only for kept runs, and never used to choose anything.
Every trained student is exported with `learn.export()` to OUT/students/ROW-SETTING-seedSEED.pkl (outside git).
Writes bench/results/accuracy.md atomically, with the commands that produced it and the time they took.
Resuming: every run is recorded in OUT/runs.csv (kept runs, with their test scores) and OUT/selection.csv (the
candidates tried) as soon as it ends, and OUT/config.json holds what all runs of a table share (classes, lr, batch
size, width, teacher, TTA settings) and the commands so far. `--resume` adds to that table: runs already recorded
(same row, setting, seed and epochs) are reused, not trained again, and the results cover every recorded row, so the
table can be built in parts (`--rows`), across sessions or machines; a different configuration is refused.
Several processes can add to one table at once (each with `--resume`): a run is recorded under a lock, merged with
what the others recorded, and each process looks for recorded runs again before training one; `--report` writes the
results from what is recorded without training. Processes on the same row share its runs out: each run is
claimed (a lock file under OUT/claims/) by the process that makes it, and the others go on to the next seed.
`bench/accuracy_parallel.sh` runs the table that way, processes per row, for a machine with many cores or a GPU.
`--in-memory` decodes every image once (`fastkd.memory.in_memory`): an epoch then costs the model and the batch
transforms alone, which is what makes a GPU pay on these 32 px images.
Run: `python bench/accuracy.py` (`--help` for the sizes); `--quick` is a smoke run on a few classes and images.
Cost on the 2-core CPU build machine (2 threads): 8 to 13 minutes per 4-epoch student run on all 43 classes (loading
and augmenting the images alone takes about 41 s an epoch), plus several minutes to score the teacher: the default
table (about 300 student epochs) takes some 5 hours; `--rows`, `--seeds`, `--epochs` and `--candidates` cut it down.
On one H200 GPU (16 cores) with `--in-memory`: 37 s per 8-epoch run with two processes, 70 to 120 s with eight or
nine processes sharing the GPU, and 150 to 230 s per 20-epoch distilled run with nine (`bench/accuracy_parallel.sh`
with PER_ROW=3: the missing 23 runs of the table in 8 minutes).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import sys
import tarfile
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.mixup import MixUp
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner, load_learner
from fastai.metrics import accuracy
from fastai.torch_core import default_device, set_seed
from torch import nn
from torchvision.models import resnet34

from fastkd.callback import KnowledgeDistillation, load_teacher
from fastkd.files import atomic_write, locked
from fastkd.gtsrb import gtsrb_dls, gtsrb_test_dl, prepare_gtsrb
from fastkd.hints import FitNet, Hint
from fastkd.memory import InMemoryDL, in_memory
from fastkd.compression import compare_models
from fastkd.split import default_split
from fastkd.tta import tta_preds
from fastkd.workflow import SPREAD_RULE, Schedule, kd_method, seed_gain, train_schedule, weighted_f1

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/'shared'/'data'/'gtsrb'
ARCHIVE, TEACHER = SHARED/'gtsrb32.tar.gz', SHARED/'teachers'/'resnet34-gtsrb32.pth'
RESULTS, OUT = ROOT/'bench'/'results'/'accuracy.md', ROOT/'bench'/'out'
QUICK_CLASSES = [0, 19, 37]  # the three smallest classes: 210 training images each
SIZES = dict(epochs=8, patient_epochs=20, seeds=[0, 1, 2], candidates=2, n_augs=[0, 4, 8])  # unless given
QUICK = dict(epochs=1, patient_epochs=1, seeds=[0, 1], candidates=1, n_augs=[0, 1])  # with --quick, unless given


@dataclass
class Row:
    "A line of the table: the student alone (`method` None) or distilled by `method` (see `kd_method`)"
    key: str
    label: str
    method: str | None = None
    settings: list[dict] = field(default_factory=lambda: [{}])  # candidates: loss settings, `weight`, `mix_alpha`
    patient: bool = False  # trained for --patient-epochs
    settings_of: str | None = None  # reuse the setting kept for that row instead of choosing again
    hinted: bool = False  # adds `fitnet_hint()` to the distillation
    mixed: bool = False  # the student alone on MixUp batches: function matching's control, without a teacher


    @property
    def baseline(self) -> str: return 'alone-patient' if self.patient else 'alone'

    @property
    def compared(self) -> bool: return bool(self.method or self.mixed)  # scored against `baseline`


ROWS = [Row('alone', 'student alone'),
        Row('softtarget', '+ SoftTarget', 'softtarget', [dict(T=4, weight=0.5), dict(T=2, weight=0.25)]),
        Row('dkd', '+ DKD', 'dkd', [dict(alpha=1, beta=8, T=4, weight=0.5), dict(alpha=1, beta=2, T=4, weight=0.5)]),
        Row('dist', '+ DIST', 'dist', [dict(T=1, weight=0.5), dict(T=1, weight=0.8)]),
        Row('softtarget-std', '+ SoftTarget, standardized logits', 'softtarget',
            [dict(T=2, standardize=True, weight=0.5), dict(T=4, standardize=True, weight=0.5)]),
        Row('hint', '+ DIST + FitNet hint', 'dist', [dict(T=1, weight=0.5)], hinted=True),
        Row('fm', '+ function matching (MixUp + SoftTarget)', 'fm', [dict(T=4, weight=0.5), dict(T=4, weight=1.0)]),
        Row('alone-patient', 'student alone, patient', patient=True),
        Row('fm-patient', '+ function matching, patient', 'fm', patient=True, settings_of='fm'),
        Row('hint-patient', '+ DIST + FitNet hint, patient', 'dist', patient=True, settings_of='hint', hinted=True),
        Row('mixup-patient', 'student alone on MixUp batches, patient (control)', patient=True, mixed=True)]


def digits_and_gtsrb_args(parser: argparse.ArgumentParser, name: str, argv: list[str] | None) -> argparse.Namespace:
    """`parser`'s arguments and those a benchmark on the digits and GTSRB shares: --quick (the digits alone),
    --datasets, --threads, --out (kept runs, default OUT/NAME) and --results (default bench/results/NAME.md)"""
    parser.add_argument('--quick', action='store_true', help='smoke run: digits only, 2 seeds, 2 epochs')
    parser.add_argument('--datasets', nargs='+', default=None, choices=['digits', 'gtsrb'])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--out', type=Path, default=None, help=f'kept runs (default: bench/out/{name})')
    parser.add_argument('--results', type=Path, default=None, help=f'default: bench/results/{name}.md')
    args = parser.parse_args(argv)
    args.datasets = args.datasets or (['digits'] if args.quick else ['digits', 'gtsrb'])
    args.out = (args.out or OUT/(f'{name}-quick' if args.quick else name)).resolve()
    args.results = (args.results or (args.out if args.quick else ROOT/'bench'/'results')/f'{name}.md').resolve()
    return args


def write_text(text: str, path: Path):
    "Write `text` to `path` atomically, its folder made first"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))


def student_model(width: int = 24, n_out: int = 43) -> nn.Sequential:
    "A small CNN for 32 px images as `Sequential(body, head)`, built from fastai layers (so exports load anywhere)"
    body = nn.Sequential(ConvLayer(3, width), ConvLayer(width, 2 * width, stride=2),
                         ConvLayer(2 * width, 4 * width, stride=2), ConvLayer(4 * width, 4 * width, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten())
    return nn.Sequential(body, nn.Linear(4 * width, n_out))


def fitnet_hint() -> Hint:
    """The hint row's hint: the student's last convolution (`student_model`'s '0.3', 4x4 at 32 px) to the output of
    ResNet-34's layer2 ('0.5' in the teacher `load_teacher` builds: `Sequential(body, head)`), 4x4 too"""
    return Hint('0.3', '0.5', FitNet())


def setting_name(setting: dict) -> str:
    "A setting as text for tables and file names: 'T4-weight0.5'"
    return '-'.join(f'{k}{v}' for k, v in setting.items()) or 'default'


def prepared_data(data: Path, classes: list[int] | None) -> Path:
    "`data` with the folders of `prepare_gtsrb` (hard links), after unpacking the 32x32 archive there if needed"
    if not (data/'GTSRB').is_dir():
        if not ARCHIVE.exists():
            raise SystemExit(f'GTSRB archive not found at {ARCHIVE} (see shared/data/gtsrb/README.md).')
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as archive: archive.extractall(data, filter='data')
    with redirect_stdout(StringIO()): prepare_gtsrb(data, classes=classes, link=True)
    return data


def check_gap(teacher: nn.Module, width: int) -> pd.DataFrame:
    "`compare_models` of teacher and student at 32 px; stop unless the student is <= 1/5 the size and >= 2x faster"
    sizes = compare_models(teacher, student_model(width), input_size=(3, 32, 32), batch_size=128)
    params, speedup = sizes.at['parameters', 'student/teacher'], 1 / sizes.at['latency_ms', 'student/teacher']
    if params > 0.2 or speedup < 2:
        raise SystemExit(f'No real capacity gap: the student has {params:.1%} of the teacher\'s parameters and is '
                         f'{speedup:.1f}x faster at batch 1 (need <= 20% and >= 2x): make --width smaller.')
    return sizes


class Scorer:
    "Weighted F1 and accuracy of a learner on the validation split and the test part, plain and with TTA"
    def __init__(self, dls, data: Path, classes: list[int] | None, n_augs: list[int]):
        self.valid_dl, self.n_augs = dls.valid, n_augs
        self.y_valid = np.array([int(Path(f).parent.name) for f in dls.valid.items])  # class index == ClassId
        self.test_dl, y_test = gtsrb_test_dl(dls, data, classes)
        if isinstance(dls.valid, InMemoryDL): self.test_dl = InMemoryDL.from_dl(self.test_dl)
        self.y_test = y_test.numpy()

    def _scores(self, learn: Learner, dl, y: np.ndarray, n_augs: list[int]) -> dict[int, tuple[float, float]]:
        with learn.no_bar(): probs, _ = tta_preds(learn, dl, n_augs)
        return {n: (weighted_f1(y, p.argmax(dim=1).numpy()), float((p.argmax(dim=1).numpy() == y).mean()))
                for n, p in probs.items()}

    def valid(self, learn: Learner, choose_tta: bool = False) -> dict:
        "Validation F1 without TTA; with `choose_tta`, also `n_aug`: the passes that scored best (the fewest on a tie)"
        scores = self._scores(learn, self.valid_dl, self.y_valid, self.n_augs if choose_tta else [0])
        result = dict(valid_f1=scores[0][0])
        if choose_tta: result['n_aug'] = max(scores, key=lambda n: (scores[n][0], -n))
        return result

    def test(self, learn: Learner, n_aug: int) -> dict:
        scores = self._scores(learn, self.test_dl, self.y_test, sorted({0, n_aug}))
        return dict(test_f1=scores[0][0], test_acc=scores[0][1], test_f1_tta=scores[n_aug][0],
                    test_acc_tta=scores[n_aug][1], n_aug=n_aug)


def train_student(dls, teacher: nn.Module, row: Row, setting: dict, seed: int, epochs: int, lr: float,
                  width: int) -> tuple[Learner, float]:
    "The student of `row` with `setting`, trained from `seed`; and the seconds its training took"
    cbs = []
    if row.method:
        loss_settings = {k: v for k, v in setting.items() if k not in ('weight', 'mix_alpha')}
        kd_loss, mix = kd_method(row.method, 'mixup', setting.get('mix_alpha'), **loss_settings)
        hints = [fitnet_hint()] if row.hinted else []
        cbs = [KnowledgeDistillation(teacher, kd_loss, weight=setting['weight'], hints=hints), *([mix()] if mix else [])]
    if row.mixed: cbs = [MixUp()]  # fastai's default alpha, as function matching's
    return trained_student(dls, cbs, seed, epochs, lr, width)


def trained_student(dls, cbs: list, seed: int, epochs: int, lr: float, width: int) -> tuple[Learner, float]:
    "A `student_model` trained from `seed` with `cbs` (`fit_one_cycle`, unfrozen); and the seconds its training took"
    set_seed(seed, reproducible=True)
    learn = Learner(dls, student_model(width), metrics=accuracy, splitter=default_split, cbs=cbs)
    with learn.no_bar(), learn.no_logging():
        seconds = train_schedule(learn, Schedule(freeze_epochs=0, epochs=epochs, lr=lr, seed=seed))['seconds']
    return learn, seconds


class Progress:
    """The runs of a table so far, recorded in OUT/runs.csv (kept runs, with test scores) and OUT/selection.csv
    (candidates from the first seed) after every run, and reused when resuming: by row, setting, seed and epochs.
    Other processes may add to the same files (with --resume): every look-up reads them again, and every record is
    merged with them under `locked`."""
    def __init__(self, out: Path, resume: bool):
        self.out, self.files = out, dict(kept=out/'runs.csv', selection=out/'selection.csv')
        if not resume:
            for file in self.files.values(): file.unlink(missing_ok=True)
        self.refresh()

    def refresh(self):
        "Read what is recorded now, other processes' runs included"
        self.runs = {name: self._read(name) for name in self.files}

    def _read(self, name: str) -> list[dict]:
        file = self.files[name]
        return pd.read_csv(file).to_dict('records') if file.exists() else []

    @staticmethod
    def _key(run: dict) -> tuple: return run['row'], run['setting'], int(run['seed']), int(run['epochs'])

    def find(self, name: str, row: str, setting: str, seed: int, epochs: int) -> dict | None:
        "The recorded run of `name` ('kept' or 'selection') with these settings, or None"
        self.runs[name] = self._read(name)
        return next((dict(r) for r in self.runs[name] if self._key(r) == (row, setting, seed, epochs)), None)

    @contextmanager
    def claim(self, name: str, row: str, setting: str, seed: int, epochs: int, wait: bool):
        """Yield whether this process may make the run of `name` ('kept' or 'selection'): it holds the run's lock file
        (OUT/claims/) until the `with` ends, so processes on one row share its runs out. Without `wait`, a run another
        process makes now yields False at once; with it, the lock is waited for. A process that dies lets it go."""
        (self.out/'claims').mkdir(exist_ok=True)
        with open(self.out/'claims'/f'{name}-{row}-{setting}-seed{seed}-epochs{epochs}', 'w') as lock:
            try: fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try: yield True
            finally: fcntl.flock(lock, fcntl.LOCK_UN)

    def record(self, name: str, run: dict):
        "Add `run` (or replace the one with its key) to what is recorded and write the file at once, atomically"
        run = {k: v for k, v in run.items() if k != 'learn' and not (name == 'kept' and k == 'kept')}
        with locked(self.out):
            self.runs[name] = [r for r in self._read(name) if self._key(r) != self._key(run)] + [run]
            atomic_write(self.files[name], lambda tmp: pd.DataFrame(self.runs[name]).to_csv(tmp, index=False))


def run_rows(rows: list[Row], dls, teacher: nn.Module, scorer: Scorer, args, progress: Progress):
    """Every row's runs: its candidate settings from the first seed (the best validation F1 is kept, and the TTA
    setting that scored best on validation for that run is the row's), then the kept setting from the other seeds;
    every student is exported, and the kept runs are scored on the test part. Runs that `progress` already holds are
    reused, not trained again, and runs another process is making now are left to it (`Progress.claim`), so several
    processes can share one row's seeds; a row's choice waits for its candidates, and its test scores for the TTA
    setting of its first seed."""
    chosen = {}
    (args.out/'students').mkdir(parents=True, exist_ok=True)

    def run(row: Row, setting: dict, seed: int, epochs: int) -> dict:
        learn, seconds = train_student(dls, teacher, row, setting, seed, epochs, args.lr, args.width)
        file = args.out/'students'/f'{row.key}-{setting_name(setting)}-seed{seed}.pkl'
        learn.export(file)
        result = dict(row=row.key, setting=setting_name(setting), seed=seed, epochs=epochs, seconds=seconds,
                      file=file.name, learn=learn, **scorer.valid(learn, choose_tta=seed == args.seeds[0]))
        print(f'{row.key} {result["setting"]} seed {seed}: valid F1 {result["valid_f1"]:.4f}, {seconds:.0f} s',
              flush=True)
        return result

    def first_run(row: Row, setting: dict, epochs: int, wait: bool, kept: bool) -> dict | None:
        """The run of `setting` from the first seed: recorded, or trained here (and recorded as `kept` until the
        row's choice says otherwise); None, without `wait`, while another process trains it"""
        key = row.key, setting_name(setting), args.seeds[0], epochs
        if found := progress.find('selection', *key): return found
        with progress.claim('selection', *key, wait=wait) as mine:
            if not mine: return None
            if found := progress.find('selection', *key): return found  # recorded while this process waited
            result = run(row, setting, args.seeds[0], epochs)
            progress.record('selection', {**result, 'kept': kept})
            return result

    def learner(result: dict) -> Learner:
        "The trained student of `result`: in memory, or its export when the run was recorded earlier"
        return result.pop('learn', None) or load_learner(args.out/'students'/result['file'])

    def row_n_aug(first: dict) -> int:
        """The TTA setting of a row: the one chosen on validation for its kept run from the first seed (`first`),
        recorded with that run, or with its test scores in tables recorded before selection runs held it"""
        if pd.notna(first.get('n_aug')): return int(first['n_aug'])
        kept = progress.find('kept', first['row'], first['setting'], int(first['seed']), int(first['epochs']))
        return int(kept['n_aug']) if kept else scorer.valid(learner(dict(first)), choose_tta=True)['n_aug']

    for row in rows:
        epochs = args.patient_epochs if row.patient else args.epochs
        candidates = [chosen[row.settings_of]] if row.settings_of else row.settings[:args.candidates]
        first = [first_run(row, setting, epochs, wait=len(candidates) > 1, kept=len(candidates) == 1)
                 for setting in candidates]
        if len(candidates) > 1:
            best = max(first, key=lambda result: result['valid_f1'])
            for result in first: progress.record('selection', {**result, 'kept': result is best})
        else: best = first[0]  # None while another process trains it
        chosen[row.key] = candidates[0] if best is None else candidates[first.index(best)]
        name, n_aug = setting_name(chosen[row.key]), None
        for seed in args.seeds:
            if seed == args.seeds[0] and best is None: continue  # left to the process that trains it
            if progress.find('kept', row.key, name, seed, epochs): continue
            with progress.claim('kept', row.key, name, seed, epochs, wait=False) as mine:
                if not mine or progress.find('kept', row.key, name, seed, epochs): continue
                result = best if seed == args.seeds[0] else run(row, chosen[row.key], seed, epochs)
                if n_aug is None:
                    n_aug = row_n_aug(best or first_run(row, chosen[row.key], epochs, wait=True, kept=True))
                progress.record('kept', {**result, **scorer.test(learner(result), n_aug)})


def summary(runs: pd.DataFrame, teacher: dict) -> pd.DataFrame:
    """One line per row: means and sample standard deviations over seeds, the paired gain over the student alone of
    the same schedule and the share of the teacher-student gap closed"""
    lines = []
    for key, group in runs.groupby('row', sort=False):
        row = next(r for r in ROWS if r.key == key)
        line = dict(key=key, baseline=row.baseline, row=row.label, setting=group.setting.iloc[0],
                    epochs=group.epochs.iloc[0], seeds=len(group), valid_f1=group.valid_f1.mean(),
                    seconds=group.seconds.mean(), n_aug=group.n_aug.iloc[0], gain_mean=float('nan'))
        for score in ('test_f1', 'test_acc', 'test_f1_tta', 'test_acc_tta'):
            line[score], line[f'{score}_std'] = group[score].mean(), group[score].std()
        line['distilled'] = bool(row.method)
        if row.compared:
            alone = runs[runs.row == row.baseline].set_index('seed').test_f1
            line.update({f'gain_{k}': v for k, v in seed_gain(alone, group.set_index('seed').test_f1).items()})
            line['gap_closed'] = (line['test_f1'] - alone.mean()) / (teacher['test_f1'] - alone.mean())
        lines.append(line)
    return pd.DataFrame(lines)


def _mean_std(mean: float, std: float) -> str:
    return f'{mean:.4f}' if pd.isna(std) else f'{mean:.4f} ± {std:.4f}'


def _points(mean: float, std: float) -> str:
    return f'{mean:+.1f}' if pd.isna(std) else f'{mean:+.1f} ± {std:.1f}'


def _table_line(line) -> str:
    "A row of the results table"
    gain = '| | | |' if pd.isna(line.gain_mean) else (
        f'| {_points(line.gain_mean, line.gain_std)} | {"yes" if line.gain_beyond_spread else "no"} '
        f'| {line.gap_closed:.0%} |')
    return (f'| {line.row} | {line.setting} | {line.epochs} | {line.seeds} '
            f'| {_mean_std(line.test_f1, line.test_f1_std)} | {_mean_std(line.test_acc, line.test_acc_std)} '
            f'| {_mean_std(line.test_f1_tta, line.test_f1_tta_std)} ({line.n_aug}) | {line.valid_f1:.4f} {gain} '
            f'{line.seconds:.0f} |')


def targets(table: pd.DataFrame, runs: pd.DataFrame) -> str:
    "The issue's targets, checked on the distillation row with the best validation F1 (not the best test F1)"
    distilled = table[table.distilled]
    if distilled.empty: return 'No distillation row was run: no target to check.'
    best = distilled.loc[distilled.valid_f1.idxmax()]
    alone_std = 100 * runs[runs.row == best.baseline].test_f1.std()
    two_std, half_gap = best.gain_mean > 2 * alone_std, best.gap_closed >= 0.5
    return (f'Targets, on the distillation row with the best validation F1 ({best.row}): gain over the student alone '
            f'of the same schedule {best.gain_mean:+.1f} points, against two standard deviations of the student alone '
            f'= {2 * alone_std:.1f} points: **{"met" if two_std else "not met"}**; share of the gap closed '
            f'{best.gap_closed:.0%} (target >= 50%): **{"met" if half_gap else "not met"}**.')


def report(table: pd.DataFrame, runs: pd.DataFrame, selection: pd.DataFrame, teacher: dict, sizes: pd.DataFrame,
           setup: dict) -> str:
    "The results as Markdown"
    ratio = sizes['student/teacher']
    return '\n'.join([
        '# Accuracy benchmark: how much of the teacher a small student gets back (GTSRB 32x32)', '',
        *[f'- {k}: {v}' for k, v in setup.items()], '', '## Results', '',
        'Test part, weighted F1 and accuracy: mean ± sample standard deviation over seeds. TTA: the number of '
        'augmented passes (n) chosen on the validation split. Gain: distilled minus alone of the same seed and '
        'schedule, in points (mean ± std over seeds); "beyond spread" by the rule below. Gap closed: '
        '(F1 distilled - F1 alone) / (F1 teacher - F1 alone), on the means. Seconds: training time per run.', '',
        '| row | setting | epochs | seeds | test F1 | test accuracy | test F1, TTA (n) | valid F1 | gain (points) '
        '| beyond spread | gap closed | s per run |', '|---|---|---|---|---|---|---|---|---|---|---|---|',
        f"| teacher (ResNet-34) | {teacher['weights']} | - | - | {teacher['test_f1']:.4f} | {teacher['test_acc']:.4f} "
        f"| {teacher['test_f1_tta']:.4f} ({teacher['n_aug']}) | {teacher['valid_f1']:.4f} | | | | |",
        *map(_table_line, table.itertuples()), '',
        SPREAD_RULE, '', targets(table, runs), '',
        '## Teacher and student', '',
        f"Student: {sizes.at['parameters', 'student']:,.0f} parameters ({ratio['parameters']:.1%} of the teacher's "
        f"{sizes.at['parameters', 'teacher']:,.0f}), {1 / ratio['latency_ms']:.1f}x faster at batch 1 "
        f"({sizes.at['latency_ms', 'student']:.2f} ms against {sizes.at['latency_ms', 'teacher']:.2f} ms, "
        'measured with compare_models where this report was written).', '',
        '## Settings chosen on the validation split', '',
        'Each candidate trained from the first seed; the best validation F1 is kept (no test scores were computed '
        'for the others).', '', '| row | setting | valid F1 | kept |', '|---|---|---|---|',
        *[f'| {s.row} | {s.setting} | {s.valid_f1:.4f} | {"yes" if s.kept else ""} |' for s in selection.itertuples()],
        '', '## Every run', '',
        '| row | setting | seed | valid F1 | test F1 | test accuracy | test F1, TTA (n) | seconds | exported as |',
        '|---|---|---|---|---|---|---|---|---|',
        *[f'| {r.row} | {r.setting} | {r.seed} | {r.valid_f1:.4f} | {r.test_f1:.4f} | {r.test_acc:.4f} | '
          f'{r.test_f1_tta:.4f} ({r.n_aug}) | {r.seconds:.0f} | {r.file} |' for r in runs.itertuples()], ''])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help=f'smoke run: classes {QUICK_CLASSES}, {QUICK}, no DataLoader workers (each unless given), '
                        'and the results under --out instead of bench/results')
    parser.add_argument('--classes', type=int, nargs='+', default=None,
                        help=f'ClassIds to train and score on (default: all 43; {QUICK_CLASSES} with --quick)')
    parser.add_argument('--rows', nargs='+', choices=[r.key for r in ROWS], default=[r.key for r in ROWS],
                        help="rows to run (default: all; each row's baseline, and the row whose setting it reuses, "
                        'are added)')
    for name, text in (('epochs', 'epochs of every row but the patient ones'), ('patient-epochs', 'epochs of the '
                       'patient rows'), ('candidates', 'candidate settings tried per row')):
        parser.add_argument(f'--{name}', type=int, help=f"{text} (default: {SIZES[name.replace('-', '_')]})")
    for name, text in (('seeds', 'seeds of every row'), ('n-augs', 'TTA settings to choose from')):
        parser.add_argument(f'--{name}', type=int, nargs='+', help=f"{text} (default: {SIZES[name.replace('-', '_')]})")
    parser.add_argument('--lr', type=float, default=3e-3, help='learning rate of fit_one_cycle (default: 3e-3)')
    parser.add_argument('--bs', type=int, default=128, help='batch size (default: 128)')
    parser.add_argument('--width', type=int, default=24, help='channels of the student\'s first layer (default: 24)')
    parser.add_argument('--teacher-weights', type=Path, default=TEACHER, help='ResNet-34 state dict (default: shared)')
    parser.add_argument('--data', type=Path, default=None, help='data folder (default: OUT/data, unpacked there)')
    parser.add_argument('--out', type=Path, default=None, help='students and data (default: bench/out/accuracy)')
    parser.add_argument('--results', type=Path, default=None, help='results file (default: bench/results/accuracy.md)')
    parser.add_argument('--workers', type=int, default=None,
                        help="DataLoader worker processes (default: fastai's, one per CPU; 0 in --quick)")
    parser.add_argument('--resume', action='store_true',
                        help='add to the table recorded under --out: reuse its runs, train only the missing ones')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (default: 1, steadiest on a shared machine)')
    parser.add_argument('--in-memory', action='store_true',
                        help='decode every image once and keep it in memory (fastkd.memory.in_memory): much faster '
                        'epochs, but other batches than without it, so a table is made with or without it throughout')
    parser.add_argument('--report', action='store_true',
                        help='train nothing: write the results from the runs recorded under --out (implies --resume)')
    args = parser.parse_args(argv)
    args.resume |= args.report
    for name, value in (QUICK if args.quick else SIZES).items():
        if getattr(args, name) is None: setattr(args, name, value)
    if args.quick and args.workers is None: args.workers = 0
    if args.quick and args.classes is None: args.classes = QUICK_CLASSES
    args.out = (args.out or OUT/('accuracy-quick' if args.quick else 'accuracy')).resolve()  # exports join learn.path
    args.data = (args.data or args.out/'data').resolve()
    args.results = (args.results or (args.out/'accuracy.md' if args.quick else RESULTS)).resolve()
    keys = set(args.rows) | {r.settings_of for r in ROWS if r.key in args.rows and r.settings_of}
    keys |= {r.baseline for r in ROWS if r.key in keys and r.compared}
    args.rows = [r for r in ROWS if r.key in keys]
    return args


def table_config(args) -> dict:
    "What every run of one table shares: a resumed table must match it"
    config = dict(classes=args.classes, lr=args.lr, bs=args.bs, width=args.width, teacher=args.teacher_weights.name,
                  n_augs=args.n_augs, epochs=args.epochs, patient_epochs=args.patient_epochs,
                  selection_seed=args.seeds[0])
    return {**config, 'in_memory': True} if args.in_memory else config  # tables made before the option lack it


def load_config(args) -> dict:
    """OUT/config.json when resuming (refused if its configuration differs from `args`), else a new one: the
    configuration, the commands so far with their minutes (None until one ends) and machines, and the teacher's
    scores once computed"""
    file, config = args.out/'config.json', table_config(args)
    if not args.resume and (args.out/'runs.csv').exists():
        raise SystemExit(f'{args.out} already holds a table (runs.csv): add --resume to add to it, or choose another '
                         '--out (or delete that folder) for a new one.')
    if not (args.resume and file.exists()): return dict(config=config, commands=[], minutes=[], machines=[], teacher=None)
    saved = json.loads(file.read_text())
    saved.setdefault('machines', [None] * len(saved['commands']))  # tables made before machines were recorded
    differ = {k: (saved['config'].get(k), v) for k, v in config.items() if saved['config'].get(k) != v}
    if differ:
        raise SystemExit(f'--resume: this table in {args.out} was made with other settings: '
                         + ', '.join(f'{k} {old} (now {new})' for k, (old, new) in differ.items())
                         + '. Use those settings, or another --out for a new table.')
    return saved


def update_config(out: Path, saved: dict, change=None) -> dict:
    """Write OUT/config.json: `saved` merged, under `locked`, with what other processes wrote meanwhile (teacher
    scores, commands, minutes, machines), after `change(config)` when given; returns what was written"""
    file = out/'config.json'
    with locked(out):
        saved = json.loads(json.dumps(saved))  # a copy: `change` edits it
        if file.exists():
            disk = json.loads(file.read_text())
            saved.update(teacher=disk['teacher'] or saved['teacher'],
                         **{k: disk.get(k, [None] * len(disk['commands'])) for k in ('commands', 'minutes', 'machines')})
        if change: change(saved)
        atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=1)))
    return saved


def machine(threads: int) -> str:
    "This machine, as the results name it"
    return (f'{platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}, '
            f'{device_name()}')


def commands_run(saved: dict) -> dict:
    "The report's lines on how the table was made: the commands, the machines they ran on and their minutes"
    machines = pd.Series([m or 'not recorded' for m in saved['machines']]).value_counts(sort=False)
    return {'commands': ', then '.join(f'`{c}`' + ('' if m is not None else ' (stopped before it ended)')
                                       for c, m in zip(saved['commands'], saved['minutes'])),
            'machines': '; '.join(f'{name} ({n} command{"s" * (n > 1)})' for name, n in machines.items()),
            'minutes': ' + '.join('-' if m is None else str(m) for m in saved['minutes'])
                       + (' (one a command; commands run side by side overlap)' if len(saved['minutes']) > 1 else '')}


def device_name() -> str:
    "Where the students train: fastai's default device, by name"
    return f'GPU {torch.cuda.get_device_name()}' if default_device().type == 'cuda' else 'CPU'


def main(argv: list[str] | None = None):
    start, args = time.perf_counter(), parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.teacher_weights.is_file(): raise SystemExit(f'No teacher weights at {args.teacher_weights}.')
    if args.report and not (args.out/'runs.csv').exists():
        raise SystemExit(f'--report: no run is recorded under {args.out}: train rows there first (without --report), '
                         'or give the --out of a table.')
    args.out.mkdir(parents=True, exist_ok=True)
    saved = load_config(args)
    command = ' '.join(['python bench/accuracy.py', *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    def add_command(config: dict):
        for key, value in (('commands', command), ('minutes', None), ('machines', machine(args.threads))):
            config[key].append(value)
    saved = update_config(args.out, saved, add_command)
    index = len(saved['commands']) - 1  # others only append: this command keeps its place
    classes = args.classes
    with locked(args.out): data = prepared_data(args.data, classes)  # one process unpacks, the others wait
    dls = gtsrb_dls(data, size=32, bs=args.bs, classes=classes,
                    **({} if args.workers is None else dict(num_workers=args.workers)))
    if args.in_memory and not args.report: dls = in_memory(dls)  # a report reads no training image
    teacher = load_teacher(args.teacher_weights, resnet34, 43)
    sizes, scorer = check_gap(teacher, args.width), Scorer(dls, data, classes, args.n_augs)
    if saved['teacher'] is None:
        teacher_learn = Learner(dls, teacher, metrics=accuracy)
        valid = scorer.valid(teacher_learn, choose_tta=True)
        saved['teacher'] = dict(weights=args.teacher_weights.name, valid_f1=valid['valid_f1'],
                                **scorer.test(teacher_learn, valid['n_aug']))
        saved = update_config(args.out, saved)
    progress = Progress(args.out, args.resume)
    if not args.report: run_rows(args.rows, dls, teacher, scorer, args, progress)
    progress.refresh()
    order = {r.key: i for i, r in enumerate(ROWS)}
    kept_settings = {(r['row'], r['setting']) for r in progress.runs['selection'] if r['kept']}
    runs = pd.DataFrame([r for r in progress.runs['kept'] if (r['row'], r['setting']) in kept_settings])
    runs = runs.sort_values(['row', 'seed'], key=lambda c: c.map(order) if c.name == 'row' else c, kind='stable')
    selection = pd.DataFrame(progress.runs['selection']).sort_values('row', key=lambda c: c.map(order), kind='stable')
    table = summary(runs, saved['teacher'])
    minutes = round((time.perf_counter() - start) / 60, 1)
    saved = update_config(args.out, saved, lambda c: c['minutes'].__setitem__(index, minutes))
    one, _, fifteen = os.getloadavg()
    how = commands_run(saved)
    setup = {'commands': how['commands'],
             'machines': f"{how['machines']}; load average where this report was written {one:.1f} (1 min), "
                         f'{fifteen:.1f} (15 min)',
             'data': f"{'classes ' + str(classes) if classes else 'all 43 classes'}: {len(dls.train_ds):,} training "
                     f'and {len(dls.valid_ds):,} validation images (whole tracks), {len(scorer.y_test):,} test images, '
                     '32 px',
             'schedule': f'fit_one_cycle at lr {args.lr}, batch {args.bs}, epochs: {args.epochs}'
                         + (f', patient rows {args.patient_epochs}' if any(r.patient for r in ROWS if r.key in set(runs.row)) else '')
                         + f'; settings chosen from seed {args.seeds[0]}; candidate settings per row: at most '
                         f'{args.candidates}',
             'minutes': how['minutes']}
    text = report(table, runs, selection, saved['teacher'], sizes, setup)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.results, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    print(text)
    return table


if __name__ == '__main__': main()
