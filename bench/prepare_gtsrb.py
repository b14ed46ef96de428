"""Time `prepare_gtsrb` on the full 32x32 GTSRB training set (39,209 images) and its 3,789-image test part.

Unpacks ../shared/data/gtsrb/gtsrb32.tar.gz into a temporary folder, then times: a first preparation
(copies), a second one over the finished folder (nothing to do), and a first one with hard links.
Writes bench/results/prepare_gtsrb.md. Run: `.venv/bin/python bench/prepare_gtsrb.py`.
"""
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from fastkd.files import atomic_write
from fastkd.gtsrb import prepare_gtsrb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent/'shared'/'data'/'gtsrb'/'gtsrb32.tar.gz'
RESULT = ROOT/'bench'/'results'/'prepare_gtsrb.md'


def timed(f, *args, **kwargs) -> float:
    "Seconds `f(*args, **kwargs)` takes, its printed progress swallowed"
    start = time.perf_counter()
    with redirect_stdout(StringIO()): f(*args, **kwargs)
    return time.perf_counter() - start


def data_folder(source: Path, dest: Path) -> Path:
    "A data folder whose `GTSRB/` is the unpacked archive"
    dest.mkdir()
    (dest/'GTSRB').symlink_to(source/'GTSRB', target_is_directory=True)
    return dest


def main():
    if not DATA.exists(): sys.exit(f'GTSRB data not found at {DATA}: it lives in the shared data folder beside the repo.')
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        subprocess.run(['tar', 'xzf', str(DATA), '-C', str(tmp)], check=True)
        rows = [('unpack gtsrb32.tar.gz with `tar` (not fastkd, for scale)', time.perf_counter() - start)]
        copies = data_folder(tmp, tmp/'copies')
        rows.append(('prepare_gtsrb, first run (copies)', timed(prepare_gtsrb, copies)))
        rows.append(('prepare_gtsrb, second run (nothing to do)', timed(prepare_gtsrb, copies)))
        rows.append(('prepare_gtsrb, first run with link=True', timed(prepare_gtsrb, data_folder(tmp, tmp/'links'), link=True)))
        counts = {name: sum(1 for _ in (copies/name).rglob('*.ppm')) for name in ('train', 'valid', 'all', 'test')}
    table = '\n'.join(f'| {what} | {seconds:.1f} | {39_209 / seconds:,.0f} |' for what, seconds in rows)
    text = (f'# prepare_gtsrb on the full 32x32 training set\n\n'
            f'`bench/prepare_gtsrb.py`, {time.strftime("%Y-%m-%d")}, Python {platform.python_version()}, '
            f'{os.cpu_count()} CPU cores (shared with other work: load average {os.getloadavg()[0]:.1f} at the end).\n'
            f'Each run writes train/valid/all ({counts["train"]:,} / {counts["valid"]:,} / {counts["all"]:,} images) '
            f'and the test part ({counts["test"]:,} images); it reads and decodes every source image first, '
            f'and the second run compares every file byte for byte.\n\n'
            f'| step | seconds | training images per second |\n|---|---|---|\n{table}\n')
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULT, lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == '__main__': main()
