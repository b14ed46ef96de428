"Shared fixtures: seeded runs, the digits image folder, and the real GTSRB data in ../shared when present."
import subprocess
from pathlib import Path

import pytest
import torch
from fastai.torch_core import set_seed

from fastkd.digits import write_digits

GTSRB_DATA = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'gtsrb'


@pytest.fixture(autouse=True)
def seeded():
    "Every test starts from the same seed, with one thread so timings of other tests don't change results"
    torch.set_num_threads(1)
    set_seed(42, reproducible=True)


@pytest.fixture(scope='session')
def digits_path(tmp_path_factory) -> Path:
    "scikit-learn's digits as a 32 px image folder: train/valid/test, one sub-folder per digit"
    return write_digits(tmp_path_factory.mktemp('digits'), size=32)


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
