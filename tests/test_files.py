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


def test_the_mode_follows_the_umask_which_is_never_changed(tmp_path, monkeypatch):
    "Reading the umask means setting it for the whole process, a race with other threads: the system applies it"
    umask = os.umask(0o027)
    try:
        def changed(mask): raise AssertionError(f'os.umask({mask:#o}) called: it changes the whole process')
        monkeypatch.setattr(os, 'umask', changed)
        path = atomic_write(tmp_path/'results.csv', lambda tmp: Path(tmp).write_text('a,b'))
    finally:
        monkeypatch.undo()
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_hard_link_to_a_read_only_source_leaves_the_source_as_it_was(tmp_path):
    source = tmp_path/'source.ppm'
    source.write_bytes(b'P6 image')
    source.chmod(0o444)
    before = source.stat()
    def link(tmp):
        os.remove(tmp)
        os.link(source, tmp)
    path = atomic_write(tmp_path/'copy.ppm', link)
    after = source.stat()
    assert path.stat().st_ino == after.st_ino and source.read_bytes() == b'P6 image'
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_the_file_then_the_rename_reach_the_disk_before_it_returns(tmp_path, monkeypatch):
    "fsync of the written file before the rename (else a power loss can leave it empty), then of its folder"
    events, fsync, replace = [], os.fsync, os.replace
    def synced(fd):
        events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))
        fsync(fd)
    def renamed(src, dst):
        events.append(('replace', str(src), str(dst)))
        replace(src, dst)
    monkeypatch.setattr(os, 'fsync', synced)
    monkeypatch.setattr(os, 'replace', renamed)
    path = atomic_write(tmp_path/'run.json', lambda tmp: Path(tmp).write_text('{}'))
    assert [event[0] for event in events] == ['fsync', 'replace', 'fsync']
    tmp = events[1][1]
    assert events == [('fsync', tmp), ('replace', tmp, str(path)), ('fsync', str(tmp_path))]
