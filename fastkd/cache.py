"""`TeacherCache`: offline distillation, the teacher's output for each training item computed once and reused.

When the training inputs are the same every epoch (no random augmentation), the teacher's output for an item
never changes: the cache stores it the first time the item is seen and hands it back in later epochs, so a heavy
teacher costs one pass over the training set instead of one per epoch. In memory by default; with a `path`, in a
store on disk (`fastkd.store`) that later fits, processes, students and seeds reuse, which
`fill_teacher_cache` can also fill ahead of training.
Outputs are keyed by the item's index in the dataset, read from the order fastai's `DataLoader` drew for the
epoch, and each is stored with a fingerprint of its input that is checked when the output is reused.
With `views=K`, each item has K fixed augmented views: its random item transforms are replayed from a seed per item
and view, each training epoch picks one view per item, and the outputs are keyed by (item, view).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastai.callback.mixup import MixHandler
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.torch_core import find_bs
from fastai.vision.augment import RandTransform, Resize
from fastcore.basics import store_attr
from fastcore.foundation import L
from fastprogress.fastprogress import progress_bar
from torch import Tensor, nn

from .basics import evaluating, first_output, inputs_of, random_state_kept, teacher_model, user_loader
from .store import TeacherStore

__all__ = ['TeacherCache', 'random_augmentations', 'fill_teacher_cache']

_PIPELINES = ('after_item', 'before_batch', 'after_batch')
_BATCH_PIPELINES = _PIPELINES[1:]  # what views cannot replay: they draw once per batch, not per item


def _transforms(dl: DataLoader) -> list[tuple[str, object]]:
    "The item and batch transforms of `dl`, each with the name of its pipeline"
    return [(name, tfm) for name in _PIPELINES for tfm in getattr(getattr(user_loader(dl), name, None), 'fs', [])]


def _random_transforms(dl: DataLoader, pipelines: tuple[str, ...] = _PIPELINES) -> list[str]:
    "The names of `dl`'s fastai `RandTransform`s in `pipelines` that draw (probability above 0), `Resize` aside"
    return [f'{type(tfm).__name__} (dls.train.{name})' for name, tfm in _transforms(dl)
            if name in pipelines and isinstance(tfm, RandTransform) and not isinstance(tfm, Resize) and tfm.p > 0]


def _mixing_callbacks(learn: Learner) -> list[str]:
    "The names of `learn`'s `MixHandler` callbacks (MixUp, CutMix): they mix each batch's items at random"
    return [f'{type(cb).__name__} (callback)' for cb in learn.cbs if isinstance(cb, MixHandler)]


def random_augmentations(learn: Learner) -> list[str]:
    """What gives an item a different input from one training epoch to the next: fastai `RandTransform`s of the
    training loader (with a probability above 0), and `MixHandler` callbacks (MixUp, CutMix).
    `Resize` is left out: it only crops or pads at a random place when an image is not of its aspect ratio."""
    return _random_transforms(learn.dls.train) + _mixing_callbacks(learn)


def _refuse_unreplayable(randoms: list[str], views: int):
    "An error naming `randoms`, the random transforms and callbacks that `views` cannot replay, and the fixes"
    if randoms:
        raise ValueError(
            f'TeacherCache(views={views}) replays the random item transforms of each view, but these draw random '
            f'numbers once per batch, which cannot be replayed: {", ".join(randoms)}. Augment with item transforms '
            'instead (item_tfms, e.g. RandomResizedCrop, FlipItem, RandomCrop) and no random batch_tfms (e.g. '
            'aug_transforms, or augment=False) nor MixUp/CutMix, or keep cache=False to run the teacher on every '
            'batch.')


class _ViewReplay:
    """Stands in for the `do_item` of the training loader `dl`: item `s` is made in view `views[s]`, with Python's,
    numpy's and torch's CPU random generators seeded from (`seed`, `s`, view) and put back after, so its random item
    transforms draw what they drew the first time that view was made. Worker processes get a copy of the loader, and
    with it of `views`, when each epoch's iterator starts them."""
    def __init__(self, dl: DataLoader, seed: int, n_items: int):
        store_attr('dl,seed')
        self.views = torch.zeros(n_items, dtype=torch.long)

    def __call__(self, s):
        view = int(self.views[s])
        with random_state_kept():
            random.seed(f'{self.seed} {s} {view}')  # a str seed: the same in every process (sha512, no hash salt)
            np.random.seed(random.getrandbits(32))
            torch.default_generator.manual_seed(random.getrandbits(63))  # the CPU's only: GPU streams keep drawing
            return type(self.dl).do_item(self.dl, s)

    def install(self):
        "Make `dl`'s items through this replay"
        self.dl.do_item = self

    def remove(self):
        "Give `dl` back its own `do_item`"
        if vars(self.dl).get('do_item') is self: del self.dl.do_item


def _fingerprints(xb: tuple) -> Tensor:
    "One number per item of `xb` that changes when its input does: the input's projection on a fixed random direction"
    total = 0.
    for x in xb:
        x = x.flatten(1).float()
        direction = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0)).to(x.device)
        total = total + x @ direction / math.sqrt(x.shape[1])
    return total.cpu()


def _teachers_signature(teachers: list[nn.Module]) -> list:
    "Which teachers these are and what their weights sum to, tensor by tensor: it changes when a teacher does"
    return [(id(t), [float(v.double().sum()) for v in t.state_dict().values() if v.is_floating_point()])
            for t in teachers]


def _same_teachers(a: list, b: list) -> bool:
    "Whether two `_teachers_signature`s match (the sums allow for the rounding of another device)"
    return len(a) == len(b) and all(id_a == id_b and len(sa) == len(sb) and all(map(math.isclose, sa, sb))
                                    for (id_a, sa), (id_b, sb) in zip(a, b))




def _weights_digest(teacher: nn.Module) -> str:
    "sha256 of `teacher`'s class and state dict: each tensor's name, dtype, shape and bytes (memory layout aside)"
    digest = hashlib.sha256(type(teacher).__qualname__.encode())
    for name, value in teacher.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f'{name} {value.dtype} {tuple(value.shape)}'.encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


_ADDRESS = re.compile(r' at 0x[0-9a-fA-F]+')  # in the repr of a function: another in every process


def _data_identity(dl: DataLoader) -> dict:
    """What the teacher's inputs are made of: the items of `dl`'s dataset (for a fastai dataset of files, each item's
    path; else only their number: the input fingerprints then tell items apart) and the reprs of the transforms
    from item to input"""
    dataset = dl.dataset
    items = getattr(dataset, 'items', None)
    by_item = isinstance(items, (list, tuple, L)) and len(items) == len(dataset) and all(
        isinstance(item, (str, Path)) for item in items)
    names = [str(Path(item).absolute()) for item in items] if by_item else []
    tfms = getattr(dataset, 'tfms', [])
    tfms = list(tfms)[:getattr(dataset, 'n_inp', None) or len(tfms)] if isinstance(tfms, (list, L)) else [tfms]
    return dict(dataset=type(dataset).__name__, n_items=len(dataset), keyed_by='item' if by_item else 'index',
                items_sha256=hashlib.sha256('\n'.join(names).encode()).hexdigest(), first_item=names[:1],
                transforms=[_ADDRESS.sub('', repr(tfm)) for tfm in [*tfms, *(t for _, t in _transforms(dl))]])


def _batch_items(dl: DataLoader, i: int, n: int) -> Tensor:
    "Dataset indices of the `n` items of batch `i` of `dl`, from the order the loader drew for this pass"
    order = getattr(dl, '_DataLoader__idxs', None)  # set by `DataLoader.__iter__` before the first batch
    items = order[i * dl.bs:i * dl.bs + n] if order is not None else []
    if len(items) != n:
        raise RuntimeError(f'The teacher cache cannot tell which items batch {i} holds: it follows the item order '
                           'of fastai DataLoaders. Use cache=False with this loader.')
    return torch.as_tensor(items, dtype=torch.long)


_STORED_DTYPES = (torch.float32, torch.float16)


class TeacherCache:
    """The teacher's output for each training item, computed at the item's first training step and reused after.

    Outputs are stored in float32 by default: exactly what the teacher gave, so a cached run trains as an uncached
    one does. An item's output is computed with the teacher once, when a batch holds it and it is not stored yet, so
    `lr_find` or a cancelled epoch leave valid outputs for the items they saw and nothing for the others. With
    `allow_random=False`, a random augmentation is refused before training, and an item whose input differs from the
    one its output was computed from stops training with an error: that catches in-place changes of data or
    transforms. `allow_random=True` reuses the output of each item's first view for all its later views instead.

    Where: in memory (`path=None`, on the CPU, at most `max_gib`; it refills after a change of the training dataset
    object or length, of the transform objects, or of a teacher's weights), or on disk: `path` is a folder holding
    one store per teacher and data (`fastkd.store.TeacherStore`, numpy memory maps), which every later fit, process,
    student or seed with the same teacher on the same items reuses. A store's sub-folder is named by a fingerprint of
    the teachers (sha256 of their weights), of the data (each item's file path, or only the number of items, and the
    reprs of the transforms) and of the storage: other weights, other items or other transforms get a store of their
    own, never a mix. It is crash-safe and several processes may fill it at once (see `fastkd.store`).

    Bytes per item, with C classes (one flag byte and a 4-byte input fingerprint each besides):
    - `dtype=torch.float32`: 4C, exact (GTSRB, 39,209 items x 43 classes: 6.7 MB; ImageNet-1k: 5.1 GB);
    - `dtype=torch.float16`: 2C, about 3 significant digits, fine for temperatures of 1 and above;
    - `top_k=k`: the k largest logits and the log of the rest of the probability mass (k+1 values in `dtype`) and
      the k class indices (int16, or int32 beyond 32,767 classes): 6k+4 bytes in float32 (k=10 on ImageNet-1k: 64
      bytes instead of 4,000). The other classes get equal logits holding that mass, so the softmax at T=1 is exact
      on the top k and spreads the rest evenly: SoftTarget, DKD and DIST take these logits as they are. Losses that
      read the tail move (top 5 of 43 GTSRB classes: SoftTarget(T=1) by 8e-4, SoftTarget(T=4) by 0.37, DIST by 0.17;
      bench/results/teacher_once.md): top-k suits T=1, float16 the others. One row of class logits per item only.

    Augmentation at the cost of K teacher passes: `views=K` gives each training item K fixed augmented views. The
    random item transforms (`item_tfms` such as `RandomResizedCrop`, `FlipItem`, `RandomCrop`) of view v of item i
    are replayed from a seed of (`view_seed`, i, v); each training epoch picks one view per item (from `view_seed`
    and the epoch: each K epochs, every view of an item once, in an order drawn per item), and the output of each
    (item, view) is stored, K rows per item (K times the bytes
    above; on disk, K and `view_seed` are part of the store's identity). The input fingerprint is checked as without
    views: a view that does not replay is stopped. Random batch transforms (`aug_transforms`) and MixUp/CutMix draw
    once per batch, cannot be replayed and are refused; so are persistent workers, which would keep an old epoch's
    views. Validation has no views."""

    def __init__(self, allow_random: bool = False, dtype: torch.dtype = torch.float32, max_gib: float = 8.,
                 path: str | Path | None = None, top_k: int | None = None, views: int | None = None,
                 view_seed: int = 0):
        if path is not None: path = TeacherStore.root(path)
        if dtype not in _STORED_DTYPES:
            raise ValueError(f'TeacherCache stores torch.float32 or torch.float16, not {dtype}.')
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f'top_k is the number of largest logits kept per item, at least 1: got {top_k!r}.')
        if views is not None and (not isinstance(views, int) or isinstance(views, bool) or views < 1):
            raise ValueError(f'views is the number of augmented views kept per item, at least 1: got {views!r}.')
        if views is not None and allow_random:
            raise ValueError("allow_random=True reuses each item's first output for all its views and views=K stores "
                             'the output of each of K views: pass one of them.')
        store_attr()
        self.replay = None
        self.reset()

    def reset(self):
        "Forget every stored output (on disk they stay: a cache with the same teacher and data opens them again)"
        self.outputs = self.indices = self.stored = self.inputs = self.source = self.store = self.shape = None

    def __getstate__(self):
        "Pickles (`learn.export`) keep the settings and no stored output"
        return {**self.__dict__, **dict.fromkeys(('outputs', 'indices', 'stored', 'inputs', 'source', 'store',
                                                  'replay'))}

    def prepare(self, learn: Learner, teachers: list[nn.Module]):
        """Before a fit's first step: refuse random augmentation (with views, what cannot be replayed); forget the
        outputs stored for other data or teachers"""
        randoms = random_augmentations(learn)
        if self.views is not None:
            _refuse_unreplayable(_random_transforms(learn.dls.train, _BATCH_PIPELINES) + _mixing_callbacks(learn),
                                 self.views)
        elif randoms and not self.allow_random:
            raise ValueError(
                f'The teacher cache needs each training item to have the same input in every epoch, but these draw '
                f'random numbers: {", ".join(randoms)}. A cached output would be paired with views the teacher never '
                'saw. Train without them to use the cache (e.g. no `batch_tfms`, no MixUp), or keep cache=False to run '
                'the teacher on every view, or pass cache=TeacherCache(allow_random=True) to reuse the output of '
                "each item's first view.")
        dl = user_loader(learn.dls.train)
        if not dl.indexed or dl.bs is None:
            raise ValueError('The teacher cache keys outputs by dataset index: it needs a training DataLoader over an '
                             'indexed dataset, with a batch size. Use cache=False for iterable or pre-batched data.')
        if self.views is not None and dl.fake_l.num_workers > 0 and dl.fake_l.persistent_workers:
            raise ValueError(f'TeacherCache(views={self.views}) picks new views at each epoch, which persistent '
                             'workers would not see: pass persistent_workers=False to the DataLoaders.')
        self._attach(dl, teachers)

    def epoch_views(self, epoch: int, n_items: int) -> Tensor:
        """The view of each of `n_items` items in training epoch `epoch`, from `view_seed` and `epoch` alone: every K
        epochs, each item goes through its K views in an order of its own. So the first K epochs run the teacher on
        whole batches of new views, and each view is used as often as the others."""
        cycle, at = divmod(epoch, self.views)
        orders = np.random.default_rng([self.view_seed, cycle]).permuted(np.tile(np.arange(self.views), (n_items, 1)),
                                                                         axis=1)
        return torch.from_numpy(orders[:, at].copy())

    def start_epoch(self, learn: Learner):
        "Before a training epoch, with views: pick each item's view and have the training loader make it"
        if self.views is None: return
        dl = user_loader(learn.dls.train)
        if self.replay is None or self.replay.dl is not dl:
            self.release()
            self.replay = _ViewReplay(dl, self.view_seed, len(dl.dataset))
        self.replay.views = self.epoch_views(learn.epoch, len(dl.dataset))
        self.replay.install()

    def release(self):
        "After a fit: the training loader makes its items as it did before `start_epoch` (random draws included)"
        if self.replay is not None: self.replay.remove()
        self.replay = None

    def _attach(self, dl: DataLoader, teachers: list[nn.Module]):
        "Use the outputs stored for `dl`'s data and these teachers: those kept so far, a store on disk, or none yet"
        if self.path is None:
            data, teachers = (id(dl.dataset), len(dl.dataset), [id(tfm) for _, tfm in _transforms(dl)]), \
                _teachers_signature(teachers)
            if self.source is None or self.source[0] != data or not _same_teachers(self.source[1], teachers):
                self.reset()
            self.source = data, teachers
            return
        storage = dict(dtype=str(self.dtype), top_k=self.top_k)
        if self.views is not None: storage.update(views=self.views, view_seed=self.view_seed)  # None: as before views
        identity = dict(teachers=[_weights_digest(t) for t in teachers], data=_data_identity(dl), storage=storage)
        if identity == self.source: return
        self.reset()
        self.source = identity
        self._use(TeacherStore.find(self.folder, identity))

    @property
    def folder(self) -> Path | None:
        "The store's folder for the teachers and data of the last `prepare`: `path`/fingerprint"
        if self.path is None or self.source is None: return None
        return self.path/hashlib.sha256(json.dumps(self.source, sort_keys=True).encode()).hexdigest()[:16]

    def _use(self, store: TeacherStore | None):
        "Read and write the arrays of `store` (nothing if None)"
        if store is None: return
        self.store, self.shape = store, torch.Size(store.manifest['output_shape'])
        for name, array in store.arrays.items(): setattr(self, name, torch.from_numpy(array))
        self.stored = torch.from_numpy(store.filled).view(torch.bool)

    def _layout(self, shape: torch.Size) -> dict[str, tuple[tuple, torch.dtype]]:
        "The arrays that hold an output of `shape` per item: their names, shapes of one item and dtypes"
        if self.top_k is None: return dict(outputs=(tuple(shape), self.dtype), inputs=((), torch.float32))
        if len(shape) != 1 or self.top_k >= shape[0]:
            raise ValueError(f'top_k={self.top_k} keeps the largest of one row of class logits per item, and the '
                             f'teacher gives outputs of shape {tuple(shape)} per item: pass a top_k below the number '
                             'of classes, or store whole outputs (top_k=None, dtype=torch.float16 to halve them).')
        index = torch.int16 if shape[0] <= torch.iinfo(torch.int16).max else torch.int32
        return dict(outputs=((self.top_k + 1,), self.dtype), indices=((self.top_k,), index), inputs=((), torch.float32))

    def _allocate(self, n_items: int, shape: torch.Size):
        "Room for an output of `shape` per item: in memory, or in a new store on disk"
        layout = self._layout(shape)
        if self.path is not None:
            numpy_layout = {name: (s, str(d).removeprefix('torch.')) for name, (s, d) in layout.items()}
            return self._use(TeacherStore.create(self.folder, self.source, n_items, numpy_layout, tuple(shape)))
        gib = n_items * sum(math.prod(s) * d.itemsize for s, d in layout.values()) / 2**30
        if gib > self.max_gib:
            raise MemoryError(f'Caching the teacher outputs would take {gib:.1f} GiB ({n_items} items x '
                              f'{tuple(shape)} in {self.dtype}), more than max_gib={self.max_gib}: pass '
                              'TeacherCache(dtype=torch.float16), top_k, a path on disk or a larger max_gib, or use '
                              'cache=False.')
        for name, (s, d) in layout.items(): setattr(self, name, torch.zeros(n_items, *s, dtype=d))
        self.stored, self.shape = torch.zeros(n_items, dtype=torch.bool), shape

    def batch_items(self, learn: Learner, n: int) -> Tensor:
        "Dataset indices of the `n` items of training batch `learn.iter`, from the order the loader drew this epoch"
        return _batch_items(learn.dl, learn.iter, n)

    def __call__(self, learn: Learner, xb: tuple, forward: Callable[[tuple], Tensor]) -> Tensor:
        """The teacher's output for the training batch `xb`: stored outputs, and `forward` on the items not stored yet.
        With views, an output is stored per (item, view), under `item * views + view`."""
        if self.source is None: raise RuntimeError('TeacherCache.prepare must run before the cache is used.')
        items, n_items = self.batch_items(learn, find_bs(xb)), len(learn.dl.dataset)
        if self.views is not None and self.replay is None:
            raise RuntimeError('TeacherCache.start_epoch must run before each training epoch.')
        views = 0 if self.views is None else self.replay.views[items]
        return self.lookup(self.keys(items, views), xb, forward, self.keys(n_items, 0))

    def keys(self, items: Tensor | int, views: Tensor | int) -> Tensor | int:
        "Where the outputs of `items` in `views` are stored: `item * views + view`, or the item itself without views"
        return items * (self.views or 1) + views

    def lookup(self, items: Tensor, xb: tuple, forward: Callable[[tuple], Tensor], n_items: int) -> Tensor:
        """The outputs of the `items` (rows of `n_items`: dataset indices, with views `item * views + view`) whose
        inputs are `xb`, in float32: those stored, and `forward` on the others, stored first"""
        fingerprints = _fingerprints(xb)
        stored = self.stored[items] if self.stored is not None else torch.zeros(len(items), dtype=torch.bool)
        if stored.any() and not self.allow_random: self._check_inputs(items[stored], fingerprints[stored])
        if not stored.all():
            new = ~stored
            output = forward(xb if new.all() else tuple(x[new.to(x.device)] for x in xb))
            if self.stored is None: self._allocate(n_items, output.shape[1:])
            if output.shape[1:] != self.shape:
                raise ValueError(f'The teacher gives outputs of shape {tuple(output.shape[1:])} per item and the store '
                                 f'{self.folder} holds {tuple(self.shape)}: delete that folder and fill it again.')
            self._keep(items[new], dict(self._encode(output), inputs=fingerprints[new]))
        return self._decode(items).to(xb[0].device)

    def _encode(self, output: Tensor) -> dict[str, Tensor]:
        "What is stored of `output`: all of it in `dtype`, or its top k logits, their classes and the rest's log-mass"
        output = output.detach().float().cpu()
        if self.top_k is None: return dict(outputs=output.to(self.dtype))
        values, indices = output.topk(self.top_k, dim=-1)
        rest = output.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)
        return dict(outputs=torch.cat([values, rest], -1).to(self.dtype), indices=indices.to(self.indices.dtype))

    def _decode(self, items: Tensor) -> Tensor:
        "The stored outputs of `items` in float32; from top k, the other classes share the rest's mass evenly"
        stored = self.outputs[items].float()
        if self.top_k is None: return stored
        n_classes = self.shape[0]
        spread = stored[:, -1:] - math.log(n_classes - self.top_k)
        return spread.expand(len(items), n_classes).scatter(-1, self.indices[items].long(), stored[:, :-1])

    def _keep(self, items: Tensor, rows: dict[str, Tensor]):
        "Store `rows` for `items`, then mark them stored: on disk, the rows reach the file before their flags"
        for name, value in rows.items(): getattr(self, name)[items] = value
        if self.store is not None: self.store.flush()
        self.stored[items] = True
        if self.store is not None: self.store.flush()

    def _check_inputs(self, items: Tensor, fingerprints: Tensor):
        "An error if the inputs of stored `items` differ from those their outputs were computed from"
        changed = ~torch.isclose(fingerprints, self.inputs[items], rtol=1e-4, atol=1e-4)
        if not changed.any(): return
        where = f' in the store {self.folder}' if self.store is not None else ''
        if self.views is not None:
            views = [f'{key // self.views} (view {key % self.views})' for key in items[changed][:5].tolist()]
            raise RuntimeError(
                f'The inputs of training items {", ".join(views)} are not those their teacher outputs were cached '
                f'for{where}: a view did not replay. A transform draws random numbers outside the item transforms '
                '(or from a generator of its own), or the data or its transforms were changed in place. Draw from '
                "Python's random module in item transforms, or call `cache.reset()` after changing data (on disk, "
                "delete the store's folder), or keep cache=False.")
        raise RuntimeError(
            f'The inputs of training items {items[changed][:5].tolist()} changed since the teacher output was '
            f'cached for them{where}: a transform draws random numbers (e.g. Resize cropping images of another '
            'aspect ratio at random; use ResizeMethod.Squish), or the data or its transforms were changed in '
            'place. Remove the randomness, or call `cache.reset()` after changing data (on disk, delete the '
            "store's folder), or pass cache=TeacherCache(allow_random=True) to reuse the first output of each "
            'item.')


def fill_teacher_cache(teacher, dls: DataLoaders | DataLoader, path: str | Path, dtype: torch.dtype = torch.float32,
                       top_k: int | None = None, allow_random: bool = False, views: int | None = None,
                       view_seed: int = 0) -> Path:
    """Fill the store in `path` with `teacher`'s outputs (eval mode, no gradient) for every item of the training
    loader of `dls` (or the loader `dls`), in one pass with a progress bar (with `views=K`: K passes, one per view);
    items already stored are skipped. A later `KnowledgeDistillation(teacher, cache=path)` (or `TeacherCache(path=path,
    ...)` with the same `dtype`, `top_k`, `views` and `view_seed`) on the same data reuses them. Returns the store's
    folder."""
    model = teacher_model(teacher)
    dl = user_loader(dls.train if isinstance(dls, DataLoaders) else dls)
    cache = TeacherCache(allow_random, dtype, path=path, top_k=top_k, views=views, view_seed=view_seed)
    if views is not None: _refuse_unreplayable(_random_transforms(dl, _BATCH_PIPELINES), views)
    elif (randoms := _random_transforms(dl)) and not allow_random:
        raise ValueError(f'These transforms draw random numbers: {", ".join(randoms)}, so the outputs would be those '
                         'of one random view: fill the store from a loader without them (augment=False), pass '
                         'views=K to store K replayable views of each item, or pass allow_random=True.')
    cache._attach(dl, [model])
    plain = dl.new(shuffle=False, drop_last=False)
    replay = None if views is None else _ViewReplay(plain, view_seed, len(dl.dataset))
    def forward(xb: tuple) -> Tensor:
        with torch.no_grad(), evaluating(model): return first_output(model(*xb)).float()
    for view in range(views or 1):
        if replay is not None:
            replay.views.fill_(view)
            replay.install()
        for i, batch in enumerate(progress_bar(plain, leave=False)):
            xb = inputs_of(plain, batch)
            model.to(xb[0].device)
            items = _batch_items(plain, i, find_bs(xb))
            cache.lookup(cache.keys(items, view), xb, forward, cache.keys(len(dl.dataset), 0))
    return cache.folder
