"`download_gtsrb` against a real HTTP server on 127.0.0.1 serving small zips in the official layout, built from real data."
import hashlib
import io
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastkd.gtsrb import download_gtsrb, prepare_gtsrb, read_annotations

CLASSES = [0, 19]
TRAIN, TEST, GT = 'GTSRB_Final_Training_Images.zip', 'GTSRB_Final_Test_Images.zip', 'GTSRB_Final_Test_GT.zip'


class GTSRBHandler(BaseHTTPRequestHandler):
    "Serves `server.files`, honours `Range: bytes=N-`, and cuts the connection mid-file while `server.cuts[name]` > 0"
    def do_GET(self):
        name, wanted = self.path.lstrip('/'), self.headers.get('Range')
        self.server.requests.append((name, wanted))
        if name not in self.server.files: return self.send_error(404)
        data = self.server.files[name]
        start = int(re.fullmatch(r'bytes=(\d+)-', wanted).group(1)) if wanted else 0
        self.send_response(206 if start else 200)
        if start: self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.send_header('Content-Length', str(len(data) - start))
        self.end_headers()
        cut = self.server.cuts.get(name, 0) > 0
        if cut: self.server.cuts[name] -= 1
        self.wfile.write(data[start:(start + len(data)) // 2 if cut else len(data)])  # then the connection closes

    def log_message(self, *args): pass


def zip_bytes(members: dict[str, bytes]) -> bytes:
    "A zip of `members` (name: bytes), as the bytes a server sends"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as zf:
        for name, data in members.items(): zf.writestr(name, data)
    return buffer.getvalue()


def checksum(data: bytes) -> tuple[int, str]: return len(data), hashlib.md5(data).hexdigest()


@pytest.fixture(scope='module')
def official(gtsrb_data) -> dict[str, bytes]:
    """The three zips in the official layout, small: CLASSES of the original-size training sample, and their
    test images (32x32) with the test csv of those rows, unlabelled in the image zip and labelled in the GT zip"""
    images = gtsrb_data/'sample'/'GTSRB'/'Final_Training'/'Images'
    train = {f'GTSRB/Final_Training/Images/{p.parent.name}/{p.name}': p.read_bytes()
             for c in CLASSES for p in sorted((images/f'{c:05d}').iterdir())}
    with tarfile.open(gtsrb_data/'gtsrb32.tar.gz') as tar:
        test = {m.name: tar.extractfile(m).read() for m in tar if m.name.startswith('GTSRB/Final_Test/') and m.isfile()}
    lines = test.pop('GTSRB/Final_Test/GT-final_test.csv').decode().splitlines(keepends=True)
    rows = [l for l in lines[1:] if int(l.split(';')[-1]) in CLASSES]
    kept = {f'GTSRB/Final_Test/Images/{r.split(";")[0]}': test[f'GTSRB/Final_Test/Images/{r.split(";")[0]}'] for r in rows}
    unlabelled = ''.join(l.rsplit(';', 1)[0] + '\r\n' for l in [lines[0]] + rows).encode()
    return {TRAIN: zip_bytes(train), TEST: zip_bytes({**kept, 'GTSRB/Final_Test/Images/GT-final_test.test.csv': unlabelled}),
            GT: zip_bytes({'GT-final_test.csv': ''.join([lines[0]] + rows).encode()})}


@pytest.fixture(scope='module')
def http_server():
    "A real HTTP server on 127.0.0.1, in a thread"
    server = ThreadingHTTPServer(('127.0.0.1', 0), GTSRBHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(http_server, official):
    "The server with the official zips, no cuts and an empty request log"
    http_server.files, http_server.cuts, http_server.requests = dict(official), {}, []
    return http_server


def url(server) -> str: return f'http://127.0.0.1:{server.server_address[1]}/'


def expected(official, *names) -> dict[str, tuple[int, str]]:
    return {name: checksum(official[name]) for name in names or official}


def test_download_unpack_and_prepare(server, official, tmp_path, capsys):
    download_gtsrb(tmp_path, url(server), expected(official), timeout=5)
    assert server.requests == [(TRAIN, None), (TEST, None), (GT, None)]
    assert all((tmp_path/n).read_bytes() == data for n, data in official.items())
    assert sorted(p.name for p in (tmp_path/'GTSRB'/'Final_Training'/'Images').iterdir()) == ['00000', '00019']
    paths = prepare_gtsrb(tmp_path, classes=CLASSES, zips=expected(official))
    n_train = sum(1 for n in zipfile.ZipFile(tmp_path/TRAIN).namelist() if n.endswith('.ppm'))
    assert len(list(paths['all'].rglob('*.ppm'))) == n_train == 92  # 46 sample images of each class
    labels = read_annotations(tmp_path/'GT-final_test.csv')
    assert read_annotations(paths['test']/'labels.csv') == labels and {a.label for a in labels} == set(CLASSES)
    capsys.readouterr()
    download_gtsrb(tmp_path, url(server), expected(official), timeout=5)
    assert len(server.requests) == 3  # verified zips are not fetched again
    assert capsys.readouterr().out.count('nothing changed') == 3


def test_cut_connection_resumes(server, official, tmp_path):
    server.cuts[TRAIN] = 1
    download_gtsrb(tmp_path, url(server), expected(official, TRAIN), unpack=False, timeout=5)
    size = len(official[TRAIN])
    assert server.requests == [(TRAIN, None), (TRAIN, f'bytes={size // 2}-')]
    assert (tmp_path/TRAIN).read_bytes() == official[TRAIN] and not (tmp_path/f'{TRAIN}.part').exists()


def test_cut_every_time_keeps_the_part_for_later(server, official, tmp_path):
    server.cuts[TEST] = 10
    with pytest.raises(ConnectionError, match='run again to resume'):
        download_gtsrb(tmp_path, url(server), expected(official, TEST), retries=2, timeout=5)
    part = tmp_path/f'{TEST}.part'
    fetched = part.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [part.name] and len(official[TEST]) // 2 < fetched
    server.cuts[TEST] = 0
    download_gtsrb(tmp_path, url(server), expected(official, TEST), timeout=5)
    assert server.requests[-1] == (TEST, f'bytes={fetched}-')
    assert (tmp_path/TEST).read_bytes() == official[TEST] and (tmp_path/'GTSRB'/'Final_Test'/'Images').is_dir()


def test_corrupt_part_restarts(server, official, tmp_path):
    half = len(official[GT]) // 2
    (tmp_path/f'{GT}.part').write_bytes(b'\0' * half)  # a broken earlier download
    download_gtsrb(tmp_path, url(server), expected(official, GT), timeout=5)
    assert server.requests == [(GT, f'bytes={half}-'), (GT, None)]
    assert (tmp_path/GT).read_bytes() == official[GT] and (tmp_path/'GT-final_test.csv').is_file()


def test_corrupted_zip_fails_its_checksum(server, official, tmp_path):
    data = bytearray(official[GT])
    data[len(data) // 2] ^= 0xFF
    server.files[GT] = bytes(data)
    with pytest.raises(ValueError, match=r'failed 2 times, last: md5 [0-9a-f]+ where [0-9a-f]+ was expected'):
        download_gtsrb(tmp_path, url(server), expected(official, GT), retries=2, timeout=5)
    assert list(tmp_path.iterdir()) == []  # no zip, no part, nothing unpacked


def test_missing_file_on_server(server, tmp_path):
    with pytest.raises(OSError, match='HTTP 404.*check base_url'):
        download_gtsrb(tmp_path, url(server), {'GTSRB_Missing.zip': (10, '0' * 32)}, timeout=5)
    assert server.requests == [('GTSRB_Missing.zip', None)]
