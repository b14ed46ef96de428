"Teachers at their own input size and normalisation: `TeacherInput` and `teacher_input=` everywhere the teacher runs."
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.all import get_image_files, imagenet_stats

from fastkd.cache import TeacherCache, fill_teacher_cache
from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls
from fastkd.hints import FitNet, Hint, match_layers
from fastkd.kd_find import TeacherAgreement, _teacher_logits, kd_find
from fastkd.teacher_input import AdaptedTeacher, TeacherInput, input_stats, teacher_input_of
from conftest import same_batches, tiny_cnn

STUDENT_STATS = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


@pytest.fixture(scope='module')
def small(digits_path):
    "The digits at 16 px without augmentation or normalisation: a student's data, half the teacher's size"
    return digits_dls(digits_path, size=16, bs=64, augment=False)


@pytest.fixture(scope='module')
def normalised(digits_path):
    "The digits at 32 px with ImageNet normalisation, no augmentation: a teacher's own data"
    loaders = digits_dls(digits_path, size=32, bs=64, augment=False)
    for dl in loaders.loaders: dl.after_batch.add(Normalize.from_stats(*imagenet_stats, cuda=False))
    return loaders


def test_adapt_unnormalises_resizes_and_normalises():
    x = torch.randn(2, 3, 16, 16)
    teacher_input = TeacherInput(32, *imagenet_stats)
    images = x * torch.tensor(STUDENT_STATS[1]).view(1, 3, 1, 1) + torch.tensor(STUDENT_STATS[0]).view(1, 3, 1, 1)
    expected = (F.interpolate(images, size=(32, 32), mode='bilinear', align_corners=False)
                - torch.tensor(imagenet_stats[0]).view(1, 3, 1, 1)) / torch.tensor(imagenet_stats[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher_input.adapt(x, STUDENT_STATS), expected)
    shrunk = TeacherInput(8).adapt(x, STUDENT_STATS)  # the student's normalisation kept; antialiased
    torch.testing.assert_close(shrunk, (F.interpolate(images, size=(8, 8), mode='bilinear', antialias=True)
                                        - torch.tensor(STUDENT_STATS[0]).view(1, 3, 1, 1))
                               / torch.tensor(STUDENT_STATS[1]).view(1, 3, 1, 1), atol=1e-5, rtol=1e-5)
    assert TeacherInput(16, *STUDENT_STATS).adapt(x, STUDENT_STATS) is x  # nothing to change
    assert TeacherInput(16, 0., 1.).adapt(x, None) is x  # unnormalised images both
    with pytest.raises(ValueError, match='both mean and std'): TeacherInput(32, mean=(0.5,))
    with pytest.raises(ValueError, match='shape \\(2, 5\\)'): TeacherInput(32).adapt(torch.randn(2, 5))


def test_a_learner_teacher_receives_exactly_what_its_own_dataloaders_give(small, normalised, digits_path):
    "The student's 32 px unnormalised images become the teacher's ImageNet-normalised ones, item for item"
    student_dls = digits_dls(digits_path, size=32, bs=64, augment=False)
    teacher = Learner(normalised, tiny_cnn(16))
    teacher_input = teacher_input_of(teacher)
    assert teacher_input == TeacherInput(32, *imagenet_stats)
    items = get_image_files(digits_path/'valid')[:8]
    student_batch = student_dls.test_dl(items).one_batch()[0]
    teacher_batch = normalised.test_dl(items).one_batch()[0]
    torch.testing.assert_close(teacher_input.adapt(student_batch, input_stats(student_dls.train)), teacher_batch)
    kd = KnowledgeDistillation(teacher)
    assert 'teacher_input' not in repr(kd)  # 'auto': what it changes is known once a learner has the callback
    Learner(student_dls, tiny_cnn(8), cbs=kd)
    assert repr(kd).endswith('teacher_input=TeacherInput(size=(32, 32), mean=(0.485, 0.456, 0.406), '
                             'std=(0.229, 0.224, 0.225)))')
    own = KnowledgeDistillation(teacher)
    Learner(normalised, tiny_cnn(8), cbs=own)  # on the teacher's own data nothing changes
    assert 'teacher_input' not in repr(own) and own.shown_inputs == [None]
    explicit = KnowledgeDistillation(teacher, teacher_input=TeacherInput(64))
    assert repr(explicit).endswith('teacher_input=TeacherInput(size=(64, 64)))')
    assert KnowledgeDistillation(teacher, teacher_input=None).teacher_inputs == [None]


def test_a_timm_teacher_is_read_from_its_pretrained_cfg_and_fastkd_needs_no_timm_for_it():
    model = timm.create_model('resnet18', pretrained=False, num_classes=10)
    assert teacher_input_of(model) == TeacherInput(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert teacher_input_of(tiny_cnn(8)) is None  # other models: the student's batch as it is
    # where timm cannot be imported, a model that carries a pretrained_cfg is read all the same
    script = ('import sys; sys.modules["timm"] = None\n'
              'import torch, fastkd.all as fk\n'
              'model = torch.nn.Linear(2, 2); model.pretrained_cfg = dict(input_size=(3, 96, 96), mean=(0.5,) * 3, '
              'std=(0.25,) * 3)\n'
              'print(fk.teacher_input_of(model))')
    printed = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == 'TeacherInput(size=(96, 96), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))'


def test_every_training_step_feeds_the_teacher_its_size(small, teacher):
    "A teacher trained at 32 px gets the 16 px student's batches at 32 px, in the check before training too"
    sizes = []
    hook = teacher.model.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        set_seed(0, reproducible=True)
        learn = Learner(small, tiny_cnn(8), metrics=accuracy, cbs=KnowledgeDistillation(teacher.model,
                                                                                        teacher_input=TeacherInput(32)))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    finally: hook.remove()
    assert len(sizes) == len(small.train) + 1 and set(sizes) == {(32, 32)}
    assert learn.dls.train.one_batch()[0].shape[-2:] == (16, 16)


def test_agreement_kd_find_and_match_layers_feed_the_teacher_its_size(small, teacher):
    teacher_input, stats = TeacherInput(32), input_stats(small.train)
    metric = TeacherAgreement(teacher.model, teacher_input)
    set_seed(0, reproducible=True)
    learn = Learner(small, tiny_cnn(8), metrics=[accuracy, metric])
    with learn.no_bar(), learn.no_logging(): agreement = learn.validate()[2]
    preds = learn.get_preds()[0].argmax(1)
    with torch.no_grad():
        by_hand = torch.cat([teacher.model.eval()(teacher_input.adapt(x, stats)).argmax(1) for x, _ in small.valid])
    assert agreement == pytest.approx((preds == by_hand).float().mean().item())
    x = small.valid.one_batch()[0]
    pairs = match_layers(tiny_cnn(8), teacher.model, x, teacher_x=teacher_input.adapt(x, stats))
    assert ('0.1', '0.2') in set(zip(pairs.student_layer, pairs.teacher_layer))  # 4x4 both: the teacher at 2x
    res = kd_find(learn, teacher, {'soft': {}}, epochs=1, lr=1e-2, seeds=(0,), teacher_input=teacher_input,
                  show_progress=False, show_plot=False)
    assert res.callback('soft')[0].teacher_inputs == [teacher_input]
    with torch.no_grad(): by_hand = torch.cat([teacher.model(teacher_input.adapt(x, stats)) for x, _ in small.valid])
    torch.testing.assert_close(_teacher_logits(teacher.model, learn, teacher_input), by_hand)  # kd_find's agreement


def test_hints_pool_a_teacher_map_twice_the_students(small, teacher):
    set_seed(0, reproducible=True)
    learn = Learner(small, tiny_cnn(8), cbs=KnowledgeDistillation(teacher.model, hints=[Hint('0.1', '0.1', FitNet())],
                                                                  teacher_input=TeacherInput(32)))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()
    assert learn.knowledge_distillation.hints.losses[0].adapter.weight.shape[:2] == (64, 16)  # 8x8 pooled to 4x4


def test_the_cache_and_the_store_keep_teacher_inputs_apart(small, teacher, tmp_path):
    folders = {name: fill_teacher_cache(teacher.model, small, tmp_path, teacher_input=given)
               for name, given in (('16', None), ('32', TeacherInput(32)), ('48', TeacherInput(48)))}
    assert len(set(folders.values())) == 3
    assert fill_teacher_cache(teacher.model, small, tmp_path, teacher_input=TeacherInput(32)) == folders['32']
    cache = TeacherCache()
    outputs = []
    for given in (TeacherInput(32), TeacherInput(48)):
        set_seed(0, reproducible=True)
        same_batches(small)
        learn = Learner(small, tiny_cnn(8), cbs=KnowledgeDistillation(teacher.model, cache=cache, teacher_input=given))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        outputs.append(cache.rows.arrays['outputs'][cache.rows.stored].clone())
    assert not torch.allclose(outputs[0], outputs[1])  # refilled for the other input, never mixed


def test_an_adapted_teacher_scores_the_students_images_as_it_takes_them(small, teacher):
    stats = input_stats(small.train)
    adapted = AdaptedTeacher(teacher.model, TeacherInput(32), stats)
    x, y = small.valid.one_batch()
    with torch.no_grad():
        assert torch.equal(adapted.eval()(x), teacher.model.eval()(F.interpolate(x, size=(32, 32), mode='bilinear')))


def test_a_teacher_input_that_makes_a_good_teacher_fail_is_refused_naming_the_fix(dls, teacher):
    "A teacher trained at 32 px fed 16 px by a wrong TeacherInput, while the batch as it is serves it"
    learn = Learner(dls, tiny_cnn(8), cbs=KnowledgeDistillation(teacher.model, teacher_input=TeacherInput(8)))
    with pytest.raises(ValueError, match=r'fed as teacher_input=TeacherInput\(size=\(8, 8\)\) makes it .* pass '
                                         r'teacher_input=None'), learn.no_bar(), learn.no_logging():
        learn.fit(1)


def test_a_store_filled_for_a_learner_teacher_is_the_one_the_callback_reads(small, tmp_path):
    "'auto' on a Learner teacher of the student's own data changes nothing: both key the store as the plain teacher"
    teacher = Learner(small, tiny_cnn(8))
    folder = fill_teacher_cache(teacher, small, tmp_path)
    calls = []
    hook = teacher.model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    try:
        learn = Learner(small, tiny_cnn(4), cbs=KnowledgeDistillation(teacher, cache=tmp_path))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    finally: hook.remove()
    assert learn.knowledge_distillation.cache.folder == folder and calls == [small.valid.bs]  # the check alone


def test_a_kept_kd_find_record_gives_back_the_teacher_input(small, teacher):
    from fastkd.kd_find import KDFindResult
    set_seed(0, reproducible=True)
    learn = Learner(small, tiny_cnn(8), metrics=accuracy)
    res = kd_find(learn, teacher.model, {'soft': {}}, epochs=1, lr=1e-2, seeds=(0,), teacher_input=TeacherInput(32),
                  show_progress=False, show_plot=False)
    again = KDFindResult.from_record(res.record(), {'soft': {}}, teacher.model, teacher_input=TeacherInput(32))
    assert again.callback('soft')[0].teacher_inputs == [TeacherInput(32)]
