"Distillation under fastai's mixed precision: the teacher runs under the learner's autocast, the distillation term in float32."
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner
from fastai.torch_core import set_seed

from conftest import tiny_cnn
from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls
from fastkd.losses import SoftTarget


class CPUAutocast(Callback):
    "fastai's `MixedPrecision` autocasts CUDA operations only: point its autocast at the CPU (bf16 is the CPU's type)"
    order = MixedPrecision.order + 1
    def before_fit(self): self.learn.mixed_precision.autocast = torch.autocast('cpu', dtype=torch.bfloat16)


class RecordingKD:
    "SoftTarget(T=1) that keeps the dtypes of what it was given and gave"
    def __init__(self): self.loss, self.dtypes = SoftTarget(T=1), set()
    def __call__(self, student_logits, teacher_logits):
        value = self.loss(student_logits, teacher_logits)
        self.dtypes.add((student_logits.dtype, teacher_logits.dtype, value.dtype))
        return value


class FirstSteps(Callback):
    "Each training step's loss as backpropagated, for 3 steps"
    order = KnowledgeDistillation.order + 1
    def before_fit(self): self.losses = []
    def after_loss(self):
        self.losses.append(float(self.learn.loss_grad))
        if len(self.losses) == 3: raise CancelFitException()


def first_losses(digits_path, autocast: bool):
    "Three steps of a student distilled from a fixed teacher, in float32 or under bf16 autocast; what the teacher output"
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)
    set_seed(1, reproducible=True)
    teacher = tiny_cnn(16).eval()
    teacher_outputs = []
    teacher.register_forward_hook(lambda module, inputs, output: teacher_outputs.append(output.dtype))
    kd_loss, steps = RecordingKD(), FirstSteps()
    set_seed(0, reproducible=True)
    learn = Learner(dls, tiny_cnn(8), cbs=[KnowledgeDistillation(teacher, kd_loss), steps])
    if autocast: learn.to_bf16().add_cb(CPUAutocast())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    return steps.losses, set(teacher_outputs), kd_loss.dtypes


def test_bf16_autocast_reaches_the_teacher_and_the_distillation_term_stays_float32(digits_path):
    losses, teacher_dtypes, kd_dtypes = first_losses(digits_path, autocast=True)
    assert teacher_dtypes == {torch.bfloat16}  # the teacher ran under the learner's autocast
    assert kd_dtypes == {(torch.float32, torch.float32, torch.float32)}
    reference, teacher_dtypes, _ = first_losses(digits_path, autocast=False)
    assert teacher_dtypes == {torch.float32}
    assert losses == pytest.approx(reference, rel=2e-2)  # bf16 keeps about 3 significant digits
