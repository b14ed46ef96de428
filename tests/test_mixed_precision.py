"How the teacher computes: under the learner's mixed-precision autocast (distillation term in float32), and channels-last."
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.vision.core import TensorImage
from fasttransform import Transform
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
        self.losses.append(float(self.learn.loss_grad.detach()))
        if len(self.losses) == 3: raise CancelFitException()


def first_losses(digits_path, precision: str = 'float32', teacher=None, **kwargs):
    """Three steps of a student distilled from a fixed teacher, and what the teacher output: on the CPU in float32 or
    under bf16 autocast (`precision` 'bf16'), with `learn.to_bf16()` alone ('to_bf16'),
    or on the GPU in float32 ('cuda') or with fastai's fp16 ('fp16')"""
    set_seed(0, reproducible=True)  # the loader draws its shuffling seed when it is made
    device = torch.device('cuda' if precision in ('cuda', 'fp16') else 'cpu')
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0, device=device)
    if teacher is None:
        set_seed(1, reproducible=True)
        teacher = tiny_cnn(16).eval()
    teacher_outputs = []
    hook = teacher.register_forward_hook(lambda module, inputs, output: teacher_outputs.append(output.dtype))
    kd_loss, steps = RecordingKD(), FirstSteps()
    set_seed(0, reproducible=True)
    learn = Learner(dls, tiny_cnn(8), cbs=[KnowledgeDistillation(teacher, kd_loss, **kwargs), steps])
    if precision == 'bf16': learn.to_bf16().add_cb(CPUAutocast())
    if precision == 'to_bf16': learn.to_bf16()  # as users write it
    if precision == 'fp16': learn.to_fp16()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    hook.remove()
    return steps.losses, set(teacher_outputs), kd_loss.dtypes


def test_bf16_autocast_reaches_the_teacher_and_the_distillation_term_stays_float32(digits_path):
    losses, teacher_dtypes, kd_dtypes = first_losses(digits_path, 'bf16')
    assert teacher_dtypes == {torch.bfloat16}  # the teacher ran under the learner's autocast
    assert kd_dtypes == {(torch.float32, torch.float32, torch.float32)}
    reference, teacher_dtypes, _ = first_losses(digits_path)
    assert teacher_dtypes == {torch.float32}
    assert losses == pytest.approx(reference, rel=5e-3)  # bf16 keeps about 3 significant digits


def test_to_bf16_on_a_cpu_trains_in_float32(digits_path):
    "What users run on a CPU: fastai's MixedPrecision autocasts CUDA only, so teacher and student compute in float32"
    losses, teacher_dtypes, kd_dtypes = first_losses(digits_path, 'to_bf16')
    assert teacher_dtypes == {torch.float32} and kd_dtypes == {(torch.float32, torch.float32, torch.float32)}
    reference, _, _ = first_losses(digits_path)
    assert losses == pytest.approx(reference, rel=1e-6)  # the float32 run, not a bf16 one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fastai's fp16 (MixedPrecision) autocasts CUDA only")
def test_fp16_on_gpu_runs_the_teacher_in_half_and_the_distillation_term_in_float32(digits_path):
    losses, teacher_dtypes, kd_dtypes = first_losses(digits_path, 'fp16')
    assert teacher_dtypes == {torch.float16}
    assert kd_dtypes == {(torch.float32, torch.float32, torch.float32)}
    reference, teacher_dtypes, _ = first_losses(digits_path, 'cuda')
    assert teacher_dtypes == {torch.float32}
    assert losses == pytest.approx(reference, rel=5e-3)  # the loss backpropagated, before the gradient scaler


def test_teacher_runs_channels_last_on_a_cpu_by_default_with_the_same_losses_and_is_given_back_as_it_was(digits_path):
    set_seed(1, reproducible=True)
    teacher = tiny_cnn(16).train()  # as a user might leave it: train mode, gradients on
    teacher[0][0][0].requires_grad_(False)
    params, flags, before = list(teacher.parameters()), [p.requires_grad for p in teacher.parameters()], teacher.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    conv = teacher[0][0][0]
    layouts = []
    conv.register_forward_pre_hook(lambda module, inputs: layouts.append(module.weight.is_contiguous(memory_format=torch.channels_last)
                                                                          and not module.weight.is_contiguous()))
    losses, _, _ = first_losses(digits_path, teacher=teacher)  # the default, teacher_channels_last=None, on a CPU
    assert layouts == [False, True, True, True]  # the check on a validation batch, then 3 steps on channels-last weights
    reference, _, _ = first_losses(digits_path, teacher=teacher, teacher_channels_last=False)
    assert layouts[4:] == [False] * 4
    assert losses == pytest.approx(reference, rel=1e-5)
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) and after[k].is_contiguous() for k, v in before.items())
    assert list(teacher.parameters()) == params and [p.requires_grad for p in teacher.parameters()] == flags
    assert all(m.training for m in teacher.modules())


class FixedBlur(torch.nn.Module):
    "A 3x3 blur of each channel by a fixed convolution, whose kernel is a 4-d buffer"
    def __init__(self):
        super().__init__()
        self.register_buffer('kernel', torch.eye(3)[:, :, None, None].expand(3, 3, 3, 3) / 9)
    def forward(self, x): return torch.nn.functional.conv2d(x, self.kernel, padding=1)


def test_channels_last_covers_the_teachers_4d_buffers_and_puts_them_back(digits_path):
    set_seed(1, reproducible=True)
    teacher = torch.nn.Sequential(FixedBlur(), tiny_cnn(16)).eval()
    layouts = []
    teacher[0].register_forward_pre_hook(lambda module, inputs: layouts.append(
        module.kernel.is_contiguous(memory_format=torch.channels_last) and not module.kernel.is_contiguous()))
    first_losses(digits_path, teacher=teacher)
    assert layouts == [False, True, True, True]  # the check on a validation batch, then 3 steps
    assert teacher[0].kernel.is_contiguous() and torch.equal(teacher[0].kernel, FixedBlur().kernel)


class DoubleImages(Transform):
    "Images in float64, after `IntToFloatTensor`"
    order = 99
    def encodes(self, x: TensorImage): return x.double()


def test_the_teacher_computes_in_the_students_dtype(digits_path):
    """A float64 student on float64 images: the float32 teacher is cast to float64 before the first step, and is
    float32 again after the fit (left as it was given)"""
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)
    for dl in dls.loaders: dl.after_batch.add(DoubleImages())
    set_seed(1, reproducible=True)
    teacher = tiny_cnn(16).eval()
    dtypes = []
    teacher.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    steps = FirstSteps()
    learn = Learner(dls, tiny_cnn(8).double(), cbs=[KnowledgeDistillation(teacher, SoftTarget(T=1)), steps])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert dtypes and set(dtypes) == {torch.float64}
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    assert len(steps.losses) == 3 and all(torch.isfinite(torch.tensor(steps.losses)))
