"""What makes a job reproducible and resumable: `RunStore` (each trained model's weights and scores, saved as soon as
it ends, under the settings that made them), `environment` (versions and machine) and `fingerprint` (a short hash of
a model's weights)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import warnings
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write

__all__ = ['RunStore', 'environment', 'fingerprint']


def fingerprint(model: nn.Module) -> str:
    "The first 12 hex digits of the SHA-256 of `model`'s state dict (names, shapes, dtypes and values)"
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f'{name}{tuple(tensor.shape)}{tensor.dtype}'.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def _cpu_name() -> str:
    "The CPU's model name where Linux says it, else what `platform` knows"
    try:
        lines = Path('/proc/cpuinfo').read_text().splitlines()
        return next(line.split(':', 1)[1].strip() for line in lines if line.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    "The versions and the machine a result came from: fastkd, fastai, torch, Python, CPU, GPU and torch's threads"
    from importlib.metadata import version
    import fastkd
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'
    return {'fastkd': fastkd.__version__, 'fastai': version('fastai'), 'torch': torch.__version__,
            'python': platform.python_version(), 'cpu': f'{_cpu_name()} ({os.cpu_count()} cores)', 'gpu': gpu,
            'threads': str(torch.get_num_threads())}


class RunStore:
    """A job's finished runs in `path`: for each model and seed, `NAME-seedSEED.json` (its scores and training
    history) and, when it has weights to keep, `NAME-seedSEED.pth` (a state dict). `settings.json` holds the settings
    every run was made with: opening the store with other settings is refused, so runs of different jobs never mix."""
    def __init__(self, path: str | Path, settings: dict):
        self.path, self.settings = Path(path), settings
        file = self.path/'settings.json'
        stored = json.loads(json.dumps(settings))  # as settings.json keeps them: tuples as lists
        if file.exists():
            try: kept = json.loads(file.read_text())
            except ValueError as e:
                raise ValueError(f'{file} is not readable JSON ({e}), so the settings of the runs kept in {self.path} '
                                 f'are unknown: delete {self.path} to start again.') from None
            differ = sorted(k for k in {*kept, *stored} if kept.get(k) != stored.get(k))
            if differ:
                changes = '; '.join(f'{k}: {kept.get(k)!r} then, {stored.get(k)!r} now' for k in differ)
                raise FileExistsError(f'{self.path.parent} holds runs of a job with other settings ({changes}). Run '
                                      f'again with the same settings to resume it, pass another --out for this job, '
                                      f'or delete {self.path} to start again.')
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))

    def _file(self, name: str, seed: int, suffix: str) -> Path:
        return self.path/f'{name.replace(" ", "-")}-seed{seed}{suffix}'

    def load(self, name: str, seed: int, model: nn.Module | None = None) -> dict | None:
        """The record of `name` at `seed`, its weights loaded into `model` when given; None when that run has not
        ended, or when its record or weights are missing or cut short (a crash while writing them): it trains again"""
        record, weights = self._file(name, seed, '.json'), self._file(name, seed, '.pth')
        if not record.exists(): return None
        try:
            kept = json.loads(record.read_text())
            state = torch.load(weights, map_location='cpu', weights_only=True) if model is not None else None
        except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            warnings.warn(f'The {name} of seed {seed} kept in {self.path} is incomplete ({type(e).__name__}: {e}): '
                          'training it again.')
            return None
        if model is not None: model.load_state_dict(state)
        return kept

    def save(self, name: str, seed: int, record: dict, model: nn.Module | None = None):
        "Keep a finished run: the weights first, then the record that says the run is complete"
        if model is not None:
            atomic_write(self._file(name, seed, '.pth'), lambda tmp: torch.save(model.state_dict(), tmp))
        atomic_write(self._file(name, seed, '.json'), lambda tmp: Path(tmp).write_text(json.dumps(record)))
