"""Feature distillation ("hints"): train a student layer's output to match a teacher layer's output.

`Hint(student_layer, teacher_layer, loss, weight)` names both layers by their `named_modules()` paths; the feature
losses below compare the two outputs (one small class per paper, its formula in the docstring); `HintHooks` is the
plumbing the `KnowledgeDistillation` callback drives; `match_layers` lists layer pairs whose outputs fit together.

How `HintHooks` works with fastai:
- Forward hooks live from `attach` (the callback's `before_train`: `get_preds` and `validate` also send `before_fit`)
  to `detach` (its `after_fit`, and fastkd's `Learner.fit` wrapper when a fit raises, which skips `after_fit`). The
  student's feature is kept only when computed with gradient (a training forward), the teacher's detached; `loss` uses
  both and forgets them, so nothing outlives a batch. `attach` replaces hooks still there; `detach` may be repeated.
- Adapters (FitNet's 1x1 convolution or linear layer, CosineHint's where sizes differ) are parameters of the losses,
  created at their first call from the shapes of the first training batch (no extra forward), on the feature's device,
  in float32 (or the feature's dtype if wider), drawn without moving the random generator (a seed's batches and
  augmentations stay those of the student alone). `HintHooks` is an `nn.Module` holding a copy of each hint's loss: its
  parameters are the adapters and its `state_dict` saves them; `load_state_dict` takes them back into a new
  `HintHooks` (adapters not made yet are made from the saved weights' shapes, then moved to the student's device at
  `attach`). The student never holds them: its `state_dict` keys and `export` are those of the student alone.
- The adapters never join the learner's optimizer, so no checkpoint of a fit (`learn.save(with_opt=True)`,
  `SaveModelCallback`) holds them, and its reload fits the student's optimizer. `loss(opt)`, given the learner's
  optimizer, gives them one of their own of the same kind (fastai's step functions, or the same torch optimizer class
  in an `OptimWrapper`), made again when they change, and zeroes their gradients before the backward; the callback's
  `before_step` calls `step(opt)`, which copies the hyper-parameters the last parameter group of `opt` has at that step
  (its learning rate, momentum and weight-decay schedule; never frozen) and steps them, through fp16's `GradScaler`
  where `MixedPrecision` uses one (a step it skips skips them too). Their optimizer state lives as long as the
  `HintHooks`: `state_dict` saves the adapters, not their optimizer state.
- `lr_find` trains at growing learning rates, then reloads the model and optimizer as they were; `attach(restore=True)`
  does the same for the adapters and their optimizer: `detach` puts them back as they were at `attach` (those created
  meanwhile are dropped and created again at the next fit's first batch).
- Under DDP (`learn.distrib_ctx()`) the adapters stay the same in every process, as DDP keeps the student: when they
  get their optimizer each process takes process 0's (`torch.distributed.broadcast`), and the callback's
  `after_backward` averages their gradients across processes (`average_gradients`) before the step.
"""
from __future__ import annotations

import difflib
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fastai.learner import Learner
from fastai.optimizer import Optimizer, OptimWrapper
from fastai.torch_core import get_model, to_device
from torch import Tensor, nn

from .basics import evaluating, first_output

__all__ = ['Hint', 'FitNet', 'CosineHint', 'AttentionTransfer', 'HintHooks', 'match_layers']

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _compute_dtype(feature: Tensor) -> torch.dtype:
    "float32, or the feature's dtype where it is wider (float64)"
    return torch.promote_types(feature.dtype, torch.float32)


def _check_features(name: str, s: Tensor, t: Tensor, maps_only: bool = False):
    """Both features are (batch, channels, *spatial), of one batch size and rank: 1 to 3 spatial axes, or none unless
    `maps_only`"""
    ranks = (1, 2, 3) if maps_only else (0, 1, 2, 3)
    if s.ndim != t.ndim or s.ndim - 2 not in ranks or len(s) != len(t):
        kind = 'feature maps (batch, channels, height, width)' if maps_only else \
               'features of the same rank: (batch, channels) or (batch, channels, height, width)'
        raise ValueError(f'{name} compares {kind}; got student {tuple(s.shape)} and teacher {tuple(t.shape)}. '
                         'Choose other layers: `match_layers(student, teacher, x)` lists pairs that fit.')


def _adapter(student: Tensor, teacher: Tensor) -> nn.Module:
    "A 1x1 convolution (a linear layer for flat features) from the student's channels to the teacher's"
    n_in, n_out, n_spatial = student.shape[1], teacher.shape[1], student.ndim - 2
    with torch.random.fork_rng(devices=[]):  # drawn aside: the fit's later batches and augmentations stay the same
        layer = _CONVS[n_spatial](n_in, n_out, kernel_size=1) if n_spatial else nn.Linear(n_in, n_out)
    return layer.to(device=student.device, dtype=_compute_dtype(student))


def _pool(x: Tensor, size: Sequence[int]) -> Tensor:
    "Adaptive average pooling of the map `x` to the spatial `size` (`x` itself when it has that size)"
    return x if tuple(x.shape[2:]) == tuple(size) else _POOLS[len(size)](x, tuple(size))


def _world_size() -> int:
    "How many processes train together: the size of the initialised `torch.distributed` group, else 1"
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _common_size(s: Tensor, t: Tensor) -> list[int]:
    "The smaller of both spatial sizes, dimension by dimension"
    return [min(a, b) for a, b in zip(s.shape[2:], t.shape[2:])]


class _Adapted(nn.Module):
    """A feature loss that may need an adapter from the student's channels to the teacher's, made at its first call,
    or by `load_state_dict` from the shapes of saved adapter weights"""
    def __init__(self):
        super().__init__()
        self.adapter = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        weight = state_dict.get(f'{prefix}adapter.weight')
        if self.adapter is None and weight is not None:
            n_out, n_in, *kernel = weight.shape
            layer = _CONVS[len(kernel)](n_in, n_out, kernel_size=1) if kernel else nn.Linear(n_in, n_out)
            self.adapter = layer.to(device=weight.device, dtype=weight.dtype)  # its values: loaded next
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FitNet(_Adapted):
    """Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets": `mean((adapter(s) - t)**2)` over all elements,
    for student and teacher features `s` and `t` of the same spatial size, where `adapter` is a 1x1 convolution
    (a linear layer for flat features) from the student's channels to the teacher's, created at the first call and
    trained with the student. Where one map is a whole multiple of the other in each dimension (a teacher fed twice
    the student's resolution), the larger is average-pooled to the smaller first. Computes in float32."""
    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        _check_features('FitNet', s, t)
        if s.shape[2:] != t.shape[2:]:
            if any(max(a, b) % min(a, b) for a, b in zip(s.shape[2:], t.shape[2:])):
                raise ValueError(f'FitNet compares features of the same spatial size, or of sizes one a whole multiple '
                                 f'of the other (pooled); got student {tuple(s.shape)} and teacher {tuple(t.shape)}. '
                                 'Choose layers whose sizes match (`match_layers` lists them), or use CosineHint or '
                                 'AttentionTransfer, which pool the larger map to any size.')
            size = _common_size(s, t)
            s, t = _pool(s, size), _pool(t, size)
        if self.adapter is None: self.adapter = _adapter(s, t)
        dtype = self.adapter.weight.dtype
        return F.mse_loss(self.adapter(s.to(dtype)).to(dtype), t.to(dtype))


class CosineHint(_Adapted):
    """The hint of PyTorch's knowledge distillation tutorial: average-pool the larger feature map to the smaller spatial
    size, flatten each item, and `mean over items of (1 - cos(s_i, t_i))`. Where the flattened sizes still differ
    (different channel counts), `s` first goes through an adapter as in `FitNet`, created at the first call and trained
    with the student. Computes in float32."""
    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        _check_features('CosineHint', s, t)
        size, dtype = _common_size(s, t), _compute_dtype(s)
        s, t = _pool(s.to(dtype), size), _pool(t.to(dtype), size)
        if s.shape != t.shape:
            if self.adapter is None: self.adapter = _adapter(s, t)
            s = self.adapter(s).to(dtype)
        return (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()


class AttentionTransfer(nn.Module):
    """Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention": for each item, the spatial attention map
    `a(f) = sum over channels c of |f_c|**p`, average-pooled to the smaller of both spatial sizes, flattened and divided
    by its L2 norm; the loss is `mean((a(s) - a(t))**2)` over items and positions. Channel counts may differ (no
    adapter). Computes in float32."""
    def __init__(self, p: float = 2.):
        super().__init__()
        self.p = p

    def attention(self, f: Tensor, size: Sequence[int]) -> Tensor:
        "The L2-normalised attention map of each item of `f`, pooled to `size`, flattened"
        a = f.to(_compute_dtype(f)).abs().pow(self.p).sum(dim=1, keepdim=True)
        return F.normalize(_pool(a, size).flatten(1), dim=1)

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        _check_features('AttentionTransfer', s, t, maps_only=True)
        size = _common_size(s, t)
        return F.mse_loss(self.attention(s, size), self.attention(t, size))

    def extra_repr(self) -> str: return f'p={self.p}'


@dataclass
class Hint:
    """Train the output of the student's layer `student_layer` to match the output of the teacher's `teacher_layer`
    (paths of `named_modules()`, such as `'0.6'`) with the feature loss `loss`, scaled by `weight`"""
    student_layer: str
    teacher_layer: str
    loss: nn.Module
    weight: float = 1.

    def __post_init__(self):
        if isinstance(self.loss, type): self.loss = self.loss()
        if not isinstance(self.student_layer, str) or not isinstance(self.teacher_layer, str):
            raise TypeError(f'Hint layers are names (paths of `model.named_modules()`, such as "0.6"), got '
                            f'{self.student_layer!r} and {self.teacher_layer!r}.')
        if not isinstance(self.loss, nn.Module):
            raise TypeError('A hint loss is a feature loss module such as FitNet(), CosineHint() or '
                            f'AttentionTransfer(), got {type(self.loss).__name__}.')
        if not self.weight >= 0: raise ValueError(f'A hint weight must be a number >= 0, got {self.weight}.')


def _layer(model: nn.Module, name: str, role: str) -> nn.Module:
    "The module of `model` named `name`, or an error listing the three closest names"
    modules = dict(model.named_modules())
    if name in modules: return modules[name]
    closest = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0)
    raise ValueError(f'The {role} model has no layer {name!r}; the closest names are {closest}. Hint layers are paths '
                     'of `model.named_modules()`; `match_layers(student, teacher, x)` lists pairs that fit.')


class HintHooks(nn.Module):
    """Forward hooks on the layers `hints` name, and a copy of each hint's loss: its parameters are the adapters, which
    `opt` (their own optimizer) trains. `attach` at the start of a fit, `loss(opt)` after each training forward of
    student and teacher, `step(opt)` at each step, `detach` at its end."""
    def __init__(self, hints: Sequence[Hint]):
        super().__init__()
        self.hints = list(hints)
        self.losses = nn.ModuleList(deepcopy(hint.loss) for hint in self.hints)
        self.handles, self.student_features, self.teacher_features = [], {}, {}
        self.opt, self.saved = None, None  # the adapters' optimizer; what `detach` puts back

    @property
    def attached(self) -> bool: return bool(self.handles)

    def attach(self, student: nn.Module, teacher: nn.Module, restore: bool = False):
        """Hook the hinted layers of `student` and `teacher` (unwrapped from DDP); with `restore`, `detach` puts the
        adapters back as they are now (for `lr_find`). A layer name that does not exist raises, leaving no hook."""
        self.detach()
        student, teacher = get_model(student), get_model(teacher)
        layers = [(_layer(student, h.student_layer, 'student'), _layer(teacher, h.teacher_layer, 'teacher'))
                  for h in self.hints]
        for i, (student_layer, teacher_layer) in enumerate(layers):
            self.handles.append(student_layer.register_forward_hook(partial(self._keep_student, i)))
            self.handles.append(teacher_layer.register_forward_hook(partial(self._keep_teacher, i)))
        parameter = next(student.parameters(), None)
        if parameter is not None: self.to(parameter.device)  # adapters loaded on another device (their dtype kept)
        self.saved = deepcopy((list(self.losses), self.opt)) if restore else None  # not a submodule

    def _keep_student(self, i: int, module: nn.Module, inputs, output):
        if torch.is_grad_enabled(): self.student_features[i] = first_output(output)

    def _keep_teacher(self, i: int, module: nn.Module, inputs, output):
        self.teacher_features[i] = first_output(output).detach()

    def loss(self, opt=None) -> Tensor:
        """The weighted sum of the hint losses on the features of the last training forward of student and teacher,
        which it then forgets. Given the learner's optimizer `opt`, the adapters (created at the first call) get an
        optimizer of its kind, and their gradients are zeroed for the backward to come."""
        student, teacher = self.student_features, self.teacher_features
        self.student_features, self.teacher_features = {}, {}
        terms = []
        for i, (hint, loss) in enumerate(zip(self.hints, self.losses)):
            if i not in student or i not in teacher:
                role, layer = ('student', hint.student_layer) if i not in student else ('teacher', hint.teacher_layer)
                raise RuntimeError(f'No output of the {role} layer {layer!r} was captured for {hint}: are the hooks '
                                   f'attached, and did the {role} run this layer in its last training forward?')
            try: terms.append(hint.weight * loss(student[i], teacher[i]))
            except ValueError as e: raise ValueError(f'{hint}: {e}') from None
        if opt is not None: self._optimize_like(opt)
        if self.opt is not None: self.opt.zero_grad()
        return torch.stack(terms).sum()

    def _optimize_like(self, opt):
        """Give the adapters an optimizer of the kind of `opt` (the same step and hyper-parameters), a new one when they
        changed (made at the first step, put back by `detach`)"""
        params = list(self.parameters())
        if not params or (self.opt is not None and _ids(params) == _ids(_params_of(self.opt))): return
        self.opt = _optimizer_like(opt, params)
        self._take_hypers(opt)
        if _world_size() > 1:  # every process starts from process 0's adapters (all make them at the same step)
            with torch.no_grad():
                for p in params: dist.broadcast(p, src=0)

    def step(self, opt, scaler=None):
        """Step the adapters with the hyper-parameters that the last parameter group of the learner's optimizer `opt`
        has now (its schedule), through `scaler` (fp16's `GradScaler`, which unscales their gradients) if given"""
        if self.opt is None: return
        self._take_hypers(opt)
        if scaler is None: self.opt.step()
        else: scaler.step(self.opt)

    def _take_hypers(self, opt):
        "The hyper-parameters of the last parameter group of `opt`, for the adapters' optimizer (one group)"
        for name, value in opt.hypers[-1].items(): self.opt.set_hyper(name, [value])

    def average_gradients(self):
        "Under DDP, the mean of the adapters' gradients across processes in each process, as DDP does for the student's"
        n_processes = _world_size()
        if n_processes == 1: return
        for p in self.parameters():
            if p.grad is None: p.grad = torch.zeros_like(p)  # every process reduces the same tensors, in one order
            dist.all_reduce(p.grad)
            p.grad /= n_processes

    def detach(self):
        """Remove the hooks and forget the features; put the adapters and their optimizer back as they were at
        `attach` if it was asked to"""
        for handle in self.handles: handle.remove()
        self.handles, self.student_features, self.teacher_features = [], {}, {}
        if self.saved is not None:
            losses, self.opt = self.saved
            self.losses, self.saved = nn.ModuleList(losses), None


def _ids(params) -> set[int]: return {id(p) for p in params}


def _params_of(opt) -> list[Tensor]:
    "Every parameter `opt` (a fastai `Optimizer` or `OptimWrapper`) updates"
    return [p for group in opt.param_lists for p in group]


def _optimizer_like(opt, params: list[Tensor]):
    "An optimizer of the kind of `opt` (fastai's, or a torch optimizer in an `OptimWrapper`) over `params`"
    if isinstance(opt, OptimWrapper): return OptimWrapper(opt=type(opt.opt)(params), hp_map=opt.fwd_map)
    return Optimizer(params, opt.cbs)  # its hyper-parameters: `HintHooks._take_hypers`, at each step


def _map_shapes(model: nn.Module, xb: tuple, depth: int) -> dict[str, tuple]:
    "The output shape of each layer of `model` at most `depth` levels deep whose output for `xb` is a feature map"
    shapes = {}
    def keep(name, module, inputs, output):
        output = first_output(output)
        if isinstance(output, Tensor) and output.ndim > 2: shapes[name] = tuple(output.shape)
    layers = [(name, module) for name, module in model.named_modules() if name and name.count('.') < depth]
    handles = [module.register_forward_hook(partial(keep, name)) for name, module in layers]
    parameter = next(model.parameters(), None)
    if parameter is not None: xb = to_device(xb, parameter.device)  # a batch from a GPU loader, a model on the CPU
    try:
        with torch.no_grad(), evaluating(model): model(*xb)
    finally:
        for handle in handles: handle.remove()
    return {name: shapes[name] for name, _ in layers if name in shapes}


def match_layers(student: nn.Module | Learner, teacher: nn.Module | Learner, x: Tensor | tuple,
                 depth: int = 2, teacher_x: Tensor | tuple | None = None) -> pd.DataFrame:
    """Candidate `Hint` layer pairs: each student layer and teacher layer at most `depth` levels deep (`'0.6'` is 2)
    whose feature maps for the input batch `x` have the same spatial size, with both shapes, in layer order.
    `teacher_x`: the teacher's input where it differs from the student's (another size: `TeacherInput.adapt(x)`).
    Both models run once, in eval mode and without gradient; their modes are restored after."""
    xbs = [x if isinstance(x, (tuple, list)) else (x,) for x in (x, x if teacher_x is None else teacher_x)]
    student_shapes, teacher_shapes = [_map_shapes(get_model(m.model if isinstance(m, Learner) else m), xb, depth)
                                      for m, xb in zip((student, teacher), xbs)]
    rows = [dict(student_layer=s_name, student_shape=s_shape, teacher_layer=t_name, teacher_shape=t_shape)
            for s_name, s_shape in student_shapes.items() for t_name, t_shape in teacher_shapes.items()
            if len(s_shape) == len(t_shape) and s_shape[2:] == t_shape[2:]]
    return pd.DataFrame(rows, columns=['student_layer', 'student_shape', 'teacher_layer', 'teacher_shape'])
