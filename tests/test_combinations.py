"""Features meeting each other: the combinations a user reaches in the first week, each cell asserting what the user
reads (columns that line up, finite parts, a teacher left as given, an export that loads without fastkd).

The first part holds one test per defect found where two features meet; the second, the matrix, runs the callback
across teachers, caches, hints, MixUp, `lr_find`, `fine_tune`, `SaveModelCallback`, `train_metrics` and every task
kind and fastai loss, on small real data (a few batches)."""
import copy
import json
import math
import subprocess
import sys
import warnings
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import CancelFitException
from fastai.callback.mixup import MixUp
from fastai.callback.tracker import SaveModelCallback
from fastai.data.block import CategoryBlock, DataBlock, MultiCategoryBlock
from fastai.data.transforms import (ColReader, ColSplitter, GrandparentSplitter, get_image_files,
                                    parent_label)
from fastai.layers import ConvLayer
from fastai.learner import Callback, Learner
from fastai.losses import (BCEWithLogitsLossFlat, CrossEntropyLossFlat, FocalLossFlat, LabelSmoothingCrossEntropy,
                           LabelSmoothingCrossEntropyFlat)
from fastai.metrics import accuracy, accuracy_multi, error_rate
from fastai.tabular.all import RegressionBlock
from fastai.text.all import AWD_LSTM, TextDataLoaders, language_model_learner
from fastai.torch_core import set_seed
from fastai.vision.all import ImageBlock, Resize
from torch import nn

from fastkd.basics import placement
from fastkd.cache import TeacherCache
from fastkd.digits import digits_dls
from fastkd.callback import KnowledgeDistillation
from fastkd.hints import FitNet, Hint
from fastkd.kd_find import TeacherAgreement
from fastkd.losses import DIST, DKD, SoftTarget
from fastkd.split import default_split
from fastkd.tasks import Task, task_of

from conftest import SEGMENTATION_CODES, assert_same_state, state, stroke_masks, tiny_cnn, whole
from test_mixed_precision import DoubleImages


def quietly(learn: Learner, action, *args, **kwargs):
    "Run `learn.<action>` without bars, logs or warnings (untrained teachers are no better than chance)"
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return getattr(learn, action)(*args, **kwargs)


def columns(learn: Learner) -> dict:
    "The last epoch's values by column name, asserting first that names and values line up"
    names = list(learn.recorder.metric_names[1:-1])  # no epoch, no time
    values = learn.recorder.values[-1]
    assert len(names) == len(values), (names, values)
    return dict(zip(names, values))


class Scaled(nn.Module):
    "`model`'s logits times `factor`: a confident teacher"
    def __init__(self, model: nn.Module, factor: float):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x): return self.model(x) * self.factor


# --- the defects, one test each -------------------------------------------------------------------------------

def test_train_metrics_line_up_with_their_columns(dls, teacher):
    learn = Learner(dls, tiny_cnn(8), metrics=[accuracy, error_rate], cbs=KnowledgeDistillation(teacher))
    learn.recorder.train_metrics = True
    quietly(learn, 'fit', 1, 1e-2)
    cols = columns(learn)
    assert list(cols)[:5] == ['train_loss', 'train_ce', 'train_kd', 'train_accuracy', 'train_error_rate']
    assert cols['train_accuracy'] + cols['train_error_rate'] == pytest.approx(1)
    assert cols['valid_accuracy'] + cols['valid_error_rate'] == pytest.approx(1)
    assert cols['train_ce'] > 0 and cols['train_kd'] > 0


@pytest.mark.parametrize('kind,gap', [('categorical', 300.), ('binary', 40.)])
def test_a_confident_ensemble_is_combined_in_log_space(kind, gap):
    "Logit gaps far past float32's softmax and sigmoid: the combined logits match a float64 reference, finite"
    torch.manual_seed(0)
    logits = [torch.randn(6, 5) * gap, torch.randn(6, 5) * gap]
    if kind == 'categorical':
        reference = torch.stack([l.double().log_softmax(1) for l in logits]).logsumexp(0) - math.log(2)
    else:
        p = torch.stack([l.double().sigmoid() for l in logits]).mean(0)
        log_p = torch.stack([F.logsigmoid(l.double()) for l in logits]).logsumexp(0) - math.log(2)
        log_q = torch.stack([F.logsigmoid(-l.double()) for l in logits]).logsumexp(0) - math.log(2)
        reference = torch.where((p > 1e-6) & (p < 1 - 1e-6), p.logit(), log_p - log_q)
    combined = Task(kind, 1 if kind == 'categorical' else -1).ensemble(logits)
    assert torch.isfinite(combined).all()
    torch.testing.assert_close(combined.double(), reference, rtol=1e-5, atol=1e-3)


def test_a_confident_ensemble_distils(dls, teacher):
    "Two teachers with logit gaps in the hundreds: no 'non-finite' refusal, finite parts"
    confident = [Scaled(teacher.model, 200.), Scaled(copy.deepcopy(teacher.model), 150.)]
    learn = Learner(dls, tiny_cnn(8), metrics=accuracy, cbs=KnowledgeDistillation(confident))
    quietly(learn, 'fit', 1, 1e-2)
    assert all(math.isfinite(v) for v in columns(learn).values())


def test_label_smoothing_that_is_not_flat_distils_over_its_class_axis():
    "fastai's LabelSmoothingCrossEntropy takes the softmax over dim 1: a (2, 5, 3, 3) output is 18 rows of 5 classes"
    task = task_of(LabelSmoothingCrossEntropy())
    assert task.items(torch.randn(2, 5, 3, 3)).shape == (18, 5)
    assert task_of(LabelSmoothingCrossEntropyFlat()).items(torch.randn(2, 3, 5)).shape == (6, 5)


CODES = SEGMENTATION_CODES
VOID = 255


@pytest.fixture(scope='module')
def void_dls(digits_path, tmp_path_factory):
    "Digits with a mask per image (stroke parity), whose top-left 6x6 corner is void (255, fastai's CamVid convention)"
    return stroke_masks(digits_path, tmp_path_factory.mktemp('void_masks'), every=12, void=VOID)


def fcn(width: int) -> nn.Sequential:
    "Per-pixel logits of the 3 codes at the input's size"
    return nn.Sequential(ConvLayer(3, width), ConvLayer(width, width), nn.Conv2d(width, len(CODES), 1))


class NoisyAtVoid(nn.Module):
    "`model`'s logits, with large noise added at the void corner only"
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x).clone()
        out[:, :, :6, :6] += 50 * torch.randn_like(out[:, :, :6, :6])
        return out


class FirstLoss(Callback):
    "The distillation part of the first training batch's loss, then stop"
    order = KnowledgeDistillation.order + 1
    def after_loss(self):
        self.kd = self.learn.knowledge_distillation.smooth_parts[1].item() / (1 - KnowledgeDistillation.beta)
        raise CancelFitException()


@pytest.mark.parametrize('loss', [SoftTarget(), DIST(), DKD()], ids=['softtarget', 'dist', 'dkd'])
def test_void_pixels_leave_the_distillation_term(void_dls, loss):
    "A teacher that differs from another only at void pixels gives the same distillation loss"
    torch.manual_seed(0)
    base = fcn(8)
    parts = []
    for teacher in (base, NoisyAtVoid(base)):
        set_seed(1, reproducible=True)
        void_dls.train.rng.seed(1)  # the loader keeps its own generator across fits: the same batches for both
        learn = Learner(void_dls, fcn(4), loss_func=CrossEntropyLossFlat(axis=1, ignore_index=VOID),
                        cbs=KnowledgeDistillation(teacher, loss))
        recorder = FirstLoss()
        quietly(learn, 'fit', 1, 1e-3, cbs=recorder)
        parts.append(recorder.kd)
    assert math.isfinite(parts[0]) and parts[0] == pytest.approx(parts[1], rel=1e-5)


def test_hints_refuse_void_pixels_naming_the_conflict(void_dls):
    torch.manual_seed(0)
    learn = Learner(void_dls, fcn(4), loss_func=CrossEntropyLossFlat(axis=1, ignore_index=VOID),
                    cbs=KnowledgeDistillation(fcn(8), hints=[Hint('1', '1', FitNet())]))
    with pytest.raises(ValueError, match=whole(
            "Training batch 0 has void positions (target 255, the loss function's ignore_index), and hints compare "
            'whole feature maps, void included: distil the logits alone (no hints) for data with void positions.')):
        quietly(learn, 'fit', 1, 1e-3)


TINY_AWD = dict(emb_sz=16, n_hid=16, n_layers=1, pad_token=1, bidir=False, output_p=0.1, hidden_p=0.1, input_p=0.1,
                embed_p=0.0, weight_p=0.1, tie_weights=True, out_bias=True)


@pytest.fixture(scope='module')
def lm_dls():
    "A small generated corpus for a language model"
    rng = np.random.default_rng(0)
    words = ['the', 'film', 'was', 'great', 'dull', 'and', 'plot', 'music']
    rows = [' '.join(rng.choice(words, 12)) for _ in range(120)]
    return TextDataLoaders.from_df(pd.DataFrame({'text': rows}), text_col='text', is_lm=True, valid_pct=0.2, seed=0,
                                   bs=8, seq_len=8)


class HiddenAtFirstBatch(Callback):
    "Whether student and teacher start each training epoch from a fresh (zero) recurrent state"
    order = KnowledgeDistillation.order + 1
    def __init__(self, teacher): self.teacher, self.fresh = teacher, []
    def before_batch(self):
        if self.training and self.iter == 0:
            zero = lambda model: all(not h.any() for pair in model[0].hidden for h in pair)
            self.fresh.append((zero(self.learn.model), zero(self.teacher)))


def test_language_models_start_every_epoch_from_a_fresh_state(lm_dls):
    "The check before the first step runs both models; neither starts training from the state it left"
    set_seed(0, reproducible=True)
    teacher = language_model_learner(lm_dls, AWD_LSTM, pretrained=False, config=dict(TINY_AWD))
    learn = language_model_learner(lm_dls, AWD_LSTM, pretrained=False, config=dict(TINY_AWD),
                                   cbs=KnowledgeDistillation(teacher))
    spy = HiddenAtFirstBatch(teacher.model)
    quietly(learn, 'fit', 2, 1e-3, cbs=spy)
    assert spy.fresh == [(True, True), (True, True)]
    assert all(math.isfinite(v) for v in columns(learn).values())


def test_a_language_model_is_refused_by_the_cache_naming_why(lm_dls):
    set_seed(0, reproducible=True)
    teacher = language_model_learner(lm_dls, AWD_LSTM, pretrained=False, config=dict(TINY_AWD))
    learn = language_model_learner(lm_dls, AWD_LSTM, pretrained=False, config=dict(TINY_AWD),
                                   cbs=KnowledgeDistillation(teacher, cache=True))
    with pytest.raises(ValueError, match=whole(
            "The teacher cache keys outputs by dataset item, and a language model's loader cuts its texts into "
            'sequences that change at every epoch (shuffled and joined anew): no item keeps its input. Use '
            'cache=False for language models.')):
        quietly(learn, 'fit', 1, 1e-3)


def test_teacher_agreement_and_kd_find_run_a_half_precision_teacher_in_the_students_dtype(dls, teacher):
    "Outside a distillation fit too (validate, kd_find's teacher logits), and the teacher stays in float16"
    from fastkd.kd_find import _teacher_logits
    half = copy.deepcopy(teacher.model).half()
    learn = Learner(dls, tiny_cnn(8), metrics=TeacherAgreement(half))
    agreement = quietly(learn, 'validate')[1]
    assert 0 <= agreement <= 1 and {p.dtype for p in half.parameters()} == {torch.float16}
    logits = _teacher_logits(half, learn)
    assert logits.shape == (len(dls.valid_ds), 10) and {p.dtype for p in half.parameters()} == {torch.float16}


def test_the_teacher_gets_its_dtype_back_even_when_the_fit_raises(digits_path):
    class Interrupt(Callback):
        def after_step(self): raise KeyboardInterrupt
    dls = digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)
    for dl in dls.loaders: dl.after_batch.add(DoubleImages())
    teacher = tiny_cnn(8)
    learn = Learner(dls, tiny_cnn(8).double(), cbs=[KnowledgeDistillation(teacher, teacher_channels_last=True)])
    with pytest.raises(KeyboardInterrupt): quietly(learn, 'fit', 1, 1e-3, cbs=Interrupt())
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    assert all(p.is_contiguous() for p in teacher.parameters())


def test_placement_puts_every_parameter_and_buffer_back():
    "What the callback, kd_find, TeacherAgreement and fill_teacher_cache use to leave a teacher where it was given"
    model = tiny_cnn(8)
    model[1].half()  # a teacher of mixed dtypes comes back mixed, not cast to one
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    put_back = placement(model)
    model.double()
    put_back()
    assert {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]} == dtypes
    assert model[1].weight.dtype == torch.float16 and model[0][0][1].running_mean.dtype == torch.float32


class NanAtStep(nn.Module):
    "`model`'s logits, nan from the third call on (the first is the check before training)"
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x) * (float('nan') if self.calls >= 3 else 1.)


def test_a_non_finite_teacher_is_named_after_the_epoch_and_leaves_the_student_finite(dls, teacher):
    "Checked once per epoch (no wait for the device at each step): the first bad batch is named, and no nan trained"
    learn = Learner(dls, tiny_cnn(8), cbs=KnowledgeDistillation(NanAtStep(copy.deepcopy(teacher.model))))
    with pytest.raises(ValueError, match=whole('The teacher gave non-finite logits (nan or inf) at training batch 1 of '
                                               'epoch 0: check its weights and the input normalisation.')):
        quietly(learn, 'fit', 1, 1e-3)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


# --- the matrix: classification on the digits, every feature a user combines ------------------------------------

@pytest.fixture(scope='module')
def small_dls(few_digits):
    "300 training and 100 validation digits, batches of 64 (5 training steps an epoch)"
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=GrandparentSplitter(valid_name='valid'), item_tfms=Resize(32))
    return block.dataloaders(few_digits, bs=64, num_workers=0, path=few_digits)


@pytest.fixture(scope='module')
def exported():
    "The files the cells export, loaded all at once at the end in a Python without fastkd"
    return []


def trained_teacher(dls) -> Learner:
    set_seed(0, reproducible=True)
    learn = Learner(dls, tiny_cnn(16), metrics=accuracy)
    quietly(learn, 'fit_one_cycle', 3, 3e-2)
    return learn


@pytest.fixture(scope='module')
def small_teacher(small_dls):
    return trained_teacher(small_dls)


TEACHERS = {'module': lambda t: t.model, 'learner': lambda t: t,
            'confident ensemble': lambda t: [Scaled(t.model, 200.), Scaled(copy.deepcopy(t.model), 100.)]}
EXTRAS = {
    'plain': dict(),
    'cache in memory': dict(kd=dict(cache=True)),
    'cache on disk, top-k': dict(kd=dict(cache='disk-top-k')),
    'hints': dict(kd=dict(hints=[Hint('0.2', '0.2', FitNet())])),
    'mixup': dict(cbs=[MixUp]),
    'save model with opt': dict(cbs=[partial(SaveModelCallback, with_opt=True)]),
    'save model': dict(cbs=[SaveModelCallback]),
    'hints, save model with opt': dict(kd=dict(hints=[Hint('0.2', '0.2', FitNet())]),
                                       cbs=[partial(SaveModelCallback, with_opt=True)]),
}
ACTIONS = {'fit_one_cycle': lambda learn: quietly(learn, 'fit_one_cycle', 1, 1e-2),
           'fine_tune': lambda learn: quietly(learn, 'fine_tune', 1, 1e-2, freeze_epochs=1),
           'lr_find then fit': lambda learn: (quietly(learn, 'lr_find', num_it=4, show_plot=False),
                                              quietly(learn, 'fit', 1, 1e-2))}
CELLS = ([(t, e, 'fit_one_cycle') for t in TEACHERS for e in EXTRAS
          if not (t == 'confident ensemble' and 'hints' in e)]  # refused: whose layers would the hints be?
         + [('module', e, a) for e in ('plain', 'hints', 'cache in memory') for a in ('fine_tune', 'lr_find then fit')])


def kd_arguments(extra: dict, tmp_path) -> dict:
    kd = dict(extra.get('kd', {}))
    if kd.get('cache') == 'disk-top-k': kd['cache'] = TeacherCache(path=tmp_path/'store', top_k=3)
    return kd


@pytest.mark.parametrize('teacher_kind,extra,action', CELLS, ids=[' / '.join(c) for c in CELLS])
def test_combination(small_dls, small_teacher, exported, tmp_path, teacher_kind, extra, action):
    teacher = TEACHERS[teacher_kind](small_teacher)
    models = [t.model if isinstance(t, Learner) else t for t in (teacher if isinstance(teacher, list) else [teacher])]
    before = [state(m) for m in models]
    modes = [[m.training for m in model.modules()] for model in models]
    cbs = [cb() for cb in EXTRAS[extra].get('cbs', [])]
    set_seed(1, reproducible=True)
    learn = Learner(small_dls, tiny_cnn(8), splitter=default_split, path=tmp_path,
                    metrics=[accuracy, error_rate, TeacherAgreement(models[0])], cbs=cbs,
                    loss_func=CrossEntropyLossFlat())
    learn.recorder.train_metrics = True
    learn.add_cb(KnowledgeDistillation(teacher, **kd_arguments(EXTRAS[extra], tmp_path)))
    ACTIONS[action](learn)
    cols = columns(learn)
    assert cols.pop('train_teacher_agreement') is None  # a validation metric: the teacher runs on validation only
    assert list(cols)[:3] == ['train_loss', 'train_ce', 'train_kd'] and all(map(math.isfinite, cols.values()))
    mixed = extra == 'mixup'  # MixUp's training metrics compare mixed predictions with one of the two targets
    if not mixed: assert cols['train_accuracy'] + cols['train_error_rate'] == pytest.approx(1)
    assert cols['valid_accuracy'] + cols['valid_error_rate'] == pytest.approx(1)
    assert 0 <= cols['valid_teacher_agreement'] <= 1
    if 'hints' in extra: assert list(cols)[3] == 'train_hint'
    for model, saved, mode in zip(models, before, modes):  # the teachers are left as they were given
        assert_same_state(model, saved)
        assert [m.training for m in model.modules()] == mode
        assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    metrics = list(learn.metrics)
    learn.export(tmp_path/'student.pkl')
    assert list(learn.metrics) == metrics  # export leaves the learner's metrics as they were
    exported.append((str(tmp_path/'student.pkl'), str(small_dls.valid_ds.items[0]),
                     learn.predict(small_dls.valid_ds.items[0])[2].tolist()))


# --- every task kind and fastai loss ----------------------------------------------------------------------------

def digit_labels(d: int) -> str:
    "Three labels that are not exclusive: parity, size, loop"
    return ' '.join(name for name, on in (('odd', d % 2), ('big', d > 4), ('loop', d in (0, 6, 8, 9))) if on)


@pytest.fixture(scope='module')
def digits_frame(few_digits) -> pd.DataFrame:
    "The few digits as a table (file, class, labels, value, split): fastai's `ColReader`s pickle without the tests"
    files = get_image_files(few_digits)
    frame = pd.DataFrame(dict(file=[str(f) for f in files], label=[f.parent.name for f in files],
                              labels=[digit_labels(int(f.parent.name)) for f in files],
                              value=[float(f.parent.name) for f in files],
                              valid=[f.parent.parent.name == 'valid' for f in files]))
    return frame[frame.file.str.find('/test/') < 0]


TASKS = {
    'CrossEntropyLossFlat': dict(loss=CrossEntropyLossFlat()),
    'nn.CrossEntropyLoss': dict(loss=nn.CrossEntropyLoss()),
    'F.cross_entropy': dict(loss=F.cross_entropy),
    'LabelSmoothingCrossEntropyFlat': dict(loss=LabelSmoothingCrossEntropyFlat()),
    'LabelSmoothingCrossEntropy': dict(loss=LabelSmoothingCrossEntropy()),
    'FocalLossFlat': dict(loss=FocalLossFlat()),
    'multi-label BCEWithLogitsLossFlat': dict(loss=BCEWithLogitsLossFlat(), block=MultiCategoryBlock,
                                              get_y=ColReader('labels', label_delim=' ')),
    'regression MSELossFlat': dict(loss=None, block=RegressionBlock, get_y=ColReader('value')),
}


@pytest.mark.parametrize('name', TASKS)
def test_every_task_and_loss(digits_frame, exported, tmp_path, name):
    spec = TASKS[name]
    block = spec.get('block', CategoryBlock)
    dls = DataBlock(blocks=(ImageBlock, block), get_x=ColReader('file'), get_y=spec.get('get_y', ColReader('label')),
                    splitter=ColSplitter('valid'), item_tfms=Resize(32)
                    ).dataloaders(digits_frame, bs=64, num_workers=0, path=tmp_path)
    n_out = dls.c if block is not RegressionBlock else 1
    kwargs = dict(loss_func=spec['loss']) if spec['loss'] is not None else {}
    set_seed(0, reproducible=True)
    teacher = Learner(dls, tiny_cnn(16, n_out), **kwargs)
    quietly(teacher, 'fit', 1, 1e-2)
    metric = accuracy_multi if block is MultiCategoryBlock else None
    learn = Learner(dls, tiny_cnn(8, n_out), path=tmp_path, metrics=metric or [], cbs=KnowledgeDistillation(teacher),
                    **kwargs)
    learn.recorder.train_metrics = True
    quietly(learn, 'fit', 1, 1e-2)
    cols = columns(learn)
    assert list(cols)[1:3] == [task_of(learn.loss_func).column, 'train_kd'] and all(map(math.isfinite, cols.values()))
    learn.export(tmp_path/'student.pkl')
    item = dls.valid_ds.items.file.iloc[0]
    exported.append((str(tmp_path/'student.pkl'), item, learn.predict(item)[2].tolist()))


def test_segmentation_with_void_pixels_trains_and_exports(void_dls, exported, tmp_path):
    set_seed(0, reproducible=True)
    loss = CrossEntropyLossFlat(axis=1, ignore_index=VOID)
    teacher = Learner(void_dls, fcn(8), loss_func=loss)
    quietly(teacher, 'fit', 1, 1e-2)
    learn = Learner(void_dls, fcn(4), loss_func=loss, path=tmp_path, cbs=KnowledgeDistillation(teacher, DKD()))
    quietly(learn, 'fit', 1, 1e-2)
    assert all(map(math.isfinite, columns(learn).values()))
    learn.export(tmp_path/'student.pkl')
    exported.append((str(tmp_path/'student.pkl'), str(void_dls.valid_ds.items[0]),
                     learn.predict(void_dls.valid_ds.items[0])[2].tolist()))


LOAD_ALL_WITHOUT_FASTKD = """
import json, sys
sys.modules['fastkd'] = None  # importing fastkd (or anything in it) now fails, as on a server without it
import torch
from fastai.vision.all import load_learner
for path, item, probs in json.load(open(sys.argv[1])):
    try: learn = load_learner(path)
    except Exception as e: raise RuntimeError(f'{path} does not load: {e!r}') from e
    assert not any('fastkd' in type(o).__module__ for o in [*learn.cbs, *learn.metrics]), path
    got = learn.predict(item)[2]
    torch.testing.assert_close(got, torch.tensor(probs), rtol=1e-4, atol=1e-5)
print('loaded', len(json.load(open(sys.argv[1]))))
"""


def test_zz_every_export_loads_and_predicts_without_fastkd(exported, tmp_path):
    "Last in this module: every file the cells exported, loaded in one Python where fastkd cannot be imported"
    if not exported: pytest.skip('run with the cells above (they export the files)')
    (tmp_path/'exported.json').write_text(json.dumps(exported))
    (tmp_path/'load.py').write_text(LOAD_ALL_WITHOUT_FASTKD)
    result = subprocess.run([sys.executable, str(tmp_path/'load.py'), str(tmp_path/'exported.json')],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f'loaded {len(exported)}'
