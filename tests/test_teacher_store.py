"""Teacher outputs on disk (`TeacherCache(path=...)`, `cache='folder'`, `fill_teacher_cache`, `fastkd fill-cache`) on
real Learners over the digits image folder: reuse by another learner and another process, no mix of teachers or
data, a process killed while filling, two processes filling at once, float16 and top-k storage, bad paths."""
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastai.vision.all import DisplayedTransform, ImageDataLoaders, Resize, TensorImage
from fastcore.basics import store_attr
from torchvision.models import resnet34

import store_worker
from conftest import Doubled, RecordFirstBatch, changed_inputs, data_folder, tiny_cnn, whole
from fastkd.cache import TeacherCache, fill_teacher_cache
from fastkd.callback import load_teacher
from fastkd.cli import main
from fastkd.digits import digits_dls
from fastkd.gtsrb import gtsrb_dls
from fastkd.losses import DIST, SoftTarget
from fastkd.teacher_input import TeacherInput
from fastkd.store import TeacherStore
from store_worker import distil, max_diff, teacher_from
from test_mixed_precision import CPUAutocast

ROOT = Path(__file__).resolve().parents[1]
# the largest relative change of a loss against full outputs (measured: float16 below 1e-5; top 3 of 10 classes 0.016
# for SoftTarget(T=1) and 0.002 for DIST, and 0.30 for SoftTarget(T=4), whose flattened tail weighs more: not held)
TOLERANCE = {'float16': {'SoftTarget(T=4)': 1e-4, 'SoftTarget(T=1)': 1e-4, 'DIST': 1e-4},
             'top3': {'SoftTarget(T=1)': 0.03, 'DIST': 0.005}}
LOSSES = {'SoftTarget(T=4)': SoftTarget(T=4), 'SoftTarget(T=1)': SoftTarget(T=1), 'DIST': DIST()}


@pytest.fixture(scope='module')
def dls(digits_path):
    return digits_dls(digits_path, size=32, bs=64, augment=False, num_workers=0)


@pytest.fixture(scope='module')
def trained_teacher(dls) -> torch.nn.Module:
    "A tiny CNN trained on the digits: its outputs are peaked as a real teacher's are"
    set_seed(0, reproducible=True)
    learn = Learner(dls, tiny_cnn(32))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-2)
    return learn.model.eval()


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    "The weights of a random tiny CNN (its outputs differ from item to item, which is all a store needs)"
    set_seed(1, reproducible=True)
    torch.save(tiny_cnn(16).state_dict(), tmp_path/'teacher.pth')
    return tmp_path/'teacher.pth'


def worker(digits_path, teacher_file, store, *args) -> subprocess.Popen:
    "A training process over `store` (tests/store_worker.py), started"
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), str(ROOT/'tests'), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, store_worker.__file__, str(digits_path), str(teacher_file), str(store),
                             *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> dict:
    "What a worker printed, once it ended well"
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


def only_store(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


@torch.no_grad()
def filled_and_valid(folder: Path, teacher, dls) -> int:
    "How many items of the float32 store in `folder` are filled; an error unless each equals a live forward"
    store = TeacherStore(folder)
    filled = np.asarray(store.filled).astype(bool)
    plain = dls.train.new(shuffle=False, drop_last=False)
    lives = torch.cat([teacher.eval()(xb) for xb, _ in plain])
    assert filled.shape == (len(lives),)
    torch.testing.assert_close(torch.from_numpy(np.array(store.arrays['outputs']))[filled], lives[filled],
                               rtol=1e-5, atol=1e-5)
    return int(filled.sum())


def test_another_learner_and_another_process_reuse_the_store(digits_path, dls, teacher_file, tmp_path):
    "The teacher runs only on the items no earlier run stored: a training epoch drops its last partial batch"
    teacher, n_items = teacher_from(teacher_file), len(dls.train.dataset)
    first, batches = distil(dls, teacher, tmp_path/'store', seed=0)
    assert n_items - dls.bs < first.items <= n_items and max_diff(batches, teacher) < 1e-5  # one epoch: every item, once
    folder = only_store(tmp_path/'store')
    assert filled_and_valid(folder, teacher, dls) == first.items
    second, batches = distil(dls, teacher, str(tmp_path/'store'), seed=1, epochs=2)  # a new student, path as a str
    assert second.items < dls.bs and max_diff(batches, teacher) < 1e-5
    assert filled_and_valid(folder, teacher, dls) == first.items + second.items
    third = finished(worker(digits_path, teacher_file, tmp_path/'store', '--seed', 2))
    assert third['teacher_items'] < dls.bs and third['max_diff'] < 1e-5
    assert filled_and_valid(folder, teacher, dls) == first.items + second.items + third['teacher_items']
    manifest = json.loads((folder/'manifest.json').read_text())
    dataset, dl = dls.train.dataset, dls.train
    files = [str(Path(item).absolute()) for item in dataset.items]
    assert manifest['n_items'] == n_items and manifest['identity']['data'] == dict(  # what makes the inputs
        dataset='Datasets', n_items=n_items, keyed_by='item',
        items_sha256=hashlib.sha256('\n'.join(files).encode()).hexdigest(), first_item=[str(dataset.items[0])],
        transforms=[repr(dataset.tfms[0]), *map(repr, dl.after_item.fs + dl.before_batch.fs + dl.after_batch.fs)])


def some_digits(digits_path: Path, dest: Path, first: int, n: int = 20, copy: bool = False) -> Path:
    "A digits folder of links to (or with `copy`, copies of) images `first` to `first + n` of each class and split"
    for split in ('train', 'valid'):
        for folder in sorted((digits_path/split).iterdir()):
            (dest/split/folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[first:first + n]:
                if copy: shutil.copy(image, dest/split/folder.name)
                else: (dest/split/folder.name/image.name).symlink_to(image)
    return dest


def test_another_teacher_or_other_data_get_a_store_of_their_own(digits_path, dls, teacher_file, tmp_path):
    teacher = teacher_from(teacher_file)
    distil(dls, teacher, tmp_path/'stores')
    other = teacher_from(teacher_file)
    with torch.no_grad(): other[1].weight.mul_(2)  # the same architecture, other weights
    record, batches = distil(dls, other, tmp_path/'stores')
    assert record.items > len(dls.train.dataset) - dls.bs and max_diff(batches, other) < 1e-5  # nothing of the first
    first, later = [digits_dls(some_digits(digits_path, tmp_path/name, start), size=32, bs=64, augment=False,
                               num_workers=0) for name, start in (('first', 0), ('later', 20))]
    assert len(first.train.dataset) == len(later.train.dataset)  # as many items, other ones
    for few in first, later:
        record, batches = distil(few, teacher, tmp_path/'stores')
        assert record.items > len(few.train.dataset) - few.bs and max_diff(batches, teacher) < 1e-5
    doubled = Doubled(*teacher).eval()  # the same weights, another class: another function
    record, batches = distil(dls, doubled, tmp_path/'stores')
    assert record.items > len(dls.train.dataset) - dls.bs and max_diff(batches, doubled) < 1e-5
    smaller = digits_dls(digits_path, size=24, bs=64, augment=False, num_workers=0)  # same items, another Resize
    record, batches = distil(smaller, teacher, tmp_path/'stores')
    assert record.items > len(smaller.train.dataset) - smaller.bs and max_diff(batches, teacher) < 1e-5
    folders = [p for p in (tmp_path/'stores').iterdir() if p.is_dir()]
    assert len(folders) == 6
    identities = [json.loads((f/'manifest.json').read_text())['identity'] for f in folders]
    assert len({i['teachers'][0] for i in identities}) == 3 and len({i['data']['items_sha256'] for i in identities}) == 3


def test_a_dataset_of_tensors_is_keyed_by_index(dls, teacher_file, tmp_path):
    """A fastai DataLoader over a list of tensors (no file per item, no transforms): the store is keyed by index, and a
    learner on that data reuses what `fill_teacher_cache` stored"""
    items = [(x, y) for xb, yb in dls.valid for x, y in zip(xb, yb)]
    tensors = DataLoaders(DataLoader(items, bs=32, shuffle=True, drop_last=True), DataLoader(items, bs=64))
    teacher = teacher_from(teacher_file)
    folder = fill_teacher_cache(teacher, tensors, tmp_path/'stores')
    data = json.loads((folder/'manifest.json').read_text())['identity']['data']
    assert data == dict(dataset='list', n_items=len(items), keyed_by='index', items_sha256=data['items_sha256'],
                        first_item=[], transforms=[])
    assert data['items_sha256'] != hashlib.sha256(b'').hexdigest()  # of the items' inputs: see the test below
    record, batches = distil(tensors, teacher, tmp_path/'stores', loss_func=CrossEntropyLossFlat())
    assert record.items == 0 and max_diff(batches, teacher) < 1e-5 and np.asarray(TeacherStore(folder).filled).all()


def tensor_dls(items: list, bs: int = 32) -> DataLoaders:
    "Plain fastai DataLoaders over a list of (input, target) tensors: no file per item, no transforms"
    return DataLoaders(DataLoader(items, bs=bs, shuffle=True, drop_last=True), DataLoader(items, bs=64))


def test_datasets_without_files_of_one_length_get_a_store_each(dls, teacher_file, tmp_path):
    """Two lists of tensors as long as each other, of other inputs: each gets its store, even with allow_random=True
    (no input check to catch a mix); another list of the first's inputs finds the first's store"""
    teacher, bs = teacher_from(teacher_file), 32
    first = [(x, y) for xb, yb in dls.valid for x, y in zip(xb, yb)]
    second = [(x, y) for xb, yb in dls.train.new(shuffle=False) for x, y in zip(xb, yb)][:len(first)]
    for items in first, second:
        record, batches = distil(tensor_dls(items, bs), teacher, TeacherCache(path=tmp_path, allow_random=True),
                                 loss_func=CrossEntropyLossFlat())
        assert record.items > len(items) - bs and max_diff(batches, teacher) < 1e-5  # every item, its own output
    record, batches = distil(tensor_dls(list(first), bs), teacher, TeacherCache(path=tmp_path, allow_random=True),
                             loss_func=CrossEntropyLossFlat())
    assert record.items < bs and max_diff(batches, teacher) < 1e-5  # the first's outputs, but a dropped batch's items
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_another_compute_precision_gets_a_store_of_its_own(dls, teacher_file, tmp_path):
    "A fit under bfloat16 autocast (to_bf16, its autocast pointed at the CPU) reuses no float32 output"
    teacher = teacher_from(teacher_file)
    distil(dls, teacher, tmp_path)  # float32: every item of a whole batch stored
    record, batches = distil(dls, teacher, tmp_path, cbs=[MixedPrecision('bf16'), CPUAutocast(), RecordFirstBatch()])
    assert record.items == dls.bs  # the first step ran the teacher on its whole batch
    ((inputs, handed),) = batches
    teacher.to(memory_format=torch.channels_last)  # as the callback lays a teacher out on the CPU during a fit: bfloat16
    # convolutions round otherwise in the other layout, on some batches
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16): live = teacher(inputs).float()
    assert torch.equal(handed, live) and max_diff(batches, teacher) > 1e-3  # bfloat16 outputs, not float32 ones
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(json.loads((f/'manifest.json').read_text())['identity']['precision'] for f in folders) == [
        'bfloat16', 'float32']


def test_a_new_store_takes_its_room_on_disk(tmp_path):
    "No sparse file: every byte of a store is allocated when it is made, so a full disk cannot strike a write later"
    store = TeacherStore.create(tmp_path/'store', {}, 100_000, dict(outputs=((10,), 'float32')), (10,))
    for name in ('outputs', 'filled'):
        file = tmp_path/'store'/f'{name}.npy'
        assert file.stat().st_blocks * 512 >= file.stat().st_size > 100_000
    assert not np.asarray(store.filled).any() and not np.asarray(store.arrays['outputs']).any()


@pytest.fixture
def small_disk(tmp_path) -> Path:
    "A file system of 1 MiB (a tmpfs mounted for the test, which needs root: skipped where it cannot be)"
    (folder := tmp_path/'disk').mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(folder)], capture_output=True).returncode:
        pytest.skip('A tmpfs cannot be mounted here (it needs root).')
    yield folder
    subprocess.run(['umount', str(folder)], check=True)


def no_room(needs: str, folder: Path) -> str:
    "A `match=` pattern for the whole error of a store that needs `needs` in `folder`, with what is free there now"
    return whole(f'The teacher store needs {needs} and {folder} has {shutil.disk_usage(folder).free / 1024:.1f} KiB '
                 'free: pass another path, or a smaller storage (dtype=torch.float16, or top_k).')


def test_a_store_the_disk_cannot_hold_is_refused_saying_what_it_needs(small_disk):
    """A store that fits is made; a second as large no longer fits (the first took its room for real); nor does one
    that the free space holds but not with its files' headers and pages: refused, and nothing of it left"""
    layout = dict(outputs=((10,), 'float32'), inputs=((), 'float32'))  # 45 bytes an item, with the flag
    TeacherStore.create(small_disk/'first', {}, 12_000, layout, (10,))  # 527.3 KiB
    with pytest.raises(OSError, match=no_room('527.3 KiB', small_disk)):
        TeacherStore.create(small_disk/'second', {}, 12_000, layout, (10,))
    n_items = shutil.disk_usage(small_disk).free // 45
    with pytest.raises(OSError, match=no_room(f'{45 * n_items / 1024:.1f} KiB', small_disk)):
        TeacherStore.create(small_disk/'third', {}, n_items, layout, (10,))
    assert sorted(p.name for p in small_disk.iterdir()) == ['.lock', 'first']


class Scaled(DisplayedTransform):
    "An item transform whose repr shows the function it holds, and with it the function's address"
    order = 10
    def __init__(self, scale): store_attr()
    def encodes(self, x: TensorImage): return self.scale(x)


def halving():
    "A new function object each call: another address, as in another process"
    def half(x): return x / 2
    return half


def test_transforms_that_hold_functions_match_across_processes(digits_path, teacher_file, tmp_path):
    "A function's repr holds its address, another in every process: the store is found again all the same"
    teacher, functions = teacher_from(teacher_file), [halving(), halving()]  # both alive: two addresses
    assert repr(Scaled(functions[0])) != repr(Scaled(functions[1]))
    records = []
    for f in functions:
        dls = ImageDataLoaders.from_folder(digits_path, train='train', valid='valid', item_tfms=[Resize(32), Scaled(f)],
                                           bs=64, num_workers=0)
        records.append(distil(dls, teacher, tmp_path)[0])
    assert records[0].items > len(dls.train.dataset) - dls.bs and records[1].items < dls.bs
    transforms = json.loads((only_store(tmp_path)/'manifest.json').read_text())['identity']['data']['transforms']
    assert any(t.startswith("Scaled -- {'scale': <function halving.<locals>.half>}") for t in transforms)  # no address


def test_images_rewritten_in_place_stop_training_and_name_the_store(digits_path, teacher_file, tmp_path):
    "Files rewritten under the same paths find the same store: the check of each item's input stops the fit"
    dls = digits_dls(some_digits(digits_path, tmp_path/'data', 0, n=5, copy=True), size=32, bs=16, augment=False,
                     num_workers=0)
    teacher = teacher_from(teacher_file)
    folder = fill_teacher_cache(teacher, dls, tmp_path/'stores')
    for image in (tmp_path/'data'/'train').rglob('*.png'):
        ImageOps.invert(Image.open(image).convert('RGB')).save(image)
    with pytest.raises(RuntimeError, match=changed_inputs(f' in the store {folder}')):
        distil(dls, teacher, tmp_path/'stores')
    assert all(image.is_file() for image in (digits_path/'train').rglob('*.png'))  # the copies were rewritten only


def test_a_process_killed_while_filling_leaves_valid_outputs_and_the_next_run_completes(digits_path, dls, teacher_file,
                                                                                        tmp_path):
    killed = worker(digits_path, teacher_file, tmp_path, '--kill-after', 5)
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    teacher = teacher_from(teacher_file)
    filled = filled_and_valid(only_store(tmp_path), teacher, dls)
    assert filled == 5 * dls.bs  # five batches stored; the others never were
    rerun = finished(worker(digits_path, teacher_file, tmp_path))
    assert rerun['teacher_items'] <= len(dls.train.dataset) - filled and rerun['max_diff'] < 1e-5  # only what was missing
    assert filled_and_valid(only_store(tmp_path), teacher, dls) >= len(dls.train.dataset) - dls.bs


def test_two_processes_filling_one_store_at_once(digits_path, dls, teacher_file, tmp_path):
    runs = [worker(digits_path, teacher_file, tmp_path, '--seed', seed) for seed in (0, 1)]  # other orders of items
    results = [finished(run) for run in runs]
    assert all(r['max_diff'] < 1e-5 for r in results)
    n_items = len(dls.train.dataset)
    assert n_items - dls.bs <= sum(r['teacher_items'] for r in results) <= 2 * n_items
    assert filled_and_valid(only_store(tmp_path), teacher_from(teacher_file), dls) > n_items - 2 * dls.bs


def test_float16_and_top_k_storage(dls, trained_teacher, tmp_path):
    """Stores filled ahead by `fill_teacher_cache` from a trained teacher, then read in training: dtype and bytes per
    item, and the loss against full outputs"""
    teacher, n_items, n_classes = trained_teacher, len(dls.train.dataset), 10
    set_seed(0, reproducible=True)
    student = tiny_cnn(8).eval()
    for name, settings in {'float16': dict(dtype=torch.float16), 'top3': dict(top_k=3)}.items():
        store = TeacherStore(fill_teacher_cache(teacher, dls, tmp_path/name, **settings))
        assert np.asarray(store.filled).all()
        assert store.manifest['identity']['storage'] == dict(dtype=str(settings.get('dtype', torch.float32)),
                                                             top_k=settings.get('top_k'))  # part of the store's name
        outputs, per_item = store.arrays['outputs'], store.manifest['bytes_per_item']
        if name == 'float16':
            assert outputs.dtype == np.float16 and outputs.shape == (n_items, n_classes)
            assert per_item == 2 * n_classes + 4 + 1  # outputs, input fingerprint, flag
        else:
            assert outputs.dtype == np.float32 and outputs.shape == (n_items, 3 + 1)  # top 3 and the rest's log-mass
            assert store.arrays['indices'].dtype == np.int16 and per_item == 4 * 4 + 3 * 2 + 4 + 1
        record, batches = distil(dls, teacher, TeacherCache(path=tmp_path/name, **settings))
        assert record.items == 0  # all from the store filled ahead
        with torch.no_grad():
            inputs = torch.cat([x for x, _ in batches])
            stored, live, student_logits = torch.cat([t for _, t in batches]), teacher(inputs), student(inputs)
        for loss, tolerance in TOLERANCE[name].items():
            loss = LOSSES[loss]
            assert abs(float(loss(student_logits, stored) / loss(student_logits, live)) - 1) < tolerance, (name, loss)
        if name == 'top3':  # at T=1 the top 3 probabilities are the teacher's own, and the rest is spread evenly
            top = live.topk(3, dim=-1).indices
            torch.testing.assert_close(stored.softmax(-1).gather(-1, top), live.softmax(-1).gather(-1, top))
            assert torch.allclose(stored.topk(4, dim=-1).values[:, 3:].expand(-1, 7),
                                  stored.topk(7, dim=-1, largest=False).values)
        else: torch.testing.assert_close(stored, live, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('n_classes, index_dtype', [(32767, np.int16), (32768, np.int32)])
def test_top_k_class_indices_take_int32_beyond_int16(dls, tmp_path, n_classes, index_dtype):
    "Top-k keeps class indices in int16 up to 32,767 classes, in int32 beyond (the last class stored right)"
    set_seed(0, reproducible=True)
    teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, n_classes))
    with torch.no_grad(): teacher[2].bias[-1] = 100.  # the last class always first
    store = TeacherStore(fill_teacher_cache(teacher, dls, tmp_path, top_k=2))
    indices = np.asarray(store.arrays['indices'])
    assert indices.dtype == index_dtype and (indices[:, 0] == n_classes - 1).all()


class Sliced(torch.nn.Sequential):
    "A tiny CNN that gives its first `n_out` logits: a setting outside its state dict, so outside the store's name"
    n_out = 10
    def forward(self, x): return super().forward(x)[:, :self.n_out]


def test_a_teacher_whose_outputs_changed_shape_is_stopped_naming_the_store(dls, teacher_file, tmp_path):
    teacher = Sliced(*teacher_from(teacher_file))
    distil(dls, teacher, tmp_path)  # one epoch: the last partial batch is left to fill
    teacher.n_out = 5
    with pytest.raises(ValueError, match=whole(
            f'The teacher gives outputs of shape (5,) per item and the store {only_store(tmp_path)} holds (10,): '
            'delete that folder and fill it again.')):
        fill_teacher_cache(teacher, dls, tmp_path)


def test_filling_from_random_transforms_is_refused_unless_asked(digits_path, teacher_file, tmp_path):
    """`fill_teacher_cache` stores one output per item: from a loader with random transforms only when allowed, and
    then a later fill takes the stored outputs as they are (their inputs are not compared)"""
    teacher, augmented = teacher_from(teacher_file), digits_dls(digits_path, size=32, bs=64, augment=True)
    message = ('These transforms draw random numbers: {}, so the outputs would be those of one random view: fill the '
               'store from a loader without them (augment=False), pass views=K to store K replayable views of each '
               'item, or pass allow_random=True.')
    with pytest.raises(ValueError, match=whole(message.format(
            'Rotate (dls.train.after_batch), Brightness (dls.train.after_batch)'))):
        fill_teacher_cache(teacher, augmented, tmp_path/'store')
    calls = []
    teacher.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    folder = fill_teacher_cache(teacher, augmented.train, tmp_path/'store', allow_random=True)  # a loader, or ...
    assert fill_teacher_cache(teacher, augmented, tmp_path/'store', allow_random=True) == folder  # ... its DataLoaders
    assert sum(calls) == len(augmented.train.dataset) and np.asarray(TeacherStore(folder).filled).all()


def test_a_pickled_cache_holds_its_settings_only_and_finds_its_store_again(dls, teacher_file, tmp_path):
    teacher, cache = teacher_from(teacher_file), TeacherCache(path=tmp_path/'store', top_k=3)
    distil(dls, teacher, cache)
    pickled = pickle.dumps(cache)
    assert len(pickled) < 1000  # no outputs, classes, input fingerprints or store: those take kilobytes
    record, _ = distil(dls, teacher, pickle.loads(pickled))
    assert record.items < dls.bs  # the copy found the store on disk (all but the items of the batch the first fit dropped)


def test_bad_paths_and_settings_are_refused_clearly(dls, teacher_file, tmp_path):
    (tmp_path/'file').write_text('')
    with pytest.raises(NotADirectoryError, match='is a file: pass a folder'): TeacherCache(path=tmp_path/'file')
    with pytest.raises(ValueError, match=whole('TeacherCache stores torch.float32 or torch.float16, not torch.bfloat16.')):
        TeacherCache(path=tmp_path, dtype=torch.bfloat16)
    for top_k in 0, 2.5:
        with pytest.raises(ValueError, match=whole(f'top_k is the number of largest logits kept per item, at least 1: '
                                                   f'got {top_k}.')):
            TeacherCache(top_k=top_k)
    teacher = teacher_from(teacher_file)
    with pytest.raises(ValueError, match=whole(
            'top_k=10 keeps the largest of one row of class logits per item, and the teacher gives outputs of shape '
            '(10,) per item: pass a top_k below the number of classes, or store whole outputs (top_k=None, '
            'dtype=torch.float16 to halve them).')):
        distil(dls, teacher, TeacherCache(top_k=10))
    distil(dls, teacher, tmp_path/'store')
    folder = only_store(tmp_path/'store')
    with pytest.raises(ValueError, match='folder of one teacher store.*pass the folder above it'):
        TeacherCache(path=folder)
    manifest = json.loads((folder/'manifest.json').read_text())
    manifest['identity']['teachers'] = ['0' * 64]
    (folder/'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match='another teacher or other data than its name says'):
        distil(dls, teacher, tmp_path/'store')
    (folder/'outputs.npy').write_bytes((folder/'outputs.npy').read_bytes()[:200])
    with pytest.raises(ValueError, match='damaged.*delete that folder'): TeacherStore(folder)


def test_the_fill_cache_command_fills_a_store_that_training_code_reuses(gtsrb32, gtsrb_data, tmp_path, capsys):
    "`fastkd fill-cache` on one GTSRB class with the shared ResNet-34; the same store found again from Python"
    data, weights = data_folder(gtsrb32, tmp_path/'data'), gtsrb_data/'teachers'/'resnet34-gtsrb32.pth'
    assert main(['fill-cache', '--data', str(data), '--teacher-weights', str(weights), '--classes', '0', '--size', '32',
                 '--cache', str(tmp_path/'cache'), '--dtype', 'float16']) == 0
    assert "cache=TeacherCache(path=" in capsys.readouterr().out
    dls = gtsrb_dls(data, size=32, bs=64, classes=[0], augment=False, num_workers=0)
    teacher, calls = load_teacher(weights, resnet34, 43), []
    teacher.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    folder = fill_teacher_cache(teacher, dls, tmp_path/'cache', dtype=torch.float16)
    assert calls == [] and folder == only_store(tmp_path/'cache')  # all there, in the store the command filled
    store = TeacherStore(folder)
    assert np.asarray(store.filled).all() and store.n_items == len(dls.train.dataset)
    xb, _ = dls.train.new(shuffle=False, drop_last=False).one_batch()
    with torch.no_grad(): live = teacher(xb)
    torch.testing.assert_close(torch.from_numpy(np.array(store.arrays['outputs'][:len(xb)])).float(), live,
                               rtol=1e-3, atol=2e-2)
    # at 16 px with --teacher-size 32 the teacher sees its own size: another store, which training code finds again
    assert main(['fill-cache', '--data', str(data), '--teacher-weights', str(weights), '--classes', '0', '--size', '16',
                 '--teacher-size', '32', '--cache', str(tmp_path/'cache'), '--dtype', 'float16']) == 0
    assert 'teacher_input=TeacherInput(size=(32, 32))) on gtsrb_dls(' in capsys.readouterr().out
    small, calls[:] = gtsrb_dls(data, size=16, bs=64, classes=[0], augment=False, num_workers=0), []
    again = fill_teacher_cache(teacher, small, tmp_path/'cache', dtype=torch.float16, teacher_input=TeacherInput(32))
    assert calls == [] and again != folder and len([d for d in (tmp_path/'cache').iterdir() if d.is_dir()]) == 2
