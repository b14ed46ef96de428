"Unlabeled items in distillation: they join every training epoch, taught by the teacher alone (`unlabeled=`)."
from collections import Counter

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.distributed import DistributedDL
from fastai.learner import Learner, Recorder, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.all import get_image_files

from fastkd.cache import TeacherCache
from fastkd.digits import digits_dls
from fastkd.hints import FitNet, Hint
from fastkd.kd_find import kd_candidates, kd_find
from fastkd.losses import DKD
from fastkd.memory import InMemoryDL, in_memory
from fastkd.unlabeled import joint_loader, keep_labels
from conftest import same_batches, tiny_cnn
from fastkd.callback import KnowledgeDistillation


@pytest.fixture(scope='module')
def split(digits_path):
    "Digits loaders whose training set keeps 10% of its labels (stratified), and the other 90% of its images"
    few, rest = keep_labels(digits_dls(digits_path, size=32, bs=64, augment=False), 0.1, seed=0)
    return few, rest


def fitted(dls, *cbs, epochs=1, seed=0, **kwargs) -> Learner:
    set_seed(seed, reproducible=True)
    same_batches(dls, seed)
    learn = Learner(dls, tiny_cnn(8), metrics=accuracy, cbs=list(cbs), **kwargs)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, 1e-2)
    return learn


def test_keep_labels_keeps_a_share_of_each_class_and_hands_over_the_rest(digits_path):
    dls = digits_dls(digits_path, size=32, bs=64, augment=False)
    few, rest = keep_labels(dls, 0.1, seed=0)
    kept = list(few.train_ds.items)
    assert len(kept) + len(rest) == len(dls.train_ds) and not set(kept) & set(rest)
    per_class = Counter(f.parent.name for f in kept)
    totals = Counter(f.parent.name for f in dls.train_ds.items)
    assert all(abs(per_class[c] - 0.1 * totals[c]) <= 0.5 for c in totals)
    assert [int(few.train_ds[i][1]) for i in range(3)] == [int(f.parent.name) for f in kept[:3]]  # labels kept
    assert list(keep_labels(dls, 0.1, seed=0)[0].train_ds.items) == kept  # seeded
    assert list(keep_labels(dls, 0.1, seed=1)[0].train_ds.items) != kept
    assert few.valid is dls.valid
    with pytest.raises(ValueError, match='share of training labels'): keep_labels(dls, 0)


def test_the_teacher_sees_every_unlabeled_item_each_epoch_and_the_loss_only_the_labeled(split, teacher):
    "The memory cache holds the teacher's output for each item it ran on: every labeled and unlabeled one"
    few, rest = split
    seen = []

    class RecordingCE(CrossEntropyLossFlat):
        def __call__(self, pred, targ, **kwargs):
            if torch.is_grad_enabled(): seen.append(targ.detach().clone())  # training steps
            return super().__call__(pred, targ, **kwargs)

    class MetricCount(Callback):
        def after_train(self): counts.append(self.recorder._train_mets[1].count)  # items the accuracy averaged

    kd, counts = KnowledgeDistillation(teacher, unlabeled=rest, cache=True), []
    set_seed(0, reproducible=True)
    learn = Learner(few, tiny_cnn(8), loss_func=RecordingCE(), metrics=accuracy,
                    cbs=[kd, Recorder(train_metrics=True), MetricCount()])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    n_labeled, n_all, bs = len(few.train_ds), len(few.train_ds) + len(rest), few.train.bs
    stored = kd.cache.rows.stored
    assert len(stored) == n_all and stored[:n_labeled].all()
    assert n_all - bs < int(stored.sum())  # all but the last items drop_last left out
    # the stored output of an unlabeled item is the teacher's on that image
    item = int(stored[n_labeled:].nonzero()[0, 0]) + n_labeled
    plain = few.test_dl([rest[item - n_labeled]])
    with torch.no_grad(): expected = teacher.model.eval()(plain.one_batch()[0])
    assert torch.allclose(kd.cache.rows.arrays['outputs'][item], expected[0], atol=1e-5)
    # the learner's loss saw every labeled item once per epoch, with its label, and nothing else
    labels = torch.cat(seen)
    assert len(labels) == 2 * n_labeled
    assert sorted(labels.tolist()) == sorted(2 * [int(few.train_ds[i][1]) for i in range(n_labeled)])
    assert counts == [n_labeled, n_labeled]  # the training metric too
    assert learn.dls.train is few.train  # the user's loader is back


def test_unlabeled_items_make_the_distilled_student_better(split, teacher):
    few, rest = split
    labeled_only = fitted(few, KnowledgeDistillation(teacher), epochs=6)
    with_unlabeled = fitted(few, KnowledgeDistillation(teacher, unlabeled=rest), epochs=6)
    assert with_unlabeled.validate()[1] > labeled_only.validate()[1] + 0.3


def test_a_dataloader_of_inputs_is_the_same_as_the_items(split, teacher):
    few, rest = split
    from_items = fitted(few, KnowledgeDistillation(teacher, unlabeled=rest))
    from_loader = fitted(few, KnowledgeDistillation(teacher, unlabeled=few.test_dl(rest)))
    assert from_items.recorder.values[-1] == from_loader.recorder.values[-1]


def test_every_batch_has_labeled_items_first(split):
    few, rest = split
    joint = joint_loader(few.train, rest)
    batches = list(joint)
    counts = joint.labeled_first.labeled_counts
    assert len(counts) == len(batches) == len(joint) and min(counts) >= 1 and sum(counts) == len(few.train_ds)
    order = joint._DataLoader__idxs
    for i, count in enumerate(counts):
        batch = order[i * joint.bs:(i + 1) * joint.bs]
        assert all(j < len(few.train_ds) for j in batch[:count]) and all(j >= len(few.train_ds) for j in batch[count:])
    assert set(order) >= set(range(len(few.train_ds)))
    with pytest.raises(ValueError, match='every batch needs a labeled item'):
        joint_loader(keep_labels(few, 0.05, seed=0)[0].train, rest + rest + rest)


def test_mixup_takes_weight_one(split, teacher):
    few, rest = split
    with pytest.raises(ValueError, match='weight=1'):
        fitted(few, KnowledgeDistillation(teacher, unlabeled=rest), MixUp())
    learn = fitted(few, KnowledgeDistillation(teacher, weight=1., unlabeled=rest), MixUp())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values[-1])


def test_hints_and_a_loss_that_takes_the_target_learn_from_unlabeled_items(split, teacher):
    few, rest = split
    hinted = fitted(few, KnowledgeDistillation(teacher, unlabeled=rest, hints=[Hint('0.1', '0.1', FitNet())]))
    assert 'train_hint' in hinted.recorder.metric_names
    dkd = fitted(few, KnowledgeDistillation(teacher, DKD(), unlabeled=rest))
    assert torch.isfinite(torch.tensor(hinted.recorder.values[-1] + dkd.recorder.values[-1])).all()


def test_lr_find_fine_tune_and_export(split, teacher, tmp_path):
    few, rest = split
    set_seed(0, reproducible=True)
    learn = Learner(few, tiny_cnn(8), metrics=accuracy, cbs=KnowledgeDistillation(teacher, unlabeled=rest))
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(show_plot=False)
        assert learn.dls.train is few.train
        learn.fine_tune(1, 1e-2)
    assert learn.dls.train is few.train
    learn.export(tmp_path/'student.pkl')
    assert len(load_learner(tmp_path/'student.pkl').dls.train_ds) == 0  # fastai's export empties the data


def test_the_user_loader_is_put_back_when_a_fit_raises(split, teacher):
    few, rest = split

    class Stop(Callback):
        def after_batch(self):
            if self.iter == 1: raise RuntimeError('stopped')

    learn = Learner(few, tiny_cnn(8), cbs=[KnowledgeDistillation(teacher, unlabeled=rest), Stop()])
    with pytest.raises(RuntimeError, match='stopped'), learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert learn.dls.train is few.train


def test_distributed_training_is_refused(split, teacher):
    few, rest = split
    learn = Learner(few, tiny_cnn(8), cbs=KnowledgeDistillation(teacher, unlabeled=rest))
    user = learn.dls.loaders[0] = few.train
    learn.dls.loaders[0] = DistributedDL(user, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match='distributed'), learn.no_bar(), learn.no_logging(): learn.fit(1)
    finally: learn.dls.loaders[0] = user


def test_in_memory_loaders_make_the_unlabeled_inputs_once(split, teacher):
    few, rest = split
    kept = in_memory(few)
    joint = joint_loader(kept.train, rest)
    assert isinstance(joint, InMemoryDL) and len(joint.decoded[0]) == len(kept.train_ds) + len(rest)
    first_unlabeled = joint.decoded[0][len(kept.train_ds)].float() / 255  # uint8 until the batch transforms
    assert torch.allclose(first_unlabeled, few.test_dl(rest[:1]).one_batch()[0][0].cpu())
    learn = fitted(kept, KnowledgeDistillation(teacher, unlabeled=rest))
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()


def test_kd_find_measures_the_candidates_with_unlabeled_items(split, teacher):
    few, rest = split
    sizes = []

    class Sizes(Callback):
        def after_train(self): sizes.append(len(self.dl.dataset))

    assert kd_candidates(Learner(few, tiny_cnn(8)), teacher, rest)['fm (mixup)']['weight'] == 1
    learn = Learner(few, tiny_cnn(8), metrics=accuracy)
    res = kd_find(learn, teacher, {'soft': dict(cbs=[Sizes])}, epochs=1, lr=1e-2, seeds=(0,), unlabeled=rest,
                  show_progress=False, show_plot=False)
    assert len(few.train_ds) + len(rest) in sizes
    assert res.callback('soft')[0].unlabeled is rest


def test_segmentation_distils_every_pixel_of_unlabeled_images_and_leaves_void_ones_out(digits_path, tmp_path):
    """Void pixels exist only where there are labels: a teacher noisy at the void corner changes the term through the
    unlabeled rows alone"""
    import math
    from test_combinations import VOID, FirstLoss, NoisyAtVoid, fcn, quietly
    from conftest import stroke_masks
    dls = stroke_masks(digits_path, tmp_path, every=12, void=VOID)
    unlabeled = get_image_files(digits_path/'test')[::6]
    torch.manual_seed(0)
    base = fcn(8)
    parts = {}
    runs = [('base', base, None), ('noisy', NoisyAtVoid(base), None), ('base+unlabeled', base, unlabeled),
            ('noisy+unlabeled', NoisyAtVoid(base), unlabeled)]
    for name, teacher, extra in runs:
        set_seed(1, reproducible=True)
        dls.train.rng.seed(1)
        learn = Learner(dls, fcn(4), loss_func=CrossEntropyLossFlat(axis=1, ignore_index=VOID),
                        cbs=KnowledgeDistillation(teacher, unlabeled=extra))
        recorder = FirstLoss()
        quietly(learn, 'fit', 1, 1e-3, cbs=recorder)
        parts[name] = recorder.kd
    assert all(map(math.isfinite, parts.values()))
    assert parts['base'] == pytest.approx(parts['noisy'], rel=1e-5)  # labeled rows: the void corner is left out
    assert parts['base+unlabeled'] != pytest.approx(parts['noisy+unlabeled'], rel=1e-3)  # unlabeled rows: every pixel


def test_unlabeled_must_be_items_or_a_dataloader(split, teacher):
    few, rest = split
    with pytest.raises(TypeError, match=r"get_image_files\('frames'\)"):
        KnowledgeDistillation(teacher, unlabeled='frames')
    with pytest.raises(TypeError, match='one DataLoader'): KnowledgeDistillation(teacher, unlabeled=few)
    with pytest.raises(ValueError, match='holds no items'): KnowledgeDistillation(teacher, unlabeled=[])
    assert f', unlabeled={len(rest)} items' in repr(KnowledgeDistillation(teacher, unlabeled=rest))


def test_regression_distils_unlabeled_items_with_its_default_loss(digits_path):
    "LogitMSE's target is optional: unlabeled rows are distilled without one"
    from fastai.data.block import DataBlock, RegressionBlock
    from fastai.vision.all import ImageBlock, Resize
    from fastai.data.transforms import GrandparentSplitter
    block = DataBlock(blocks=(ImageBlock, RegressionBlock), get_items=get_image_files, get_y=lambda f: float(f.parent.name),
                      splitter=GrandparentSplitter(valid_name='valid'), item_tfms=Resize(16))
    dls = block.dataloaders(digits_path, bs=32, num_workers=0)
    set_seed(0, reproducible=True)
    learn = Learner(dls, tiny_cnn(4, n_out=1), cbs=KnowledgeDistillation(tiny_cnn(8, n_out=1),
                                                                         unlabeled=get_image_files(digits_path/'test')))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.recorder.metric_names[1:4] == ['train_loss', 'train_mse', 'train_kd']
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1])).all()


def test_a_loader_that_draws_its_own_items_is_refused(split):
    from fastai.callback.data import WeightedDL
    few, rest = split
    weighted = few.train.new(cls=WeightedDL, wgts=[1.] * len(few.train_ds))
    with pytest.raises(ValueError, match='draws its own choice of items each epoch'): joint_loader(weighted, rest)


def test_a_joint_loader_is_made_anew_for_a_list_that_grew_and_while_held_shared(split):
    few, rest = split
    items = list(rest[:200])
    first = joint_loader(few.train, items)
    assert joint_loader(few.train, items) is first
    items.extend(rest[200:400])
    assert len(joint_loader(few.train, items).dataset) == len(few.train_ds) + 400


def test_export_during_a_fit_with_unlabeled_items(split, teacher, tmp_path):
    few, rest = split

    class ExportAtTheEnd(Callback):
        def after_fit(self): self.learn.export(tmp_path/'during.pkl')

    learn = Learner(few, tiny_cnn(8), cbs=[ExportAtTheEnd(), KnowledgeDistillation(teacher, unlabeled=rest)])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert (tmp_path/'during.pkl').exists() and learn.dls.train is few.train
