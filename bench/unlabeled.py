"""What unlabeled images gain: a student distilled on 10% of the labels, with and without the other 90% as unlabeled
images (`KnowledgeDistillation(..., unlabeled=items)`), against the student distilled on all the labels.

GTSRB 32x32: the data, track split, teacher (the shared ResNet-34), student (`student_model`, width 24) and schedule
(`fit_one_cycle` at 3e-3, batch 128, 4 epochs, unfrozen) of bench/accuracy.py, every image decoded once
(`in_memory`), DIST at weight 0.5 (the job's default method on GTSRB); 3 seeds; test part, weighted F1.
Digits (scikit-learn's, 32 px, `write_digits`' split): a teacher (`xresnet34-half`) trained once on all the labels,
students `xresnet18-sixteenth`, `fit_one_cycle` at 1e-2, batch 32, 10 epochs; 5 seeds; test folder, weighted F1.
Rows: the student alone on the 10% kept (`keep_labels`, stratified, seed 42), distilled on the 10% only, distilled on
the 10% plus the other 90% without labels, and for reference distilled on all the labels and alone on all of them.
Target (issue 39): with the unlabeled 90%, the student closes at least half of the gap between "distilled on the 10%
only" and "distilled on all labels".
Every run is kept in OUT/runs.csv as it ends (a stopped run goes on from there) and the report is rewritten after each.

    python bench/unlabeled.py --threads 2     # writes bench/results/unlabeled.md (about 35 minutes on 2 CPU cores)
    python bench/unlabeled.py --quick         # smoke run: digits only, 2 seeds, 2 epochs, under bench/out
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torchvision.models import resnet34

from accuracy import OUT, TEACHER, Scorer, digits_and_gtsrb_args, prepared_data, student_model, write_text
from fastkd.callback import KnowledgeDistillation, load_teacher
from fastkd.cli import ARCHS
from fastkd.digits import digits_dls, write_digits
from fastkd.files import atomic_write
from fastkd.gtsrb import gtsrb_dls
from fastkd.losses import DIST, SoftTarget
from fastkd.memory import in_memory
from fastkd.unlabeled import keep_labels
from fastkd.workflow import scratch_learner, seed_gain, weighted_f1

ROWS = ['alone, 10% labels', 'distilled, 10% labels', 'distilled, 10% labels + 90% unlabeled',
        'distilled, all labels', 'alone, all labels', 'distilled, 10% labels, as many steps']


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--labels', type=float, default=0.1, help='share of the training labels kept (default: 0.1)')
    parser.add_argument('--loss', default='dist', choices=['dist', 'softtarget'],
                        help='distillation loss: DIST (default), or SoftTarget at --temperature (a section of its own)')
    parser.add_argument('--temperature', type=float, default=1.)
    parser.add_argument('--rows', type=int, nargs='+', default=None, help='which rows (0-5, in ROWS; default: all)')
    return digits_and_gtsrb_args(parser, 'unlabeled', argv)


class Digits:
    "scikit-learn's digits, a teacher trained once on all their labels, and the students' schedule"
    name, seeds, epochs, lr, bs = 'digits', [0, 1, 2, 3, 4], 10, 1e-2, 32

    def __init__(self, args):
        if args.quick: self.seeds, self.epochs = [0, 1], 2
        data = write_digits(args.out/'digits', size=32)
        self.dls = digits_dls(data, size=32, bs=self.bs)
        test_files = sorted((data/'test').glob('*/*.png'))
        self.test_dl, self.y_test = self.dls.test_dl(test_files), np.array([int(f.parent.name) for f in test_files])
        teacher = scratch_learner(self.dls, ARCHS['xresnet34-half'], seed=0)
        with teacher.no_bar(), teacher.no_logging(): teacher.fit_one_cycle(2 if args.quick else 12, 1e-2)
        self.teacher = teacher.model.eval()

    def student(self, dls, cbs, seed: int) -> Learner:
        return scratch_learner(dls, ARCHS['xresnet18-sixteenth'], seed, cbs=cbs)

    def test_f1(self, learn: Learner) -> float:
        preds, _ = learn.get_preds(dl=self.test_dl)
        return weighted_f1(self.y_test, preds.argmax(1).numpy())


class GTSRB:
    "GTSRB 32x32 as bench/accuracy.py has it, decoded once, and the shared ResNet-34"
    name, seeds, epochs, lr, bs = 'gtsrb', [0, 1, 2], 4, 3e-3, 128

    def __init__(self, args):
        self.dls = gtsrb_dls(prepared_data(OUT/'accuracy'/'data', None), size=32, bs=self.bs)
        self.teacher = load_teacher(TEACHER, resnet34, 43)
        self.scorer = Scorer(in_memory(self.dls), OUT/'accuracy'/'data', None, [0])

    def student(self, dls, cbs, seed: int) -> Learner:
        set_seed(seed, reproducible=True)
        return Learner(dls, student_model(24), cbs=cbs)

    def test_f1(self, learn: Learner) -> float: return self.scorer.test(learn, 0)['test_f1']


def rows(bench, args) -> dict[str, tuple]:
    "Each row (of `args.rows`): its DataLoaders and a factory of its callbacks"
    few, rest = keep_labels(bench.dls, args.labels, seed=42)
    if isinstance(bench, GTSRB): few, full = in_memory(few), in_memory(bench.dls)
    else: full = bench.dls
    loss = DIST() if args.loss == 'dist' else SoftTarget(T=args.temperature)
    def distil(unlabeled=None): return [KnowledgeDistillation(bench.teacher, loss, weight=0.5, unlabeled=unlabeled)]
    made = {ROWS[0]: (few, list), ROWS[1]: (few, distil), ROWS[2]: (few, partial(distil, rest)),
            ROWS[3]: (full, distil), ROWS[4]: (full, list), ROWS[5]: (few, distil)}
    return {row: made[row] for i, row in enumerate(ROWS) if args.rows is None or i in args.rows}, len(few.train_ds), \
        len(rest)


def train(bench, dls, cbs, seed: int, epochs: int) -> tuple[float, float]:
    "Test weighted F1 of a student trained from `seed` with `cbs` for `epochs`, and the seconds its training took"
    learn = bench.student(dls, cbs, seed)  # the starting weights from `seed`
    for dl in dls.loaders: dl.rng.seed(seed)  # and the batch order
    set_seed(seed, reproducible=True)
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, bench.lr)
    seconds = time.perf_counter() - start
    return bench.test_f1(learn), seconds


def section(name: str, runs: pd.DataFrame, sizes: tuple[int, int], bench) -> list[str]:
    "The report's table of one dataset, and how much of the gap the unlabeled images closed"
    runs = runs[runs.dataset == name]
    f1 = {row: runs[runs.row == row].set_index('seed').test_f1 for row in ROWS if (runs.row == row).any()}
    base = f1.get(ROWS[1])
    lines = [f'### {name}: {sizes[0]} labeled training images, {sizes[1]} unlabeled; {bench.epochs} epochs', '',
             '| row | seeds | test weighted F1 | against "distilled, 10% labels" (points) | seconds per run |',
             '|---|---|---|---|---|']
    for row, scores in f1.items():
        gain = seed_gain(base.reindex(scores.index), scores) if base is not None and row != ROWS[1] else None
        seconds = runs[runs.row == row].seconds.mean()
        lines.append(f'| {row} | {len(scores)} | {scores.mean():.4f} ± {scores.std():.4f} | '
                     f'{"" if gain is None else format(gain["mean"], "+.1f") + " ± " + format(gain["std"], ".1f")} | '
                     f'{seconds:.0f} |')
    if all(row in f1 for row in ROWS[1:4]):
        gap, closed = f1[ROWS[3]].mean() - f1[ROWS[1]].mean(), f1[ROWS[2]].mean() - f1[ROWS[1]].mean()
        lines += ['', f'Gap between "distilled, 10% labels" and "distilled, all labels": {100 * gap:.1f} points; the '
                  f'unlabeled 90% closed {100 * closed:.1f} of them, {closed / gap:.0%} (target: at least 50%).']
    if all(row in f1 for row in (ROWS[2], ROWS[3], ROWS[5])):  # against the student given as many steps
        gap, closed = f1[ROWS[3]].mean() - f1[ROWS[5]].mean(), f1[ROWS[2]].mean() - f1[ROWS[5]].mean()
        lines += ['', f'Against "{ROWS[5]}" (the labeled tenth for as many steps as the unlabeled run takes): a gap of '
                  f'{100 * gap:.1f} points to "distilled, all labels", of which the unlabeled images closed '
                  f'{100 * closed:.1f}, {closed / gap:.0%}.']
    return lines + ['']


def report(runs: pd.DataFrame, sections: dict, args, command: str) -> str:
    return '\n'.join([
        '# Distilling with unlabeled images', '',
        f'Command: `{command}` ({args.threads} torch thread(s); torch {torch.__version__}; '
        f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}).', '',
        'Mean ± sample std over seeds; gains are paired by seed (same starting weights and batch order within a row '
        'pair) in points of weighted F1 (100 x F1). See the docstring of bench/unlabeled.py for data and schedules.',
        '', *[line for lines in sections.values() for line in lines],
        '## Every run', '', '| dataset | row | seed | test F1 | seconds |', '|---|---|---|---|---|',
        *[f'| {r.dataset} | {r.row} | {r.seed} | {r.test_f1:.4f} | {r.seconds:.0f} |' for r in runs.itertuples()], ''])


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = ' '.join(['python bench/unlabeled.py', *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    runs_file = args.out/'runs.csv'
    runs = pd.read_csv(runs_file).to_dict('records') if runs_file.exists() else []
    sections = {}
    for bench in [{'digits': Digits, 'gtsrb': GTSRB}[name](args) for name in args.datasets]:
        if args.loss != 'dist': bench.name = f'{bench.name}, SoftTarget T={args.temperature:g}'
        by_row, n_labeled, n_unlabeled = rows(bench, args)
        for seed in bench.seeds:
            for row, (dls, cbs) in by_row.items():
                if any(r['dataset'] == bench.name and r['row'] == row and r['seed'] == seed for r in runs): continue
                # the control of as many steps: the labeled tenth for as many epochs as hold the steps of all the images
                epochs = bench.epochs * (round((n_labeled + n_unlabeled) / n_labeled) if row == ROWS[5] else 1)
                f1, seconds = train(bench, dls, cbs(), seed, epochs)
                runs.append(dict(dataset=bench.name, row=row, seed=seed, test_f1=f1, seconds=seconds))
                print(runs[-1], flush=True)
                atomic_write(runs_file, lambda tmp: pd.DataFrame(runs).to_csv(tmp, index=False))
                sections[bench.name] = section(bench.name, pd.DataFrame(runs), (n_labeled, n_unlabeled), bench)
                write_text(report(pd.DataFrame(runs), sections, args, command), args.results)
        sections[bench.name] = section(bench.name, pd.DataFrame(runs), (n_labeled, n_unlabeled), bench)
    write_text(report(pd.DataFrame(runs), sections, args, command), args.results)
    print(f'written {args.results}')



if __name__ == '__main__': main()
