"""Benchmark: a TTA sweep with `test_time_aug` (max(n) + 1 passes) against one `learn.tta(n=...)` per setting, as the
reference notebook ran it, on the GTSRB 32x32 test part with a ResNet-18 student trained briefly from scratch.

Both run in this process on the same learner and test items, alternating which goes first, for several repeats.
Writes the time ratio and the per-n scores with their run-to-run spread to bench/results/tta_sweep.md.
Run: `python bench/tta_sweep.py` (or `make bench`); `--help` lists the sizes, which keep a run under ~15 minutes on
a shared 2-core CPU. Needs the GTSRB archive of ../shared/data/gtsrb (see its README.md).
"""
from __future__ import annotations

import argparse
import platform
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.vision.all import Callback, accuracy, resnet18, set_seed, vision_learner
from sklearn.metrics import f1_score

from fastkd.files import atomic_write
from fastkd.gtsrb import gtsrb_dls, gtsrb_test_dl, prepare_gtsrb
from fastkd.tta import plot_tta, test_time_aug

SWEEP, BETA = [0, 5, 10, 20, 30], 0.1
ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent/'shared'/'data'/'gtsrb'/'gtsrb32.tar.gz'
RESULTS = ROOT/'bench'/'results'/'tta_sweep.md'  # and its plot, tta_sweep.png
weighted_f1 = partial(f1_score, average='weighted')


class PassCounter(Callback):
    "Counts prediction passes over a DataLoader"
    passes = 0
    def before_validate(self): self.passes += 1


def prepare(work: Path) -> Path:
    "Unpack the 32x32 archive into `work` and make the folders of `prepare_gtsrb` (hard links, no copies)"
    with tarfile.open(ARCHIVE) as archive: archive.extractall(work, filter='data')
    prepare_gtsrb(work, link=True)
    return work


def random_part(dl, n: int, rng: np.random.Generator):
    "`dl` over `n` of its items, drawn at random each epoch"
    return dl.new(n=n, get_idxs=lambda: rng.choice(len(dl.dataset), n, replace=False).tolist())


def train_student(path: Path, n_train: int, n_valid: int, seed: int = 0):
    "A ResNet-18 trained from scratch for one epoch on `n_train` random training images at 32 px"
    set_seed(seed, reproducible=True)
    dls = gtsrb_dls(path, size=32, bs=32, num_workers=0)
    rng, loaders = np.random.default_rng(seed), dls.loaders
    dls.loaders = [random_part(dls.train, n_train, rng), random_part(dls.valid, n_valid, rng)]
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 2e-3)
    dls.loaders = loaders  # test DataLoaders copy the validation one: give them all its items back
    return learn, learn.recorder.values[-1][-1]


def notebook_sweep(learn, dl, y_true) -> tuple[dict[int, float], dict[int, float]]:
    "The reference notebook's way: plain predictions for n=0, then one `learn.tta(n=n)` per setting"
    scores, seconds = {}, {}
    for n in SWEEP:
        start = time.perf_counter()
        probs = learn.tta(dl=dl, n=n, beta=BETA)[0] if n else learn.get_preds(dl=dl)[0]
        seconds[n] = time.perf_counter() - start
        scores[n] = weighted_f1(y_true, probs.argmax(dim=1).numpy())
    return scores, seconds


def our_sweep(learn, dl, y_true) -> tuple[dict[int, float], dict[int, float]]:
    results = test_time_aug(learn, dl, y_true, weighted_f1, n_augs=SWEEP, beta=BETA).set_index('n_aug')
    return results.score.to_dict(), results.time.to_dict()


def run(learn, dl, y_true, repeats: int) -> list[dict]:
    "Both sweeps `repeats` times, alternating which goes first; scores, wall seconds and passes of each"
    with learn.no_bar(): learn.tta(dl=dl, n=1)  # warm-up, untimed: first plain and augmented passes are slower
    runs = []
    for repeat in range(repeats):
        order = [('ours', our_sweep), ('notebook', notebook_sweep)]
        for name, sweep in order if repeat % 2 == 0 else order[::-1]:
            set_seed(100 + repeat)
            counter = PassCounter()
            start, start_cpu = time.perf_counter(), time.process_time()
            with learn.no_bar(), learn.added_cbs(counter): scores, seconds = sweep(learn, dl, y_true)
            runs.append(dict(method=name, repeat=repeat, wall=time.perf_counter() - start, passes=counter.passes,
                             cpu=time.process_time() - start_cpu, scores=scores, seconds=seconds))
            print(f'repeat {repeat} {name}: {runs[-1]["wall"]:.1f}s, {runs[-1]["cpu"]:.1f}s CPU, {counter.passes} passes')
    return runs


def our_means(runs: list[dict]) -> pd.DataFrame:
    "Mean score and median time of each setting over our runs, as `test_time_aug` returns them"
    ours = [r for r in runs if r['method'] == 'ours']
    return pd.DataFrame([dict(n_aug=n, score=np.mean([r['scores'][n] for r in ours]),
                              time=np.median([r['seconds'][n] for r in ours])) for n in SWEEP])


def report(runs: list[dict], setup: dict) -> str:
    "The results as markdown"
    by = lambda method, key: [r[key] for r in runs if r['method'] == method]
    walls, cpus = ({m: np.array(by(m, key)) for m in ('ours', 'notebook')} for key in ('wall', 'cpu'))
    ratios, cpu_ratios = walls['ours'] / walls['notebook'], cpus['ours'] / cpus['notebook']
    lines = ['# TTA sweep benchmark: `test_time_aug` vs one `learn.tta` per setting', '',
             f'Sweep n_augs = {SWEEP}, beta = {BETA}, metric: weighted F1 (scikit-learn).', '',
             *[f'- {k}: {v}' for k, v in setup.items()], '',
             '## Time', '', 'Wall seconds, and CPU seconds of this process (steadier: other users of the machine '
             'slow the wall clock, not the work done).', '',
             '| repeat | ours (s) | notebook (s) | ratio | ours CPU (s) | notebook CPU (s) | CPU ratio | passes ours '
             '| passes notebook |', '|---|---|---|---|---|---|---|---|---|']
    for i in range(len(ratios)):
        lines.append(f"| {i} | {walls['ours'][i]:.1f} | {walls['notebook'][i]:.1f} | {ratios[i]:.3f} | "
                     f"{cpus['ours'][i]:.1f} | {cpus['notebook'][i]:.1f} | {cpu_ratios[i]:.3f} | "
                     f"{by('ours', 'passes')[i]} | {by('notebook', 'passes')[i]} |")
    target = 'met' if np.median(ratios) <= 0.5 else 'NOT met'
    ours, notebook = max(SWEEP) + 1, sum(n + 1 for n in SWEEP)
    lines += ['', f'**Median time ratio ours/notebook: {np.median(ratios):.3f} wall, {np.median(cpu_ratios):.3f} CPU** '
              f'(target <= 0.5 on wall time: {target}). Expected from the passes: between {ours}/{notebook} = '
              f'{ours / notebook:.3f} (plain and augmented passes cost the same) and {ours - 1}/{notebook - len(SWEEP)} '
              f'= {(ours - 1) / (notebook - len(SWEEP)):.3f} (plain passes free).', '',
              '## Scores and per-setting cost', '',
              'Spread: max - min of the score over all runs of both methods for that n (augmentation is random, so '
              'scores of augmented settings differ from run to run). Agree: |mean ours - mean notebook| <= spread. '
              '`time ours` is the `time` column of `test_time_aug` (plain pass + n augmented passes, measured within '
              'the sweep); `time notebook` is the measured call for that n alone (median over repeats).', '',
              '| n_aug | ours mean | notebook mean | difference | spread | agree | time ours (s) | time notebook (s) |',
              '|---|---|---|---|---|---|---|---|']
    for n in SWEEP:
        ours, notebook = ([r['scores'][n] for r in runs if r['method'] == m] for m in ('ours', 'notebook'))
        spread, difference = max(ours + notebook) - min(ours + notebook), np.mean(ours) - np.mean(notebook)
        times = [np.median([r['seconds'][n] for r in runs if r['method'] == m]) for m in ('ours', 'notebook')]
        lines.append(f'| {n} | {np.mean(ours):.4f} | {np.mean(notebook):.4f} | {difference:+.4f} | {spread:.4f} | '
                     f"{'yes' if abs(difference) <= spread else 'no'} | {times[0]:.1f} | {times[1]:.1f} |")
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--test-items', type=int, default=150, help='random test images scored (of 3,789)')
    parser.add_argument('--train-items', type=int, default=10000, help='random training images for the one epoch')
    parser.add_argument('--valid-items', type=int, default=1000, help='random validation images for its accuracy')
    parser.add_argument('--repeats', type=int, default=5, help='runs of each sweep')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1: steadiest on a shared machine)')
    args = parser.parse_args()
    if not ARCHIVE.exists(): raise SystemExit(f'GTSRB archive not found at {ARCHIVE} (see shared/data/gtsrb/README.md).')
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        path = prepare(Path(work))
        learn, valid_accuracy = train_student(path, args.train_items, args.valid_items)
        dl, y_true = gtsrb_test_dl(learn, path)
        picked = np.sort(np.random.default_rng(0).choice(len(y_true), min(args.test_items, len(y_true)), replace=False))
        dl, y_true = learn.dls.test_dl([dl.items[i] for i in picked]), y_true[picked].numpy()
        runs = run(learn, dl, y_true, args.repeats)
        setup = {'machine': f'{platform.processor() or platform.machine()}, {args.threads} torch thread(s), '
                            f'torch {torch.__version__}, CPU',
                 'student': f'fastai ResNet-18 from scratch, 1 epoch (one cycle) on {args.train_items} random training '
                            f'images at 32 px (batch 32, lr 2e-3): validation accuracy {valid_accuracy:.3f} on '
                            f'{args.valid_items} random validation images. A weak student, trained only to make '
                            'the predictions non-trivial; the benchmark is about the cost of the sweep.',
                 'test items': f'{len(y_true)} random images of the 3,789-image GTSRB test part (seed 0): a subset, to '
                               f'keep a run under ~15 minutes; {args.repeats} repeats of each sweep',
                 'whole run': f'{(time.perf_counter() - start) / 60:.1f} minutes (unpacking, preparing and training '
                              'included)'}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = report(runs, setup)
    atomic_write(RESULTS, lambda tmp: Path(tmp).write_text(text))
    fig = plot_tta(our_means(runs))
    atomic_write(RESULTS.with_suffix('.png'), lambda tmp: fig.savefig(tmp, format='png', dpi=100))
    print(text)


if __name__ == '__main__': main()
