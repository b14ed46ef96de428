"Feature hints: the three losses against direct computations, and HintHooks on real models, real optimizers and real Learners."
import difflib
import re
import warnings
from copy import deepcopy
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fastai.callback.mixup import MixUp
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import ShortEpochCallback
from fastai.learner import Callback, Learner, load_learner
from fastai.metrics import accuracy
from fastai.optimizer import OptimWrapper
from fastai.torch_core import set_seed
from fastai.vision.core import PILImage
from fastai.vision.learner import create_vision_model
from torch import nn
from torchvision.models import resnet18, resnet34

from conftest import assert_same_state, eval_logits, first_batch, state, student, tiny_cnn, whole
from fastkd.callback import _OPTIMIZER_STATE_GLOBALS, KnowledgeDistillation
from fastkd.hints import AttentionTransfer, CosineHint, FitNet, Hint, HintHooks, match_layers
from fastkd.losses import SoftTarget
from fastkd.split import default_split


@pytest.fixture
def images(dls) -> torch.Tensor:
    "A batch of 64 real digit images, 32 px, on the CPU with the models the tests build"
    return dls.one_batch()[0].cpu()


def block_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    "Average of each k x k block of the maps `x`, written out (what adaptive pooling to size/k computes)"
    b, c, h, w = x.shape
    return x.reshape(b, c, h // k, k, w // k, k).mean(dim=(3, 5))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    "Each item flattened and divided by its L2 norm"
    x = x.flatten(1)
    return x / (x**2).sum(dim=1, keepdim=True).sqrt()


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    "A 1x1 convolution written as a sum over channels"
    return torch.einsum('oc,bchw->bohw', conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]


def forward_hooks(*models: nn.Module) -> int:
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


# --- the losses, against direct computations


def test_fitnet_is_the_mse_of_a_1x1_conv_of_the_student_to_the_teacher():
    s, t = torch.randn(4, 8, 6, 6), torch.randn(4, 16, 6, 6)
    fitnet = FitNet()
    loss = fitnet(s, t)
    assert isinstance(fitnet.adapter, nn.Conv2d) and fitnet.adapter.weight.shape == (16, 8, 1, 1)
    torch.testing.assert_close(loss, ((conv1x1(fitnet.adapter, s) - t)**2).mean())
    flat = FitNet()
    s, t = torch.randn(4, 8), torch.randn(4, 5)
    loss = flat(s, t)
    assert isinstance(flat.adapter, nn.Linear)
    torch.testing.assert_close(loss, ((s @ flat.adapter.weight.T + flat.adapter.bias - t)**2).mean())


def test_fitnet_pools_a_map_a_whole_multiple_of_the_other_and_refuses_other_sizes():
    "A teacher fed twice the student's resolution: its 6x6 map is average-pooled to the student's 3x3"
    fitnet, s, t = FitNet(), torch.randn(4, 8, 3, 3), torch.randn(4, 5, 6, 6)
    loss = fitnet(s, t)
    torch.testing.assert_close(loss, F.mse_loss(fitnet.adapter(s), F.avg_pool2d(t, 2)))
    with pytest.raises(ValueError, match=r'whole multiple.*\(4, 8, 6, 6\).*\(4, 8, 4, 4\).*CosineHint or '
                                         r'AttentionTransfer, which pool the larger map to any size\.$'):
        FitNet()(torch.randn(4, 8, 6, 6), torch.randn(4, 8, 4, 4))


@pytest.mark.parametrize('loss', [FitNet, CosineHint])
def test_a_loss_refusing_features_of_other_ranks_names_itself(loss):
    "The message starts with the loss's own name, as written in the code"
    with pytest.raises(ValueError, match=rf'^{loss.__name__} compares features of the same rank: \(batch, channels\) '
                                         r'or \(batch, channels, height, width\); got student \(4, 8, 6, 6\) and '
                                         r'teacher \(4, 8\)\. Choose other layers'):
        loss()(torch.randn(4, 8, 6, 6), torch.randn(4, 8))


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


def test_cosine_hint_pools_the_larger_map_and_needs_no_adapter_for_equal_sizes():
    s, t = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 4, 4)
    hint = CosineHint()
    torch.testing.assert_close(hint(s, t), cosine_distance(block_mean(s, 2), t))
    torch.testing.assert_close(hint(t, s), cosine_distance(t, block_mean(s, 2)))
    assert hint.adapter is None and not list(hint.parameters())


def test_cosine_hint_pools_a_half_precision_map_in_float32():
    "The loss of a float16 map is that of its float32 copy, to the bit: pooling in float16 would round the means"
    s, t = torch.randn(4, 16, 4, 4), torch.randn(4, 16, 8, 8).half()
    assert torch.equal(CosineHint()(s, t), CosineHint()(s, t.float()))


def test_cosine_hint_adapts_channels_where_flattened_sizes_differ():
    s, t = torch.randn(4, 8, 4, 4), torch.randn(4, 16, 8, 8)
    hint = CosineHint()
    loss = hint(s, t)
    assert hint.adapter.weight.shape == (16, 8, 1, 1)
    torch.testing.assert_close(loss, cosine_distance(conv1x1(hint.adapter, s), block_mean(t, 2)))


@pytest.mark.parametrize('p', [1, 2])
def test_attention_transfer_compares_normalised_attention_maps(p):
    s, t = torch.randn(4, 8, 8, 8), torch.randn(4, 32, 4, 4)
    loss = AttentionTransfer(p=p)(s, t)
    attention_s = unit_rows(block_mean(s.abs().pow(p).sum(dim=1, keepdim=True), 2))
    attention_t = unit_rows(t.abs().pow(p).sum(dim=1, keepdim=True))
    torch.testing.assert_close(loss, ((attention_s - attention_t)**2).mean())
    assert not list(AttentionTransfer().parameters()) and AttentionTransfer().p == 2  # the paper's default


def test_attention_transfer_refuses_flat_features():
    with pytest.raises(ValueError, match=r'AttentionTransfer compares feature maps.*\(4, 8\).*match_layers'):
        AttentionTransfer()(torch.randn(4, 8), torch.randn(4, 8))


@pytest.mark.parametrize('loss', [FitNet, CosineHint, AttentionTransfer])
def test_losses_compute_in_float32_and_reach_the_student(loss):
    s, t = torch.randn(4, 8, 4, 4), torch.randn(4, 16, 4, 4)
    full = loss()
    expected = full(s, t)
    s_half = s.half().requires_grad_()
    value = deepcopy(full)(s_half, t.half())  # the same adapter, if any
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, atol=1e-3, rtol=1e-2)
    value.backward()
    assert s_half.grad is not None and s_half.grad.abs().sum() > 0


def test_hint_checks_its_arguments():
    assert isinstance(Hint('0.1', '0.1', FitNet).loss, FitNet)
    with pytest.raises(TypeError, match='paths of `model.named_modules'): Hint(1, '0.1', FitNet())
    with pytest.raises(TypeError, match=r'FitNet\(\), CosineHint\(\) or AttentionTransfer\(\), got str'):
        Hint('0.1', '0.1', 'mse')
    with pytest.raises(ValueError, match='>= 0, got -1'): Hint('0.1', '0.1', FitNet(), weight=-1)
    assert [Hint('0.1', '0.1', FitNet(), weight=w).weight for w in (0, 0.5)] == [0, 0.5]  # 0 switches a hint off


# --- HintHooks on real models


def hinted_pair(width_student=8, width_teacher=16):
    "An untrained student and teacher (in eval mode) of two widths, drawn from a fixed seed"
    set_seed(0, reproducible=True)
    return tiny_cnn(width_student), tiny_cnn(width_teacher).eval()


def test_hooks_capture_the_named_layers_and_give_the_weighted_sum_of_the_losses(images):
    student_model, teacher = hinted_pair()
    hooks = HintHooks([Hint('0.1', '0.1', FitNet(), weight=2.), Hint('0.2', '0.1', AttentionTransfer(), weight=3.)])
    hooks.attach(student_model, teacher)
    student_model(images)
    with torch.no_grad(): teacher(images)
    loss = hooks.loss()
    with torch.no_grad(): t1 = teacher[0][:2](images)
    s1 = student_model[0][:2](images)
    s2 = student_model[0][2](s1)
    fitnet, attention = hooks.losses
    torch.testing.assert_close(loss, 2 * fitnet(s1, t1) + 3 * attention(s2, t1))
    loss.backward()
    assert all(p.grad is not None for p in student_model[0][:3].parameters())
    assert fitnet.adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    hooks.detach()


def test_features_are_used_once_and_only_from_forwards_with_gradient(images):
    student_model, teacher = hinted_pair()
    hooks = HintHooks([Hint('0.1', '0.2', CosineHint())])
    hooks.attach(student_model, teacher)
    student_model(images)
    with torch.no_grad(): teacher(images)
    hooks.loss()
    assert not hooks.student_features and not hooks.teacher_features
    with pytest.raises(RuntimeError, match=r"No output of the student layer '0.1' was captured"): hooks.loss()
    with torch.no_grad(): student_model(images), teacher(images)  # a validation forward of the student_model keeps nothing
    assert not hooks.student_features
    with pytest.raises(RuntimeError, match=r"student layer '0.1'"): hooks.loss()
    student_model(images)  # a training forward of the student alone: the teacher's feature is the one missing
    with pytest.raises(RuntimeError, match=r"^No output of the teacher layer '0.2' was captured for Hint\(student_layer="
                                           r"'0.1', teacher_layer='0.2'.*did the teacher run this layer"):
        hooks.loss()
    hooks.detach()


def test_an_error_of_a_hint_loss_names_the_hint(images):
    "A feature loss that refuses its inputs during training: the error says which hint it was"
    student_model, teacher = hinted_pair()
    hooks = HintHooks([Hint('0.1', '1', FitNet())])  # a map and flat features: FitNet refuses them
    hooks.attach(student_model, teacher)
    student_model(images)
    with torch.no_grad(): teacher(images)
    with pytest.raises(ValueError, match=r"^Hint\(student_layer='0.1', teacher_layer='1', loss=FitNet\(\).*\): FitNet "
                                         'compares features of the same rank'):
        hooks.loss()
    hooks.detach()


def test_feature_losses_take_the_ranks_they_promise():
    "FitNet: flat features and maps of 1 to 3 spatial axes; AttentionTransfer: maps of 1 to 3 spatial axes; no more"
    for spatial in [(), (6,), (6, 6), (4, 4, 4)]:
        s, t = torch.randn(2, 3, *spatial), torch.randn(2, 5, *spatial)
        assert FitNet()(s, t).ndim == 0
        if spatial: assert AttentionTransfer()(s, t).ndim == 0
    for loss in (FitNet(), AttentionTransfer()):
        with pytest.raises(ValueError, match='compares'): loss(torch.randn(2, 3, 2, 2, 2, 2), torch.randn(2, 5, 2, 2, 2, 2))


def test_attach_and_detach_leave_no_hook_behind():
    student_model, teacher = hinted_pair()
    hooks = HintHooks([Hint('0.1', '0.1', FitNet()), Hint('0.2', '0.2', AttentionTransfer())])
    hooks.attach(student_model, teacher)
    assert hooks.attached and forward_hooks(student_model) == 2 and forward_hooks(teacher) == 2
    hooks.attach(student_model, teacher)  # again, as after a fit that raised: no second set
    assert forward_hooks(student_model) == 2 and forward_hooks(teacher) == 2
    hooks.detach()
    assert not hooks.attached and forward_hooks(student_model, teacher) == 0
    hooks.detach()
    assert forward_hooks(student_model, teacher) == 0


def test_a_bad_layer_name_is_refused_with_the_closest_names_and_no_hook():
    student_model, teacher = resnet18(), resnet34()
    names = [name for name, _ in student_model.named_modules() if name]
    hooks = HintHooks([Hint('layer2', 'layer3', FitNet()), Hint('layer5', 'layer4', FitNet())])
    with pytest.raises(ValueError) as error: hooks.attach(student_model, teacher)
    closest = difflib.get_close_matches('layer5', names, n=3, cutoff=0)
    assert "The student model has no layer 'layer5'; the closest names are" in str(error.value)
    assert str(closest) in str(error.value) and 'layer4' in closest and len(closest) == 3
    assert str(error.value).endswith('Hint layers are paths of `model.named_modules()`; `match_layers(student, '
                                     'teacher, x)` lists pairs that fit.')
    with pytest.raises(ValueError) as error:  # a name like none of them still gets three suggestions
        HintHooks([Hint('zzz', 'layer4', FitNet())]).attach(student_model, teacher)
    far = difflib.get_close_matches('zzz', names, n=3, cutoff=0)
    assert len(far) == 3 and str(far) in str(error.value)
    assert forward_hooks(student_model, teacher) == 0
    with pytest.raises(ValueError, match=r"The teacher model has no layer '0.7'"):
        HintHooks([Hint('layer4', '0.7', FitNet())]).attach(student_model, teacher)


def test_hooks_reach_through_ddp(images, tmp_path):
    student_model, teacher = hinted_pair()
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(student_model)
        hooks = HintHooks([Hint('0.2', '0.2', FitNet())])
        hooks.attach(wrapped, teacher)
        wrapped(images)
        with torch.no_grad(): teacher(images)
        loss = hooks.loss()
        with torch.no_grad(): expected = hooks.losses[0](student_model[0][:3](images), teacher[0][:3](images))
        torch.testing.assert_close(loss, expected)
        hooks.detach()
        assert forward_hooks(student_model) == 0
    finally: dist.destroy_process_group()


def test_hints_between_resnet_stages(images):
    "A ResNet-18 student and ResNet-34 teacher as fastai builds them: stage outputs of other sizes and channel counts"
    student_model, teacher = (create_vision_model(arch, 10, pretrained=False) for arch in (resnet18, resnet34))
    hooks = HintHooks([Hint('0.5', '0.5', FitNet()), Hint('0.5', '0.6', CosineHint()), Hint('0.6', '0.7', AttentionTransfer())])
    hooks.attach(student_model, teacher.eval())
    student_model(images[:4])
    with torch.no_grad(): teacher(images[:4])
    loss = hooks.loss()
    loss.backward()
    fitnet, cosine, _ = hooks.losses
    assert fitnet.adapter.weight.shape == (128, 128, 1, 1) and cosine.adapter.weight.shape == (256, 128, 1, 1)
    assert torch.isfinite(loss) and all(p.grad.abs().sum() > 0 for p in hooks.parameters())
    hooks.detach()


# --- adapters and the optimizer


def student_learner(dls, opt_func=None, **kwargs) -> Learner:
    set_seed(0, reproducible=True)
    if opt_func is not None: kwargs['opt_func'] = opt_func
    return Learner(dls, tiny_cnn(8), metrics=accuracy, splitter=default_split, **kwargs)


def param_ids(params) -> set:
    return {id(p) for p in params}


def all_params(opt) -> list:
    return [p for group in opt.param_lists for p in group]


@pytest.mark.parametrize('opt_func', [None, partial(OptimWrapper, opt=torch.optim.AdamW)], ids=['fastai', 'torch'])
def test_adapters_get_an_optimizer_of_the_learners_kind_that_follows_its_last_group(dls, images, opt_func):
    learn = student_learner(dls, opt_func)
    learn.create_opt()
    n_student, n_groups = len(all_params(learn.opt)), len(learn.opt.param_lists)
    teacher = hinted_pair()[1]
    hooks = HintHooks([Hint('0.1', '0.1', FitNet()), Hint('0.2', '0.2', CosineHint())])
    hooks.attach(learn.model, teacher)
    learn.model(images)
    with torch.no_grad(): teacher(images)
    assert not param_ids(hooks.parameters())  # created at the first loss, from the features' shapes
    hooks.loss(learn.opt).backward()
    adapters = list(hooks.parameters())
    assert len(adapters) == 4 and all(p.device == images.device and p.dtype == torch.float32 for p in adapters)
    assert type(hooks.opt) is type(learn.opt) and param_ids(all_params(hooks.opt)) == param_ids(adapters)
    if opt_func: assert type(hooks.opt.opt) is torch.optim.AdamW
    assert len(all_params(learn.opt)) == n_student and len(learn.opt.param_lists) == n_groups  # the learner's alone
    learn.opt.set_hyper('lr', slice(1e-4, 0.123))  # a schedule moves it: the adapters take the last group's
    before = [p.detach().clone() for p in adapters]
    hooks.step(learn.opt)
    assert all(not torch.equal(p, b) for p, b in zip(adapters, before))
    assert hooks.opt.hypers == [learn.opt.hypers[-1]] and hooks.opt.hypers[0]['lr'] == pytest.approx(0.123)
    hooks.detach()
    fresh = student_learner(dls, opt_func)
    fresh.create_opt()
    fresh.opt.load_state_dict(learn.opt.state_dict())  # the student's optimizer state alone: fits a plain learner


def test_adapters_take_a_float64_students_dtype(images):
    student_model, teacher = (model.double() for model in hinted_pair())
    hooks = HintHooks([Hint('0.1', '0.1', FitNet())])
    hooks.attach(student_model, teacher)
    student_model(images.double())
    with torch.no_grad(): teacher(images.double())
    assert hooks.loss().dtype == torch.float64 and hooks.losses[0].adapter.weight.dtype == torch.float64
    hooks.detach()


def test_restore_puts_the_adapters_back_as_they_were_at_attach(images):
    student_model, teacher = hinted_pair()
    hooks = HintHooks([Hint('0.1', '0.1', FitNet())])
    def step():
        student_model(images)
        with torch.no_grad(): teacher(images)
        hooks.loss().backward()
        with torch.no_grad():
            for p in hooks.parameters(): p -= 0.1 * p.grad
    hooks.attach(student_model, teacher, restore=True)
    step()
    hooks.detach()
    assert hooks.losses[0].adapter is None  # created during the trial: dropped
    hooks.attach(student_model, teacher)
    step()
    hooks.detach()
    kept = state(hooks)
    hooks.attach(student_model, teacher, restore=True)
    step()
    assert not torch.equal(hooks.losses[0].adapter.weight, kept['losses.0.adapter.weight'])
    hooks.detach()
    assert_same_state(hooks, kept)


# --- through KnowledgeDistillation, on real Learners over the digits


def two_hints() -> list[Hint]:
    "A FitNet hint at the second stage and a cosine hint at the third, between tiny CNNs of widths 8 and 32"
    return [Hint('0.1', '0.1', FitNet()), Hint('0.2', '0.2', CosineHint(), weight=2.)]


def test_training_loss_adds_the_weighted_hint_losses(dls, teacher):
    hints = [Hint('0.1', '0.1', FitNet(), weight=2.), Hint('0.2', '0.2', AttentionTransfer(), weight=100.)]
    learn = student(dls, teacher, loss=SoftTarget(T=4), weight=0.3, hints=hints)
    batch = first_batch(learn)
    (xb,), (target,) = batch.inputs, batch.targets
    fitnet, attention = learn.knowledge_distillation.hints.losses
    with torch.no_grad():
        t1 = teacher.model.eval()[0][:2](xb)
        t2 = teacher.model[0][2](t1)
        s1 = learn.model.train()[0][:2](xb)
        s2 = learn.model[0][2](s1)
        expected = (0.7 * F.cross_entropy(batch.logits, target) + 0.3 * SoftTarget(T=4)(batch.logits, eval_logits(teacher.model, (xb,)))
                    + 2 * fitnet(s1, t1) + 100 * attention(s2, t2))
    assert batch.total_loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize('loss,parts', [(SoftTarget(T=4), ['train_ce', 'train_kd', 'train_hint']),
                                        (None, ['train_ce', 'train_hint'])], ids=['with_logits', 'hints_only'])
def test_recorder_shows_the_hint_term_and_train_loss_is_the_mix_of_its_columns(dls, teacher, loss, parts):
    learn = student(dls, teacher, loss=loss, weight=0.3, hints=two_hints())
    with learn.no_bar(): learn.fit(1, 1e-2)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', *parts, 'valid_loss', 'accuracy', 'time']
    train_loss, *values = learn.recorder.values[0]
    columns = dict(zip(parts, values))
    logit_term = 0.7 * columns['train_ce'] + 0.3 * columns['train_kd'] if loss else columns['train_ce']
    assert train_loss == pytest.approx(logit_term + columns['train_hint'], rel=1e-4)
    assert columns['train_hint'] > 0


def test_hints_only_work_with_a_teacher_of_other_classes(dls):
    "Without a logit term the teacher's head never meets the student's: a teacher trained on other classes can give hints"
    teacher = tiny_cnn(32, n_out=5)
    learn = student(dls, teacher, loss=None, hints=two_hints())
    assert repr(learn.knowledge_distillation).startswith('KnowledgeDistillation(loss=None, hints=[')  # no weight: no term
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=ShortEpochCallback(pct=0.2))
    assert learn.knowledge_distillation.smooth_parts[1] > 0


@pytest.mark.parametrize('hint', [Hint('0.1', '0.1', FitNet()), Hint('0.1', '0.2', CosineHint()),
                                  Hint('0.1', '0.1', AttentionTransfer(), weight=1e3)],
                         ids=['FitNet', 'CosineHint', 'AttentionTransfer'])
def test_a_short_fit_with_each_hint_loss_moves_the_metric_and_leaves_the_teacher_as_it_was(dls, teacher, teacher_calls, hint):
    teacher_state = state(teacher.model)
    learn = student(dls, teacher, loss=SoftTarget(T=4), hints=[hint])
    _, accuracy_before = learn.validate()
    teacher_calls.clear()
    with learn.no_bar(): learn.fit_one_cycle(3, 3e-2)
    hint_column = learn.recorder.metric_names.index('train_hint') - 1
    first, *_, last = (values[hint_column] for values in learn.recorder.values)
    _, accuracy_after = learn.validate()
    # from chance (0.1): over seeds 0-4, 3 epochs gained 0.38 to 0.67 for each loss (2 epochs: 0.13 to 0.35, too close to call)
    assert accuracy_after > accuracy_before + 0.2 and last < first
    assert len(teacher_calls) == 1 + 3 * len(dls.train) and not any(teacher_calls)  # the check, then one per step
    assert_same_state(teacher.model, teacher_state)


def test_mixup_composes_with_hints(dls, teacher, teacher_calls):
    learn = student(dls, teacher, hints=two_hints())
    teacher_calls.clear()
    with learn.no_bar(): learn.fit(1, 1e-2, cbs=MixUp())
    hint = learn.recorder.values[0][learn.recorder.metric_names.index('train_hint') - 1]
    assert 0 < hint < float('inf') and len(teacher_calls) == 1 + len(dls.train)


class RaiseAfterPred(Callback):
    "Interrupt the second training step between the student's forward and the loss, while the hooks hold its features"
    def after_pred(self):
        if self.training and self.iter == 1:
            self.hooks_at_raise = forward_hooks(self.model)
            raise KeyboardInterrupt


def test_no_hook_remains_after_any_learner_call(dls, teacher, tmp_path):
    learn = student(dls, teacher, hints=two_hints())
    learn.path = tmp_path
    image, few = PILImage.create(dls.valid_ds.items[0]), dls.test_dl(dls.valid_ds.items[:16], with_labels=True)
    calls = {'summary': learn.summary, 'fit': partial(learn.fit, 1, 1e-2, cbs=ShortEpochCallback(pct=0.1)),
             'lr_find': partial(learn.lr_find, num_it=10, show_plot=False), 'get_preds': partial(learn.get_preds, dl=few),
             'validate': partial(learn.validate, dl=few), 'tta': partial(learn.tta, dl=few, n=1),
             'predict': partial(learn.predict, image), 'export': partial(learn.export, 'student.pkl')}
    with learn.no_bar():
        for name, call in calls.items():
            call()
            assert forward_hooks(learn.model, teacher.model) == 0, name
        interrupt = RaiseAfterPred()
        with pytest.raises(KeyboardInterrupt): learn.fit(1, 1e-2, cbs=interrupt)
    assert interrupt.hooks_at_raise == 2 and forward_hooks(learn.model, teacher.model) == 0
    assert not learn.knowledge_distillation.hints.student_features


class RecordAdapters(Callback):
    "Whether the adapters were in their own optimizer, not the learner's, at each step; their values at the first step"
    order = KnowledgeDistillation.order + 1
    def __init__(self, hints: HintHooks): self.hints, self.in_opt, self.first = hints, [], None
    def after_loss(self):
        if self.first is None: self.first = [p.detach().clone() for p in self.hints.parameters()]
    def before_step(self):
        adapters, learners = param_ids(self.hints.parameters()), param_ids(all_params(self.opt))
        self.in_opt.append(adapters == param_ids(all_params(self.hints.opt)) and not adapters & learners)

    def changed(self) -> bool:
        return all(not torch.equal(p, f) for p, f in zip(self.hints.parameters(), self.first))


def test_adapters_train_across_fits_freeze_and_lr_find_and_never_join_the_student(dls):
    student_model, teacher = hinted_pair()  # a plain-module teacher
    teacher_state = state(teacher)
    learn = Learner(dls, student_model, metrics=accuracy, splitter=default_split,
                    cbs=KnowledgeDistillation(teacher, hints=two_hints()))
    hints = learn.knowledge_distillation.hints
    keys, n_student_params = learn.model.state_dict().keys(), len(list(learn.model.parameters()))
    def fit(run):
        record = RecordAdapters(hints)
        with learn.no_bar(), learn.no_logging(): run(cbs=[record, ShortEpochCallback(pct=0.1)])
        assert record.in_opt and all(record.in_opt) and record.changed()
        assert len(all_params(learn.opt)) == n_student_params  # the learner's optimizer: the student's alone
    fit(partial(learn.fit, 1, 1e-2))
    learn.freeze_to(1)
    fit(partial(learn.fit, 1, 1e-2))
    learn.unfreeze()
    trained = state(hints)
    with warnings.catch_warnings(record=True) as caught, learn.no_bar():
        warnings.simplefilter('always')
        learn.lr_find(num_it=10, show_plot=False)
    assert not [w for w in caught if 'optimizer state' in str(w.message)]  # it reloaded the optimizer it saved
    assert_same_state(hints, trained)  # lr_find leaves the adapters as it leaves the model
    fit(partial(learn.fit_one_cycle, 1, 1e-2))
    fit(partial(learn.fit, 1, 1e-2, reset_opt=True))
    assert learn.model.state_dict().keys() == keys == tiny_cnn(8).state_dict().keys()
    assert_same_state(teacher, teacher_state)


def test_export_holds_the_student_alone_and_loads_to_predict(dls, teacher, tmp_path):
    learn = student(dls, teacher, hints=two_hints())
    learn.path = tmp_path
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=ShortEpochCallback(pct=0.2))
    learn.export('student.pkl')
    exported = (tmp_path/'student.pkl').read_bytes()
    assert b'HintHooks' not in exported and b'FitNet' not in exported
    loaded = load_learner(tmp_path/'student.pkl')
    assert forward_hooks(loaded.model) == 0 and loaded.model.state_dict().keys() == tiny_cnn(8).state_dict().keys()
    image = PILImage.create(dls.valid_ds.items[0])
    torch.testing.assert_close(loaded.predict(image)[2], learn.predict(image)[2])


def test_saved_adapters_load_into_a_fresh_callback_and_train_on(dls, teacher, tmp_path):
    "Resuming feature distillation: a new callback takes the saved adapters (made from their shapes) and trains them"
    learn = student(dls, teacher, hints=two_hints())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=ShortEpochCallback(pct=0.2))
    torch.save(learn.knowledge_distillation.hints.state_dict(), tmp_path/'adapters.pth')
    saved = state(learn.knowledge_distillation.hints)
    resumed = student(dls, teacher, hints=two_hints())
    hints = resumed.knowledge_distillation.hints
    hints.load_state_dict(torch.load(tmp_path/'adapters.pth', weights_only=True))
    assert_same_state(hints, saved)
    assert [type(loss.adapter) for loss in hints.losses] == [nn.Conv2d, nn.Conv2d]
    adapters = list(hints.parameters())
    with resumed.no_bar(), resumed.no_logging(): resumed.fit(1, 1e-2, cbs=ShortEpochCallback(pct=0.2))
    assert param_ids(hints.parameters()) == param_ids(adapters)  # trained on, not made anew
    assert not any(torch.equal(p, saved[k]) for k, p in hints.state_dict().items())


class SaveMidFit(Callback):
    "`learn.save(name, with_opt=True)` at the second training step, while the adapters train"
    def after_batch(self):
        if self.training and self.iter == 1: self.learn.save('mid_fit', with_opt=True)


def optimizer_state(path) -> dict:
    with torch.serialization.safe_globals(_OPTIMIZER_STATE_GLOBALS): return torch.load(path, weights_only=True)['opt']


@pytest.mark.parametrize('with_opt', [True, False])
def test_checkpoints_taken_during_a_fit_hold_the_students_optimizer_state_alone(dls, teacher, tmp_path, with_opt):
    learn = student(dls, teacher, hints=two_hints())
    learn.path = tmp_path
    n_student = len(list(learn.model.parameters()))
    with warnings.catch_warnings(record=True) as caught, learn.no_bar(), learn.no_logging():
        warnings.simplefilter('always')
        learn.fit(1, 1e-2, cbs=[SaveModelCallback(with_opt=with_opt), SaveMidFit()])
    assert not [w for w in caught if 'optimizer state' in str(w.message)]  # the reload at the end took it
    checkpoints = ['mid_fit', 'model'] if with_opt else ['mid_fit']
    for name in checkpoints: assert len(optimizer_state(tmp_path/'models'/f'{name}.pth')['state']) == n_student
    plain = student_learner(dls)
    plain.path = tmp_path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        plain.load('mid_fit', with_opt=True)
    assert not [w for w in caught if 'optimizer state' in str(w.message)]  # a learner without hints takes it whole


def test_a_bad_layer_name_fails_as_the_fit_starts_with_the_closest_names_of_that_model(dls, teacher):
    learn = student(dls, teacher, hints=[Hint('0.1', '0.9', FitNet())])
    closest = difflib.get_close_matches('0.9', [name for name, _ in teacher.model.named_modules() if name], n=3, cutoff=0)
    with learn.no_bar(), pytest.raises(ValueError, match=re.escape(f"teacher model has no layer '0.9'; the closest names are {closest}")):
        learn.fit(1, 1e-2)
    assert learn.train_iter == 0 and forward_hooks(learn.model, teacher.model) == 0


def test_hints_are_refused_for_an_ensemble_and_with_a_cache_and_loss_none_needs_hints(teacher):
    with pytest.raises(ValueError, match=whole(
            "Hints name layers of one teacher, and this is an ensemble of 2: which teacher's layer would it be? Distil "
            "the ensemble's outputs without hints, or give hints with a single teacher.")):
        KnowledgeDistillation([teacher, teacher.model], hints=two_hints())
    with pytest.raises(ValueError, match=whole("A teacher cache stores outputs, and hints need the teacher's features "
                                               'at every step: use cache=True or hints, not both.')):
        KnowledgeDistillation(teacher, hints=two_hints(), cache=True)
    with pytest.raises(ValueError, match=whole('loss=None leaves nothing to distil: pass a distillation loss, or hints '
                                               '(feature distillation without a logit term).')):
        KnowledgeDistillation(teacher, loss=None)


# --- choosing layers


def test_match_layers_lists_layers_whose_maps_have_the_same_size(dls, images):
    student_model, teacher = hinted_pair(8, 32)
    pairs = match_layers(student_model.train(), Learner(dls, teacher), images)
    assert all(m.training for m in student_model.modules()) and not any(m.training for m in teacher.modules())
    assert forward_hooks(student_model, teacher) == 0
    with torch.no_grad(): stages = [(student_model[0][:k](images).shape, teacher[0][:k](images).shape) for k in (1, 2, 3, 4)]
    expected = [(f'0.{k}', s_shape, f'0.{k}', t_shape) for k, (s_shape, t_shape) in enumerate(stages)]
    assert list(pairs.itertuples(index=False, name=None)) == expected
    assert stages[1] == ((len(images), 16, 8, 8), (len(images), 64, 8, 8))
    deeper = match_layers(student_model, teacher, images, depth=3)
    assert ('0.0.0', '0.0.2') in set(zip(deeper.student_layer, deeper.teacher_layer))
    assert all(s[2:] == t[2:] for s, t in zip(deeper.student_shape, deeper.teacher_shape))


def test_match_layers_pairs_resnet_stages(images):
    student_model, teacher = (create_vision_model(arch, 10, pretrained=False) for arch in (resnet18, resnet34))
    pairs = match_layers(student_model, teacher, images[:4])
    shapes = {(row.student_layer, row.teacher_layer): (row.student_shape, row.teacher_shape) for row in pairs.itertuples()}
    assert shapes[('0.6', '0.6')] == ((4, 256, 2, 2), (4, 256, 2, 2))
    assert shapes[('0.7', '0.7')] == ((4, 512, 1, 1), (4, 512, 1, 1))
    assert ('0.5', '0.6') not in shapes and all(s[2:] == t[2:] for s, t in shapes.values())


def conv1d_net(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(3, width, 3, padding=1), nn.ReLU(), nn.Conv1d(width, width, 3, stride=2, padding=1))


def test_match_layers_takes_a_tuple_of_inputs_one_dimensional_maps_and_models_without_weights():
    set_seed(0, reproducible=True)
    x = torch.randn(2, 3, 16)
    pairs = match_layers(conv1d_net(4), conv1d_net(8), (x,))  # a tuple is the model's inputs, as a fastai batch
    assert list(zip(pairs.student_layer, pairs.teacher_layer, pairs.teacher_shape)) == [
        ('0', '0', (2, 8, 16)), ('0', '1', (2, 8, 16)), ('1', '0', (2, 8, 16)), ('1', '1', (2, 8, 16)),
        ('2', '2', (2, 8, 8))]
    pooled = match_layers(nn.Sequential(nn.MaxPool1d(2)), conv1d_net(8), x)  # a student without parameters
    assert list(zip(pooled.student_layer, pooled.teacher_layer)) == [('0', '2')]


def test_match_layers_without_a_pair_gives_an_empty_table_with_its_columns():
    set_seed(0, reproducible=True)
    pairs = match_layers(conv1d_net(4), nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), torch.randn(2, 3, 16))
    assert pairs.empty and list(pairs.columns) == ['student_layer', 'student_shape', 'teacher_layer', 'teacher_shape']
