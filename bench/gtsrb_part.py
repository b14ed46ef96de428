"""Shared by the distillation benchmarks: a fixed random part of the real GTSRB 32x32 images, the ResNet-34 teacher
trained on them (../shared/data/gtsrb, see its README.md), and a probe of time and peak memory."""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastai.data.core import DataLoaders
from torch import nn
from torchvision.models import resnet34

from fastkd.callback import load_teacher
from fastkd.files import atomic_write
from fastkd.gtsrb import gtsrb_dls, prepare_gtsrb

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent/'shared'/'data'/'gtsrb'/'gtsrb32.tar.gz'
TEACHER = ARCHIVE.parent/'teachers'/'resnet34-gtsrb32.pth'
DATA = ROOT/'bench'/'out'/'gtsrb32'  # prepared by the first run, reused by later ones (bench/out/ is not tracked)


def check_data():
    "Stop with the reason when the shared GTSRB data is not there"
    for path in (ARCHIVE, TEACHER):
        if not path.exists(): raise SystemExit(f'{path} not found: the benchmarks need ../shared/data/gtsrb (README.md there).')


def prepared_gtsrb() -> Path:
    "`DATA`: the archive unpacked (by `tar`, much faster than Python's tarfile) and split by `prepare_gtsrb`, once"
    done = DATA/'.prepared'
    if not done.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        subprocess.run(['tar', 'xzf', str(ARCHIVE), '-C', str(DATA)], check=True)
        with redirect_stdout(StringIO()): prepare_gtsrb(DATA, link=True)
        done.touch()
    return DATA


def gtsrb_part(n_train: int, n_valid: int, augment: bool, bs: int = 64, seed: int = 0) -> DataLoaders:
    """`gtsrb_dls` at 32 px over `n_train` training and `n_valid` validation images drawn once with `seed`; the same
    training images every epoch, shuffled (as a smaller dataset would be)"""
    dls = gtsrb_dls(prepared_gtsrb(), size=32, bs=bs, augment=augment, num_workers=0)
    rng = np.random.default_rng(seed)
    train = rng.choice(len(dls.train.dataset), n_train, replace=False)
    valid = rng.choice(len(dls.valid.dataset), n_valid, replace=False).tolist()
    dls.loaders = [dls.train.new(n=n_train, get_idxs=lambda: rng.permutation(train).tolist()),
                   dls.valid.new(n=n_valid, get_idxs=lambda: valid)]
    return dls


def gtsrb_teacher() -> nn.Module:
    "The ResNet-34 trained on GTSRB 32x32 (validation accuracy 0.978)"
    return load_teacher(TEACHER, resnet34, 43)


def _status_kib(field: str) -> int:
    "A memory figure of this process from /proc/self/status (Linux), in KiB"
    return int(re.search(rf'{field}:\s+(\d+)', Path('/proc/self/status').read_text()).group(1))


def measure(f: Callable) -> dict:
    """Wall and CPU seconds of this process for `f()` (CPU time is steadier on a machine other work shares), and how
    far it raised the resident memory above what the process held before, in MiB (resets the peak, VmHWM)"""
    Path('/proc/self/clear_refs').write_text('5')
    memory, wall, cpu = _status_kib('VmRSS'), time.perf_counter(), time.process_time()
    f()
    return dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                memory=(_status_kib('VmHWM') - memory) / 1024)


def machine_line(threads: int) -> str:
    "The machine a benchmark ran on, its torch threads, and how busy the CPU was (load average now, over 1 and 15 min)"
    one, _, fifteen = os.getloadavg()
    return (f'{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} torch thread(s); '
            f'load average at the end {one:.1f} (1 min), {fifteen:.1f} (15 min)')


def part_parser(description: str) -> argparse.ArgumentParser:
    "A command line with the options every benchmark on `gtsrb_part` shares: repeats and the part's size"
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--train-items', type=int, default=2048)
    parser.add_argument('--valid-items', type=int, default=512)
    return parser


def write_results(path: Path, text: str):
    "Write a benchmark's Markdown `text` to `path` atomically, and print it"
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    print(text)
