"""Test-time augmentation sweeps scored on a (masked) test set: `tta_preds`, `test_time_aug`, `class_mask`, `plot_tta`.

A sweep over `n_augs` runs `max(n_augs)` augmented passes and one plain pass, and mixes every setting from them
exactly as `Learner.tta` mixes its passes, so it costs `max(n_augs) + 1` passes instead of their sum.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import event
from fastai.learner import Learner, _before_epoch
from fastprogress.fastprogress import master_bar
from matplotlib.figure import Figure
from torch import Tensor

from .basics import as_array, class_indices, mask_indices

__all__ = ['tta_preds', 'test_time_aug', 'class_mask', 'plot_tta']


def _check_n_augs(n_augs: int | Sequence[int]) -> list[int]:
    "`n_augs` as a list of distinct counts of augmented passes, or a clear error"
    n_augs = [n_augs] if isinstance(n_augs, (int, np.integer)) else list(n_augs)
    if not n_augs or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in n_augs):
        raise TypeError('n_augs must be a non-empty list of whole numbers of augmented passes, e.g. [0, 5, 10], got '
                        f'{n_augs}')
    negatives = [n for n in n_augs if n < 0]
    if negatives:
        raise ValueError(f'n_augs counts augmented passes and cannot be negative, got {negatives}: use 0 for plain '
                         'predictions.')
    duplicates = sorted({n for n in n_augs if n_augs.count(n) > 1})
    if duplicates:
        raise ValueError(f'n_augs lists {duplicates} more than once: give each setting once, e.g. '
                         f'{sorted(set(n_augs))}.')
    return [int(n) for n in n_augs]


def _check_dl(dl):
    "Fail early unless `dl` is a fastai DataLoader whose transforms can be switched to their augmenting behaviour"
    if not hasattr(getattr(dl, 'dataset', None), 'set_split_idx'):
        raise TypeError('test_dataloader must be a fastai DataLoader over `Datasets`, such as '
                        f'`learn.dls.test_dl(items)`, got {type(dl).__name__}: TTA switches its transforms to their '
                        'training (augmenting) behaviour.')


def _passes(learner: Learner, dl, n_aug: int) -> tuple[list[Tensor], list[float]]:
    "Probabilities and seconds of `n_aug` augmented passes over `dl`, then a plain one, run as `Learner.tta` runs them"
    probs, seconds = [], []
    with learner.no_logging(), learner.no_mbar():
        try:
            learner(_before_epoch)
            passes = range(n_aug + 1)
            if hasattr(learner, 'progress'): passes = learner.progress.mbar = master_bar(passes)
            for i in passes:
                start = time.perf_counter()
                with dl.dataset.set_split_idx(0 if i < n_aug else 1):  # split 0: the training (augmenting) transforms
                    probs.append(learner.get_preds(dl=dl, inner=True)[0])
                seconds.append(time.perf_counter() - start)
        finally: learner(event.after_fit)
    return probs, seconds


def tta_preds(learner: Learner, dl, n_augs: int | Sequence[int] = (10,),
              beta: float = 0.1) -> tuple[dict[int, Tensor], dict[int, float]]:
    """Probabilities on `dl` for each `n` of `n_augs`, equal to `learner.tta(dl=dl, n=n, beta=beta)[0]` (`n=0`: plain
    predictions), from `max(n_augs) + 1` passes in all; and the seconds each setting takes on its own (plain pass and
    `n` augmented passes, measured)."""
    n_augs = _check_n_augs(n_augs)
    _check_dl(dl)
    if not 0 <= beta <= 1:
        raise ValueError(f'beta is the weight of the plain pass and must be between 0 and 1, got {beta}.')
    probs, seconds = _passes(learner, dl, max(n_augs))
    plain, augmented = probs[-1], probs[:-1]
    mixed = {n: torch.lerp(torch.stack(augmented[:n]).mean(0), plain, beta) if n else plain for n in n_augs}
    return mixed, {n: seconds[-1] + sum(seconds[:n]) for n in n_augs}


def test_time_aug(learner: Learner, test_dataloader, y_true, metric: Callable, n_augs: int | Sequence[int] = [10],
                  beta: float = 0.1, mask=None, verbose: bool = False) -> pd.DataFrame:
    """Score `metric(y_true, y_pred)` on the test items `mask` selects for each number of augmented passes in `n_augs`
    (0: plain predictions); a DataFrame with columns `n_aug`, `score` and `time` (seconds of that setting on its own),
    and with `verbose` also one printed line per row. `y_true` holds one label or class index per item of
    `test_dataloader`, which may be unlabelled. See `tta_preds` for the passes."""
    _check_dl(test_dataloader)
    n_items = len(test_dataloader.dataset)
    if len(y_true) != n_items:
        raise ValueError(f'y_true has {len(y_true)} labels for {n_items} test items: give one per item of '
                         'test_dataloader, in its order.')
    items = mask_indices(mask, n_items)
    targets = class_indices(as_array(y_true)[items], getattr(learner.dls, 'vocab', None))
    probs, seconds = tta_preds(learner, test_dataloader, n_augs, beta)
    rows = []
    for n, p in probs.items():
        score = float(metric(targets, p[torch.as_tensor(items)].argmax(dim=1).numpy()))
        if verbose: print(f'n_aug={n:>3}  score={score:.4f}  time={seconds[n]:.2f}s')
        rows.append((n, score, seconds[n]))
    return pd.DataFrame(rows, columns=['n_aug', 'score', 'time'])


test_time_aug.__test__ = False  # named like a test: keep pytest from collecting it from `from fastkd.all import *`


def class_mask(y_true, classes, vocab=None, invert: bool = False) -> np.ndarray:
    """Boolean array: which items of `y_true` belong to `classes` (with `invert`, to none of them, e.g. the classes
    never trained on). With `vocab`, labels and class indices may be mixed: both sides are turned into indices."""
    y_true, classes = as_array(y_true), as_array(classes)
    if vocab is not None: y_true, classes = class_indices(y_true, vocab), class_indices(classes, vocab, 'classes')
    elif np.issubdtype(y_true.dtype, np.number) != np.issubdtype(classes.dtype, np.number):
        raise TypeError(f'y_true holds {y_true.dtype} values and classes holds {classes.dtype}, so none can match: '
                        'pass the vocab (learn.dls.vocab) to compare labels with class indices.')
    return np.isin(y_true, classes) != invert


def plot_tta(results: pd.DataFrame, figsize: tuple[float, float] = (6, 4)) -> Figure:
    "Score and time against the number of augmented passes on twin axes, from `test_time_aug`'s results"
    missing = {'n_aug', 'score', 'time'} - set(results.columns)
    if missing:
        raise ValueError('plot_tta needs the columns n_aug, score and time of test_time_aug; missing '
                         f'{sorted(missing)}.')
    results = results.sort_values('n_aug')
    fig = Figure(figsize=figsize)  # no pyplot: renders headless, and nothing is left open
    score_ax = fig.subplots()
    time_ax = score_ax.twinx()
    score_ax.plot(results.n_aug, results.score, 'o-', color='C0')
    time_ax.plot(results.n_aug, results.time, 's--', color='C1')
    score_ax.set(xlabel='augmented passes (n_aug)', title='Test-time augmentation: score and cost')
    score_ax.set_ylabel('score', color='C0')
    time_ax.set_ylabel('time (s)', color='C1')
    fig.tight_layout()
    return fig
