"""What distillation bought in size and speed: `compare_models` (parameters, size on disk, CPU latency and throughput
of teacher and student, and their ratios) and `compression_summary` (that comparison in one sentence)."""
from __future__ import annotations

import copy
import io
import statistics
import time

import pandas as pd
import torch
from fastai.learner import Learner
from torch import Tensor, nn

__all__ = ['compare_models', 'compression_summary']


def _model(model, name: str) -> nn.Module:
    "The `nn.Module` of `model`, which may be a fastai `Learner`"
    if isinstance(model, Learner): model = model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f'{name} must be a torch `nn.Module` or a fastai `Learner`, got {type(model).__name__}.')
    return model


def _state_dict_bytes(model: nn.Module) -> int:
    "Bytes of `model`'s state dict as `torch.save` writes it to disk"
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _median_seconds(models: dict[str, nn.Module], x: Tensor, n_repeats: int, n_warmup: int) -> dict[str, float]:
    """Median seconds of `model(x)` for each of `models` over `n_repeats` timed runs after `n_warmup` untimed ones,
    taking turns, so that a change in the machine's load hits every model alike"""
    seconds = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(n_warmup + n_repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                if i >= n_warmup: seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def compare_models(teacher: nn.Module | Learner, student: nn.Module | Learner,
                   input_size: tuple[int, ...] = (3, 96, 96), batch_size: int = 64, n_repeats: int = 10,
                   n_warmup: int = 2) -> pd.DataFrame:
    """Rows `parameters`, `size_mb` (state dict on disk), `latency_ms` (per image at batch 1) and `throughput_per_s`
    (images per second at `batch_size`); columns `teacher`, `student` and their ratio `student/teacher`.
    Timings are medians of `n_repeats` runs after `n_warmup`, under `torch.inference_mode`, on eval-mode CPU copies
    of the models (yours keep their device and mode) with torch's current thread count (`torch.set_num_threads`)."""
    models = {name: _model(model, name) for name, model in (('teacher', teacher), ('student', student))}
    if batch_size < 1 or n_repeats < 1 or n_warmup < 0:
        raise ValueError(f'Need batch_size >= 1, n_repeats >= 1 and n_warmup >= 0, got {batch_size}, {n_repeats}, '
                         f'{n_warmup}.')
    models = {name: copy.deepcopy(model).cpu().eval() for name, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    one, batch = (torch.randn(n, *input_size, generator=generator) for n in (1, batch_size))
    latency, batch_seconds = (_median_seconds(models, x, n_repeats, n_warmup) for x in (one, batch))
    report = pd.DataFrame({name: {'parameters': sum(p.numel() for p in model.parameters()),
                                  'size_mb': _state_dict_bytes(model) / 2**20,
                                  'latency_ms': 1000 * latency[name],
                                  'throughput_per_s': batch_size / batch_seconds[name]}
                           for name, model in models.items()})
    report['student/teacher'] = report.student / report.teacher
    return report


def compression_summary(report: pd.DataFrame) -> str:
    "The ratios of `compare_models`'s report in one sentence"
    ratio = report['student/teacher']
    return (f"The student has {ratio['parameters']:.1%} of the teacher's parameters ({ratio['size_mb']:.1%} of its "
            f"size on disk), is {1 / ratio['latency_ms']:.1f}x faster per image at batch 1 and has "
            f"{ratio['throughput_per_s']:.1f}x its throughput.")
