"The KnowledgeDistillation callback on real fastai Learners over the digits image folder."
import re
from functools import partial

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import CancelFitException
from fastai.callback.schedule import SchedLin
from fastai.callback.training import GradientAccumulation
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Callback, Learner, load_learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.core import PILImage
from fastcore.xtras import Path

from conftest import tiny_cnn
from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls
from fastkd.losses import DKD, SoftTarget
from fastkd.split import default_split

matplotlib.use('Agg')


@pytest.fixture(scope='module')
def dls(digits_path):
    return digits_dls(digits_path, size=32, bs=64)


@pytest.fixture(scope='module')
def teacher(dls):
    "A tiny CNN trained on the digits to about 90% validation accuracy"
    set_seed(0, reproducible=True)
    learn = Learner(dls, tiny_cnn(32), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-2)
    return learn


@pytest.fixture
def teacher_calls(teacher):
    "The `training` flag of the teacher at each of its forward passes during the test"
    calls = []
    hook = teacher.model.register_forward_hook(lambda module, inputs, output: calls.append(module.training))
    yield calls
    hook.remove()


def student(dls, teacher, width=8, **kwargs) -> Learner:
    "A smaller student with the KD callback attached through the constructor, as users do"
    return Learner(dls, tiny_cnn(width), metrics=accuracy, splitter=default_split,
                   cbs=KnowledgeDistillation(teacher, **kwargs))


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


class RecordFirstBatch(Callback):
    "Keep what the learner holds after the loss of the first training batch, then stop the fit"
    order = KnowledgeDistillation.order + 1
    def after_loss(self):
        self.inputs, self.targets, self.logits = self.learn.xb, self.learn.yb, self.learn.pred.detach()
        self.total_loss, self.progress = self.learn.loss_grad.detach(), self.learn.pct_train
        raise CancelFitException()



def first_batch(learn: Learner) -> RecordFirstBatch:
    recorder = RecordFirstBatch()
    learn.fit(1, 1e-3, cbs=recorder)
    return recorder


# --- training ----------------------------------------------------------------------------------------------

def test_fit_distils_the_teacher_and_leaves_it_untouched(dls, teacher, teacher_calls):
    teacher_state = state(teacher.model)
    teacher_valid_loss, teacher_accuracy = teacher.validate()
    learn = student(dls, teacher, loss=SoftTarget(T=4), weight=0.5)
    valid_loss_before, accuracy_before = learn.validate()
    teacher_calls.clear()
    learn.fit_one_cycle(3, 3e-2)
    valid_loss_after, accuracy_after = learn.validate()
    assert teacher_accuracy > 0.85
    assert valid_loss_after < valid_loss_before - 0.5 and accuracy_after > accuracy_before + 0.3
    assert len(teacher_calls) == 3 * len(dls.train)  # one teacher forward per training step, none in validation
    assert not any(teacher_calls)  # always in eval mode
    assert_same_state(teacher.model, teacher_state)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())


def test_recorder_shows_both_loss_parts_and_their_mix(dls, teacher):
    learn = student(dls, teacher, weight=0.3)
    learn.fit(2, 1e-2)
    names = list(learn.recorder.metric_names)
    assert names == ['epoch', 'train_loss', 'train_ce', 'train_kd', 'valid_loss', 'accuracy', 'time']
    for train_loss, train_ce, train_kd, valid_loss, _ in learn.recorder.values:
        assert train_loss == pytest.approx(0.7 * train_ce + 0.3 * train_kd, rel=1e-4)
        assert train_kd > 0
    assert learn.recorder.values[-1][3] == pytest.approx(learn.validate()[0], rel=1e-5)  # valid_loss is plain CE


def test_training_loss_is_the_weighted_mix(dls, teacher):
    kd_loss = SoftTarget(T=2)
    learn = student(dls, teacher, loss=kd_loss, weight=SchedLin(0.2, 0.8))
    batch = first_batch(learn)
    teacher_logits = teacher.model(*batch.inputs)
    weight = 0.2 + 0.6 * batch.progress
    expected = (1 - weight) * F.cross_entropy(batch.logits, *batch.targets) + weight * kd_loss(batch.logits, teacher_logits)
    assert batch.total_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def kd_without_target(student_logits, teacher_logits):
    return F.mse_loss(student_logits.softmax(-1), teacher_logits.softmax(-1))


def kd_with_target(student_logits, teacher_logits, target):
    return F.cross_entropy(student_logits, teacher_logits.argmax(-1)) + 0 * target.float().mean()


@pytest.mark.parametrize('loss,reference', [
    (SoftTarget, SoftTarget()), (partial(SoftTarget, T=20), SoftTarget(T=20)), (SoftTarget(T=2), SoftTarget(T=2)),
    (DKD, DKD()), (kd_without_target, kd_without_target), (kd_with_target, kd_with_target)])
def test_loss_can_be_a_class_a_partial_an_instance_or_a_function(dls, teacher, loss, reference):
    learn = Learner(dls, tiny_cnn(8), cbs=KnowledgeDistillation(teacher.model, loss, from_learner=False, weight=1.0))
    batch = first_batch(learn)
    teacher_logits = teacher.model(*batch.inputs)
    args = (batch.logits, teacher_logits) + (tuple(batch.targets) if reference is kd_with_target or isinstance(reference, DKD) else ())
    assert batch.total_loss.item() == pytest.approx(reference(*args).item(), rel=1e-5)


def test_ensemble_averages_probabilities(dls, teacher):
    second = tiny_cnn(16)
    kd = KnowledgeDistillation([teacher, second])
    assert kd.teachers == [teacher.model, second]
    xb = dls.one_batch()[:1]
    expected = (teacher.model(*xb).softmax(-1) + second.eval()(*xb).softmax(-1)) / 2
    torch.testing.assert_close(kd.teacher_logits(xb).softmax(-1), expected)
    assert not any(p.requires_grad for p in second.parameters())


def test_teacher_stays_in_eval_mode_when_the_user_sets_it_to_train(dls, teacher, teacher_calls):
    teacher_state = state(teacher.model)
    learn = student(dls, teacher)
    teacher.model.train()
    learn.fit(1, 1e-2)
    assert teacher_calls and not any(teacher_calls)
    assert_same_state(teacher.model, teacher_state)  # batchnorm running statistics included


# --- every other fastai habit keeps working, without the teacher ----------------------------------------

def test_summary_on_a_fresh_learner(dls, teacher, teacher_calls):
    text = student(dls, teacher).summary()
    assert 'KnowledgeDistillation' in text and 'Total params' in text
    assert teacher_calls == []


def test_lr_find(dls, teacher):
    learn = student(dls, teacher)
    before = state(learn.model)
    suggestion = learn.lr_find(num_it=20, show_plot=False)
    assert 1e-7 < suggestion.valley < 10
    assert_same_state(learn.model, before)  # lr_find restores the model


def test_freeze_to_trains_the_head_only(dls, teacher):
    learn = student(dls, teacher)
    learn.freeze_to(1)
    body_conv = learn.model[0][0][0].weight
    body_before, head_before = body_conv.detach().clone(), learn.model[1].weight.detach().clone()
    assert not body_conv.requires_grad and learn.model[1].weight.requires_grad
    learn.fit(1, 1e-2)
    assert torch.equal(body_conv, body_before) and not torch.equal(learn.model[1].weight, head_before)
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())


@pytest.fixture(scope='module')
def trained_student(dls, teacher):
    set_seed(1, reproducible=True)
    learn = student(dls, teacher)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 3e-2)
    return learn


def test_validate_and_get_preds_are_the_learners_own(dls, trained_student, teacher_calls):
    learn = trained_student
    valid_loss, _ = learn.validate()
    probs, targets, losses = learn.get_preds(with_loss=True)
    torch.testing.assert_close(losses, -probs[torch.arange(len(targets)), targets].log(), rtol=1e-4, atol=1e-5)
    assert valid_loss == pytest.approx(losses.mean().item(), rel=1e-4)
    test_files = sorted((Path(dls.path)/'test').glob('*/*.png'))
    unlabelled_probs, no_targets = learn.get_preds(dl=dls.test_dl(test_files))
    assert unlabelled_probs.shape == (len(test_files), 10) and no_targets is None
    assert teacher_calls == []


def test_tta_predict_interpretation_and_show_results(dls, trained_student, teacher_calls):
    learn = trained_student
    tta_probs, targets = learn.tta(n=2)
    assert tta_probs.shape == (len(dls.valid_ds), 10)
    label, label_idx, probs = learn.predict(PILImage.create(dls.valid_ds.items[0]))
    assert label in dls.vocab and probs.sum().item() == pytest.approx(1, rel=1e-5)
    interp = ClassificationInterpretation.from_learner(learn)
    assert interp.confusion_matrix().sum() == len(dls.valid_ds)
    learn.show_results(max_n=4)
    assert teacher_calls == []


def test_save_load_and_export_without_the_teacher(dls, teacher, trained_student, tmp_path):
    learn = trained_student
    learn.path = tmp_path
    probs, _ = learn.get_preds()
    learn.save('student')
    fresh = student(dls, teacher)
    fresh.path = tmp_path
    fresh.load('student')
    torch.testing.assert_close(fresh.get_preds()[0], probs)

    learn.export('with_kd.pkl')
    plain = Learner(dls, learn.model, metrics=accuracy, splitter=default_split, path=tmp_path)
    plain.export('without_kd.pkl')
    with_kd, without_kd = (tmp_path/'with_kd.pkl').stat().st_size, (tmp_path/'without_kd.pkl').stat().st_size
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.model.parameters())
    assert with_kd - without_kd < teacher_bytes / 10
    assert learn.knowledge_distillation.teachers == [teacher.model]  # export did not strip the live callback
    loaded = load_learner(tmp_path/'with_kd.pkl')
    assert loaded.knowledge_distillation.teachers is None
    image = PILImage.create(dls.valid_ds.items[0])
    torch.testing.assert_close(loaded.predict(image)[2], learn.predict(image)[2])


# --- bad input ----------------------------------------------------------------------------------------------

def test_teacher_of_the_wrong_type_fails_at_construction():
    with pytest.raises(TypeError, match=r'nn\.Module.*Learner.*got str'):
        KnowledgeDistillation('resnet34')


def test_weight_out_of_range_fails_at_construction(teacher):
    with pytest.raises(ValueError, match='between 0 and 1'):
        KnowledgeDistillation(teacher, weight=1.5)


def test_class_count_mismatch_names_both_shapes(dls):
    learn = student(dls, tiny_cnn(8, n_out=5))
    with pytest.raises(ValueError, match=re.escape('teacher (64, 5), student (64, 10)')):
        learn.fit(1)


def test_non_finite_teacher_outputs_name_the_batch(dls):
    broken = tiny_cnn(8)
    with torch.no_grad(): broken[1].bias.fill_(float('nan'))
    with pytest.raises(ValueError, match='non-finite.*batch 0 of epoch 0'):
        student(dls, broken).fit(1)


def test_gradient_accumulation_is_refused_clearly(dls, teacher):
    with pytest.raises(ValueError, match='does not support GradientAccumulation'):
        student(dls, teacher).fit(1, cbs=GradientAccumulation(128))


def test_exported_callback_asks_for_its_teacher_before_training(dls, trained_student, tmp_path):
    trained_student.path = tmp_path
    trained_student.export('student.pkl')
    loaded = load_learner(tmp_path/'student.pkl')
    learn = Learner(dls, loaded.model, cbs=loaded.knowledge_distillation)
    with pytest.raises(RuntimeError, match='never stores the teacher'):
        learn.fit(1)
