"""Distillation losses on logits: one small class per paper, its formula in the docstring.

Every loss is called as `loss(student_logits, teacher_logits, target)` and returns a scalar;
it computes in float32 whatever the dtype of its inputs (mixed precision included).
`s` and `t` below are the student's and teacher's logits, `T` the temperature, `y` the target.
The class losses take rows of classes, (items, classes); the callback lays dense outputs such as
segmentation's (B, C, H, W) out as one row per position first, so each is averaged over items and positions.
Each is a `DistillationLoss`, the contract the callback relies on, and `LOSSES` catalogues them: the name the
command line and `kd_method` use, the class and its settings, and the task kinds it serves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['DistillationLoss', 'standardize_logits', 'SoftTarget', 'DKD', 'DIST', 'BinarySoftTarget', 'LogitMSE',
           'LossEntry', 'LOSSES', 'losses_for', 'loss_examples']


class DistillationLoss(nn.Module):
    """What fastkd calls a distillation loss: `loss(student_logits, teacher_logits, target=None)` returns a scalar (a
    loss that needs the target takes it without a default), and `over` says what it turns the outputs into:
    probabilities over `'classes'` (a softmax), over `'labels'` (a sigmoid each), or `None` (raw outputs). The callback
    reads `over` to refuse a loss that cannot fit the learner's task. Any function `f(s, t)` or `f(s, t, target)` is
    accepted too; it says nothing about `over`, so it is taken as it is."""
    over: str | None = None

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        raise NotImplementedError(f'{type(self).__name__} must define forward(student_logits, teacher_logits, target)')


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    "Z-score each row of `logits`: `(z - mean(z)) / (std(z) + eps)` (Sun et al., CVPR 2024)"
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + eps)


def _prepare(student_logits: Tensor, teacher_logits: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    "Both logits in float32, z-scored when `standardize`"
    s, t = student_logits.float(), teacher_logits.float()
    return (standardize_logits(s), standardize_logits(t)) if standardize else (s, t)


def _kl(student_log_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    "`KL(teacher || student)` summed over classes, averaged over the batch"
    return F.kl_div(student_log_probs, teacher_probs, reduction='batchmean')


class SoftTarget(DistillationLoss):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":
    `T**2 * KL(softmax(t/T) || softmax(s/T))`, KL summed over classes and averaged over the batch.
    With `standardize=True` both logits are z-scored per row first (logit standardization)."""
    over = 'classes'
    def __init__(self, T: float = 4., standardize: bool = False):
        super().__init__()
        self.T, self.standardize = T, standardize

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        s, t = _prepare(student_logits, teacher_logits, self.standardize)
        return self.T**2 * _kl(F.log_softmax(s / self.T, dim=-1), F.softmax(t / self.T, dim=-1))

    def extra_repr(self) -> str: return f'T={self.T}, standardize={self.standardize}'


class DKD(DistillationLoss):
    """Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation":
    `alpha * TCKD + beta * NCKD`, with `p = softmax(z/T)` for logits `z`, and
      `TCKD = T**2 * KL([p_y, 1 - p_y] of t || [p_y, 1 - p_y] of s)` (target vs. all other classes),
      `NCKD = T**2 * KL(softmax(t_{c != y} / T) || softmax(s_{c != y} / T))` (among the non-target classes),
    each averaged over the batch. `standardize=True` z-scores both logits per row first."""
    over = 'classes'
    def __init__(self, alpha: float = 1., beta: float = 8., T: float = 4., standardize: bool = False):
        super().__init__()
        self.alpha, self.beta, self.T, self.standardize = alpha, beta, T, standardize

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        s, t = _prepare(student_logits, teacher_logits, self.standardize)
        is_target = F.one_hot(target.long(), s.shape[-1]).bool()
        p_s, p_t = F.softmax(s / self.T, dim=-1), F.softmax(t / self.T, dim=-1)
        binary_s = torch.stack([p_s[is_target], 1 - p_s[is_target]], dim=-1)
        binary_t = torch.stack([p_t[is_target], 1 - p_t[is_target]], dim=-1)
        tckd = _kl(binary_s.clamp_min(1e-12).log(), binary_t)
        non_target_s = s[~is_target].view(len(s), -1)
        non_target_t = t[~is_target].view(len(t), -1)
        nckd = _kl(F.log_softmax(non_target_s / self.T, dim=-1), F.softmax(non_target_t / self.T, dim=-1))
        return self.T**2 * (self.alpha * tckd + self.beta * nckd)

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}, beta={self.beta}, T={self.T}, standardize={self.standardize}'


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    "Pearson correlation of each row of `a` with the same row of `b`"
    a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


class DIST(DistillationLoss):
    """Huang et al., NeurIPS 2022, "Knowledge Distillation from a Stronger Teacher":
    with `p_s = softmax(s/T)` and `p_t = softmax(t/T)` of shape (batch, classes),
      `inter = 1 - mean over items of pearson(p_s[i, :], p_t[i, :])` (class ranking of each item),
      `intra = 1 - mean over classes of pearson(p_s[:, c], p_t[:, c])` (item ranking of each class),
    and the loss is `T**2 * (beta * inter + gamma * intra)`.
    For dense outputs (segmentation) every position is an item: `intra` ranks all positions of the batch."""
    over = 'classes'
    def __init__(self, beta: float = 1., gamma: float = 1., T: float = 1.):
        super().__init__()
        self.beta, self.gamma, self.T = beta, gamma, T

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        p_s = F.softmax(student_logits.float() / self.T, dim=-1)
        p_t = F.softmax(teacher_logits.float() / self.T, dim=-1)
        inter = 1 - _pearson(p_s, p_t).mean()
        intra = 1 - _pearson(p_s.T, p_t.T).mean()
        return self.T**2 * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str: return f'beta={self.beta}, gamma={self.gamma}, T={self.T}'


class BinarySoftTarget(DistillationLoss):
    """Soft targets for multi-label outputs, one sigmoid per label (Hinton et al.'s soft targets, per label):
    `T**2 * mean over items and labels of KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T)))`, where
    `KL(Bernoulli(p) || Bernoulli(q)) = p log(p/q) + (1-p) log((1-p)/(1-q))`."""
    over = 'labels'
    def __init__(self, T: float = 1.):
        super().__init__()
        self.T = T

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        s, t = student_logits.float() / self.T, teacher_logits.float() / self.T
        p_t = torch.sigmoid(t)  # log sigmoid(z) and log(1 - sigmoid(z)) = log sigmoid(-z), stable for any z
        kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return self.T**2 * kl.mean()

    def extra_repr(self) -> str: return f'T={self.T}'


class LogitMSE(DistillationLoss):
    """Logit matching (Ba & Caruana, NeurIPS 2014, "Do Deep Nets Really Need to be Deep?"):
    `mean((s - t)**2)` over items and classes (or outputs: any task, regression included)."""
    over = None
    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return F.mse_loss(student_logits.float(), teacher_logits.float())


@dataclass(frozen=True)
class LossEntry:
    """A row of `LOSSES`: the loss class and the settings fastkd builds it with, the task kinds it serves (see
    `fastkd.tasks.KINDS`), whether teacher and student see the same MixUp/CutMix batch (function matching), and a
    line that says what it is"""
    loss: type
    settings: dict = field(default_factory=dict)
    kinds: tuple[str, ...] = ('categorical',)
    mixed: bool = False
    about: str = ''

    def build(self, **settings) -> DistillationLoss:
        "A new loss with the entry's settings, updated by `settings`"
        return self.loss(**{**self.settings, **settings})

    @property
    def example(self) -> str:
        "How a user writes this loss, e.g. `SoftTarget(T=4)`"
        settings = (f'{k}={v:g}' if isinstance(v, float) else f'{k}={v!r}' for k, v in self.settings.items())
        return f'{self.loss.__name__}({", ".join(settings)})'


# The catalogue: for each kind of task, the first entry that serves it is the loss `loss='auto'` picks.
LOSSES = {
    'softtarget': LossEntry(SoftTarget, dict(T=4.), about='soft targets (Hinton et al.)'),
    'dkd': LossEntry(DKD, about='decoupled KD (Zhao et al.)'),
    'dist': LossEntry(DIST, about='DIST: class and item rankings (Huang et al.)'),
    'fm': LossEntry(SoftTarget, dict(T=4.), mixed=True, about='function matching (Beyer et al.): SoftTarget on batches '
                    'mixed by MixUp or CutMix, the teacher seeing the same mixed images'),
    'binarysofttarget': LossEntry(BinarySoftTarget, kinds=('binary',), about='soft targets per label (multi-label)'),
    'logitmse': LossEntry(LogitMSE, kinds=('categorical', 'binary', 'regression'),
                          about='logit matching (Ba & Caruana), any task'),
}


def losses_for(kind: str) -> dict[str, LossEntry]:
    "The entries of `LOSSES` that serve task kind `kind`, in catalogue order (the first is the default)"
    return {name: entry for name, entry in LOSSES.items() if kind in entry.kinds}


def loss_examples(kind: str | None = None) -> str:
    "How to write each loss of the catalogue (for `kind`'s task only, when given), as a list in words"
    entries = losses_for(kind).values() if kind else LOSSES.values()
    examples = list(dict.fromkeys(entry.example for entry in entries if not entry.mixed))
    return examples[0] if len(examples) == 1 else f'{", ".join(examples[:-1])} or {examples[-1]}'
