"""What distillation bought: `compare_models` (size and CPU speed of teacher and student, and their ratios),
`compression_summary` (that comparison in one sentence), `per_class_table` and `plot_confusion` (how each class
fares on a masked test set)."""
from __future__ import annotations

import copy
import io
import statistics
import time
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import Tensor, nn

from .tta import _as_array, _class_indices, _mask_indices

__all__ = ['compare_models', 'compression_summary', 'per_class_table', 'plot_confusion']


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


def compare_models(teacher: nn.Module | Learner, student: nn.Module | Learner, input_size: tuple[int, ...] = (3, 96, 96),
                   batch_size: int = 64, n_repeats: int = 10, n_warmup: int = 2) -> pd.DataFrame:
    """Rows `parameters`, `size_mb` (state dict on disk), `latency_ms` (per image at batch 1) and `throughput_per_s`
    (images per second at `batch_size`); columns `teacher`, `student` and their ratio `student/teacher`.
    Timings are medians of `n_repeats` runs after `n_warmup`, under `torch.inference_mode`, on eval-mode CPU copies
    of the models (yours keep their device and mode) with torch's current thread count (`torch.set_num_threads`)."""
    models = {name: _model(model, name) for name, model in (('teacher', teacher), ('student', student))}
    if batch_size < 1 or n_repeats < 1 or n_warmup < 0:
        raise ValueError(f'Need batch_size >= 1, n_repeats >= 1 and n_warmup >= 0, got {batch_size}, {n_repeats}, {n_warmup}.')
    models = {name: copy.deepcopy(model).cpu().eval() for name, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    one, batch = (torch.randn(n, *input_size, generator=generator) for n in (1, batch_size))
    latency, batch_seconds = (_median_seconds(models, x, n_repeats, n_warmup) for x in (one, batch))
    report = pd.DataFrame({name: {'parameters': sum(p.numel() for p in model.parameters()),
                                  'size_mb': _state_dict_bytes(model) / 2**20,
                                  'latency_ms': 1000 * latency[name],
                                  'throughput_per_s': batch_size / batch_seconds[name]} for name, model in models.items()})
    report['student/teacher'] = report.student / report.teacher
    return report


def compression_summary(report: pd.DataFrame) -> str:
    "The ratios of `compare_models`'s report in one sentence"
    ratio = report['student/teacher']
    return (f"The student has {ratio['parameters']:.1%} of the teacher's parameters ({ratio['size_mb']:.1%} of its size "
            f"on disk), is {1 / ratio['latency_ms']:.1f}x faster per image at batch 1 and has "
            f"{ratio['throughput_per_s']:.1f}x its throughput.")


def _masked_classes(y_true, y_pred, vocab, mask) -> tuple[np.ndarray, np.ndarray]:
    "True and predicted class indices of the items `mask` selects; `y_pred` may be probabilities (one row per item)"
    y_true, y_pred = _as_array(y_true), _as_array(y_pred)
    if y_pred.ndim == 2: y_pred = y_pred.argmax(axis=1)
    if len(y_true) != len(y_pred):
        raise ValueError(f'y_true has {len(y_true)} items and y_pred {len(y_pred)}: give both for the same test items.')
    items = _mask_indices(mask, len(y_true))
    return _class_indices(y_true[items], vocab), _class_indices(y_pred[items], vocab, 'y_pred', predicted=True)


def _class_name(names, label) -> str:
    "The name `names` gives `label`: looked up as it is, or as a number when it is digits ('00012' -> 12)"
    names = dict(names) if isinstance(names, (Mapping, pd.Series)) else dict(enumerate(names))
    if label in names: return names[label]
    if isinstance(label, str) and label.isdigit() and int(label) in names: return names[int(label)]
    raise ValueError(f'names has no entry for class {label!r}: give a name for every class (a list, dict or Series).')


def per_class_table(y_true, y_pred, vocab=None, names=None, mask=None) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class on the items `mask` selects (default: all), as scikit-learn
    computes them, one row per true class of those items. `y_true` holds class indices or labels of `vocab`, `y_pred`
    class indices or probabilities; `names` (list, dict or Series keyed by label) adds a name column."""
    y_true, y_pred = _masked_classes(y_true, y_pred, vocab, mask)
    classes = np.unique(y_true)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    labels = [vocab[i] for i in classes] if vocab is not None else classes.tolist()
    table = pd.DataFrame({'label': labels, 'precision': precision, 'recall': recall, 'f1': f1, 'support': support},
                         index=pd.Index(classes, name='class'))
    if names is not None: table.insert(1, 'name', [_class_name(names, label) for label in labels])
    return table


def plot_confusion(y_true, y_pred, vocab=None, mask=None, normalize: bool = False,
                   figsize: tuple[float, float] | None = None) -> Figure:
    """Confusion matrix of the items `mask` selects: a row per true class of those items, a column per class among
    their true or predicted classes; `normalize` divides each row by its count. Inputs as in `per_class_table`."""
    y_true, y_pred = _masked_classes(y_true, y_pred, vocab, mask)
    rows, columns = np.unique(y_true), np.union1d(y_true, y_pred)
    matrix = confusion_matrix(y_true, y_pred, labels=columns, normalize='true' if normalize else None)
    matrix = matrix[np.isin(columns, rows)]
    tick = lambda classes: [str(vocab[i]) if vocab is not None else str(i) for i in classes]
    fig = Figure(figsize=figsize or (max(4., 0.25 * len(columns) + 2.5), max(3., 0.25 * len(rows) + 1.5)))
    ax = fig.subplots()  # a Figure without pyplot: renders headless, and nothing is left open
    fig.colorbar(ax.imshow(matrix, cmap='Blues'), ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(len(columns)), yticks=range(len(rows)), xlabel='predicted', ylabel='actual',
           title=f'Confusion matrix ({len(y_true)} items)')
    ax.set_xticklabels(tick(columns), rotation=90)
    ax.set_yticklabels(tick(rows))
    if matrix.size <= 400:
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(col, row, f'{value:.2f}' if normalize else str(value), ha='center', va='center', fontsize=8,
                    color='white' if value > matrix.max() / 2 else 'black')
    fig.tight_layout()
    return fig
