"""Distillation under `learn.distrib_ctx()`, one process of a CPU run: `torchrun --standalone --nproc_per_node 2
tests/distributed_kd.py DIGITS OUT TEACHER` trains a few steps and writes OUT/rank<R>.json (each step's loss, what
was wrapped, how many items the teacher ran on in a cached run in memory and in one with the store OUT/store shared by
the processes; each step's loss and the adapters after a hinted run; `TeacherAgreement` of the untrained student with
the trained teacher whose weights are at TEACHER).
Also imported by test_distributed.py, whose single-process reference run uses the same learner on the global batch."""
import json
import math
import sys
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import torch
import torch.distributed as dist
from fastai.callback.core import Callback, CancelFitException
from fastai.distributed import DistributedDL
from fastai.learner import Learner
from fastai.torch_core import num_distrib, rank_distrib, set_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import tiny_cnn
from fastkd.cache import TeacherCache
from fastkd.callback import KnowledgeDistillation
from fastkd.hints import FitNet, Hint
from fastkd.digits import digits_dls
from fastkd.kd_find import TeacherAgreement

STEPS, BS = 4, 16  # steps recorded, batch size of one process


class GlooDistributedDL(DistributedDL):
    "fastai's `DistributedDL` broadcasts the item order with a CUDA tensor (for nccl); gloo on CPUs takes a CPU one"
    def _broadcast(self, t, rank):
        t = torch.tensor(t)
        dist.broadcast(t, rank)
        return t.tolist()


class RecordSteps(Callback):
    "Each training step's loss as backpropagated, what the student and teacher were during it; stop after `STEPS`"
    order = KnowledgeDistillation.order + 1
    def __init__(self): self.losses, self.wrapped = [], set()
    def after_loss(self):
        self.losses.append(float(self.learn.loss_grad.detach()))
        teacher = self.learn.knowledge_distillation.teachers[0]
        self.wrapped |= {f'student {type(self.learn.model).__name__}', f'teacher {type(teacher).__name__}'}
        if not isinstance(self.learn.model, DistributedDataParallel) and num_distrib() > 1:
            raise RuntimeError('the student is not wrapped in DistributedDataParallel')
        if len(self.losses) == STEPS: raise CancelFitException()


def student() -> nn.Module:
    "A student without batch norm, whose loss on a batch is the mean of its losses on the halves"
    set_seed(0, reproducible=True)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def teacher() -> nn.Module:
    set_seed(1, reproducible=True)
    return tiny_cnn(16).eval()


def hint(adapter: bool) -> Hint:
    """A FitNet hint from the student's pooled features (16) to the teacher's (32); with `adapter`, its adapter made
    now from a fixed seed (the same in every process and run), else at the first training step from the process's
    own random state"""
    fitnet = FitNet()
    if adapter:
        set_seed(2, reproducible=True)
        fitnet.adapter = nn.Linear(16, 32)
    return Hint('5', '0.4', fitnet)


def learner(digits: Path, bs: int, cache: bool | TeacherCache = False, hints: list[Hint] | None = None) -> Learner:
    "Digits in file order (no shuffling, no augmentation), and the KD callback with a fixed teacher"
    dls = digits_dls(digits, size=32, bs=bs, augment=False, num_workers=0)
    dls.train = dls.train.new(shuffle=False)
    kd = KnowledgeDistillation(teacher(), cache=cache, hints=hints)
    return Learner(dls, student(), cbs=[kd] + ([] if cache else [RecordSteps()]))


def adapters(learn: Learner) -> list[float]:
    "Every adapter parameter of `learn`'s hints, flattened"
    return torch.cat([p.detach().flatten() for p in learn.knowledge_distillation.hints.parameters()]).tolist()


def distributed_fit(learn: Learner, epochs: int):
    "`learn.fit` in this process's share of a distributed run"
    learn.dls.loaders = [GlooDistributedDL(dl) for dl in learn.dls.loaders]
    with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-2)


def teacher_items(learn: Learner, epochs: int, shuffled: bool) -> int:
    """Items the teacher ran on in this process over `epochs` of 8 steps on the first `8 * BS * world size` training
    items (1 validation batch of the chance check included), in file order or shuffled (process 0's order is dealt)"""
    n_items, shuffle = 8 * BS * num_distrib(), torch.Generator().manual_seed(3)
    order = lambda: torch.randperm(n_items, generator=shuffle).tolist() if shuffled else list(range(n_items))
    learn.dls.train = learn.dls.train.new(get_idxs=order)
    seen = []
    learn.knowledge_distillation.teachers[0].register_forward_hook(lambda m, inputs, output: seen.append(len(inputs[0])))
    distributed_fit(learn, epochs)
    return sum(seen)


def cached_items(digits: Path) -> int:
    "Items the teacher ran on in this process over 2 epochs in file order with cache=True (in memory)"
    return teacher_items(learner(digits, BS, cache=True), 2, shuffled=False)


def stored_items(digits: Path, store: Path) -> int:
    """Items the teacher ran on in this process over 3 shuffled epochs with the disk store `store`, which the other
    processes fill too: an item dealt to another process in an earlier epoch is read, not run again"""
    return teacher_items(learner(digits, BS, cache=TeacherCache(path=store)), 3, shuffled=True)


def global_batches(n_items: int, world_size: int) -> list[int]:
    "The items of each step of a `world_size`-process run in one list: `DistributedDL` deals process r the r-th slice"
    per_rank = math.ceil(n_items / world_size)
    return [i for step in range(STEPS) for r in range(world_size)
            for i in range(r * per_rank + step * BS, r * per_rank + (step + 1) * BS)]


def hinted(digits: Path, adapter: bool) -> dict:
    "Each step's loss and the adapters after `STEPS` steps of a hinted run; unmade adapters drawn from a seed per process"
    learn = learner(digits, BS, hints=[hint(adapter)])
    torch.manual_seed(100 + rank_distrib())  # a lazily made adapter differs from process to process
    distributed_fit(learn, 1)
    return dict(losses=learn.record_steps.losses, adapters=adapters(learn))


def agreement_learner(digits: Path, trained_teacher: Path) -> Learner:
    """The untrained student (it predicts one class), and `TeacherAgreement` with the trained `tiny_cnn(32)` whose
    weights are at `trained_teacher`: their agreement differs from one part of the validation set to another"""
    model = tiny_cnn(32)
    model.load_state_dict(torch.load(trained_teacher, weights_only=True))
    return Learner(digits_dls(digits, size=32, bs=BS, augment=False, num_workers=0), student(),
                   metrics=TeacherAgreement(model))


def agreement(digits: Path, trained_teacher: Path) -> float:
    """`TeacherAgreement` after a `validate` in this process's share of a distributed run (359 validation items in
    file order, by digit: each process gets half, process 1 the first item again as padding)"""
    learn = agreement_learner(digits, trained_teacher)
    learn.dls.loaders = [GlooDistributedDL(dl) for dl in learn.dls.loaders]
    with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_bar(), learn.no_logging(): learn.validate()
    return learn.metrics[0].value


def main(digits: Path, out: Path, trained_teacher: Path):
    torch.set_num_threads(1)
    learn = learner(digits, BS)
    distributed_fit(learn, 1)
    record = learn.record_steps
    (out/f'rank{rank_distrib()}.json').write_text(json.dumps(dict(
        losses=record.losses, wrapped=sorted(record.wrapped), world_size=num_distrib(),
        cached_items=cached_items(digits), stored_items=stored_items(digits, out/'store'),
        hinted=hinted(digits, adapter=True), lazy=hinted(digits, adapter=False),
        agreement=agreement(digits, trained_teacher))))


if __name__ == '__main__': main(*map(Path, sys.argv[1:4]))
