"""Distilling across input sizes: a teacher trained at twice the student's image size, fed the student's images as
today (at the student's size) or as it takes them (`TeacherInput`: resized to its own size on the device).

Digits (scikit-learn's, `write_digits`' split): a teacher (`xresnet34-half`) trained once at 32 px; students
(`xresnet18-sixteenth`) at 16 px, `fit_one_cycle` at 1e-2, batch 32, 10 epochs, SoftTarget T=4 at weight 0.5 (the
demo's method); 5 seeds; test folder, weighted F1.
GTSRB 32x32 (bench/accuracy.py's data and track split, every image decoded once): the shared ResNet-34, trained at 32
px, fine-tuned for `--teacher-epochs` epochs at 64 px (the 32 px images upsampled by `Resize(64)`); students
(`student_model`, width 24) at 32 px, `fit_one_cycle` at 3e-3, batch 128, 4 epochs, DIST at weight 0.5 (the job's
default on GTSRB); 3 seeds; test part, weighted F1. Without random augmentation and with `cache=True`, so that the
teacher runs once per training image (its forward at 64 px costs four times that at 32 px on a CPU); every row the same.
Rows: the student alone, distilled from the teacher fed the student's images (as before `TeacherInput`), and
distilled with `TeacherInput(size=teacher's)`. Beside them: the teacher's accuracy on validation images of each kind
(its own size; the student's size fed as they are; the student's size resized by `TeacherInput`), and the students'
and the teacher's multiply-adds and CPU latency (batch 1, `compare_models`).
Every run is kept in OUT/runs.csv as it ends (a stopped run goes on from there), the report rewritten after each.

    python bench/teacher_input.py --threads 2     # writes bench/results/teacher_input.md
    python bench/teacher_input.py --quick         # smoke run: digits only, 2 seeds, 2 epochs, under bench/out
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torch import nn
from torchvision.models import resnet34

from accuracy import OUT, TEACHER, Scorer, digits_and_gtsrb_args, prepared_data, student_model, write_text
from fastkd.callback import KnowledgeDistillation, load_teacher
from fastkd.cli import ARCHS
from fastkd.compression import compare_models
from fastkd.digits import digits_dls, write_digits
from fastkd.files import atomic_write
from fastkd.gtsrb import gtsrb_dls
from fastkd.losses import DIST, SoftTarget
from fastkd.memory import in_memory
from fastkd.teacher_input import AdaptedTeacher, TeacherInput, input_stats
from fastkd.workflow import scratch_learner, seed_gain, validation_accuracy, weighted_f1

ROWS = ['alone', "distilled, teacher fed the student's size", 'distilled, TeacherInput (teacher\'s size)']


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--teacher-epochs', type=int, default=1, help='GTSRB teacher fine-tuning at 64 px (default: 1)')
    return digits_and_gtsrb_args(parser, 'teacher_input', argv)


def multiply_adds(model: nn.Module, x: torch.Tensor) -> int:
    "Multiply-adds of one forward on `x` (batch 1): convolutions and linear layers"
    total = []
    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            total.append(output.numel() * module.in_channels // module.groups * np.prod(module.kernel_size))
        elif isinstance(module, nn.Linear): total.append(output.numel() * module.in_features)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad(): model.eval()(x)
    finally:
        for hook in hooks: hook.remove()
    return int(sum(total))


class Digits:
    name, seeds, epochs, lr, bs, small, large = 'digits', [0, 1, 2, 3, 4], 10, 1e-2, 32, 16, 32

    def __init__(self, args, out: Path):
        if args.quick: self.seeds, self.epochs = [0, 1], 2
        data = write_digits(out/'digits', size=32)
        self.large_dls, self.dls = (digits_dls(data, size=s, bs=self.bs) for s in (self.large, self.small))
        teacher = scratch_learner(self.large_dls, ARCHS['xresnet34-half'], seed=0)
        with teacher.no_bar(), teacher.no_logging(): teacher.fit_one_cycle(2 if args.quick else 12, 1e-2)
        self.teacher = teacher.model.eval()
        test_files = sorted((data/'test').glob('*/*.png'))
        self.test_dl, self.y_test = self.dls.test_dl(test_files), np.array([int(f.parent.name) for f in test_files])

    def distil(self, teacher_input) -> list:
        return [KnowledgeDistillation(self.teacher, SoftTarget(T=4), weight=0.5, teacher_input=teacher_input)]

    def student(self, seed: int, cbs: list) -> Learner:
        return scratch_learner(self.dls, ARCHS['xresnet18-sixteenth'], seed, cbs=cbs)

    def test_f1(self, learn: Learner) -> float:
        preds, _ = learn.get_preds(dl=self.test_dl)
        return weighted_f1(self.y_test, preds.argmax(1).numpy())


class GTSRB:
    name, seeds, epochs, lr, bs, small, large = 'gtsrb', [0, 1, 2], 4, 3e-3, 128, 32, 64

    def __init__(self, args, out: Path):
        data = prepared_data(OUT/'accuracy'/'data', None)
        self.dls = in_memory(gtsrb_dls(data, size=self.small, bs=self.bs, augment=False))
        self.large_dls = in_memory(gtsrb_dls(data, size=self.large, bs=64, augment=False))
        weights = out/f'teacher-{self.large}px-{args.teacher_epochs}ep.pth'
        teacher = load_teacher(TEACHER, resnet34, 43)
        if weights.exists(): teacher.load_state_dict(torch.load(weights, weights_only=True))
        else:  # the shared 32 px teacher, fine-tuned at 64 px
            learn = Learner(self.large_dls, teacher.requires_grad_(True), metrics=accuracy)
            set_seed(0, reproducible=True)
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(args.teacher_epochs, 1e-3)
            atomic_write(weights, lambda tmp: torch.save(teacher.state_dict(), tmp))
        self.teacher = teacher.eval().requires_grad_(False)
        self.scorer = Scorer(self.dls, data, None, [0])

    def distil(self, teacher_input) -> list:
        return [KnowledgeDistillation(self.teacher, DIST(), weight=0.5, cache=True, teacher_input=teacher_input)]

    def student(self, seed: int, cbs: list) -> Learner:
        set_seed(seed, reproducible=True)
        return Learner(self.dls, student_model(24), cbs=cbs)

    def test_f1(self, learn: Learner) -> float: return self.scorer.test(learn, 0)['test_f1']


def teacher_accuracies(bench) -> dict[str, float]:
    "The teacher's validation accuracy at its own size, fed the student's size as it is, and resized by TeacherInput"
    stats = input_stats(bench.dls.train)
    adapted = AdaptedTeacher(bench.teacher, TeacherInput(bench.large), stats)
    return {f'its own size ({bench.large} px)': validation_accuracy(bench.teacher, bench.large_dls, 512)[0],
            f'the student\'s {bench.small} px, as they are': validation_accuracy(bench.teacher, bench.dls, 512)[0],
            f'the student\'s {bench.small} px resized to {bench.large} px (TeacherInput)':
                validation_accuracy(adapted, bench.dls, 512)[0]}


def costs(bench) -> list[str]:
    "Multiply-adds and CPU latency at batch 1: the student at its size, the teacher at its own"
    student = bench.student(0, []).model
    x_small, x_large = torch.zeros(1, 3, bench.small, bench.small), torch.zeros(1, 3, bench.large, bench.large)
    macs = {'student': multiply_adds(student, x_small), 'teacher': multiply_adds(bench.teacher, x_large)}
    adapted = AdaptedTeacher(bench.teacher, TeacherInput(bench.large), None)
    sizes = compare_models(adapted, student, input_size=(3, bench.small, bench.small), batch_size=1)
    latency = sizes.loc['latency_ms']
    return [f'Student at {bench.small} px: {macs["student"] / 1e6:.2f} M multiply-adds, {latency["student"]:.2f} ms; '
            f'teacher at {bench.large} px: {macs["teacher"] / 1e6:.1f} M multiply-adds, {latency["teacher"]:.2f} ms '
            f'(the student: {macs["student"] / macs["teacher"]:.2%} of its multiply-adds, '
            f'{latency["student"] / latency["teacher"]:.1%} of its latency; CPU, batch 1).']


def train(bench, row: str, seed: int) -> tuple[float, float]:
    cbs = [] if row == ROWS[0] else bench.distil(None if row == ROWS[1] else TeacherInput(bench.large))
    learn = bench.student(seed, cbs)
    for dl in bench.dls.loaders: dl.rng.seed(seed)
    set_seed(seed, reproducible=True)
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(bench.epochs, bench.lr)
    return bench.test_f1(learn), time.perf_counter() - start


def section(bench, runs: pd.DataFrame, teacher: dict, cost: list[str]) -> list[str]:
    runs = runs[runs.dataset == bench.name]
    f1 = {row: runs[runs.row == row].set_index('seed').test_f1 for row in ROWS if (runs.row == row).any()}
    lines = [f'### {bench.name}: teacher trained at {bench.large} px, students at {bench.small} px, {bench.epochs} '
             'epochs', '', '| row | seeds | test weighted F1 | gain over alone (points) | seconds per run |',
             '|---|---|---|---|---|']
    for row, scores in f1.items():
        gain = seed_gain(f1[ROWS[0]].reindex(scores.index), scores) if ROWS[0] in f1 and row != ROWS[0] else None
        lines.append(f'| {row} | {len(scores)} | {scores.mean():.4f} ± {scores.std():.4f} | '
                     f'{"" if gain is None else format(gain["mean"], "+.1f") + " ± " + format(gain["std"], ".1f")} | '
                     f'{runs[runs.row == row].seconds.mean():.0f} |')
    lines += ['', 'The teacher\'s validation accuracy (512 images) on images of:', '',
              *[f'- {kind}: {value:.4f}' for kind, value in teacher.items()], '', *cost, '']
    return lines


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = ' '.join(['python bench/teacher_input.py', *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    runs_file = args.out/'runs.csv'
    runs = pd.read_csv(runs_file).to_dict('records') if runs_file.exists() else []
    sections = {}
    for name in args.datasets:
        bench = {'digits': Digits, 'gtsrb': GTSRB}[name](args, args.out)
        teacher, cost = teacher_accuracies(bench), costs(bench)
        print(teacher, cost, flush=True)
        for seed in bench.seeds:
            for row in ROWS:
                if any(r['dataset'] == name and r['row'] == row and r['seed'] == seed for r in runs): continue
                f1, seconds = train(bench, row, seed)
                runs.append(dict(dataset=name, row=row, seed=seed, test_f1=f1, seconds=seconds))
                print(runs[-1], flush=True)
                atomic_write(runs_file, lambda tmp: pd.DataFrame(runs).to_csv(tmp, index=False))
                sections[name] = section(bench, pd.DataFrame(runs), teacher, cost)
                write_text(report(pd.DataFrame(runs), sections, args, command), args.results)
        sections[name] = section(bench, pd.DataFrame(runs), teacher, cost)
    write_text(report(pd.DataFrame(runs), sections, args, command), args.results)
    print(f'written {args.results}')


def report(runs: pd.DataFrame, sections: dict, args, command: str) -> str:
    return '\n'.join([
        '# Distilling across input sizes: TeacherInput', '',
        f'Command: `{command}` ({args.threads} torch thread(s); torch {torch.__version__}; '
        f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}).', '',
        'Mean ± sample std over seeds; gains paired by seed (same starting weights and batch order) in points of '
        'weighted F1 (100 x F1). Data and schedules: the docstring of bench/teacher_input.py.', '',
        *[line for lines in sections.values() for line in lines],
        '## Every run', '', '| dataset | row | seed | test F1 | seconds |', '|---|---|---|---|---|',
        *[f'| {r.dataset} | {r.row} | {r.seed} | {r.test_f1:.4f} | {r.seconds:.0f} |' for r in runs.itertuples()], ''])



if __name__ == '__main__': main()
