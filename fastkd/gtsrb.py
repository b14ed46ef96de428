"""GTSRB preparation: the official zips or folders in, `train/valid/all/test` folders and fastai `DataLoaders` out.

The German Traffic Sign Recognition Benchmark (Stallkamp et al., Neural Networks 2012) ships as three zips.
`download_gtsrb` fetches and unpacks them, `prepare_gtsrb` (from the zips, their `GTSRB/` folder, or a tarball of
that folder such as the 32x32 copy `gtsrb32.tar.gz`) makes the folders of the reference notebook
(`train/<ClassId>/`, `valid/<ClassId>/`, `all/<ClassId>/`, `test/` with `labels.csv`), `gtsrb_dls` and
`gtsrb_test_dl` load them. Sources are only read, never moved; every file is written to a temporary name
and renamed into place, and a second run over a complete destination changes nothing.
Training images come in tracks of one physical sign (`TTTTT_IIIII.ppm`): the validation split keeps each
track whole on one side, so no sign leaks from training into validation.
"""
from __future__ import annotations

import csv
import filecmp
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections import defaultdict, namedtuple
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterable
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import GrandparentSplitter, IntToFloatTensor, Normalize, get_image_files, image_extensions
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import PILImage, imagenet_stats
from fastai.vision.data import ImageDataLoaders
from fastprogress.fastprogress import progress_bar
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .files import atomic_write

__all__ = ['Annotation', 'read_annotations', 'load_training_annotations', 'copy_files', 'split_train_validation_sets',
           'copy_test_set', 'gtsrb_class_names', 'download_gtsrb', 'prepare_gtsrb', 'gtsrb_dls', 'gtsrb_test_dl']

N_CLASSES = 43
GTSRB_URL = 'https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/'
GTSRB_ZIPS = {  # name: (bytes, md5) of the official distribution
    'GTSRB_Final_Training_Images.zip': (187_490_228, '513f3c79a4c5141765e10e952eaa2478'),
    'GTSRB_Final_Test_Images.zip': (88_978_620, 'c7e4e6327067d32654124b0fe9e82185'),
    'GTSRB_Final_Test_GT.zip': (99_620, 'fe31e9c9270bbcd7b84b7f21a9d9d9e5')}
TEST_LABELS = 'labels.csv'  # `Filename;ClassId` of the images in `test/`
SPLIT = 'split.json'  # in a prepared folder: the split seed and validation fraction that made train/ and valid/
TARBALLS = ('.tar.gz', '.tgz', '.tar', '.tar.bz2', '.tar.xz')  # a GTSRB/ folder packed so, e.g. gtsrb32.tar.gz

_CLASS_NAMES = (
    'Speed limit (20km/h)', 'Speed limit (30km/h)', 'Speed limit (50km/h)', 'Speed limit (60km/h)',
    'Speed limit (70km/h)', 'Speed limit (80km/h)', 'End of speed limit (80km/h)', 'Speed limit (100km/h)',
    'Speed limit (120km/h)', 'No passing', 'No passing for vehicles over 3.5 metric tons',
    'Right-of-way at the next intersection', 'Priority road', 'Yield', 'Stop', 'No vehicles',
    'Vehicles over 3.5 metric tons prohibited', 'No entry', 'General caution', 'Dangerous curve to the left',
    'Dangerous curve to the right', 'Double curve', 'Bumpy road', 'Slippery road', 'Road narrows on the right',
    'Road work', 'Traffic signals', 'Pedestrians', 'Children crossing', 'Bicycles crossing', 'Beware of ice/snow',
    'Wild animals crossing', 'End of all speed and passing limits', 'Turn right ahead', 'Turn left ahead',
    'Ahead only', 'Go straight or right', 'Go straight or left', 'Keep right', 'Keep left', 'Roundabout mandatory',
    'End of no passing', 'End of no passing by vehicles over 3.5 metric tons')

Annotation = namedtuple('Annotation', ['filename', 'label'])
Annotation.__doc__ = 'One row of a GTSRB ground-truth csv: the image file name and its ClassId'


def gtsrb_class_names() -> list[str]:
    "The 43 sign names, indexed by ClassId"
    return list(_CLASS_NAMES)


# Annotations

def _check_classes(classes: Iterable[int] | None) -> set[int] | None:
    "`classes` as a set of ClassIds, or None for all; an error for ids GTSRB does not have"
    if classes is None: return None
    if isinstance(classes, (int, str)): classes = [classes]
    try: ids = {int(c) for c in classes}
    except (TypeError, ValueError):
        raise ValueError(f'classes must be GTSRB ClassIds (ints 0 to 42), got {classes!r}.') from None
    unknown = sorted(ids - set(range(N_CLASSES)))
    if unknown or not ids:
        raise ValueError(f'Unknown GTSRB class ids {unknown or "(none given)"}: ClassIds run from 0 to '
                         f'{N_CLASSES - 1}. Pass some of them, or classes=None for all.')
    return ids


def _check_filename(name: str, where: str) -> str:
    "`name` if it is a plain file name: paths, `..` and absolute names could read or write outside the data folders"
    if not name or name in ('.', '..') or '/' in name or '\\' in name or ':' in name:
        raise ValueError(f'{where}: {name!r} is not a plain image file name. GTSRB annotations name files of their '
                         'own folder only (no paths, `..` or absolute names); fix or replace this csv.')
    return name


def _parse_row(row: list[str], columns: dict[str, int], where: str) -> Annotation:
    "The `Annotation` of one csv `row`, or a clear error"
    if len(row) != len(columns):
        raise ValueError(f'{where}: malformed row {";".join(row)!r}, {len(row)} fields where the header has '
                         f'{len(columns)}. Fix this row or unpack the official csv again.')
    filename, label = row[columns['Filename']], row[columns['ClassId']].strip()
    if not label.isdigit():
        raise ValueError(f'{where}: malformed row, ClassId {label!r} is not a number. Fix this row or unpack the '
                         'official csv again.')
    if int(label) >= N_CLASSES:
        raise ValueError(f'{where}: unknown class id {label}: GTSRB ClassIds run from 0 to {N_CLASSES - 1}.')
    return Annotation(_check_filename(filename.strip(), where), int(label))


def read_annotations(filename: str | Path, classes: Iterable[int] | None = None) -> list[Annotation]:
    """The `Annotation`s of a `;`-separated GTSRB ground-truth csv (CRLF or LF, in any row order), sorted by
    file name; `classes` keeps only those ClassIds. Columns are found by the header's `Filename` and `ClassId`."""
    filename, classes = Path(filename), _check_classes(classes)
    if not filename.is_file():
        raise FileNotFoundError(f'Annotation file {filename} is missing: unpack the official GTSRB zips again '
                                '(`download_gtsrb` fetches them).')
    with open(filename, newline='', encoding='utf-8-sig') as f: rows = list(csv.reader(f, delimiter=';'))
    columns = {name.strip(): i for i, name in enumerate(rows[0] if rows else [])}
    if not {'Filename', 'ClassId'} <= set(columns):
        raise ValueError(f'{filename} has no `Filename` and `ClassId` header: it is not a GTSRB ground-truth csv '
                         '(the test labels are GT-final_test.csv in GTSRB_Final_Test_GT.zip, not '
                         'GT-final_test.test.csv).')
    annotations = [_parse_row(row, columns, f'{filename}, line {i}') for i, row in enumerate(rows[1:], 2) if row]
    names = [a.filename for a in annotations]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f'{filename} lists {twice[:3]} more than once: fix or replace this csv.')
    return sorted(a for a in annotations if classes is None or a.label in classes)


def load_training_annotations(source_path: str | Path, classes: Iterable[int] | None = None) -> list[Annotation]:
    """The annotations of `source_path/000NN/GT-000NN.csv` (the official `Final_Training/Images`) for `classes`
    (all 43 by default)"""
    source_path, classes = Path(source_path), _check_classes(classes)
    annotations = []
    for label in sorted(classes or range(N_CLASSES)):
        csv_file = source_path/f'{label:05d}'/f'GT-{label:05d}.csv'
        rows = read_annotations(csv_file)
        wrong = [a.filename for a in rows if a.label != label]
        if wrong: raise ValueError(f'{csv_file} labels {wrong[:3]} with another class than {label}, its folder: '
                                   'unpack the official training zip again.')
        annotations += rows
    return annotations


# Copying

def _same_file(src: Path, dst: Path) -> bool:
    "Whether `dst` already holds the bytes of `src` (or is a hard link to it)"
    return os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)


def image_problem(path: Path) -> str | None:
    "Why `path` is unreadable or not a whole image, or None when it reads (or is no image file)"
    if path.suffix.lower() not in image_extensions: return None
    try:
        with Image.open(path) as image: image.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as e: return f'{path} ({e})'
    return None


def _check_images(paths: Iterable[Path]):
    "An error naming every unreadable image of `paths` at once"
    problems = [p for p in map(image_problem, paths) if p]
    if problems:
        raise ValueError(f'{len(problems)} images are not readable images: {"; ".join(problems)}. Nothing was changed: '
                         'unpack the official GTSRB zips again (or delete these images and their csv rows).')


def _hard_link(src: Path, tmp: str):
    "Make the temporary file `tmp` a hard link to `src`"
    os.remove(tmp)
    os.link(src, tmp)


def _place(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link (when `link`) or copy `src` to `dst` through a temporary name.
    Returns whether to keep linking: False once the file system refused a link (and this file was copied)."""
    if link:
        try:
            atomic_write(dst, partial(_hard_link, src))
            return True
        except OSError as e:
            warnings.warn(f'Cannot hard-link {src} to {dst.parent} ({e.strerror}): copying the files instead.')
    atomic_write(dst, partial(shutil.copyfile, src))
    return False


def _copy_pairs(pairs: list[tuple[Path, Path]], link: bool = False) -> int:
    """Put each `(src, dst)` file in place; returns how many were written. Everything is checked first (sources
    present and readable, no `dst` holding other bytes), so bad input writes nothing."""
    missing = sorted({s for s, _ in pairs if not s.is_file()})
    if missing:
        raise FileNotFoundError(f'{len(missing)} images listed in the annotations are missing, e.g. {missing[0]}: '
                                'unpack the official GTSRB zips again (or remove their rows). Nothing was changed.')
    todo = [(s, d) for s, d in pairs if not (d.exists() and _same_file(s, d))]
    clashes = [d for s, d in todo if d.exists() or d.is_symlink()]
    if clashes:
        raise FileExistsError(f'{len(clashes)} destination files already hold other data, e.g. {clashes[0]}: '
                              'nothing was changed. Prepare into an empty folder, or delete these files if they are '
                              'not needed.')
    _check_images(sorted({s for s, _ in todo}))
    for folder in {d.parent for _, d in todo}: folder.mkdir(parents=True, exist_ok=True)
    for src, dst in progress_bar(todo, leave=False): link = _place(src, dst, link)
    return len(todo)


def _check_no_strays(pairs: list[tuple[Path, Path]], keep: Iterable[str] = ()):
    "An error when a destination folder of `pairs` holds files they do not put there: it holds another split or data"
    planned = {d for _, d in pairs}
    for folder in sorted({d.parent for d in planned}):
        strays = [f for f in folder.iterdir() if f not in planned and f.name not in keep
                  and not f.name.startswith('.')] if folder.is_dir() else []
        if strays:
            raise FileExistsError(f'{folder} holds {strays[0].name} (and {len(strays) - 1} more) that this preparation '
                                  'does not put there: the destination holds another split (made with another '
                                  'validation fraction or split seed) or other files. Nothing was changed: prepare '
                                  'into a new folder, or delete the old one.')


def _report(what: str, written: int, total: int):
    "Say what a preparation step did"
    if written: print(f'{what}: {written} of {total} files written, {total - written} already in place.')
    else: print(f'{what}: all {total} files already in place, nothing changed.')


def copy_files(label: int, filenames: Iterable[str], source: str | Path, destination: str | Path,
               link: bool = False) -> int:
    """Copy `source/000LL/<filename>` to `destination/<label>/<filename>` (hard links when `link` and the file system
    allows). Sources are never moved; files already in place are skipped. Returns how many files were written."""
    _check_classes([label])
    label = int(label)
    folder = Path(source)/f'{label:05d}'
    names = [_check_filename(f, f'copy_files for class {label}') for f in filenames]
    return _copy_pairs([(folder/f, Path(destination)/str(label)/f) for f in names], link)


def _track(filename: str) -> str:
    "The track of a training image `TTTTT_IIIII.ppm`"
    match = re.fullmatch(r'(\d+)_\d+\.\w+', filename)
    if not match:
        raise ValueError(f'{filename!r} is not a GTSRB training name TTTTT_IIIII.ppm, so its track (physical sign) is '
                         'unknown and a split could leak it into validation. Use the official training images.')
    return match.group(1)


def _validation_tracks(filenames: list[str], validation_fraction: float, rng: np.random.Generator) -> set[str]:
    "Whole tracks, drawn at random, whose images come closest to `validation_fraction` of `filenames`"
    tracks = defaultdict(int)
    for f in filenames: tracks[_track(f)] += 1
    names = sorted(tracks)
    order = [names[i] for i in rng.permutation(len(names))]
    taken = np.cumsum([0] + [tracks[t] for t in order])
    n_tracks = int(np.argmin(np.abs(taken - validation_fraction * len(filenames))))
    return set(order[:n_tracks])


def _split_pairs(source_path: Path, annotations: list[Annotation], train_path: Path, validation_path: Path,
                 all_path: Path, validation_fraction: float, seed: int) -> list[tuple[Path, Path]]:
    "The `(src, dst)` copies of a track-wise split of `annotations`"
    by_label = defaultdict(list)
    for a in annotations: by_label[a.label].append(a.filename)
    pairs = []
    for label, filenames in sorted(by_label.items()):
        valid = _validation_tracks(filenames, validation_fraction, np.random.default_rng([seed, label]))
        for f in filenames:
            src = source_path/f'{label:05d}'/f
            side = validation_path if _track(f) in valid else train_path
            pairs += [(src, side/str(label)/f), (src, all_path/str(label)/f)]
    return pairs


def split_train_validation_sets(source_path: str | Path, train_path: str | Path, validation_path: str | Path,
                                all_path: str | Path, classes: Iterable[int] | None = None,
                                validation_fraction: float = 0.2, link: bool = False, seed: int = 42) -> int:
    """Copy the official training images of `source_path` (`Final_Training/Images`) to `train_path/<ClassId>/`,
    `validation_path/<ClassId>/` and both to `all_path/<ClassId>/`. Whole tracks go to one side: per class, random
    tracks (drawn with `seed`) closest to `validation_fraction` of its images. Copies (hard links if `link` and the
    file system allows), never moves; a second run changes nothing. Returns how many files were written."""
    if not 0 <= validation_fraction < 1:
        raise ValueError(f'validation_fraction must be in [0, 1), got {validation_fraction}.')
    source_path = Path(source_path)
    annotations = load_training_annotations(source_path, classes)
    pairs = _split_pairs(source_path, annotations, Path(train_path), Path(validation_path), Path(all_path),
                         validation_fraction, seed)
    _check_no_strays(pairs)
    written = _copy_pairs(pairs, link)
    _report(f'GTSRB training split into {Path(train_path).parent}', written, len(pairs))
    return written


def copy_test_set(images_path: str | Path, test_path: str | Path, labels_file: str | Path,
                  classes: Iterable[int] | None = None, link: bool = False) -> list[Annotation]:
    """Copy the test images of `images_path` (`Final_Test/Images`) that `labels_file` (`GT-final_test.csv`) labels
    with `classes` to `test_path`, and return their annotations. `test_path/labels.csv` (`Filename;ClassId`)
    lists every image in `test_path`, so a later call with other `classes` adds to it."""
    labelled, test_path = read_annotations(labels_file), Path(test_path)
    annotations = read_annotations(labels_file, classes)
    _check_no_strays([(Path(images_path)/a.filename, test_path/a.filename) for a in labelled], keep=[TEST_LABELS])
    pairs = [(Path(images_path)/a.filename, test_path/a.filename) for a in annotations]
    written = _copy_pairs(pairs, link)
    labels = 'Filename;ClassId\n' + ''.join(f'{a.filename};{a.label}\n' for a in labelled
                                            if (test_path/a.filename).is_file())
    labels_path = test_path/TEST_LABELS
    if not labels_path.is_file() or labels_path.read_text() != labels:
        test_path.mkdir(parents=True, exist_ok=True)
        atomic_write(labels_path, lambda tmp: Path(tmp).write_text(labels))
    _report(f'GTSRB test set in {test_path}', written, len(pairs))
    return annotations


# Download and unpacking

def _md5(path: Path) -> str:
    "The md5 hex digest of the file at `path`"
    digest = hashlib.md5()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22): digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, size: int, md5: str) -> str | None:
    "What is wrong with `path` against its expected `size` and `md5`, or None"
    if path.stat().st_size != size: return f'{path.stat().st_size:,} bytes where {size:,} were expected'
    got = _md5(path)
    return None if got == md5 else f'md5 {got} where {md5} was expected'


def _fetch(url: str, part: Path, size: int, timeout: float):
    "Download `url` into `part`, resuming from the bytes `part` already holds; an error when it ends early"
    have = part.stat().st_size if part.exists() else 0
    if have == size: return  # complete but not yet verified
    if have > size:
        part.unlink()
        have = 0
    request = Request(url, headers={'Range': f'bytes={have}-'} if have else {})
    with urlopen(request, timeout=timeout) as response:
        content_range = response.headers.get('Content-Range', '')
        resumed = have and response.status == 206 and content_range.startswith(f'bytes {have}-')
        if not resumed: have = 0  # the server sent the whole file: start over
        pbar = progress_bar([], total=size, leave=False)
        pbar.update(0)
        pbar.update(have)
        with open(part, 'ab' if have else 'wb') as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                have += len(chunk)
                pbar.update(min(have, size))
    if have < size: raise ConnectionError(f'the connection closed after {have:,} of {size:,} bytes')


def _download(url: str, dest: Path, size: int, md5: str, retries: int, timeout: float):
    "Download `url` to `dest` through `dest.part`, resuming cut connections and restarting corrupt downloads"
    part, problem = dest.with_name(dest.name + '.part'), None
    for _ in range(retries):
        try: _fetch(url, part, size, timeout)
        except HTTPError as e:
            if e.code != 416: raise OSError(f'{url} answered HTTP {e.code} ({e.reason}): check base_url.') from None
            part.unlink(missing_ok=True)
            problem = 'the server refused to resume'
            continue
        except (OSError, http.client.HTTPException) as e:
            problem = f'{type(e).__name__}: {e}'
            continue
        problem = _verify(part, size, md5)
        if problem is None: return os.replace(part, dest)
        part.unlink()  # whole but wrong: the next try starts from scratch
    if part.exists():
        raise ConnectionError(f'Downloading {url} failed {retries} times, last: {problem}. The part fetched so far is '
                              f'kept in {part}: run again to resume.')
    raise ValueError(f'Downloading {url} failed {retries} times, last: {problem}. Nothing was kept: check base_url '
                     'and the expected sizes and md5s, then run again.')


def _member_path(dest: Path, filename: str, is_link: bool, archive: Path) -> Path:
    "Where archive member `filename` unpacks under `dest`; an error for names or links that could leave `dest`"
    name = PurePosixPath(filename)
    if name.is_absolute() or '..' in name.parts or '\\' in filename or ':' in filename or is_link:
        raise ValueError(f'{archive} holds {filename!r}, a link or a name which would unpack outside {dest}: it is '
                         'not an official GTSRB archive. Nothing was unpacked; delete it and download it again.')
    return dest.joinpath(*name.parts)


def _same_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bool:
    "Whether `path` already holds member `info` (same size and CRC)"
    if path.stat().st_size != info.file_size: return False
    crc = 0
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22): crc = zlib.crc32(chunk, crc)
    return crc == info.CRC


def _extract(open_member: Callable[[], IO[bytes]], dest: str | Path):
    "Write the archive member that `open_member` opens to the file `dest`"
    with open_member() as src, open(dest, 'wb') as dst: shutil.copyfileobj(src, dst)


def _unpack(zip_path: Path, dest: Path) -> int:
    "Unpack `zip_path` into `dest`, each member through a temporary name; members already there are skipped"
    with zipfile.ZipFile(zip_path) as zf:
        members = [(info, _member_path(dest, info.filename, stat.S_ISLNK(info.external_attr >> 16), zip_path))
                   for info in zf.infolist() if not info.is_dir()]
        todo = [(i, p) for i, p in members if not (p.is_file() and _same_member(zf, i, p))]
        clashes = [p for _, p in todo if p.exists() or p.is_symlink()]
        if clashes:
            raise FileExistsError(f'{len(clashes)} files {zip_path.name} unpacks already hold other data in {dest}, '
                                  f'e.g. {clashes[0]}. Nothing was unpacked: unpack into an empty folder.')
        for info, path in progress_bar(todo, leave=False):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, partial(_extract, partial(zf.open, info)))
    _report(f'Unpacking {zip_path.name}', len(todo), len(members))
    return len(todo)


def _unpack_tarball(archive: Path, dest: Path) -> int:
    """Unpack `archive`, a tarball of the official `GTSRB/` folder (such as the 32x32 copy `gtsrb32.tar.gz`), to
    `dest/GTSRB`. Members are checked as zip members are; they are written to a temporary folder whose `GTSRB/` is
    then renamed into place whole, so an interrupted run leaves no half-unpacked `GTSRB/`. Returns the files written."""
    tmp = dest/f'.{archive.name}.unpacking'
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    try:
        with tarfile.open(archive) as tar:
            members = [(m, _member_path(tmp, m.name, not (m.isfile() or m.isdir()), archive)) for m in tar.getmembers()]
            for member, path in progress_bar(members, leave=False):
                if member.isdir(): path.mkdir(parents=True, exist_ok=True)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _extract(partial(tar.extractfile, member), path)
        if not (tmp/'GTSRB').is_dir():
            raise ValueError(f'{archive} holds no GTSRB/ folder: it is not a copy of GTSRB in the official layout. '
                             'Nothing was unpacked; put the official zips (or their unpacked GTSRB/ folder) there '
                             'instead.')
        os.rename(tmp/'GTSRB', dest/'GTSRB')
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f'{archive} is not a readable tarball ({e}): it is damaged or cut short. Nothing was '
                         'unpacked; copy or download it again.') from None
    finally: shutil.rmtree(tmp, ignore_errors=True)
    files = sum(m.isfile() for m, _ in members)
    _report(f'Unpacking {archive.name}', files, files)
    return files


def _tarball(path: Path) -> Path | None:
    "The one tarball in `path` (of the `GTSRB/` folder, such as `gtsrb32.tar.gz`), or None; an error for several"
    found = sorted(p for p in path.iterdir() if p.name.endswith(TARBALLS) and not p.name.startswith('.') and
                   p.is_file()) if path.is_dir() else []
    if len(found) > 1:
        raise ValueError(f'{path} holds several tarballs, {[p.name for p in found]}, and no GTSRB/ folder: keep the '
                         'one that holds the GTSRB/ folder (such as gtsrb32.tar.gz), or unpack it there yourself.')
    return found[0] if found else None


def _check_zip(path: Path, size: int, md5: str):
    "An error when the zip at `path` is not the one expected"
    problem = _verify(path, size, md5)
    if problem:
        raise ValueError(f'{path} fails its checksum ({problem}): it is damaged or not the official file. It was left '
                         'as it is: delete it and run `download_gtsrb` again.')


def download_gtsrb(dest: str | Path, base_url: str = GTSRB_URL, zips: dict[str, tuple[int, str]] = GTSRB_ZIPS,
                   unpack: bool = True, retries: int = 3, timeout: float = 60.) -> Path:
    """Download the official GTSRB zips (`zips`: name -> (bytes, md5)) from `base_url` into `dest`, verify size and
    md5, and unpack them there (safely: no member may leave `dest`). Zips already there and verified are not fetched
    again; a cut download resumes, a corrupt one restarts. Returns `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, (size, md5) in zips.items():
        path = dest/_check_filename(name, 'download_gtsrb')
        if path.exists(): _check_zip(path, size, md5)
        else: _download(base_url.rstrip('/') + '/' + name, path, size, md5, retries, timeout)
        if unpack: _unpack(path, dest)
    return dest


# One call to the ready layout

def _test_labels_file(path: Path) -> Path | None:
    "`GT-final_test.csv`: at the root from the official GT zip, or beside the test images in some copies"
    found = [p for p in (path/'GT-final_test.csv', path/'GTSRB'/'Final_Test'/'GT-final_test.csv') if p.is_file()]
    return found[0] if found else None


def _check_split(path: Path, split: dict):
    "An error when `path` was prepared with another split than `split` (its split seed and validation fraction)"
    kept = json.loads((path/SPLIT).read_text()) if (path/SPLIT).is_file() else split
    if kept != split:
        raise FileExistsError(f'{path} holds another split, prepared with split seed {kept["split_seed"]} and '
                              f'validation fraction {kept["validation_fraction"]} (its {SPLIT}), not '
                              f'{split["split_seed"]} and {split["validation_fraction"]}. Nothing was changed: pass '
                              f'--split-seed {kept["split_seed"]} --validation-fraction {kept["validation_fraction"]} '
                              '(seed= and validation_fraction= in Python) to use its split, prepare into another '
                              f'folder, or delete its train/, valid/ and {SPLIT} to split again.')


def prepare_gtsrb(path: str | Path, classes: Iterable[int] | None = None, validation_fraction: float = 0.2,
                  link: bool = False, seed: int = 42, zips: dict[str, tuple[int, str]] = GTSRB_ZIPS) -> dict[str, Path]:
    """From the official zips in `path` (verified against `zips`, then unpacked), their unpacked `path/GTSRB` folder,
    or a tarball of that folder (such as the 32x32 copy `gtsrb32.tar.gz`, unpacked to `path/GTSRB`), make
    `path/train`, `path/valid` and `path/all` (one sub-folder per ClassId) and, when the test images and
    `GT-final_test.csv` are there, `path/test`. `seed` draws the validation tracks (the split seed, apart from any
    training seed): it and `validation_fraction` are kept in `path/split.json`, and another split of the same folder is
    refused. Only reads the sources; a second run changes nothing. Returns the paths by name (`test` is None without
    test data)."""
    path, split = Path(path), dict(split_seed=seed, validation_fraction=validation_fraction)
    _check_split(path, split)
    for name, (size, md5) in zips.items():
        if (path/name).exists():
            _check_zip(path/name, size, md5)
            _unpack(path/name, path)
    if not (path/'GTSRB').exists() and (tarball := _tarball(path)): _unpack_tarball(tarball, path)
    source, test_images = path/'GTSRB'/'Final_Training'/'Images', path/'GTSRB'/'Final_Test'/'Images'
    if not source.is_dir():
        raise FileNotFoundError(f'No GTSRB training images in {path}: put the official zips there (`download_gtsrb` '
                                'fetches them), their unpacked GTSRB/Final_Training/Images folder, or a tarball of '
                                'that GTSRB/ folder (such as gtsrb32.tar.gz).')
    labels = _test_labels_file(path)
    if test_images.is_dir() and labels is None:
        raise FileNotFoundError(f'The test images in {test_images} have no labels: GT-final_test.csv (from '
                                f'GTSRB_Final_Test_GT.zip) is missing from {path}.')
    paths = {name: path/name for name in ('train', 'valid', 'all')}
    split_train_validation_sets(source, paths['train'], paths['valid'], paths['all'], classes, validation_fraction,
                                link, seed)
    if not (path/SPLIT).is_file(): atomic_write(path/SPLIT, lambda tmp: Path(tmp).write_text(json.dumps(split)))
    paths['test'] = path/'test' if test_images.is_dir() else None
    if paths['test']: copy_test_set(test_images, paths['test'], labels, classes, link)
    return paths


# DataLoaders

def _class_id(path: Path) -> int:
    "The ClassId of an image in a `<ClassId>/` folder"
    return int(Path(path).parent.name)


def _class_images(path: Path, train: str, valid: str, classes: set[int] | None = None) -> list[Path]:
    "The images of `train` and `valid` under `path`, of `classes` only when given; an error for classes never prepared"
    files = get_image_files(path, folders=[train, valid])
    held = {side: {_class_id(f) for f in files if f.parent.parent.name == side} for side in (train, valid)}
    missing = sorted(classes - held[train]) if classes else []
    if missing or not held[train]:
        also = sorted(set(missing) - held[valid])
        of, fix = (f' of classes {missing}', f', classes={missing}') if missing else ('', '')
        nor = f' (nor in {path/valid})' if also == missing else f' (nor of {also} in {path/valid})' if also else ''
        raise FileNotFoundError(f'No images{of} in {path/train}{nor}: they were never prepared there (it holds classes '
                                f'{sorted(held[train]) or "none"}). Run prepare_gtsrb({str(path)!r}{fix}) first; it '
                                'adds them beside the classes already there.')
    return files if classes is None else files.filter(lambda f: _class_id(f) in classes)


def _open_image(fn: Path) -> PILImage:
    "`PILImage.create(fn)`, with an error that names a damaged file (PIL's says only 'image file is truncated')"
    try: return PILImage.create(fn)
    except (OSError, SyntaxError) as e:
        raise OSError(f'{fn} is not a readable image ({e}): delete it and run prepare_gtsrb again to copy it anew '
                      '(if its source is damaged too, unpack the GTSRB data again first).') from None


def gtsrb_dls(path: str | Path, size: int = 96, bs: int = 256, classes: Iterable[int] | None = None,
              train: str = 'train', valid: str = 'valid', augment: bool = True, **kwargs) -> DataLoaders:
    """`DataLoaders` over the folders of `prepare_gtsrb` as in the reference notebook: `Resize(size)`, flip-free
    augmentation (unless `augment=False`) and ImageNet normalisation. The vocab is the 43 ClassIds as ints in numeric
    order, so class index == ClassId even on a subset of `classes` (folder names sorted as strings would give
    '0','1','10',...). `train='all'` trains on train+valid for the final retrain (validation is then not held out)."""
    path, classes = Path(path), _check_classes(classes)
    for folder in (train, valid):
        if not (path/folder).is_dir():
            raise FileNotFoundError(f'{path/folder} does not exist: run prepare_gtsrb({str(path)!r}) first.')
    tfms = aug_transforms(do_flip=False, max_zoom=1.2, max_rotate=10, max_lighting=0.8, p_lighting=0.8)
    images = TransformBlock(type_tfms=_open_image, batch_tfms=IntToFloatTensor)  # ImageBlock, naming damaged files
    dblock = DataBlock(blocks=(images, CategoryBlock(vocab=list(range(N_CLASSES)))),
                       get_items=partial(_class_images, train=train, valid=valid, classes=classes),
                       splitter=GrandparentSplitter(train_name=train, valid_name=valid), get_y=_class_id,
                       item_tfms=Resize(size),
                       batch_tfms=[*(tfms if augment else []), Normalize.from_stats(*imagenet_stats)])
    return ImageDataLoaders.from_dblock(dblock, path, path=path, bs=bs, **kwargs)


def gtsrb_test_dl(learn_or_dls, path: str | Path, classes: Iterable[int] | None = None) -> tuple[TfmdDL, Tensor]:
    """A test `DataLoader` over `path/test` (with the validation transforms of `learn_or_dls`, a `Learner` or
    `DataLoaders`) and the ClassIds of its images, from `test/labels.csv`, in the same order."""
    dls, classes = getattr(learn_or_dls, 'dls', learn_or_dls), _check_classes(classes)
    annotations = read_annotations(Path(path)/'test'/TEST_LABELS, classes)
    absent = sorted(classes - {a.label for a in annotations}) if classes else []
    if absent or not annotations:
        of, fix = (f' of classes {absent}', f', classes={absent}') if absent else ('', '')
        raise FileNotFoundError(f'{Path(path)/"test"} holds no test images{of}: they were never prepared there. Run '
                                f'prepare_gtsrb({str(path)!r}{fix}) with the test zips (or the GTSRB/Final_Test '
                                'folder) in that folder first.')
    files = [Path(path)/'test'/a.filename for a in annotations]
    missing = [f for f in files if not f.is_file()]
    if missing: raise FileNotFoundError(f'{len(missing)} test images are missing, e.g. {missing[0]}: run '
                                        'prepare_gtsrb again.')
    return dls.test_dl(files), torch.tensor([a.label for a in annotations])
