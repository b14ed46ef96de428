"""`TeacherStore`: a `TeacherCache`'s per-item arrays in a folder on disk, shared by runs, students and processes.

Format: one numpy `.npy` file per array (one row per item) mapped into memory (`np.memmap`), a `filled.npy` flag
byte per item, and `manifest.json` saying what the rows are the outputs of. Why `.npy`: numpy already ships with
fastkd (no new dependency), its header records dtype and shape so any numpy reads a store (`np.load(f,
mmap_mode='r')`), and a memory map reads and writes one item's row in place, which an incremental fill by several
processes needs: safetensors files are written whole and read-only after, and zarr (another dependency) groups items
into chunks that concurrent writers of neighbouring items would rewrite over each other.

Crash safety: an item's rows are written and flushed to the file before its flag, so a process killed at any point
leaves only flags of complete rows (a row without its flag is computed again). Several processes may fill one store
at once: a store is created under a file lock (`fcntl.flock`) and its manifest appears last, atomically; writes of an
item are idempotent (the same teacher on the same input), and each process sees the others' rows as they land. Locks
and shared memory maps hold between the processes of one host only: a store on NFS or shared by several hosts is not
supported. A new store's bytes are reserved on disk when it is made: a disk too full for it is an error then, not a
SIGBUS when a row of a sparse file is written later.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from .files import atomic_write, locked

__all__ = ['TeacherStore']

MANIFEST, FLAGS = 'manifest.json', 'filled'


def _size(n_bytes: float) -> str:
    "`n_bytes` in KiB, MiB or GiB, whichever reads best"
    for unit in ('KiB', 'MiB', 'GiB'):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == 'GiB': return f'{n_bytes:.1f} {unit}'


def _no_room(folder: Path, n_bytes: int) -> OSError:
    "The error for a store of `n_bytes` that does not fit in `folder`: what it needs, what is free, the fixes"
    return OSError(f'The teacher store needs {_size(n_bytes)} and {folder} has {_size(shutil.disk_usage(folder).free)} '
                   'free: pass another path, or a smaller storage (dtype=torch.float16, or top_k).')


def _reserve(file, n_bytes: int):
    "Make the open `file` `n_bytes` long with room taken on disk: fallocate, or zeros where the file system cannot"
    try: return os.posix_fallocate(file.fileno(), 0, n_bytes)
    except AttributeError: pass  # no posix_fallocate (macOS)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS): raise
    file.seek(0, os.SEEK_END)
    while (left := n_bytes - file.tell()) > 0: file.write(bytes(min(left, 2**20)))
    file.flush()


def _allocate(file: Path, shape: tuple, dtype: str):
    "A `.npy` file of zeros of `shape` and `dtype`, its bytes reserved on disk"
    with open(file, 'wb') as f:
        np.lib.format.write_array_header_1_0(f, dict(descr=np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                     fortran_order=False, shape=shape))
        f.flush()
        _reserve(f, f.tell() + math.prod(shape) * np.dtype(dtype).itemsize)


def _mapped(file: Path) -> np.memmap:
    "The array in `file`, mapped for reading and writing, once it is known to hold all that its header promises"
    np.load(file, mmap_mode='r')  # raises on a cut file; mode 'r+' alone would lengthen it with zeros, read as outputs
    return np.load(file, mmap_mode='r+')


class TeacherStore:
    """The arrays of one store folder, mapped into memory: `arrays` (name -> `np.memmap`, one row per item) and
    `filled` (1 where an item's rows are complete). `manifest` holds the identity the folder is named after
    (teacher weights, items, transforms, storage), the `layout` of the arrays and the `output_shape` of one item."""
    def __init__(self, folder: Path):
        self.folder, self.manifest = folder, json.loads((folder/MANIFEST).read_text())
        names = [*self.manifest['layout'], FLAGS]
        try: maps = {name: _mapped(folder/f'{name}.npy') for name in names}
        except (OSError, ValueError) as error:
            raise ValueError(f'The teacher store {folder} is damaged ({error}): delete that folder and fill it again.')
        self.filled = maps.pop(FLAGS)
        self.arrays = maps
        expected = {name: (self.n_items, *shape) for name, (shape, _) in self.manifest['layout'].items()}
        if {name: a.shape for name, a in maps.items()} != expected or self.filled.shape != (self.n_items,):
            raise ValueError(f'The arrays of the teacher store {folder} do not have the shapes its manifest gives: '
                             'delete that folder and fill it again.')

    @property
    def n_items(self) -> int: return self.manifest['n_items']

    @staticmethod
    def root(path: str | Path) -> Path:
        "`path` as the folder that holds stores, one sub-folder each; an error for a file or a store's own folder"
        path = Path(path).expanduser()
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f'The teacher cache path {path} is a file: pass a folder (it is created if '
                                     'missing), e.g. cache="teacher-outputs".')
        if (path/MANIFEST).exists():
            raise ValueError(f'{path} is the folder of one teacher store (it holds {MANIFEST}): pass the folder '
                             f'above it, {path.parent}, which holds one store per teacher and data.')
        return path

    @classmethod
    def find(cls, folder: Path, identity: dict) -> TeacherStore | None:
        "The store in `folder` if one was created there, after checking that it holds outputs of `identity`"
        if not (folder/MANIFEST).exists(): return None
        store = cls(folder)
        if store.manifest['identity'] != identity:
            raise ValueError(f'The teacher store {folder} holds the outputs of another teacher or other data than '
                             'its name says (its manifest was changed or copied there): delete that folder.')
        return store

    @classmethod
    def create(cls, folder: Path, identity: dict, n_items: int, layout: dict, output_shape: tuple) -> TeacherStore:
        """The store in `folder` with room for `n_items` rows of each array of `layout` (name -> (shape, numpy dtype
        name)), all unfilled and their bytes reserved on disk; if another process created it first, that one"""
        folder.parent.mkdir(parents=True, exist_ok=True)
        with locked(folder.parent):
            if (store := cls.find(folder, identity)) is not None: return store
            n_bytes = n_items * (sum(np.dtype(d).itemsize * int(np.prod(s)) for s, d in layout.values()) + 1)
            if n_bytes > shutil.disk_usage(folder.parent).free: raise _no_room(folder.parent, n_bytes)
            folder.mkdir(exist_ok=True)
            try:
                for name, (shape, dtype) in {**layout, FLAGS: ((), 'uint8')}.items():  # zeros: nothing filled
                    _allocate(folder/f'{name}.npy', (n_items, *shape), dtype)
            except OSError as error:
                shutil.rmtree(folder)  # no manifest yet: a folder of this module's own, half made
                if error.errno == errno.ENOSPC: raise _no_room(folder.parent, n_bytes) from error
                raise
            manifest = dict(identity=identity, n_items=n_items, output_shape=list(output_shape),
                            layout={name: [list(shape), dtype] for name, (shape, dtype) in layout.items()},
                            bytes_per_item=n_bytes // n_items if n_items else 0)
            atomic_write(folder/MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
        return cls(folder)

    def flush(self):
        "Write what was changed in the mapped arrays (flags included) to the files"
        for array in (*self.arrays.values(), self.filled): array.flush()
