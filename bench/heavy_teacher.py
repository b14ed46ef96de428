"""A heavy teacher at a fraction of its cost: the teacher-output cache, and cheaper teacher forwards under augmentation.

Real GTSRB 32x32 images (2,048 training and 512 validation, batch 64), the ResNet-34 teacher trained on them and a
small CNN student whose forward pass costs a fraction of the teacher's (measured and reported).
- Without augmentation: a few epochs of the student alone, distilled with `cache=True`, and distilled without the
  cache, in rotating order; the cost of each epoch after the first, against the student alone (target: <= 1.2x with
  the cache), and how many items the teacher saw.
- With augmentation (the cache is refused there): the teacher's forward passes over the same augmented batches in
  float32, with channels-last inputs, with channels-last weights and under bfloat16 autocast, in rotating order;
  their cost against float32 and how far they move the distillation loss; then distilled epochs with the teacher's
  layout kept (`teacher_channels_last=False`) and channels-last (the default on a CPU).
Writes bench/results/heavy_teacher.md. Run: `.venv/bin/python bench/heavy_teacher.py [--repeats 2]`.
"""
from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torch import nn

from fastkd.all import KnowledgeDistillation, SoftTarget
from gtsrb_part import machine_line, check_data, gtsrb_part, gtsrb_teacher, measure, part_parser, write_results

RESULTS = Path(__file__).parent/'results'/'heavy_teacher.md'
LR, T = 3e-3, 4.


def student_cnn() -> nn.Module:
    "A small CNN student: three strided convolutions, pooling, a linear layer (99k parameters)"
    set_seed(0, reproducible=True)
    return nn.Sequential(ConvLayer(3, 32, stride=2), ConvLayer(32, 64, stride=2), ConvLayer(64, 128, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(128, 43))


class EpochClock(Callback):
    "Wall and CPU seconds of each epoch (training and validation)"
    order = -100  # first in, last out: the other callbacks' work is timed too
    def before_fit(self): self.epochs = []
    def before_epoch(self): self.start = time.perf_counter(), time.process_time()
    def after_epoch(self): self.epochs.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))


def teacher_items(teacher: nn.Module) -> list[int]:
    "A counter of the items `teacher` runs on, kept up to date by a forward hook"
    seen = [0]
    teacher.register_forward_hook(lambda module, inputs, output: seen.__setitem__(0, seen[0] + len(inputs[0])))
    return seen


def fit_epochs(dls, epochs: int, cbs=()) -> tuple[list, float]:
    "Per-epoch (wall, CPU) seconds of a fresh student over `epochs` epochs, and its final validation accuracy"
    clock = EpochClock()
    learn = Learner(dls, student_cnn(), metrics=accuracy, cbs=[clock, *cbs])
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, LR)
    return clock.epochs, float(learn.recorder.values[-1][-1])


def forward_seconds(model: nn.Module, batches: list) -> float:
    "CPU seconds of `model`'s forward passes over `batches`"
    model.eval()
    start = time.process_time()
    with torch.no_grad():
        for xb in batches: model(xb)
    return time.process_time() - start


def cache_runs(dls, teacher, epochs: int, repeats: int) -> tuple[list[dict], dict]:
    """The student alone and distilled with the cache for `epochs` epochs, distilled without the cache for 2 (its
    epochs all cost the same), `repeats` times in rotating order"""
    seen = teacher_items(teacher)
    runs = {'student alone': (epochs, lambda: ()),
            'fastkd cache=True': (epochs, lambda: [KnowledgeDistillation(teacher, SoftTarget(T=T), cache=True)]),
            'fastkd, no cache': (2, lambda: [KnowledgeDistillation(teacher, SoftTarget(T=T))])}
    rows, seen_items = [], {}
    for repeat in range(repeats):
        names = list(runs)[repeat % len(runs):] + list(runs)[:repeat % len(runs)]
        row = {}
        for name in names:
            seen[0] = 0
            n_epochs, cbs = runs[name]
            row[name] = fit_epochs(dls, n_epochs, cbs())
            seen_items[name] = seen[0]
        rows.append(row)
        print(f'repeat {repeat}:', {n: [round(w, 1) for w, _ in row[n][0]] for n in row}, flush=True)
    return rows, seen_items


def teacher_variants(teacher: nn.Module) -> dict:
    "Ways to run the teacher forward without changing it: name -> function of a batch"
    channels_last = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    def run(model, to_channels_last=False, autocast=False):
        def forward(xb):
            if to_channels_last: xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast('cpu', dtype=torch.bfloat16) if autocast else nullcontext(): return model(xb).float()
        return forward
    return {'float32': run(teacher), 'channels-last inputs': run(teacher, to_channels_last=True),
            'channels-last weights (fastkd on a CPU)': run(channels_last),
            'bfloat16 autocast': run(teacher, autocast=True)}


def augmented_forwards(dls, teacher, repeats: int, n_batches: int) -> tuple[list[dict], dict]:
    "CPU seconds of each teacher variant over the same augmented batches, and the largest change of the KD loss"
    batches = [xb.as_subclass(torch.Tensor) for _, (xb, _) in zip(range(n_batches), dls.train)]
    student, kd_loss = student_cnn().eval(), SoftTarget(T=T)
    variants = teacher_variants(teacher)
    with torch.no_grad():
        reference = [variants['float32'](xb) for xb in batches]
        kd = [kd_loss(student(xb), t) for xb, t in zip(batches, reference)]
        change = {name: max(abs(float(kd_loss(student(xb), f(xb)) / k - 1)) for xb, k in zip(batches, kd))
                  for name, f in variants.items()}
    rows = []
    for repeat in range(repeats):
        names = list(variants)[repeat % len(variants):] + list(variants)[:repeat % len(variants)]
        row = {}
        for name in names:
            start = time.process_time()
            with torch.no_grad():
                for xb in batches: variants[name](xb)
            row[name] = time.process_time() - start
        rows.append({name: row[name] for name in variants})
        print(f'augmented repeat {repeat}:', {n: round(s, 2) for n, s in rows[-1].items()}, flush=True)
    return rows, change


def augmented_epochs(dls, teacher, repeats: int) -> list[dict]:
    "CPU seconds of a distilled epoch on augmented data with the teacher's layout kept and channels-last, alternating"
    runs = {'fastkd, layout kept': dict(teacher_channels_last=False), 'fastkd (channels-last teacher)': {}}
    rows = []
    for repeat in range(repeats):
        row = {name: fit_epochs(dls, 1, [KnowledgeDistillation(teacher, SoftTarget(T=T), **runs[name])])[0][0][1]
               for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1])}
        rows.append({name: row[name] for name in runs})
        print(f'augmented epoch {repeat}:', {n: round(s, 2) for n, s in rows[-1].items()}, flush=True)
    return rows


def report(setup: list[str], cache_rows, seen, augmented_rows, change, epoch_rows, n_train: int) -> str:
    later = lambda row, name: statistics.median(cpu for _, cpu in row[name][0][1:])  # epochs after the first
    ratios = lambda name, epochs=later: [epochs(row, name) / epochs(row, 'student alone') for row in cache_rows]
    first = lambda row, name: row[name][0][0][1]
    summary = lambda values: f'{statistics.median(values):.2f}x ({", ".join(f"{v:.2f}" for v in values)})'
    lines = ['# A heavy teacher: the teacher-output cache, and cheaper teacher forwards', '',
             *[f'- {line}' for line in setup], '', '## Without augmentation: the cache', '',
             'CPU seconds of each epoch (training and validation), per run; wall seconds in brackets.', '',
             '| repeat | run | epochs: CPU s (wall s) | teacher items seen | final accuracy |', '|---|---|---|---|---|']
    for i, row in enumerate(cache_rows):
        for name, (epochs, acc) in row.items():
            lines.append(f'| {i} | {name} | ' + ', '.join(f'{c:.1f} ({w:.1f})' for w, c in epochs) +
                         f' | {seen[name] if name != "student alone" else 0} | {acc:.3f} |')
    lines += ['', 'Against the student alone of the same repeat (CPU time; median over the repeats, each repeat in brackets):', '',
              '| epochs after the first | against the student alone | target |', '|---|---|---|',
              f'| fastkd cache=True | {summary(ratios("fastkd cache=True"))} | <= 1.2x |',
              f'| fastkd, no cache | {summary(ratios("fastkd, no cache"))} | |',
              f'| first epoch, fastkd cache=True | {summary(ratios("fastkd cache=True", first))} | |',
              '', f'The teacher saw {seen["fastkd cache=True"]} items with the cache over a whole run, '
              f'{seen["fastkd cache=True"] / n_train:.2f}x the {n_train} training items (target <= 1.2x).', '',
              '## With augmentation: cheaper teacher forwards', '',
              'CPU seconds of the teacher\'s forward passes over the same augmented training batches, per repeat; the '
              'KD-loss change is the largest relative change of SoftTarget(T=4) between the student and the teacher, '
              'against float32, over those batches.', '',
              '| variant | ' + ' | '.join(f'repeat {i}' for i in range(len(augmented_rows))) + ' | median vs float32 | KD-loss change |',
              '|---' * (len(augmented_rows) + 3) + '|']
    base = statistics.median(r['float32'] for r in augmented_rows)
    for name in augmented_rows[0]:
        times = [r[name] for r in augmented_rows]
        lines.append(f'| {name} | ' + ' | '.join(f'{t:.2f}' for t in times) +
                     f' | {statistics.median(times) / base:.2f}x | {change[name]:.1e} |')
    lines += ['', 'CPU seconds of a distilled epoch (training and validation) on augmented data:', '',
              '| run | ' + ' | '.join(f'repeat {i}' for i in range(len(epoch_rows))) + ' | median vs layout kept |',
              '|---' * (len(epoch_rows) + 2) + '|']
    base = statistics.median(r['fastkd, layout kept'] for r in epoch_rows)
    for name in epoch_rows[0]:
        times = [r[name] for r in epoch_rows]
        lines.append(f'| {name} | ' + ' | '.join(f'{t:.1f}' for t in times) + f' | {statistics.median(times) / base:.2f}x |')
    return '\n'.join(lines) + '\n'


def main(repeats: int, epochs: int, n_train: int, n_valid: int, n_batches: int):
    check_data()
    torch.set_num_threads(1)  # steadier on a shared machine; the ratios are what matter
    start = time.perf_counter()
    dls, teacher = gtsrb_part(n_train, n_valid, augment=False), gtsrb_teacher()
    batches = [xb for xb, _ in dls.train]
    cost = forward_seconds(teacher, batches) / forward_seconds(student_cnn(), batches)
    cache_rows, seen = cache_runs(dls, teacher, epochs, repeats)
    augmented, teacher = gtsrb_part(n_train, n_valid, augment=True), gtsrb_teacher()
    augmented_rows, change = augmented_forwards(augmented, teacher, repeats, n_batches)
    epoch_rows = augmented_epochs(augmented, teacher, repeats)
    setup = [machine_line(1),
             f'real GTSRB 32x32: {n_train} training and {n_valid} validation images (fixed, drawn with seed 0), batch 64; '
             f'teacher: ResNet-34 trained on GTSRB 32x32; student: a 3-convolution CNN (99k parameters) whose forward '
             f'pass costs 1/{cost:.0f} of the teacher\'s on these batches; SoftTarget(T={T:g}), weight 0.5, '
             f'{epochs} epochs per run (2 without the cache) at lr {LR:g}; {repeats} repeats, order rotating',
             f'whole run {(time.perf_counter() - start) / 60:.1f} minutes']
    text = report(setup, cache_rows, seen, augmented_rows, change, epoch_rows, n_train)
    write_results(RESULTS, text)


if __name__ == '__main__':
    parser = part_parser(__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--augmented-batches', type=int, default=4, help='augmented batches the teacher variants run on')
    args = parser.parse_args()
    main(args.repeats, args.epochs, args.train_items, args.valid_items, args.augmented_batches)
