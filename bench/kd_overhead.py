"""What distillation adds to a training epoch, against its peers, on real GTSRB 32x32 images.

One process, one data part (2,048 training and 512 validation images, batch 64), a trained ResNet-34 teacher and
ResNet-18 students from scratch; each repeat times, in an order that rotates from repeat to repeat:
- plain: one epoch (training and validation) of the student alone, with fastai;
- fastkd: the same with `KnowledgeDistillation(teacher, SoftTarget(T=4))`, which on a CPU lays the teacher's weights
  out channels-last during the fit;
- fastkd (layout kept): the same with `teacher_channels_last=False`, the teacher computing as in the teacher row;
- fasterai: the same with fasterai's `KnowledgeDistillationCallback` (teacher frozen by hand), when fasterai is
  importable: it is installed for this benchmark only, e.g.
  `pip install --no-deps --target /tmp/fasterai fasterai==0.4.1` then `PYTHONPATH=/tmp/fasterai`;
- pytorch: a hand-written PyTorch distillation loop over the same fastai batches;
- teacher: the teacher's forward passes alone over the epoch's training batches (loaded beforehand).
The floor of a distillation epoch is plain + teacher. Also reports how far each epoch raised the process's peak
resident memory. Writes bench/results/kd_overhead.md. Run: `.venv/bin/python bench/kd_overhead.py [--repeats 3]`.
"""
from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.vision.all import resnet18

from fastkd.all import KnowledgeDistillation, SoftTarget, scratch_learner
from gtsrb_part import machine_line, check_data, gtsrb_part, gtsrb_teacher, measure, part_parser, write_results

RESULTS = Path(__file__).parent/'results'/'kd_overhead.md'
LR, T, WEIGHT = 1e-3, 4., 0.5

try: from fasterai.distill.all import KnowledgeDistillationCallback, SoftTarget as FasteraiSoftTarget
except ImportError: KnowledgeDistillationCallback = None


def fit_epoch(dls, cbs=()):
    "One epoch of a fresh ResNet-18 student (made before the clock starts)"
    learn = scratch_learner(dls, resnet18, cbs=list(cbs))
    def run():
        with learn.no_bar(), learn.no_logging(): learn.fit(1, LR)
    return run


def fasterai_epoch(dls, teacher):
    teacher.eval().requires_grad_(False)  # by hand, as the reference notebook did: fasterai's callback does not
    return fit_epoch(dls, [KnowledgeDistillationCallback(teacher, partial(FasteraiSoftTarget, T=T), weight=WEIGHT)])


def pytorch_epoch(dls, teacher):
    "A hand-written loop: Adam, cross-entropy and SoftTarget mixed as the callbacks mix them, then validation"
    student, kd_loss = scratch_learner(dls, resnet18).model, SoftTarget(T=T)
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    def run():
        student.train()
        for xb, yb in dls.train:
            xb, yb = xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)  # plain tensors, as PyTorch code has
            pred = student(xb)
            with torch.no_grad(): teacher_logits = teacher(xb)
            loss = (1 - WEIGHT) * F.cross_entropy(pred, yb) + WEIGHT * kd_loss(pred, teacher_logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
        student.eval()
        with torch.no_grad():
            for xb, yb in dls.valid: F.cross_entropy(student(xb.as_subclass(torch.Tensor)), yb.as_subclass(torch.Tensor))
    return run


def teacher_forwards(dls, teacher):
    "The teacher's forward passes over one epoch of training batches, loaded before the clock starts"
    batches = [xb for xb, _ in dls.train]
    def run():
        with torch.no_grad():
            for xb in batches: teacher(xb)
    return run


def contenders(dls, teacher) -> dict:
    "What each repeat times, by name: functions that set a run up and return it"
    def distilled(**kwargs): return fit_epoch(dls, [KnowledgeDistillation(teacher, SoftTarget(T=T), weight=WEIGHT, **kwargs)])
    runs = {'plain': lambda: fit_epoch(dls), 'fastkd': distilled,
            'fastkd (layout kept)': partial(distilled, teacher_channels_last=False),
            'pytorch': lambda: pytorch_epoch(dls, teacher), 'teacher': lambda: teacher_forwards(dls, teacher)}
    if KnowledgeDistillationCallback: runs['fasterai'] = lambda: fasterai_epoch(dls, teacher)
    return runs


def report(rows: list[dict], setup: list[str]) -> str:
    names = list(rows[0])
    def floor(times: dict) -> dict: return {k: times['plain'][k] + times['teacher'][k] for k in ('wall', 'cpu')}
    median = {n: {k: statistics.median(r[n][k] for r in rows) for k in ('wall', 'cpu', 'memory')} for n in names}
    median['floor'] = floor(median)
    rows = [{**r, 'floor': floor(r)} for r in rows]  # the caller's rows stay as measured
    def paired(a: str, b: str) -> str:
        "The CPU-time ratio within each repeat (runs close in time, so less exposed to the machine's drift)"
        ratios = sorted(r[a]['cpu'] / r[b]['cpu'] for r in rows)
        return f'{statistics.median(ratios):.3f} ({ratios[0]:.2f}-{ratios[-1]:.2f})'
    lines = ['# Distillation overhead per training epoch', '', *[f'- {line}' for line in setup], '',
             'Seconds of one epoch, wall clock / CPU time of this process (CPU time is steadier while other work '
             'shares the machine), per repeat:', '',
             '| repeat | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|',
             *[f'| {i} | ' + ' | '.join(f'{r[n]["wall"]:.2f} / {r[n]["cpu"]:.2f}' for n in names) + ' |'
               for i, r in enumerate(rows)], '',
             'Ratios of the medians (wall and CPU), and the median of the ratios within each repeat (CPU; range in '
             'brackets); plain + teacher is the floor of a distilled epoch:', '',
             '| ratio | wall | CPU | CPU, per repeat | target |', '|---|---|---|---|---|']
    ratios = [('fastkd / (plain + teacher)', 'fastkd', 'floor', '<= 1.00'),
              ('fastkd (layout kept) / (plain + teacher)', 'fastkd (layout kept)', 'floor', ''),
              ('pytorch loop / (plain + teacher)', 'pytorch', 'floor', ''),
              ('fastkd / pytorch loop', 'fastkd', 'pytorch', '')]
    if 'fasterai' in names: ratios.append(('fastkd / fasterai', 'fastkd', 'fasterai', '<= 0.95'))
    lines += [f'| {name} | {median[a]["wall"] / median[b]["wall"]:.3f} | {median[a]["cpu"] / median[b]["cpu"]:.3f} | '
              f'{paired(a, b)} | {target} |' for name, a, b, target in ratios]
    lines += ['', f'Peak resident memory added by one epoch (median, MiB): plain {median["plain"]["memory"]:.0f}, '
              f'fastkd {median["fastkd"]["memory"]:.0f} (the teacher\'s weights, loaded before, not counted).', '']
    if 'fasterai' not in names: lines += ['fasterai was not importable, so it was not timed (see the docstring).', '']
    return '\n'.join(lines)


def main(repeats: int, n_train: int, n_valid: int):
    check_data()
    torch.set_num_threads(1)  # steadier on a shared machine; the ratios are what matter
    start = time.perf_counter()
    dls, teacher = gtsrb_part(n_train, n_valid, augment=False), gtsrb_teacher()
    runs = contenders(dls, teacher)
    runs['plain']()()  # warm-up, untimed: the first epoch of a process is slower
    rows = []
    for repeat in range(repeats):
        names = list(runs)[repeat % len(runs):] + list(runs)[:repeat % len(runs)]  # rotate the order
        measured = {name: measure(runs[name]()) for name in names}
        rows.append({name: measured[name] for name in runs})
        print(f'repeat {repeat}:', {n: round(r['wall'], 2) for n, r in rows[-1].items()}, flush=True)
    setup = [machine_line(1),
             f'real GTSRB 32x32: {n_train} training and {n_valid} validation images (fixed, drawn with seed 0), '
             'batch 64, no augmentation; teacher: ResNet-34 trained on GTSRB 32x32; students: fastai ResNet-18 from '
             f'scratch; SoftTarget(T={T:g}), weight {WEIGHT}; {repeats} repeats, order rotating',
             f'whole run {(time.perf_counter() - start) / 60:.1f} minutes (the data folder prepared by an earlier run or this one)']
    text = report(rows, setup)
    write_results(RESULTS, text)


if __name__ == '__main__':
    parser = part_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    main(args.repeats, args.train_items, args.valid_items)
