"Distillation beyond single-label image classification, on real small Learners: segmentation, multi-label, regression, tabular, text."
import copy
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import CancelFitException
from fastai.callback.mixup import MixUp
from fastai.data.block import CategoryBlock, DataBlock, MultiCategoryBlock, RegressionBlock
from fastai.data.transforms import FuncSplitter, get_image_files
from fastai.layers import ConvLayer, NormType
from fastai.learner import Callback, Learner
from fastai.losses import (BCEWithLogitsLossFlat, CrossEntropyLossFlat, LabelSmoothingCrossEntropy,
                           LabelSmoothingCrossEntropyFlat, MSELossFlat)
from fastai.tabular.all import TabularDataLoaders, tabular_learner
from fastai.text.all import AWD_LSTM, TextDataLoaders, text_classifier_learner
from fastai.vision.all import ImageBlock, Resize
from sklearn.datasets import load_diabetes, load_wine

from fastkd.callback import KnowledgeDistillation
from fastkd.losses import DIST, DKD, BinarySoftTarget, LogitMSE, SoftTarget
from fastkd.tasks import Task, task_of

from conftest import SEGMENTATION_CODES, stroke_masks, tiny_cnn, whole


class Record(Callback):
    "Around the distillation callback on the first training batch: the loss before it and after it, then stop"
    def __init__(self, when: str): self.when, self.order = when, KnowledgeDistillation.order + (1 if when == 'after' else -1)
    def after_loss(self):
        self.inputs, self.targets, self.pred = self.learn.xb, self.learn.yb, self.learn.pred.detach()
        self.loss_grad, self.loss = self.learn.loss_grad.detach().clone(), self.learn.loss.detach().clone()
        if self.when == 'after': raise CancelFitException()


def first_batch(learn: Learner) -> tuple[Record, Record]:
    "What the learner held just before and just after the distillation callback mixed its loss, on one batch"
    before, after = Record('before'), Record('after')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # untrained teachers are no better than chance: the warning is not under test
        learn.fit(1, 1e-3, cbs=[before, after])
    return before, after


def teacher_pred(model, xb):
    "The teacher's prediction as the callback computes it: eval mode, no gradient, first element of a tuple"
    with torch.no_grad(): out = model.eval()(*xb)
    return (out[0] if isinstance(out, tuple) else out).float()


def fit_quietly(learn: Learner, epochs: int = 1, lr: float = 1e-2):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(epochs, lr)


# --- Task on its own: what a loss is given and what it is refused --------------------------------------------

@pytest.mark.parametrize('loss_func,task', [
    (CrossEntropyLossFlat(), Task('categorical', -1, 'train_ce', -100)),
    (CrossEntropyLossFlat(axis=1, ignore_index=255), Task('categorical', 1, 'train_ce', 255)),
    (torch.nn.CrossEntropyLoss(), Task('categorical', 1, 'train_ce', -100)),
    (F.cross_entropy, Task('categorical', 1, 'train_ce', -100)),
    (LabelSmoothingCrossEntropy(), Task('categorical', 1, 'train_ce')),  # its softmax is over dim 1; no void class
    (LabelSmoothingCrossEntropyFlat(), Task('categorical', -1, 'train_ce')),
    (BCEWithLogitsLossFlat(), Task('binary', -1, 'train_bce')), (MSELossFlat(), Task('regression', -1, 'train_mse')),
    (torch.nn.SmoothL1Loss(), Task('regression', -1, 'train_smooth_l1')),
    (F.l1_loss, Task('regression', -1, 'train_l1')),
    (lambda p, y: (p - y).abs().mean(), Task('unknown'))])
def test_task_of_reads_the_kind_the_class_axis_and_the_column_from_the_loss_function(loss_func, task):
    assert task_of(loss_func) == task


class Interrupt(Callback):
    "An error in the first training batch, as when a notebook's kernel is interrupted: fastai's cancel events do not run"
    def after_loss(self): raise RuntimeError('interrupted')


def test_the_task_is_read_through_the_mixed_loss_that_an_interrupted_mixup_fit_leaves_on_the_learner(dls):
    learn = Learner(dls, tiny_cnn(8), loss_func=CrossEntropyLossFlat(), cbs=MixUp())
    with pytest.raises(RuntimeError, match='interrupted'): learn.fit(1, 1e-3, cbs=Interrupt())
    assert learn.loss_func == learn.mix_up.lf  # MixUp's mixed loss is still the learner's ...
    assert task_of(learn.loss_func) == Task('categorical', -1, 'train_ce', -100)  # ... and read as the loss it mixes


def test_ensembles_of_two_copies_are_the_teacher_itself():
    "Averaging probabilities (or outputs) of identical teachers changes nothing: the division is by the count"
    logits = torch.randn(4, 3, 2, 2)
    for task in (Task('categorical', 1), Task('binary', -1), Task('regression', -1)):
        torch.testing.assert_close(task.ensemble([logits, logits.clone()]), task.ensemble([logits]) if task.kind
                                   != 'categorical' else logits.log_softmax(dim=1))


def test_only_categorical_outputs_are_laid_out_as_rows_other_losses_see_the_learners_shapes():
    dense = torch.randn(2, 3, 4, 5)
    rows = Task('categorical', 1).items(dense)
    assert torch.equal(rows, dense.movedim(1, -1).reshape(-1, 3))
    assert torch.equal(Task('categorical', 1).targets(torch.zeros(2, 4, 5)), torch.zeros(40))
    for task in (Task('binary', -1), Task('regression', -1)):
        assert task.items(dense) is dense and task.targets(dense) is dense  # a user's loss gets them as they are


@pytest.mark.parametrize('kind,n_outputs', [('regression', 2), ('regression', 1), ('categorical', 1), ('binary', 1)])
def test_probability_losses_are_refused_for_any_regression_and_for_a_single_output(kind, n_outputs):
    with pytest.raises(ValueError, match=r'^SoftTarget turns outputs into probabilities.*Use LogitMSE\(\)\.$'):
        Task(kind).check(SoftTarget(), n_outputs)
    Task(kind).check(LogitMSE(), n_outputs)  # raw outputs: fine
    Task(kind).check(lambda s, t: (s - t).abs().mean(), n_outputs)  # a function says nothing: taken as it is


# --- segmentation: (B, C, H, W) outputs, CrossEntropyLossFlat(axis=1) ------------------------------------------

CODES = SEGMENTATION_CODES


@pytest.fixture(scope='module')
def segmentation_dls(digits_path, tmp_path_factory):
    "The digits with a mask per image: stroke pixels labelled by the digit's parity, the rest background"
    return stroke_masks(digits_path, tmp_path_factory.mktemp('masks'), every=6)


def fcn(width: int, norm_type=NormType.Batch) -> torch.nn.Sequential:
    "A fully convolutional net: per-pixel logits of the 3 codes at the input's size"
    return torch.nn.Sequential(ConvLayer(3, width, norm_type=norm_type), ConvLayer(width, width, norm_type=norm_type),
                               torch.nn.Conv2d(width, len(CODES), 1))


def soft_target_per_pixel(student, teacher, T):
    "The issue's formula: T**2 * mean over b,h,w of sum_c p_t * (log p_t - log p_s), p = softmax(logits / T, dim=1)"
    log_p_s, log_p_t = F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1)
    return T**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def test_segmentation_distils_per_pixel_over_the_class_axis(segmentation_dls):
    torch.manual_seed(0)
    teacher = fcn(16)
    learn = Learner(segmentation_dls, fcn(8), cbs=KnowledgeDistillation(teacher, weight=0.5))
    assert learn.loss_func.axis == 1 and isinstance(learn.knowledge_distillation.kd_loss, SoftTarget)
    before, after = first_batch(learn)
    assert after.pred.shape[1] == len(CODES) and after.pred.ndim == 4
    kd = soft_target_per_pixel(after.pred, teacher_pred(teacher, after.inputs), T=4)
    assert after.loss_grad.item() == pytest.approx((0.5 * before.loss + 0.5 * kd).item(), rel=1e-5)


def test_segmentation_student_equal_to_its_teacher_has_no_distillation_loss(segmentation_dls):
    torch.manual_seed(1)
    teacher = fcn(8, norm_type=None)  # no batchnorm: training and eval mode compute the same logits
    learn = Learner(segmentation_dls, copy.deepcopy(teacher), cbs=KnowledgeDistillation(teacher, weight=1.0))
    before, after = first_batch(learn)
    assert after.loss_grad.item() == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize('loss', [DKD(), DIST()])
def test_segmentation_dkd_and_dist_treat_every_pixel_as_an_item(segmentation_dls, loss):
    torch.manual_seed(2)
    teacher = fcn(16)
    learn = Learner(segmentation_dls, fcn(8), cbs=KnowledgeDistillation(teacher, loss, weight=1.0))
    _, after = first_batch(learn)
    rows = lambda logits: logits.permute(0, 2, 3, 1).reshape(-1, len(CODES))
    expected = loss(rows(after.pred), rows(teacher_pred(teacher, after.inputs)), after.targets[0].reshape(-1))
    assert after.loss_grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_segmentation_learner_trains_and_predicts_after_distillation(segmentation_dls):
    torch.manual_seed(3)
    teacher = Learner(segmentation_dls, fcn(16))
    fit_quietly(teacher, epochs=2)
    learn = Learner(segmentation_dls, fcn(8), cbs=KnowledgeDistillation(teacher))
    fit_quietly(learn, epochs=2)
    assert learn.recorder.metric_names[1:4] == ['train_loss', 'train_ce', 'train_kd']
    preds, targets = learn.get_preds()
    assert preds.shape == (len(segmentation_dls.valid_ds), len(CODES), 16, 16)
    background = (targets == 0).float().mean().item()  # the accuracy of predicting the background everywhere: 0.63
    accuracy = (preds.argmax(1) == targets).float().mean().item()  # 0.78 (a stroke's parity needs the whole digit)
    strokes_found = ((preds.argmax(1) > 0) == (targets > 0)).float().mean().item()  # 0.96
    assert accuracy > background + 0.1 and strokes_found > background + 0.2
    assert learn.validate()[0] == pytest.approx(F.cross_entropy(preds.log(), targets.long()).item(), rel=1e-3)
    mask, *_ = learn.predict(segmentation_dls.valid_ds.items[0])
    assert mask.shape == (16, 16)


# --- multi-label: BCEWithLogitsLossFlat ---------------------------------------------------------------------

def digit_labels(f):
    "Three labels that are not exclusive: parity, size, loop (no return annotation: fastai would cast to it)"
    d = int(f.parent.name)
    return ['even' if d % 2 == 0 else 'odd'] + (['big'] if d >= 5 else []) + (['loop'] if d in (0, 6, 8, 9) else [])


@pytest.fixture(scope='module')
def multilabel_dls(digits_path):
    files = [f for f in get_image_files(digits_path) if f.parent.parent.name in ('train', 'valid')][::4]
    block = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_items=lambda _: files, get_y=digit_labels,
                      splitter=FuncSplitter(lambda f: f.parent.parent.name == 'valid'), item_tfms=Resize(16))
    return block.dataloaders(digits_path, bs=32)


def cnn(width: int, n_out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(ConvLayer(3, width, stride=2), ConvLayer(width, width, stride=2),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, n_out))


def test_multilabel_picks_a_per_label_sigmoid_loss(multilabel_dls):
    torch.manual_seed(4)
    teacher = cnn(16, 4)
    kd = KnowledgeDistillation(teacher, weight=0.3)
    learn = Learner(multilabel_dls, cnn(8, 4), cbs=kd)
    assert isinstance(kd.kd_loss, BinarySoftTarget) and 'BinarySoftTarget' in repr(kd)
    before, after = first_batch(learn)
    expected = 0.7 * before.loss + 0.3 * BinarySoftTarget()(after.pred, teacher_pred(teacher, after.inputs))
    assert after.loss_grad.item() == pytest.approx(expected.item(), rel=1e-5)
    fit_quietly(learn)
    assert learn.recorder.metric_names[2:4] == ['train_bce', 'train_kd']
    labels, _, probs = learn.predict(multilabel_dls.valid_ds.items[0])
    assert probs.shape == (4,) and set(labels) <= set(multilabel_dls.vocab)


def test_a_multilabel_ensemble_averages_the_teachers_sigmoids(multilabel_dls):
    torch.manual_seed(6)
    teachers = [cnn(16, 4), cnn(8, 4)]
    kd = KnowledgeDistillation(teachers)
    Learner(multilabel_dls, cnn(8, 4), cbs=kd)
    xb = multilabel_dls.one_batch()[:1]
    expected = sum(teacher_pred(t, xb).sigmoid() for t in teachers) / 2
    torch.testing.assert_close(kd.teacher_output(xb).sigmoid(), expected)


@pytest.mark.parametrize('loss', [SoftTarget(), DKD(), DIST()])
def test_multilabel_refuses_a_softmax_loss_naming_the_right_ones(multilabel_dls, loss):
    learn = Learner(multilabel_dls, cnn(8, 4), cbs=KnowledgeDistillation(cnn(8, 4), loss))
    message = (f'{type(loss).__name__} takes a softmax across labels, but this learner is multi-label (BCE with '
               'logits): labels are not exclusive. Use BinarySoftTarget() or LogitMSE().')
    with pytest.raises(ValueError, match=whole(message)):
        first_batch(learn)


# --- tabular: regression (diabetes) and classification with (B, 1) targets (wine) -----------------------------

def tabular_dls(frame: pd.DataFrame, y_block, bs: int = 32) -> TabularDataLoaders:
    cont = [c for c in frame.columns if c != 'target']
    return TabularDataLoaders.from_df(frame, y_names='target', cont_names=cont, y_block=y_block, bs=bs,
                                      valid_idx=list(range(0, len(frame), 5)))


@pytest.fixture(scope='module')
def diabetes_dls():
    data = load_diabetes(as_frame=True)
    return tabular_dls(data.frame.assign(target=data.frame.target / 100), RegressionBlock())


def test_regression_picks_logit_matching_and_distils(diabetes_dls):
    torch.manual_seed(5)
    teacher = tabular_learner(diabetes_dls, layers=[32]).model
    kd = KnowledgeDistillation(teacher, weight=0.5)
    learn = tabular_learner(diabetes_dls, layers=[8], cbs=kd)
    assert isinstance(kd.kd_loss, LogitMSE)
    before, after = first_batch(learn)
    expected = 0.5 * before.loss + 0.5 * F.mse_loss(after.pred, teacher_pred(teacher, after.inputs))
    assert after.loss_grad.item() == pytest.approx(expected.item(), rel=1e-5)
    assert after.loss_grad.item() != pytest.approx(0.5 * before.loss.item(), rel=1e-3)  # the term does something
    fit_quietly(learn)
    assert learn.recorder.metric_names[2:4] == ['train_mse', 'train_kd']
    assert learn.get_preds()[0].shape == (len(diabetes_dls.valid_ds), 1)


def test_a_regression_ensemble_averages_the_teachers_outputs(diabetes_dls):
    torch.manual_seed(7)
    teachers = [tabular_learner(diabetes_dls, layers=[32]).model, tabular_learner(diabetes_dls, layers=[16]).model]
    kd = KnowledgeDistillation(teachers)
    tabular_learner(diabetes_dls, layers=[8], cbs=kd)
    xb = diabetes_dls.one_batch()[:2]
    expected = sum(teacher_pred(t, xb) for t in teachers) / 2
    torch.testing.assert_close(kd.teacher_output(xb), expected)


@pytest.mark.parametrize('loss', [SoftTarget(), DIST(), BinarySoftTarget()])
def test_regression_refuses_probability_losses_naming_logit_mse(diabetes_dls, loss):
    learn = tabular_learner(diabetes_dls, layers=[8], cbs=KnowledgeDistillation(tabular_learner(diabetes_dls).model, loss))
    message = (f'{type(loss).__name__} turns outputs into probabilities, which a regression output (or a single '
               'output column) does not have: distillation would do nothing. Use LogitMSE().')
    with pytest.raises(ValueError, match=whole(message)):
        first_batch(learn)


@pytest.fixture(scope='module')
def wine_dls():
    data = load_wine(as_frame=True)
    return tabular_dls(data.frame, CategoryBlock())


@pytest.mark.parametrize('loss', [SoftTarget(), DKD(), DIST(), LogitMSE()])
def test_tabular_classification_with_column_targets(wine_dls, loss):
    torch.manual_seed(6)
    teacher = tabular_learner(wine_dls, layers=[32]).model
    learn = tabular_learner(wine_dls, layers=[8], cbs=KnowledgeDistillation(teacher, loss, weight=1.0))
    _, after = first_batch(learn)
    assert after.targets[0].shape[1:] == (1,)  # fastai's tabular targets are a column
    expected = loss(after.pred, teacher_pred(teacher, after.inputs), after.targets[0].flatten())
    assert after.loss_grad.item() == pytest.approx(expected.item(), rel=1e-5)


# --- text: AWD-LSTM classifiers, whose forward returns a tuple, with RNNRegularizer's AR/TAR --------------------

TINY_AWD = dict(emb_sz=16, n_hid=16, n_layers=1, pad_token=1, bidir=False, output_p=0.1, hidden_p=0.1, input_p=0.1,
                embed_p=0.0, weight_p=0.1)


@pytest.fixture(scope='module')
def text_dls():
    "A small generated corpus of short reviews, positive or negative by their adjectives"
    rng = np.random.default_rng(0)
    good, bad = ['great', 'lovely', 'superb', 'fun'], ['awful', 'dull', 'boring', 'bad']
    nouns = ['film', 'plot', 'cast', 'ending', 'music']
    rows = []
    for i in range(200):
        label = i % 2
        words = [f'the {rng.choice(nouns)} was {rng.choice(good if label else bad)}' for _ in range(rng.integers(1, 4))]
        rows.append({'text': ' and '.join(words), 'label': 'pos' if label else 'neg'})
    return TextDataLoaders.from_df(pd.DataFrame(rows), text_col='text', label_col='label', valid_pct=0.2, seed=0,
                                   bs=16, seq_len=16)


def text_learner(dls, **kwargs) -> Learner:
    return text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=TINY_AWD, alpha=2., beta=1., **kwargs)


def test_text_teacher_tuple_output_and_regularisers_keep_their_weight(text_dls):
    torch.manual_seed(7)
    teacher = text_learner(text_dls)
    learn = text_learner(text_dls, cbs=KnowledgeDistillation(teacher, weight=0.5))
    before, after = first_batch(learn)
    regularisers = before.loss_grad - before.loss  # AR/TAR that RNNRegularizer added to the loss function's value
    assert regularisers.item() > 0
    kd = SoftTarget()(after.pred, teacher_pred(teacher.model, after.inputs))
    expected = 0.5 * before.loss + 0.5 * kd + regularisers
    assert after.loss_grad.item() == pytest.approx(expected.item(), rel=1e-5)
    fit_quietly(learn)
    assert learn.recorder.metric_names[2:4] == ['train_ce', 'train_kd']
    label, _, probs = learn.predict('the plot was great')
    assert label in ('pos', 'neg') and probs.shape == (2,)


# --- what cannot be known gets a clear refusal ---------------------------------------------------------------

def test_unknown_base_loss_without_an_explicit_loss_asks_for_one(wine_dls):
    learn = tabular_learner(wine_dls, layers=[8], loss_func=lambda pred, y: pred.sum() * 0 + y.float().mean(),
                            cbs=KnowledgeDistillation(tabular_learner(wine_dls).model))
    message = ("fastkd cannot tell what this learner's loss function predicts, so it picks no distillation loss: "
               'pass one, e.g. KnowledgeDistillation(teacher, SoftTarget(T=4)) for classification, '
               'BinarySoftTarget() for multi-label, LogitMSE() for regression.')
    with pytest.raises(ValueError, match=whole(message)):
        first_batch(learn)


def test_explicit_loss_wins_over_the_automatic_choice(wine_dls):
    kd = KnowledgeDistillation(tabular_learner(wine_dls).model, LogitMSE())
    tabular_learner(wine_dls, layers=[8], cbs=kd)
    assert isinstance(kd.kd_loss, LogitMSE) and repr(kd) == 'KnowledgeDistillation(loss=LogitMSE(), weight=0.5)'


def test_a_per_label_loss_is_refused_for_a_single_label_learner_naming_the_right_ones():
    with pytest.raises(ValueError, match=r'^BinarySoftTarget treats every output as an independent label.*'
                                         r'Use SoftTarget\(T=4\), DKD\(\), DIST\(\) or LogitMSE\(\)\.$'):
        Task('categorical').check(BinarySoftTarget(), 10)
    Task('binary', -1).check(BinarySoftTarget(), 4)
    Task('binary', -1).check(BinarySoftTarget(), 1)  # a single-logit binary classifier: one sigmoid
