"Bad GTSRB input gets a clear error, and nothing is written, lost or changed."
import hashlib
import io
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import data_folder
from fastkd.gtsrb import (copy_test_set, gtsrb_dls, gtsrb_test_dl, prepare_gtsrb, read_annotations,
                          split_train_validation_sets)

ROW = ';29;30;5;6;24;25;'  # Width;...;Roi.Y2 between a file name and a ClassId
DAMAGE = pytest.mark.parametrize('damage', [lambda b: b[:len(b) // 2], lambda b: b'not an image at all'],
                                 ids=['truncated', 'garbage'])


def snapshot(root: Path) -> dict[str, str]:
    "The md5 of every file under `root`, by relative path"
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob('*') if p.is_file()}


@pytest.fixture
def source(gtsrb_data, tmp_path) -> Path:
    "Classes 0 and 1 of the original-size sample, copied so a test may damage them: `Final_Training/Images`"
    images = tmp_path/'data'/'GTSRB'/'Final_Training'/'Images'
    for label in ('00000', '00001'):
        shutil.copytree(gtsrb_data/'sample'/'GTSRB'/'Final_Training'/'Images'/label, images/label)
    return images


def split(source: Path, dest: Path, **kwargs) -> int:
    return split_train_validation_sets(source, dest/'train', dest/'valid', dest/'all', classes=[0, 1], **kwargs)


def add_row(source: Path, row: str):
    with open(source/'00000'/'GT-00000.csv', 'a', newline='') as f: f.write(row + '\n')


@pytest.mark.parametrize('row, error, message', [
    ('00000_00000.ppm;29;30', ValueError, 'malformed row'),
    (f'00000_00000.ppm{ROW}zero', ValueError, 'is not a number'),
    (f'../00001/00000_00000.ppm{ROW}0', ValueError, 'not a plain image file name'),
    (f'/etc/hostname{ROW}0', ValueError, 'not a plain image file name'),
    (f'99999_00000.ppm{ROW}43', ValueError, 'unknown class id 43'),
    (f'99999_00000.ppm{ROW}1', ValueError, 'with another class than 0'),
    (f'99999_00000.ppm{ROW}0', FileNotFoundError, r'missing, e.g. .*99999_00000.ppm'),
    (f'not-a-track.ppm{ROW}0', ValueError, 'not a GTSRB training name'),
], ids=['few fields', 'ClassId not a number', 'dot-dot', 'absolute', 'unknown class', 'wrong folder',
        'missing image', 'no track'])
def test_bad_rows(source, tmp_path, row, error, message):
    add_row(source, row)
    before = snapshot(source)
    with pytest.raises(error, match=message): split(source, tmp_path/'out')
    assert not (tmp_path/'out').exists() and snapshot(source) == before


def test_missing_csv(source, tmp_path):
    (source/'00001'/'GT-00001.csv').unlink()
    with pytest.raises(FileNotFoundError, match='GT-00001.csv is missing'): split(source, tmp_path/'out')
    assert not (tmp_path/'out').exists()


def test_unknown_classes_argument(source, tmp_path):
    with pytest.raises(ValueError, match=r'Unknown GTSRB class ids \[43\]'):
        split_train_validation_sets(source, tmp_path/'t', tmp_path/'v', tmp_path/'a', classes=[1, 43])
    with pytest.raises(ValueError, match='ClassIds'): gtsrb_dls(tmp_path, classes=['stop'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']


@DAMAGE
def test_corrupt_images_all_named_in_one_run(source, tmp_path, damage):
    "Three damaged images in two classes: one run names all three (not one per run), and writes nothing"
    images = [sorted((source/'00001').glob('*.ppm'))[i] for i in (3, 7)] + [sorted((source/'00000').glob('*.ppm'))[5]]
    for image in images: image.write_bytes(damage(image.read_bytes()))
    with pytest.raises(ValueError, match='3 images are not readable images') as error: split(source, tmp_path/'out')
    assert all(str(image) in str(error.value) for image in images)
    assert 'unpack the official GTSRB zips again' in str(error.value)
    assert not (tmp_path/'out').exists()


def test_destination_with_other_files(source, tmp_path):
    dest = tmp_path/'out'
    split(source, dest)
    changed = next((dest/'all'/'1').iterdir())
    changed.write_bytes(b'my own data')
    before = snapshot(dest)
    with pytest.raises(FileExistsError, match='already hold other data'): split(source, dest)
    assert snapshot(dest) == before and changed.read_bytes() == b'my own data'
    changed.unlink()
    (dest/'valid'/'0'/'mine.ppm').write_bytes(b'mine')
    with pytest.raises(FileExistsError, match=r'holds mine.ppm .*another split'): split(source, dest)
    assert not (dest/'all'/'1'/changed.name).exists()  # refused before writing anything


def test_bad_validation_fraction(source, tmp_path):
    with pytest.raises(ValueError, match='validation_fraction'): split(source, tmp_path/'out', validation_fraction=1.5)


def test_test_set_errors(gtsrb_data, tmp_path):
    images = tmp_path/'Images'
    images.mkdir()
    (tmp_path/'GT-final_test.test.csv').write_text('Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\r\n00000.ppm;1;1;0;0;1;1\r\n')
    with pytest.raises(ValueError, match='GT-final_test.csv in GTSRB_Final_Test_GT.zip'):
        copy_test_set(images, tmp_path/'test', tmp_path/'GT-final_test.test.csv')
    (tmp_path/'GT-final_test.csv').write_text(f'Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n00000.ppm{ROW}16\r\n')
    with pytest.raises(FileNotFoundError, match='00000.ppm'): copy_test_set(images, tmp_path/'test', tmp_path/'GT-final_test.csv')
    assert not (tmp_path/'test').exists()


def test_prepare_needs_data_and_test_labels(source, tmp_path):
    with pytest.raises(FileNotFoundError, match='No GTSRB training images'): prepare_gtsrb(tmp_path/'empty')
    data = source.parents[2]
    (data/'GTSRB'/'Final_Test'/'Images').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='GT-final_test.csv'): prepare_gtsrb(data, classes=[0, 1])
    assert sorted(p.name for p in data.iterdir()) == ['GTSRB']
    with pytest.raises(FileNotFoundError, match='run prepare_gtsrb'): gtsrb_dls(data)


def make_zip(path: Path, members: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    "Write a zip of `members` to `path`; its expected (size, md5) by name, as `prepare_gtsrb` takes them"
    with zipfile.ZipFile(path, 'w') as zf:
        for name, data in members.items(): zf.writestr(name, data)
    return {path.name: (path.stat().st_size, hashlib.md5(path.read_bytes()).hexdigest())}


def test_zip_failing_its_checksum(source, tmp_path):
    data = tmp_path/'zips'
    data.mkdir()
    zips = make_zip(data/'GTSRB_Final_Training_Images.zip', {'GTSRB/Final_Training/Images/00000/GT-00000.csv': b'x'})
    size, _ = zips['GTSRB_Final_Training_Images.zip']
    with pytest.raises(ValueError, match='fails its checksum .*md5'):
        prepare_gtsrb(data, zips={'GTSRB_Final_Training_Images.zip': (size, '0' * 32)})
    assert sorted(p.name for p in data.iterdir()) == ['GTSRB_Final_Training_Images.zip']  # kept, nothing unpacked


@pytest.mark.parametrize('name', ['../escaped.txt', 'GTSRB/../../escaped.txt', '/tmp/escaped.txt'])
def test_zip_member_outside_destination(tmp_path, name):
    data = tmp_path/'a'/'b'
    data.mkdir(parents=True)
    zips = make_zip(data/'GTSRB_Final_Test_GT.zip', {'GT-final_test.csv': b'Filename;ClassId\n', name: b'escaped'})
    with pytest.raises(ValueError, match='would unpack outside'): prepare_gtsrb(data, zips=zips)
    assert not list(tmp_path.rglob('escaped.txt')) and not Path('/tmp/escaped.txt').exists()
    assert sorted(p.name for p in data.iterdir()) == ['GTSRB_Final_Test_GT.zip']


def test_read_annotations_duplicates(tmp_path):
    (tmp_path/'GT.csv').write_text(f'Filename;ClassId\na.ppm;1\nb.ppm;2\na.ppm;1\n')
    with pytest.raises(ValueError, match=r"\['a.ppm'\] more than once"): read_annotations(tmp_path/'GT.csv')


@pytest.fixture
def class_zero(gtsrb32, tmp_path) -> Path:
    "A data folder where only class 0 of the 32x32 archive was prepared (train, valid and its test images), as copies"
    path = data_folder(gtsrb32, tmp_path/'class_zero')
    prepare_gtsrb(path, classes=[0])
    return path


def test_dls_for_classes_never_prepared(class_zero):
    path = re.escape(repr(str(class_zero)))
    with pytest.raises(FileNotFoundError, match=r'No images of classes \[1, 2\] in .*train \(nor in .*valid\): they '
                       r'were never prepared there \(it holds classes \[0\]\). Run '
                       rf'prepare_gtsrb\({path}, classes=\[1, 2\]\)'):
        gtsrb_dls(class_zero, classes=[1, 2])
    with pytest.raises(FileNotFoundError, match=rf'classes \[2\] in .*prepare_gtsrb\({path}, classes=\[2\]\)'):
        gtsrb_dls(class_zero, classes=[0, 2])
    assert len(gtsrb_dls(class_zero, size=16, classes=[0], num_workers=0).train_ds) > 0
    (class_zero/'empty'/'train').mkdir(parents=True)
    (class_zero/'empty'/'valid').mkdir()
    with pytest.raises(FileNotFoundError, match=r"No images in .*classes none.*prepare_gtsrb\('[^']*empty'\) first"):
        gtsrb_dls(class_zero/'empty')


def test_test_dl_for_classes_never_prepared(class_zero):
    dls = gtsrb_dls(class_zero, size=16, classes=[0], num_workers=0)
    for classes in ([1], [0, 1]):
        with pytest.raises(FileNotFoundError, match=r'test holds no test images of classes \[1\]: '
                           r'.*classes=\[1\]\) with the test zips'):
            gtsrb_test_dl(dls, class_zero, classes=classes)
    assert len(gtsrb_test_dl(dls, class_zero, classes=[0])[1]) > 0


@DAMAGE
def test_image_damaged_after_preparation_is_named(class_zero, damage):
    "fastai's own error says 'image file is truncated' without a file name; a training or test batch names the file"
    dls = gtsrb_dls(class_zero, size=16, bs=8, classes=[0], num_workers=0)
    test_dl, _ = gtsrb_test_dl(dls, class_zero, classes=[0])
    for dl, image in ((dls.valid, dls.valid_ds.items[3]), (test_dl, test_dl.items[2])):
        image.write_bytes(damage(image.read_bytes()))
        with pytest.raises(OSError, match=f'{re.escape(str(image))} is not a readable image .*delete it and run '
                           'prepare_gtsrb again'):
            for _ in dl: pass


def make_tarball(path: Path, folder: Path, arcname: str, extra: dict[str, bytes] = {}, link: str | None = None) -> Path:
    "Pack `folder` as `arcname` into the tarball `path`, plus `extra` members by name and a symlink named `link`"
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(folder, arcname=arcname)
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, '/etc/hostname'
            tar.addfile(info)
    return path


def test_tarball_is_unpacked_and_prepared_as_its_folder(source, tmp_path):
    "A folder holding only a tarball of GTSRB/ prepares exactly as the unpacked folder does; a rerun changes nothing"
    packed = tmp_path/'packed'
    packed.mkdir()
    make_tarball(packed/'gtsrb32.tar.gz', source.parents[1], 'GTSRB')
    (packed/'.gtsrb32.tar.gz.unpacking'/'GTSRB').mkdir(parents=True)  # left by a run killed while unpacking
    (packed/'.gtsrb32.tar.gz.unpacking'/'GTSRB'/'stale.ppm').write_bytes(b'half')
    prepare_gtsrb(packed, classes=[0, 1])
    prepare_gtsrb(source.parents[2], classes=[0, 1])
    assert snapshot(packed/'GTSRB') == snapshot(source.parents[2]/'GTSRB')
    assert sorted(p.name for p in packed.iterdir()) == ['GTSRB', 'all', 'gtsrb32.tar.gz', 'split.json', 'train',
                                                       'valid']
    for folder in ('train', 'valid', 'all'): assert snapshot(packed/folder) == snapshot(source.parents[2]/folder)
    before = {str(p): p.stat().st_mtime_ns for p in packed.rglob('*')}
    prepare_gtsrb(packed, classes=[0, 1])
    assert {str(p): p.stat().st_mtime_ns for p in packed.rglob('*')} == before


@pytest.mark.parametrize('extra, link, message', [
    ({'../escaped.txt': b'escaped'}, None, 'would unpack outside'),
    ({'GTSRB/../../escaped.txt': b'escaped'}, None, 'would unpack outside'),
    ({'/tmp/escaped-fastkd.txt': b'escaped'}, None, 'would unpack outside'),
    ({}, 'GTSRB/Final_Training/Images/00000/00000_00000.ppm', 'a link'),
], ids=['dot-dot', 'dot-dot inside', 'absolute', 'symlink'])
def test_tarball_member_outside_destination(source, tmp_path, extra, link, message):
    data = tmp_path/'a'/'b'
    data.mkdir(parents=True)
    make_tarball(data/'gtsrb32.tar.gz', source.parents[1], 'GTSRB', extra, link)
    with pytest.raises(ValueError, match=f'{message}.*Nothing was unpacked'): prepare_gtsrb(data)
    assert not list(tmp_path.rglob('escaped*')) and not Path('/tmp/escaped-fastkd.txt').exists()
    assert sorted(p.name for p in data.iterdir()) == ['gtsrb32.tar.gz']


def test_tarball_without_gtsrb_folder_or_cut_short_leaves_nothing(source, tmp_path):
    "Packed from inside GTSRB/ (files written, then refused) or cut short: an error, and no GTSRB/ or temporary folder"
    data = tmp_path/'packed'
    data.mkdir()
    tarball = make_tarball(data/'gtsrb.tgz', source.parents[1], '.')
    with pytest.raises(ValueError, match='holds no GTSRB/ folder: it is not a copy of GTSRB in the official layout'):
        prepare_gtsrb(data)
    assert sorted(p.name for p in data.iterdir()) == ['gtsrb.tgz']
    make_tarball(tarball, source.parents[1], 'GTSRB')
    tarball.write_bytes(tarball.read_bytes()[:tarball.stat().st_size // 2])
    with pytest.raises(ValueError, match='gtsrb.tgz is not a readable tarball .*cut short. Nothing was unpacked'):
        prepare_gtsrb(data)
    assert sorted(p.name for p in data.iterdir()) == ['gtsrb.tgz']
    make_tarball(data/'other.tar.gz', source.parents[1], 'GTSRB')
    with pytest.raises(ValueError, match=r"several tarballs, \['gtsrb.tgz', 'other.tar.gz'\]"): prepare_gtsrb(data)
