"Shared fixtures: seeded runs, the digits image folder and a teacher trained on it, and the real GTSRB data in ../shared when present."
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.callback.core import CancelFitException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.data.transforms import IntToFloatTensor
from fastai.learner import Callback, Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed

from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls, write_digits
from fastkd.split import default_split

GTSRB_DATA = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'gtsrb'
# A folder kept from session to session (bench/mutation.py sets it): the digits and their teacher are built once there
# instead of once per session, and reloaded with the loaders' generators where training left them
KEPT = Path(os.environ['FASTKD_TEST_FIXTURES']) if os.environ.get('FASTKD_TEST_FIXTURES') else None


@pytest.fixture(autouse=True)
def seeded():
    "Every test starts from the same seed, with one thread so timings of other tests don't change results"
    torch.set_num_threads(1)
    set_seed(42, reproducible=True)


@pytest.fixture(scope='session')
def digits_path(tmp_path_factory) -> Path:
    "scikit-learn's digits as a 32 px image folder: train/valid/test, one sub-folder per digit"
    return write_digits(KEPT/'digits' if KEPT else tmp_path_factory.mktemp('digits'), size=32)


@pytest.fixture(scope='session')
def dls(digits_path):
    "The digits' loaders, their batch order seeded: the same whichever test makes them first"
    loaders = digits_dls(digits_path, size=32, bs=64)
    same_batches(loaders)
    return loaders


@pytest.fixture(scope='session')
def teacher(dls):
    "A tiny CNN trained on the digits to about 90% validation accuracy (shared: tests may change its mode, never its weights)"
    set_seed(0, reproducible=True)
    learn = Learner(dls, tiny_cnn(32), metrics=accuracy)
    if KEPT and (KEPT/'teacher.json').exists():
        learn.model.load_state_dict(torch.load(KEPT/'teacher.pth', weights_only=True))
        for dl, (version, state, gauss) in zip(dls.loaders, json.loads((KEPT/'teacher.json').read_text())):
            dl.rng.setstate((version, tuple(state), gauss))
        return learn
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-2)
    if KEPT:  # the weights, then the marker with the loaders' generators: a half-written pair is never read
        torch.save(learn.model.state_dict(), KEPT/'teacher.pth.tmp')
        os.replace(KEPT/'teacher.pth.tmp', KEPT/'teacher.pth')
        (KEPT/'teacher.json.tmp').write_text(json.dumps([dl.rng.getstate() for dl in dls.loaders]))
        os.replace(KEPT/'teacher.json.tmp', KEPT/'teacher.json')
    return learn


@pytest.fixture
def teacher_calls(teacher):
    "The `training` flag of the teacher at each of its forward passes during the test"
    calls = []
    hook = teacher.model.register_forward_hook(lambda module, inputs, output: calls.append(module.training))
    yield calls
    hook.remove()


@pytest.fixture(scope='session')
def few_digits(digits_path, tmp_path_factory) -> Path:
    "The first images of every digit and split of `digits_path` (links): 30 to train, 10 to validate, 10 to test"
    dest = tmp_path_factory.mktemp('few_digits')
    for split, n in (('train', 30), ('valid', 10), ('test', 10)):
        for folder in sorted((digits_path/split).iterdir()):
            (dest/split/folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]: (dest/split/folder.name/image.name).symlink_to(image)
    (dest/'.complete').touch()  # a marker without settings: write_digits, so the demo, takes the folder as it is
    return dest


@pytest.fixture(scope='session')
def gtsrb_data() -> Path:
    "The real GTSRB data of ../shared/data/gtsrb (README.md there); tests that need it skip without it"
    if not (GTSRB_DATA/'gtsrb32.tar.gz').exists():
        pytest.skip(f'GTSRB test data not found at {GTSRB_DATA} (it lives in the shared data folder beside the repo)')
    return GTSRB_DATA


@pytest.fixture(scope='session')
def gtsrb32(gtsrb_data, tmp_path_factory) -> Path:
    "The 32x32 archive unpacked once per session: complete training tracks and part of the test set, official layout"
    root = tmp_path_factory.mktemp('gtsrb32')
    subprocess.run(['tar', 'xzf', str(gtsrb_data/'gtsrb32.tar.gz'), '-C', str(root)], check=True)  # 10x Python's tarfile
    return root/'GTSRB'


SEGMENTATION_CODES = ['background', 'even stroke', 'odd stroke']


def stroke_masks(digits_path: Path, masks: Path, every: int, size: int = 16, void: int | None = None):
    """Segmentation loaders of every `every`-th digit of train/valid: a mask per image, stroke pixels labelled by the
    digit's parity, the rest background; with `void`, the top-left 12x12 corner of every 32 px mask holds that value
    (6x6 once resized to 16 px)"""
    from fastai.data.block import DataBlock
    from fastai.data.transforms import FuncSplitter, get_image_files
    from fastai.vision.all import ImageBlock, MaskBlock, Resize
    from PIL import Image
    files = [f for f in get_image_files(digits_path) if f.parent.parent.name in ('train', 'valid')][::every]
    for f in files:
        stroke = np.asarray(Image.open(f).convert('L')) > 96
        mask = (stroke * (1 + int(f.parent.name) % 2)).astype(np.uint8)
        if void is not None: mask[:12, :12] = void
        Image.fromarray(mask).save(masks/f'{f.parent.parent.name}_{f.stem}.png')
    block = DataBlock(blocks=(ImageBlock, MaskBlock(SEGMENTATION_CODES)), get_items=lambda _: files,
                      get_y=lambda f: masks/f'{f.parent.parent.name}_{f.stem}.png',
                      splitter=FuncSplitter(lambda f: f.parent.parent.name == 'valid'), item_tfms=Resize(size))
    return block.dataloaders(digits_path, bs=16, num_workers=0)


def data_folder(gtsrb32: Path, dest: Path) -> Path:
    "A data folder whose `GTSRB/` is the unpacked archive (a link, so many destinations share one source)"
    dest.mkdir()
    (dest/'GTSRB').symlink_to(gtsrb32, target_is_directory=True)
    return dest


def tiny_cnn(width: int, n_out: int = 10) -> torch.nn.Sequential:
    "A small CNN laid out as `create_vision_model` lays out models: Sequential(body, head)"
    from fastai.layers import ConvLayer, Flatten
    body = torch.nn.Sequential(ConvLayer(3, width, stride=2), ConvLayer(width, 2 * width, stride=2),
                               ConvLayer(2 * width, 2 * width, stride=2), torch.nn.AdaptiveAvgPool2d(1), Flatten())
    return torch.nn.Sequential(body, torch.nn.Linear(2 * width, n_out))


class Doubled(torch.nn.Sequential):
    "The layers and weights of a `tiny_cnn`, another function: twice its logits (a teacher told apart by its class)"
    def forward(self, x): return 2 * super().forward(x)


def student(dls, teacher, width=8, **kwargs) -> Learner:
    "A smaller student with the KD callback attached through the constructor, as users do"
    return Learner(dls, tiny_cnn(width), metrics=accuracy, splitter=default_split,
                   cbs=KnowledgeDistillation(teacher, **kwargs))


def same_batches(dls, seed: int = 0):
    "Seed the generator each of `dls`'s loaders keeps across fits: the batch order then no longer depends on earlier tests"
    for dl in dls.loaders: dl.rng.seed(seed)


def state(model) -> dict:
    "A copy of `model`'s state on the CPU (the callback moves a teacher to the student's device)"
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict):
    after = state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


class RecordFirstBatch(Callback):
    "Keep what the learner holds after the loss of the first training batch, then stop the fit"
    order = KnowledgeDistillation.order + 1
    def after_loss(self):
        self.inputs, self.targets, self.logits = self.learn.xb, self.learn.yb, self.learn.pred.detach()
        self.total_loss, self.progress = self.learn.loss_grad.detach(), self.learn.pct_train
        raise CancelFitException()


def whole(message: str) -> str:
    "A `match=` pattern for exactly `message`, alone or after the line fastai puts before an error raised in a callback"
    return rf'(?:^|\n\t){re.escape(message)}$'


def ready_made(dls) -> tuple[DataLoaders, list]:
    "`dls`'s training batches as a dataset of ready-made batches (bs=None): plain fastai loaders, no vocab; and them"
    batches = [(xb.clone(), yb.clone()) for xb, yb in dls.train.new(shuffle=False)]
    return DataLoaders(DataLoader(batches, bs=None), DataLoader(batches[:2], bs=None)), batches


def double_inputs(dl) -> None:
    "Every input of `dl` doubles from its next batch on, behind any cache's back: its `IntToFloatTensor` divides by 128"
    next(t for t in dl.after_batch.fs if isinstance(t, IntToFloatTensor)).div = 128.


def changed_inputs(where: str = '') -> str:
    "A `match=` pattern for the whole error of stored items whose inputs changed (no views): five items, the fixes"
    return (r'(?:^|\n\t)The inputs of training items \[\d+(?:, \d+){4}\] ' + re.escape(
        f'changed since the teacher output was cached for them{where}: a transform draws random numbers (e.g. Resize '
        'cropping images of another aspect ratio at random; use ResizeMethod.Squish), or the data or its transforms '
        'were changed in place. Remove the randomness, or call `cache.reset()` after changing data (on disk, delete '
        "the store's folder), or pass cache=TeacherCache(allow_random=True) to reuse the first output of each "
        'item.') + '$')


def eval_logits(model, xb):
    "What the callback's teacher forward computes: eval mode, no gradient"
    with torch.no_grad(): return model.eval()(*xb)


def first_batch(learn: Learner) -> RecordFirstBatch:
    recorder = RecordFirstBatch()
    learn.fit(1, 1e-3, cbs=recorder)
    return recorder
