"`in_memory` on the digits images: the same batches as from disk, all items once an epoch, a working Learner."
import pytest
import torch
from fastai.data.core import DataLoaders, TfmdDL
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import TensorCategory, TensorImage, set_seed

from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls
from fastkd.memory import InMemoryDL, in_memory

from conftest import same_batches, tiny_cnn


@pytest.fixture(scope='module')
def plain_and_memory(digits_path):
    plain = digits_dls(digits_path, size=32, bs=64, num_workers=0)
    return plain, in_memory(plain)


def test_items_are_decoded_once_with_their_types(plain_and_memory):
    plain, memory = plain_and_memory
    images, labels = memory.train.decoded
    assert isinstance(images, TensorImage) and images.dtype == torch.uint8
    assert images.shape == (len(plain.train_ds), 3, 32, 32)
    assert isinstance(labels, TensorCategory)
    assert labels.tolist() == [int(plain.train_ds[i][1]) for i in range(len(plain.train_ds))]
    assert list(memory.valid.items) == list(plain.valid.items)  # the files are still there to read, as fastai has them


def test_validation_batches_equal_those_read_from_disk(plain_and_memory):
    plain, memory = plain_and_memory
    for (x_disk, y_disk), (x_memory, y_memory) in zip(plain.valid, memory.valid, strict=True):
        assert type(x_memory) is type(x_disk) and x_memory.dtype == torch.float32
        assert torch.equal(x_memory, x_disk) and torch.equal(y_memory, y_disk)


def test_training_epochs_draw_every_item_once_in_a_new_order(plain_and_memory):
    _, memory = plain_and_memory
    dl = memory.train.new(drop_last=False)
    assert isinstance(dl, InMemoryDL)
    epochs = [torch.cat([y for _, y in dl]) for _ in range(2)]
    for labels in epochs: assert sorted(labels.tolist()) == sorted(memory.train.decoded[1].tolist())
    assert not torch.equal(*epochs)


def test_batch_augmentation_still_runs_every_batch(plain_and_memory):
    _, memory = plain_and_memory
    dl = memory.train.new(shuffle=False, drop_last=False)
    set_seed(1)
    first = dl.one_batch()[0]
    set_seed(2)
    assert not torch.equal(first, dl.one_batch()[0])  # aug_transforms redrawn: same items, other images


def distilled(dls, teacher, **kwargs) -> Learner:
    "The same student, seed and recipe on `dls`: distilled for 4 epochs"
    set_seed(42, reproducible=True)
    same_batches(dls)
    learn = Learner(dls, tiny_cnn(8), metrics=accuracy, cbs=KnowledgeDistillation(teacher, weight=0.5), **kwargs)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 3e-2)
    return learn


def test_learner_trains_distils_predicts_and_exports_without_the_items(plain_and_memory, teacher, teacher_calls,
                                                                      digits_path, tmp_path):
    plain, memory = plain_and_memory
    learn = distilled(memory, teacher, path=tmp_path)
    assert len(teacher_calls) == 1 + 4 * len(memory.train)  # it distilled: the check, then every training step
    names = list(learn.recorder.metric_names[1:-1])
    assert all(row[names.index('train_kd')] > 0 for row in learn.recorder.values)
    from_disk = distilled(plain, teacher).recorder.values[-1][-1]
    # it trains as the same recipe from disk does (0.67 and 0.69 here; a student alone reaches 0.80 in 4 epochs,
    # distillation from this teacher at T=4 costs accuracy this early; chance is 0.10)
    assert learn.recorder.values[-1][-1] == pytest.approx(from_disk, abs=0.06) and from_disk > 0.5
    test_files = sorted((digits_path/'test').rglob('*.png'))[:40]
    test_dl = memory.test_dl(test_files)
    assert type(test_dl) is TfmdDL  # other items are read from disk
    preds = learn.get_preds(dl=test_dl)[0]
    assert torch.equal(learn.get_preds(dl=InMemoryDL.from_dl(test_dl))[0], preds)
    learn.export('export.pkl')
    assert (tmp_path/'export.pkl').stat().st_size < memory.train.decoded[0].numel() / 4


def test_empty_loader_is_refused(plain_and_memory):
    plain, _ = plain_and_memory
    with pytest.raises(ValueError, match='empty'): in_memory(DataLoaders(plain.valid.new(plain.valid_ds[:0])))
