"""Pay for the teacher once: students (seeds) trained one after the other, each in a new Python process, sharing the
teacher's outputs through a store on disk (`KnowledgeDistillation(cache='folder')`), against the same students alone.

Data: GTSRB 32x32 (../shared/data/gtsrb, prepared once in bench/out/gtsrb32 by `gtsrb_part.prepared_gtsrb`) on a
subset of classes (`--classes`, default the ten smallest: about 1,900 training images) so that the whole benchmark
fits in minutes on 2 CPU cores; no random augmentation (`gtsrb_dls(augment=False)`), the store needs fixed inputs.
Teacher: the shared ResNet-34 (resnet34-gtsrb32.pth). Student: the accuracy benchmark's 4-layer CNN
(`accuracy.student_model`, width 24), `fit_one_cycle(--epochs, 3e-3)`, DIST (T=1) at weight 0.5.
Runs, each a new process timed from its start to its end (wall and CPU seconds): for each seed, the student alone and
the student distilled with the disk store, in alternating order (the first distilled run fills the store, the others
read it); one teacher pass over the training set (`fill_teacher_cache` into a fresh store, timed inside its process).
Target: the distilled runs take at most 1.1x the students alone plus one teacher pass.
Storage: float32, float16 and top-k stores filled by `fill_teacher_cache`: their size on disk, the change of the
distillation losses against float32 outputs (on the training set, with the trained seed-0 student alone's logits),
and the accuracy of a seed-0 student distilled from each; the same sizes for ImageNet-1k worked out.
Writes bench/results/teacher_once.md. Run: `python bench/teacher_once.py [--seeds 5] [--epochs 3]`.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed

from accuracy import student_model
from fastkd.cache import TeacherCache, fill_teacher_cache
from fastkd.callback import KnowledgeDistillation
from fastkd.gtsrb import gtsrb_dls
from fastkd.losses import DIST, SoftTarget
from gtsrb_part import check_data, gtsrb_teacher, machine_line, prepared_gtsrb, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS, OUT = ROOT/'bench'/'results'/'teacher_once.md', ROOT/'bench'/'out'/'teacher_once'
SMALLEST = [0, 19, 37, 27, 32, 41, 42, 24, 29, 39]  # 210 to 300 training images each
LR, BS, TOP_K = 3e-3, 64, 5
IMAGENET = 1_281_167  # training images of ImageNet-1k, 1,000 classes


def data(classes: list[int]):
    return gtsrb_dls(prepared_gtsrb(), size=32, bs=BS, classes=classes, augment=False, num_workers=0)


def store_settings(storage: str) -> dict:
    return {'float32': {}, 'float16': dict(dtype=torch.float16), f'top-{TOP_K}': dict(top_k=TOP_K)}[storage]


def worker(args) -> dict:
    "One run in this process: a student alone or distilled with a store (`args.run`), or one teacher pass"
    start = time.perf_counter()
    dls = data(args.classes)
    if args.run == 'teacher pass':
        teacher, begin, cpu = gtsrb_teacher(), time.perf_counter(), time.process_time()
        fill_teacher_cache(teacher, dls, args.store)
        return dict(seconds=time.perf_counter() - begin, cpu_seconds=time.process_time() - cpu,
                    items=len(dls.train.dataset))
    set_seed(args.seed, reproducible=True)
    cbs = []
    if args.run != 'alone':
        cache = TeacherCache(path=args.store, **store_settings(args.run))
        cbs = [KnowledgeDistillation(gtsrb_teacher(), DIST(), weight=0.5, cache=cache)]
    learn = Learner(dls, student_model(), metrics=accuracy, cbs=cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(args.epochs, LR)
    if args.save: torch.save(learn.model.state_dict(), args.save)
    return dict(accuracy=float(learn.recorder.values[-1][-1]), seconds=time.perf_counter() - start)


def run(argv: list[str]) -> dict:
    "A worker in a new process: what it printed, its wall seconds from start to end, and its CPU seconds"
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, __file__, '--worker', *argv], capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode: raise SystemExit(f'{argv} failed:\n{done.stderr[-3000:]}')
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return dict(json.loads(done.stdout.splitlines()[-1]), wall=wall, cpu=cpu)


def folder_bytes(root: Path) -> int:
    "Bytes on disk of the one store under `root`"
    return sum(f.stat().st_blocks * 512 for f in root.rglob('*') if f.is_file())


@torch.no_grad()
def loss_changes(classes: list[int], student_weights: Path) -> dict:
    "For each storage: the largest relative change of each loss, stored outputs against float32, over the training set"
    dls, student, teacher = data(classes), student_model(), gtsrb_teacher()
    student.load_state_dict(torch.load(student_weights, weights_only=True))
    student.eval()
    plain, learn = dls.train.new(shuffle=False, drop_last=False), Learner(dls, student)
    caches = {name: TeacherCache(path=OUT/name, **store_settings(name)) for name in ('float32', 'float16', f'top-{TOP_K}')}
    for cache in caches.values(): cache.prepare(learn, [teacher])  # opens the store of this teacher and data
    def forward(xb): return teacher.eval()(*xb)  # for the items training dropped (a last partial batch)
    losses = {'SoftTarget(T=4)': SoftTarget(T=4), 'SoftTarget(T=1)': SoftTarget(T=1), 'DIST': DIST()}
    changes = {name: {loss: 0. for loss in losses} for name in caches if name != 'float32'}
    for i, (xb, _) in enumerate(plain):
        items = torch.arange(i * plain.bs, i * plain.bs + len(xb))
        outputs = {name: c.lookup(items, (xb,), forward, len(plain.dataset)) for name, c in caches.items()}
        s = student(xb)
        for name in changes:
            for loss_name, loss in losses.items():
                change = abs(float(loss(s, outputs[name]) / loss(s, outputs['float32'])) - 1)
                changes[name][loss_name] = max(changes[name][loss_name], change)
    return changes


def main(args):
    check_data()
    begin = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    common = ['--epochs', str(args.epochs), '--classes', *map(str, args.classes)]
    rows = []
    for seed in range(args.seeds):
        alone = ['--run', 'alone', '--seed', str(seed), *common] + (['--save', str(OUT/'alone0.pth')] if seed == 0 else [])
        stored = ['--run', 'float32', '--seed', str(seed), '--store', str(OUT/'float32'), *common]
        order = [('alone', alone), ('store', stored)]
        row = {name: run(argv) for name, argv in (order[::-1] if seed % 2 else order)}  # alternating
        rows.append(row)
        print(f'seed {seed}:', {k: round(v['wall'], 1) for k, v in row.items()}, flush=True)
    teacher_pass = run(['--run', 'teacher pass', '--store', str(OUT/'pass'), *common])
    print('teacher pass:', round(teacher_pass['seconds'], 1), flush=True)
    storage = {'float32': dict(bytes=folder_bytes(OUT/'float32'), accuracy=rows[0]['store']['accuracy'])}
    for name in ('float16', f'top-{TOP_K}'):
        filled = run(['--run', name, '--seed', '0', '--store', str(OUT/name), *common])  # fills while it trains
        storage[name] = dict(bytes=folder_bytes(OUT/name), accuracy=filled['accuracy'])
    changes = loss_changes(args.classes, OUT/'alone0.pth')
    n_items = teacher_pass['items']
    text = report(args, rows, teacher_pass, storage, changes, n_items, time.perf_counter() - begin)
    write_results(RESULTS, text)


def report(args, rows, teacher_pass, storage, changes, n_items: int, seconds: float) -> str:
    total = lambda name, key: sum(row[name][key] for row in rows)
    ratio_wall = total('store', 'wall') / (total('alone', 'wall') + teacher_pass['seconds'])
    ratio_cpu = total('store', 'cpu') / (total('alone', 'cpu') + teacher_pass['cpu_seconds'])
    lines = ['# Pay for the teacher once: a teacher store on disk shared by students in new processes', '',
             f'- {machine_line(torch.get_num_threads())}',
             f'- GTSRB 32x32, classes {args.classes}: {n_items} training images, no augmentation, batch {BS}; teacher '
             f'ResNet-34 (shared weights); student: `accuracy.student_model` (width 24); DIST (T=1), weight 0.5; '
             f'`fit_one_cycle({args.epochs}, {LR:g})`; {args.seeds} seeds, each run a new Python process, timed from '
             'its start to its end (imports and data loading included)',
             f'- whole benchmark {seconds / 60:.1f} minutes', '',
             '| seed | alone: wall s (CPU s) | with the store: wall s (CPU s) | accuracy alone | accuracy distilled |',
             '|---|---|---|---|---|']
    for seed, row in enumerate(rows):
        lines.append(f'| {seed} | {row["alone"]["wall"]:.1f} ({row["alone"]["cpu"]:.1f}) | {row["store"]["wall"]:.1f} '
                     f'({row["store"]["cpu"]:.1f}) | {row["alone"]["accuracy"]:.3f} | {row["store"]["accuracy"]:.3f} |')
    first, later = rows[0]['store']['wall'], [row['store']['wall'] / row['alone']['wall'] for row in rows[1:]]
    lines += ['', f'One teacher pass over the {n_items} training images (`fill_teacher_cache`, inside its process): '
              f'{teacher_pass["seconds"]:.1f} s wall, {teacher_pass["cpu_seconds"]:.1f} s CPU.', '',
              '| total | wall s | against the target | CPU s | against the target |', '|---|---|---|---|---|',
              f'| {args.seeds} students alone | {total("alone", "wall"):.1f} | | {total("alone", "cpu"):.1f} | |',
              f'| {args.seeds} students alone + one teacher pass | '
              f'{total("alone", "wall") + teacher_pass["seconds"]:.1f} | 1.00x | '
              f'{total("alone", "cpu") + teacher_pass["cpu_seconds"]:.1f} | 1.00x |',
              f'| {args.seeds} students distilled with the store | {total("store", "wall"):.1f} | **{ratio_wall:.2f}x** '
              f'| {total("store", "cpu"):.1f} | **{ratio_cpu:.2f}x** (target <= 1.1x) |', '',
              f'The first distilled run (which filled the store) took {first:.1f} s; each later one took '
              + (f'{statistics.median(later):.2f}x its seed\'s student alone (median; '
                 + ', '.join(f'{r:.2f}' for r in later) + ').' if later else 'nothing: one seed only.'),
              '', '## Storage', '',
              f'Stores of this run ({n_items} items x 43 classes) and of ImageNet-1k ({IMAGENET:,} items x 1,000 '
              'classes) worked out from the bytes per item (a flag byte and a 4-byte input fingerprint per item '
              'besides the outputs). Loss change: the largest relative change of the loss over the training batches, '
              'stored outputs against float32, with the trained seed-0 student alone\'s logits. Accuracy: a seed-0 '
              'student distilled from that store (float32: the run above).', '',
              '| storage | bytes per item (43 classes) | this store on disk | ImageNet-1k | SoftTarget(T=4) | '
              'SoftTarget(T=1) | DIST | accuracy, seed 0 |', '|---|---|---|---|---|---|---|---|']
    per_item = {'float32': lambda c: 4 * c + 5, 'float16': lambda c: 2 * c + 5,
                f'top-{TOP_K}': lambda c: 4 * (TOP_K + 1) + (2 if c <= 32767 else 4) * TOP_K + 5}
    for name, measured in storage.items():
        change = changes.get(name, {})
        cells = [f'{change[k]:.1e}' if k in change else 'reference' for k in ('SoftTarget(T=4)', 'SoftTarget(T=1)',
                                                                              'DIST')]
        lines.append(f'| {name} | {per_item[name](43)} | {measured["bytes"] / 2**20:.2f} MiB | '
                     f'{IMAGENET * per_item[name](1000) / 1e9:.2f} GB | ' + ' | '.join(cells) +
                     f' | {measured["accuracy"]:.3f} |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, default=5)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--classes', type=int, nargs='+', default=SMALLEST)
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--run', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--seed', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--store', type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument('--save', type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker: print(json.dumps(worker(args)))
    else: main(args)
