"The embedded demo data: scikit-learn's digits written as an image folder, and what a second write does."
import json

import pytest

from fastkd.digits import write_digits


def _counts(path) -> dict:
    return {split: len(list((path/split).glob('*/*.png'))) for split in ('train', 'valid', 'test')}


def test_digits_are_split_by_the_fractions_and_marked_with_their_settings(digits_path):
    # 1,797 digits: 60/20/20 of each digit, rounded
    assert _counts(digits_path) == {'train': 1079, 'valid': 359, 'test': 359}
    assert json.loads((digits_path/'.complete').read_text()) == dict(size=32, valid_fraction=0.2, test_fraction=0.2,
                                                                     seed=42)


def test_a_complete_folder_is_reused_with_its_own_settings_and_refused_with_others(digits_path):
    first_image = sorted((digits_path/'train'/'0').iterdir())[0]
    written = first_image.stat().st_mtime_ns
    assert write_digits(digits_path, size=32) == digits_path
    assert first_image.stat().st_mtime_ns == written
    with pytest.raises(FileExistsError, match=r"not \{'size': 16, 'valid_fraction': 0.1, 'test_fraction': 0.3.*"
                       r"pass another folder .*--data DIR.*or delete this one"):
        write_digits(digits_path, size=16, valid_fraction=0.1, test_fraction=0.3)
    assert _counts(digits_path)['test'] == 359  # nothing rewritten


def test_a_marker_without_settings_is_taken_as_it_is(few_digits):
    "A folder marked complete by an older fastkd or by hand: used as it is, whatever the settings asked"
    before = _counts(few_digits)
    assert write_digits(few_digits, size=16, valid_fraction=0.1, test_fraction=0.3) == few_digits
    assert _counts(few_digits) == before and (few_digits/'.complete').read_text() == ''
