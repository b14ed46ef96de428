"""`atomic_write`: every file fastkd writes appears whole or not at all, and stays so through a crash or a power loss;
`locked`: one process at a time in a folder."""
from __future__ import annotations

import fcntl
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

__all__ = ['atomic_write', 'locked']


def _new_file(path: Path) -> str:
    """A new empty file beside `path` with a temporary name, made with the mode of any new file (0666 less the
    umask, which the system applies: the process's umask is never read or changed)"""
    while True:
        tmp = str(path.parent/f'.{path.name}.{secrets.token_hex(4)}.tmp')
        try: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError: continue
        return tmp


def _fsync(path: str | Path):
    "Wait until the data of the file or folder at `path` is on the disk"
    fd = os.open(path, os.O_RDONLY)
    try: os.fsync(fd)
    finally: os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place: an interrupted write leaves
    none. The file is on the disk before the rename, and the rename before this returns, so that after a crash or a
    power loss `path` holds the old file or the whole new one, never an empty or cut one. Only the temporary name is
    written (a `write` may replace it by a hard link to another file, which keeps its mode)."""
    path = Path(path)
    tmp = _new_file(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp): os.remove(tmp)
    _fsync(path.parent)
    return path


@contextmanager
def locked(folder: str | Path):
    "An exclusive lock on `folder` (a `.lock` file in it) for the block: other processes asking for it wait"
    with open(Path(folder)/'.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try: yield
        finally: fcntl.flock(lock, fcntl.LOCK_UN)
