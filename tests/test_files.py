"atomic_write: whole files or none, with ordinary permissions."
import os
from pathlib import Path

import pytest

from fastkd.files import atomic_write


def test_writes_the_file_with_ordinary_permissions(tmp_path):
    path = atomic_write(tmp_path/'report.md', lambda tmp: Path(tmp).write_text('hello'))
    assert path.read_text() == 'hello'
    umask = os.umask(0); os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ['report.md']


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    (tmp_path/'results.csv').write_text('old')
    def fail(tmp):
        Path(tmp).write_text('half')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): atomic_write(tmp_path/'results.csv', fail)
    assert (tmp_path/'results.csv').read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['results.csv']
