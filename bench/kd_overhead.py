"""What distillation adds to a training step: one teacher forward, nothing more.

Same process, same data, same seed: epochs of the student alone, epochs of the student with
`KnowledgeDistillation`, and the teacher's forward passes alone over the same batches (no_grad, eval).
Writes bench/results/kd_overhead.md. Run: `.venv/bin/python bench/kd_overhead.py [--repeats 3]`.
"""
import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fastai.learner import Learner

from fastkd.all import KnowledgeDistillation, SoftTarget, atomic_write, digits_dls, scratch_learner, write_digits
from fastkd.cli import ARCHS

RESULTS = Path(__file__).parent/'results'/'kd_overhead.md'


def fit_seconds(learn: Learner) -> float:
    "Seconds of one epoch (its validation is the same with or without distillation, so it cancels in the difference)"
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return time.perf_counter() - start


def teacher_seconds(teacher: torch.nn.Module, dls) -> float:
    "Seconds of the teacher's forward passes over one epoch of training batches (loaded beforehand), as the callback runs them"
    batches = [xb for xb, _ in dls.train]
    start = time.perf_counter()
    with torch.no_grad():
        for xb in batches: teacher.eval()(xb)
    return time.perf_counter() - start


def main(repeats: int, teacher_arch: str, student_arch: str, size: int):
    torch.set_num_threads(1)  # steadier on a shared machine; the ratio is what matters
    data = write_digits(Path(tempfile.mkdtemp())/'digits', size=size)
    dls = digits_dls(data, size=size, bs=64, num_workers=0)
    teacher = scratch_learner(dls, ARCHS[teacher_arch]).model
    rows = []
    for _ in range(repeats):
        student = fit_seconds(scratch_learner(dls, ARCHS[student_arch]))
        distilled = fit_seconds(scratch_learner(dls, ARCHS[student_arch], cbs=KnowledgeDistillation(teacher, SoftTarget(T=4))))
        forward = teacher_seconds(teacher, dls)
        rows.append((student, distilled, forward, (distilled - student) / forward))
    overhead = statistics.median(r[3] for r in rows)
    lines = ['# Distillation overhead per training epoch', '',
             f'{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, digits at {size} px, '
             f'{len(dls.train)} batches of 64; teacher {teacher_arch}, student {student_arch}; {repeats} repeats.', '',
             '| student alone (s) | student + KD (s) | teacher forwards alone (s) | (KD - alone) / teacher forwards |',
             '|---|---|---|---|', *[f'| {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} |' for a, b, c, d in rows], '',
             f'**Median: distillation adds {overhead:.2f} teacher-forward epochs per epoch** (1.00 = exactly one teacher '
             'forward per step and nothing else).', '']
    RESULTS.parent.mkdir(exist_ok=True)
    atomic_write(RESULTS, lambda tmp: Path(tmp).write_text('\n'.join(lines)))
    print('\n'.join(lines))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--teacher', default='xresnet34-half', choices=ARCHS)
    parser.add_argument('--student', default='xresnet18-quarter', choices=ARCHS)
    parser.add_argument('--size', type=int, default=32)
    args = parser.parse_args()
    main(args.repeats, args.teacher, args.student, args.size)
