"""Augmentation at the cost of K teacher passes: `TeacherCache(views=4)` against live teacher forwards at every step,
and against the student alone, all with the same random item augmentation.

Data: GTSRB 32x32 (../shared/data/gtsrb, prepared once in bench/out/gtsrb32 by `gtsrb_part.prepared_gtsrb`) on a
subset of classes (`--classes`, default the ten smallest as in teacher_once.py: 1,920 training images) so that the
benchmark fits in about 20 minutes on 2 CPU cores. Augmentation: `RandomResizedCrop(32, min_scale=0.75, ratio=(0.9,
1.1))` as an item transform of the training loader only (no random batch transforms: views cannot replay them).
Teacher: the shared ResNet-34 (resnet34-gtsrb32.pth). Student: the accuracy benchmark's 4-layer CNN
(`accuracy.student_model`, width 24), `fit_one_cycle(--epochs, 3e-3)`, DIST (T=1) at weight 0.5.
Runs, side by side in one process for each seed (their order turned round from one seed to the next): (a) the
teacher run live at every training step (`cache=False`), (b) `cache=TeacherCache(views=4)` in memory, (c) the student
alone. Each is timed from building its learner to the end of its fit (wall and CPU seconds of the process; on a
machine other work loads, both move with that load, CPU seconds too: idle OpenMP threads spin), and scored on the
shared test
part (`gtsrb_test_dl`) of the same classes. Writes bench/results/teacher_views.md.
`--teacher resnet50` times a heavier teacher instead: a ResNet-50 with random weights (seeded), for cost only (its
runs' accuracies mean nothing); its table goes to bench/results/teacher_views-resnet50.md.
The report also gives the replay's own cost: the views run's time less the student alone's and less the share of the
live teacher's extra time that the teacher's items with views make up.
Run: `python bench/teacher_views.py [--seeds 1] [--epochs 8] [--views 4] [--teacher resnet50]`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from fastai.data.core import Pipeline
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.augment import RandomResizedCrop
from fastai.vision.learner import create_vision_model
from torchvision.models import resnet50

from accuracy import student_model
from fastkd.cache import TeacherCache
from fastkd.callback import KnowledgeDistillation
from fastkd.gtsrb import gtsrb_dls, gtsrb_test_dl
from fastkd.losses import DIST
from gtsrb_part import check_data, gtsrb_teacher, machine_line, prepared_gtsrb, write_results
from teacher_once import SMALLEST

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT/'bench'/'results'/'teacher_views.md'
LR, BS = 3e-3, 64
RUNS = ('live teacher', 'views', 'alone')
TEACHERS = {'resnet34': 'ResNet-34 (shared weights)', 'resnet50': 'ResNet-50, random weights (timing only)'}


def augmented(classes: list[int]):
    "GTSRB 32 px over `classes`, with a random crop of 75-100% of each training image (an item transform)"
    dls = gtsrb_dls(prepared_gtsrb(), size=32, bs=BS, classes=classes, augment=False, num_workers=0)
    crop = RandomResizedCrop(32, min_scale=0.75, ratio=(0.9, 1.1))
    dls.train.after_item = Pipeline([*dls.train.after_item.fs, crop])  # validation keeps its own pipeline
    return dls


def one_run(run: str, seed: int, args, teacher: torch.nn.Module) -> dict:
    "Train one student (`run` of `RUNS`) and score it on the test part: accuracy, wall seconds, teacher items"
    set_seed(seed, reproducible=True)
    dls = augmented(args.classes)
    calls = []
    hook = teacher.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    start, cpu = time.perf_counter(), time.process_time()
    cbs = [] if run == 'alone' else [KnowledgeDistillation(teacher, DIST(), weight=0.5,
                                                           cache=TeacherCache(views=args.views) if run == 'views'
                                                           else False)]
    learn = Learner(dls, student_model(), metrics=accuracy, cbs=cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(args.epochs, LR)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    hook.remove()
    test_dl, labels = gtsrb_test_dl(learn, prepared_gtsrb(), classes=args.classes)
    with learn.no_bar(): preds, _ = learn.get_preds(dl=test_dl)
    return dict(accuracy=float((preds.argmax(-1) == labels).float().mean()), seconds=seconds, cpu=cpu_seconds,
                teacher_items=sum(calls), n_items=len(dls.train.dataset), n_test=len(labels))


def heavy_teacher() -> torch.nn.Module:
    "A ResNet-50 with random weights (seed 0): a heavier teacher, for timing only"
    set_seed(0, reproducible=True)
    return create_vision_model(resnet50, 43, pretrained=False).eval().requires_grad_(False)


def main(args):
    check_data()
    args.load_at_start = os.getloadavg()
    teacher = heavy_teacher() if args.teacher == 'resnet50' else gtsrb_teacher()
    begin, rows = time.perf_counter(), []
    for seed in range(args.seeds):
        order = RUNS if seed % 2 == 0 else RUNS[::-1]
        row = {run: one_run(run, seed, args, teacher) for run in order}
        rows.append(row)
        print(f'seed {seed}:', {run: (round(r['accuracy'], 3), round(r['seconds'], 1), round(r['cpu'], 1))
                                 for run, r in row.items()}, flush=True)
    results = RESULTS if args.teacher == 'resnet34' else RESULTS.with_name(f'teacher_views-{args.teacher}.md')
    write_results(results, report(args, rows, time.perf_counter() - begin))


def report(args, rows: list[dict], seconds: float) -> str:
    mean = lambda run, key: sum(row[run][key] for row in rows) / len(rows)
    n_items, n_test = rows[0]['alone']['n_items'], rows[0]['alone']['n_test']
    command = 'python bench/teacher_views.py ' + ' '.join(sys.argv[1:])
    lines = ['# Augmentation at the cost of K teacher passes: TeacherCache(views=K)', '',
             f'- `{command.strip()}`',
             f'- {machine_line(torch.get_num_threads())}; at the start {args.load_at_start[0]:.1f} (1 min), '
             f'{args.load_at_start[2]:.1f} (15 min)',
             f'- GTSRB 32x32, classes {args.classes}: {n_items} training images, {n_test} test images (the shared '
             'test part); augmentation: `RandomResizedCrop(32, min_scale=0.75, ratio=(0.9, 1.1))`, an item transform '
             f'of the training loader; batch {BS}; teacher {TEACHERS[args.teacher]}; student '
             f'`accuracy.student_model` (width 24); DIST (T=1), weight 0.5; `fit_one_cycle({args.epochs}, {LR:g})`; '
             f'{args.seeds} seed(s), the three runs of a seed side by side in one process',
             f'- whole benchmark {seconds / 60:.1f} minutes', '',
             '| seed | run | test accuracy | wall s (learner to end of fit) | CPU s | items the teacher ran on |',
             '|---|---|---|---|---|---|']
    names = {'live teacher': '(a) live teacher, every step', 'views': f'(b) TeacherCache(views={args.views})',
             'alone': '(c) student alone'}
    for seed, row in enumerate(rows):
        for run in RUNS:
            r = row[run]
            lines.append(f'| {seed} | {names[run]} | {r["accuracy"]:.3f} | {r["seconds"]:.1f} | {r["cpu"]:.1f} | '
                         f'{r["teacher_items"]:,} |')
    live, views, alone = (mean(run, 'seconds') for run in RUNS)
    cpu_live, cpu_views, cpu_alone = (mean(run, 'cpu') for run in RUNS)
    lines += ['', f'Means over the seeds: test accuracy (a) {mean("live teacher", "accuracy"):.3f}, (b) '
              f'{mean("views", "accuracy"):.3f}, (c) {mean("alone", "accuracy"):.3f}; accuracy (b) - (a) '
              f'{mean("views", "accuracy") - mean("live teacher", "accuracy"):+.3f}, (b) - (c) '
              f'{mean("views", "accuracy") - mean("alone", "accuracy"):+.3f}.', '',
              f'Wall time: (b)/(a) **{views / live:.2f}x**, (b)/(c) {views / alone:.2f}x, (a)/(c) {live / alone:.2f}x; '
              f'CPU time: (b)/(a) **{cpu_views / cpu_live:.2f}x**, (b)/(c) '
              f'{cpu_views / cpu_alone:.2f}x, (a)/(c) {cpu_live / cpu_alone:.2f}x. '
              f'The teacher ran on {mean("views", "teacher_items") / n_items:.2f}x the training set with views '
              f'(at most {args.views}x, plus one check batch), {mean("live teacher", "teacher_items") / n_items:.2f}x '
              'live.']
    share = mean('views', 'teacher_items') / mean('live teacher', 'teacher_items')
    replay = views - alone - share * (live - alone)
    lines += ['', f'The replay\'s own cost: (b) less (c) less {share:.0%} (the teacher\'s items with views over '
              f'live) of (a) - (c): {replay:+.1f} s, **{replay / alone:+.1%} of the student alone** '
              '(target at most 5%). '
              f'Views cost the student alone plus **{(views - alone) / (live - alone):.0%}** of the live teacher\'s '
              'extra time (target for a heavy teacher: at most 60%).']
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, default=1)
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--views', type=int, default=4)
    parser.add_argument('--classes', type=int, nargs='+', default=SMALLEST)
    parser.add_argument('--teacher', choices=list(TEACHERS), default='resnet34')
    args = parser.parse_args()
    torch.set_num_threads(2)
    main(args)
