"""One training process over a teacher store on disk, for test_teacher_store.py: `python tests/store_worker.py DIGITS
TEACHER STORE [--kill-after N]` distils a student from the tiny CNN whose state dict is at TEACHER for one epoch with
`cache=STORE`, and prints as JSON how many items the teacher ran on in training steps and the largest difference of
a teacher output it was handed from a live forward. `--kill-after N` kills this process (SIGKILL) after N training
batches."""
import argparse
import json
import os
import signal

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.torch_core import set_seed

from conftest import tiny_cnn
from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls
from fastkd.losses import SoftTarget


class TeacherRecord(Callback):
    """The items `teacher` runs on in training steps (not the check before the first one), each step's inputs and the
    teacher outputs the loss was handed; with `kill_after`, a SIGKILL of this process after that many batches"""
    order = KnowledgeDistillation.order + 1
    def __init__(self, teacher, kill_after=None):
        self.items, self.in_step, self.batches, self.kill_after = 0, False, [], kill_after
        teacher.register_forward_hook(self.count)
    def count(self, module, inputs, output):
        if self.in_step: self.items += len(inputs[0])
    def before_batch(self): self.in_step = self.training
    def after_batch(self):
        self.in_step = False
        if self.kill_after is not None and self.iter + 1 >= self.kill_after: os.kill(os.getpid(), signal.SIGKILL)


class RecordedLoss(SoftTarget):
    "SoftTarget that keeps the inputs and teacher outputs of each step"
    def forward(self, student_logits, teacher_logits, target=None):
        self.batches.append((self.learn.xb[0].clone(), teacher_logits.clone()))
        return super().forward(student_logits, teacher_logits, target)


def teacher_from(path) -> torch.nn.Module:
    teacher = tiny_cnn(16)
    teacher.load_state_dict(torch.load(path, weights_only=True))
    return teacher.eval()


def distil(dls, teacher, cache, seed: int = 0, kill_after=None, epochs: int = 1, cbs=(), **learner_kwargs
           ) -> tuple[TeacherRecord, list]:
    """A student of `seed` distilled from `teacher` with `cache` (`cbs` and `learner_kwargs` to its `Learner`): the
    record of its steps, and each step's inputs and teacher outputs"""
    set_seed(seed, reproducible=True)
    record, loss = TeacherRecord(teacher, kill_after), RecordedLoss()
    loss.batches = []
    learn = Learner(dls, tiny_cnn(8), cbs=[KnowledgeDistillation(teacher, loss, cache=cache), record, *cbs],
                    **learner_kwargs)
    loss.learn = learn
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-3)
    return record, loss.batches


@torch.no_grad()
def max_diff(batches: list, teacher) -> float:
    "The largest difference of a teacher output handed to the loss from a live forward of the teacher"
    return max(float((t - teacher(x)).abs().max()) for x, t in batches)


if __name__ == '__main__':
    parser = argparse.ArgumentParser()
    for name in ('digits', 'teacher', 'store'): parser.add_argument(name)
    parser.add_argument('--kill-after', type=int, default=None)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dls = digits_dls(args.digits, size=32, bs=64, augment=False, num_workers=0)
    teacher = teacher_from(args.teacher)
    record, batches = distil(dls, teacher, args.store, args.seed, args.kill_after)
    print(json.dumps(dict(teacher_items=record.items, max_diff=max_diff(batches, teacher))))
