"""The embedded default data: scikit-learn's handwritten digits written as an image-folder dataset.

Real data (1,797 8x8 scans of digits 0-9 that ship with scikit-learn), so the demo, the notebooks
and the tests run offline with no download, through the same `ImageDataLoaders` path as GTSRB.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.data import ImageDataLoaders
from PIL import Image
from sklearn.datasets import load_digits

from .files import atomic_write

__all__ = ['write_digits', 'digits_dls']


def write_digits(dest: str | Path, size: int = 32, valid_fraction: float = 0.2, test_fraction: float = 0.2,
                 seed: int = 42) -> Path:
    """Write scikit-learn's digits as RGB PNGs of `size` px to `dest/{train,valid,test}/<digit>/<index>.png`,
    split at random with `seed`, stratified by digit. A folder already complete is left as it is: its marker file
    `.complete` records the settings that wrote it, and other settings are refused (a marker without settings, from
    an older fastkd or made by hand, is taken as it is)."""
    dest = Path(dest)
    marker = dest/'.complete'
    settings = dict(size=size, valid_fraction=valid_fraction, test_fraction=test_fraction, seed=seed)
    if marker.exists():
        written = json.loads(marker.read_text() or 'null')
        if written not in (None, settings):
            raise FileExistsError(f'{dest} holds the digits written with {written}, not {settings}: pass another '
                                  'folder (fastkd demo --data DIR), or delete this one to write it again.')
        return dest
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for digit in range(10):
        idxs = rng.permutation(np.flatnonzero(digits.target == digit))
        n_valid, n_test = round(len(idxs) * valid_fraction), round(len(idxs) * test_fraction)
        splits = {'valid': idxs[:n_valid], 'test': idxs[n_valid:n_valid + n_test], 'train': idxs[n_valid + n_test:]}
        for split, split_idxs in splits.items():
            folder = dest/split/str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in split_idxs:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(pixels).convert('RGB').resize((size, size), Image.Resampling.BILINEAR)
                atomic_write(folder/f'{i:04d}.png', partial(image.save, format='PNG'))
    atomic_write(marker, lambda tmp: Path(tmp).write_text(json.dumps(settings)))
    return dest


def digits_dls(path: str | Path, size: int = 32, bs: int = 64, augment: bool = True, seed: int = 42,
               **kwargs) -> ImageDataLoaders:
    "`ImageDataLoaders` over the `train` and `valid` folders of `write_digits`; mild augmentation, no flips"
    batch_tfms = aug_transforms(do_flip=False, max_rotate=10, max_zoom=1.1, max_warp=0, size=size) if augment else None
    return ImageDataLoaders.from_folder(path, train='train', valid='valid', item_tfms=Resize(size), bs=bs, seed=seed,
                                        batch_tfms=batch_tfms, **kwargs)
