"GTSRB preparation on the real data of ../shared/data/gtsrb: annotations, track-wise split, test set, DataLoaders."
import csv
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from fastai.data.transforms import Normalize
from fastai.vision.augment import RandTransform

from conftest import data_folder
from fastkd.gtsrb import (copy_test_set, gtsrb_class_names, gtsrb_dls, gtsrb_test_dl, load_training_annotations,
                          prepare_gtsrb, read_annotations, split_train_validation_sets)

CLASSES = [0, 14, 19, 42]  # 7, 26, 7 and 8 complete tracks: small, and string order ('14' < '19' < '42') != index


def snapshot(root: Path) -> dict[str, str]:
    "The md5 of every file under `root`, by relative path"
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob('*') if p.is_file()}


def file_states(root: Path) -> dict[str, tuple[int, int]]:
    "Inode and modification time of every file under `root`: they change when a file is rewritten"
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob('*') if p.is_file()}


def names(folder: Path) -> set[str]:
    "The file names in `folder`"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def track(filename: str) -> str: return filename.split('_')[0]


@pytest.fixture(scope='module')
def sample(gtsrb_data) -> Path:
    "The original-size sample: `Final_Training/Images` with 46-47 images of incomplete tracks per class"
    return gtsrb_data/'sample'/'GTSRB'/'Final_Training'/'Images'


@pytest.fixture(scope='module')
def prepared(gtsrb32, tmp_path_factory) -> tuple[Path, dict, dict]:
    "`prepare_gtsrb` on CLASSES of the 32x32 archive: the data folder, the returned paths, the source before"
    before = snapshot(gtsrb32)
    path = data_folder(gtsrb32, tmp_path_factory.mktemp('prepared')/'data')
    return path, prepare_gtsrb(path, classes=CLASSES), before


def test_class_names(gtsrb_data):
    with open(gtsrb_data/'signnames.csv', newline='') as f: official = {int(r['ClassId']): r['SignName'] for r in csv.DictReader(f)}
    assert gtsrb_class_names() == [official[i] for i in range(43)]
    assert gtsrb_class_names()[14] == 'Stop'


def test_read_annotations_lf_unsorted_and_crlf(sample, gtsrb32):
    lf_file = sample/'00005'/'GT-00005.csv'
    raw = lf_file.read_bytes()
    assert b'\r\n' not in raw
    rows = [l.split(';') for l in raw.decode().splitlines()[1:]]
    assert [r[0] for r in rows] != sorted(r[0] for r in rows)  # the sample's rows are unsorted
    annotations = read_annotations(lf_file)
    assert annotations == sorted((r[0], int(r[7])) for r in rows) and {a.label for a in annotations} == {5}
    crlf_file = gtsrb32/'Final_Training'/'Images'/'00019'/'GT-00019.csv'
    assert b'\r\n' in crlf_file.read_bytes()
    annotations = read_annotations(crlf_file)
    assert len(annotations) == 210 and annotations[0] == ('00000_00000.ppm', 19)
    assert all(not a.filename.endswith('\r') for a in annotations)
    test_labels = read_annotations(gtsrb32/'Final_Test'/'GT-final_test.csv', classes=[14, 19])
    assert {a.label for a in test_labels} == {14, 19} and 0 < len(test_labels) < 3789


def test_load_training_annotations(sample):
    annotations = load_training_annotations(sample)
    assert len(annotations) == 2000 and len({a.label for a in annotations}) == 43
    subset = load_training_annotations(sample, classes=[3, 41])
    assert Counter(a.label for a in subset) == {l: len(read_annotations(sample/f'{l:05d}'/f'GT-{l:05d}.csv')) for l in (3, 41)}


def test_split_sample_by_whole_tracks(sample, tmp_path, capsys):
    before = snapshot(sample)
    folders = [tmp_path/n for n in ('train', 'valid', 'all')]
    written = split_train_validation_sets(sample, *folders)
    train, valid, every = folders
    n_valid = 0
    for label in range(43):
        listed = {a.filename for a in read_annotations(sample/f'{label:05d}'/f'GT-{label:05d}.csv')}
        t, v = names(train/str(label)), names(valid/str(label))
        assert t | v == listed == names(every/str(label)) and not t & v
        assert not {track(f) for f in t} & {track(f) for f in v}, f'class {label} has a track on both sides'
        n_valid += len(v)
    assert written == 2 * 2000 and 0.15 < n_valid / 2000 < 0.25
    copied = snapshot(tmp_path)
    assert all(md5 == before[f'{int(Path(f).parts[1]):05d}/{Path(f).name}'] for f, md5 in copied.items())
    assert snapshot(sample) == before
    states = file_states(tmp_path)
    capsys.readouterr()
    assert split_train_validation_sets(sample, *folders) == 0
    assert 'nothing changed' in capsys.readouterr().out
    assert file_states(tmp_path) == states


def test_prepare_complete_tracks(prepared, gtsrb32):
    path, paths, before = prepared
    assert paths == {'train': path/'train', 'valid': path/'valid', 'all': path/'all', 'test': path/'test'}
    assert sorted(int(p.name) for p in paths['all'].iterdir()) == CLASSES  # the class subset only
    for label in CLASSES:
        source = gtsrb32/'Final_Training'/'Images'/f'{label:05d}'
        t, v = names(paths['train']/str(label)), names(paths['valid']/str(label))
        assert t | v == names(paths['all']/str(label)) == names(source) - {f'GT-{label:05d}.csv'} and not t & v
        per_track = Counter(map(track, v))
        assert set(per_track.values()) == {30} and not set(per_track) & set(map(track, t))  # whole tracks
        assert abs(len(v) - 0.2 * (len(t) + len(v))) <= 15  # the number of tracks closest to 20%
    assert snapshot(gtsrb32) == before


def test_prepare_test_set(prepared, gtsrb32):
    path, paths, _ = prepared
    expected = read_annotations(gtsrb32/'Final_Test'/'GT-final_test.csv', classes=CLASSES)
    assert names(paths['test']) == {a.filename for a in expected} | {'labels.csv'}
    assert read_annotations(paths['test']/'labels.csv') == expected
    first = expected[0].filename
    assert (paths['test']/first).read_bytes() == (gtsrb32/'Final_Test'/'Images'/first).read_bytes()


def test_prepare_again_changes_nothing(prepared, capsys):
    path, paths, _ = prepared
    states = file_states(path/'all') | file_states(path/'test')
    assert prepare_gtsrb(path, classes=CLASSES) == paths
    out = capsys.readouterr().out
    assert out.count('nothing changed') == 2, out
    assert file_states(path/'all') | file_states(path/'test') == states


def test_another_split_into_the_same_folder_is_refused(prepared):
    path, _, _ = prepared
    states = file_states(path/'train') | file_states(path/'valid')
    with pytest.raises(FileExistsError, match='another split'): prepare_gtsrb(path, classes=CLASSES, validation_fraction=0.4)
    assert file_states(path/'train') | file_states(path/'valid') == states


def test_more_classes_later_and_hard_links(gtsrb32, tmp_path):
    path = data_folder(gtsrb32, tmp_path/'data')
    prepare_gtsrb(path, classes=[19], link=True)
    states = file_states(path)
    prepare_gtsrb(path, classes=[19, 41], link=True)
    after = file_states(path)
    assert {k: v for k, v in after.items() if k in states and k != 'test/labels.csv'} == \
        {k: v for k, v in states.items() if k != 'test/labels.csv'}
    assert {Path(k).parts[:2] for k in set(after) - set(states) if not k.startswith('test')} == \
        {('train', '41'), ('valid', '41'), ('all', '41')}
    assert {a.label for a in read_annotations(path/'test'/'labels.csv')} == {19, 41}
    src = gtsrb32/'Final_Training'/'Images'/'00041'/'00000_00000.ppm'
    side = 'train' if (path/'train'/'41'/src.name).exists() else 'valid'
    assert (path/side/'41'/src.name).stat().st_ino == (path/'all'/'41'/src.name).stat().st_ino == src.stat().st_ino


def test_seed_draws_other_tracks(gtsrb32, tmp_path):
    source = gtsrb32/'Final_Training'/'Images'
    split = lambda seed: split_train_validation_sets(source, *(tmp_path/f'{seed}'/n for n in ('t', 'v', 'a')),
                                                     classes=[14], seed=seed)
    split(1), split(2)
    assert names(tmp_path/'1'/'v'/'14') != names(tmp_path/'2'/'v'/'14')
    assert len(names(tmp_path/'1'/'v'/'14')) == len(names(tmp_path/'2'/'v'/'14')) == 150


def source_states(root: Path) -> dict[str, tuple]:
    "The bytes, mode and modification time of every file and folder under `root`"
    return {str(p.relative_to(root)): (p.is_file() and hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mode,
                                       p.stat().st_mtime_ns) for p in root.rglob('*')}


@pytest.mark.parametrize('link', [False, True])
def test_sources_are_never_written_not_even_their_mode(sample, tmp_path, link):
    "Read-only sources (0444 files in 0555 folders), copied or hard-linked: the links share the inode, not a chmod"
    images = tmp_path/'data'/'GTSRB'/'Final_Training'/'Images'
    for label in ('00000', '00001'): shutil.copytree(sample/label, images/label)
    for path in sorted(images.rglob('*'), reverse=True): path.chmod(0o444 if path.is_file() else 0o555)
    before = source_states(images)
    try:
        paths = prepare_gtsrb(tmp_path/'data', classes=[0, 1], link=link)
        assert source_states(images) == before
    finally:
        for folder in images.iterdir(): folder.chmod(0o755)
    copies = sorted(paths['all'].glob('*/*.ppm'))
    assert len(copies) == len(list(images.glob('*/*.ppm'))) and all(
        (c.stat().st_ino == (images/f'{int(c.parent.name):05d}'/c.name).stat().st_ino) == link for c in copies)


def test_the_split_seed_is_kept_in_the_folder_and_another_is_refused(gtsrb32, tmp_path):
    path = data_folder(gtsrb32, tmp_path/'data')
    prepare_gtsrb(path, classes=[19])
    assert json.loads((path/'split.json').read_text()) == {'split_seed': 42, 'validation_fraction': 0.2}
    states = file_states(path)
    with pytest.raises(FileExistsError, match=r'holds another split, prepared with split seed 42 and validation '
                       r'fraction 0\.2 \(its split\.json\), not 7 and 0\.2\. Nothing was changed: pass --split-seed 42 '
                       r'--validation-fraction 0\.2 '):
        prepare_gtsrb(path, classes=[19, 41], seed=7)
    assert file_states(path) == states
    prepare_gtsrb(path, classes=[19, 41])  # the same split: more classes join it
    assert json.loads((path/'split.json').read_text())['split_seed'] == 42 and names(path/'all') == {'19', '41'}


def test_copy_test_set_adds_classes(gtsrb32, tmp_path):
    images, labels = gtsrb32/'Final_Test'/'Images', gtsrb32/'Final_Test'/'GT-final_test.csv'
    first = copy_test_set(images, tmp_path/'test', labels, classes=[14])
    second = copy_test_set(images, tmp_path/'test', labels, classes=[0])
    assert {a.label for a in first} == {14} and {a.label for a in second} == {0}
    assert read_annotations(tmp_path/'test'/'labels.csv') == sorted(first + second)


def test_dls_vocab_is_class_id(prepared):
    path, paths, _ = prepared
    dls = gtsrb_dls(path, size=32, bs=16, num_workers=0)
    assert list(dls.vocab) == list(range(43))  # all classes, numeric order, though only CLASSES were prepared
    for ds in (dls.train_ds, dls.valid_ds):
        assert all(int(y) == int(f.parent.name) for f, (_, y) in zip(ds.items, ds))
    assert len(dls.train_ds) == sum(len(names(paths['train']/str(c))) for c in CLASSES)
    assert {f.parts[-3] for f in dls.valid_ds.items} == {'valid'}
    x, y = dls.one_batch()
    assert x.shape == (16, 3, 32, 32) and set(y.tolist()) <= set(CLASSES)
    assert any(isinstance(t, RandTransform) for t in dls.train.after_batch)
    norm = next(t for t in dls.after_batch if isinstance(t, Normalize))
    assert torch.allclose(norm.mean.flatten().cpu(), torch.tensor([0.485, 0.456, 0.406]))


def test_dls_class_subset_and_all(prepared):
    path, paths, _ = prepared
    dls = gtsrb_dls(path, size=32, bs=16, classes=[14, 42], train='all', augment=False, num_workers=0)
    assert [type(t).__name__ for t in dls.train.after_batch] == ['IntToFloatTensor', 'Normalize']  # no augmentation
    assert len(dls.train_ds) == len(names(paths['all']/'14')) + len(names(paths['all']/'42'))
    assert {int(y) for _, y in dls.valid_ds} == {14, 42} and list(dls.vocab) == list(range(43))


def test_test_dl_with_labels(prepared, gtsrb32):
    path, _, _ = prepared
    dls = gtsrb_dls(path, size=32, bs=16, num_workers=0)
    dl, labels = gtsrb_test_dl(dls, path, classes=[19])
    expected = read_annotations(gtsrb32/'Final_Test'/'GT-final_test.csv', classes=[19])
    assert [f.name for f in dl.items] == [a.filename for a in expected]
    assert labels.tolist() == [19] * len(expected) and len(expected) > 0
    assert next(iter(dl))[0].shape[1:] == (3, 32, 32)
