"""`atomic_write`: every file fastkd writes appears whole or not at all; `locked`: one process at a time in a folder."""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

__all__ = ['atomic_write', 'locked']


def _umask() -> int:
    "The process's umask (reading it means setting it, so set it back)"
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    "Call `write(tmp)` on a temporary file beside `path`, then rename it into place: an interrupted write leaves none"
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files: give the permissions of an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp): os.remove(tmp)
    return path


@contextmanager
def locked(folder: str | Path):
    "An exclusive lock on `folder` (a `.lock` file in it) for the block: other processes asking for it wait"
    with open(Path(folder)/'.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try: yield
        finally: fcntl.flock(lock, fcntl.LOCK_UN)
