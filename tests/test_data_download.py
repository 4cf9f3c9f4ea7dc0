"""Downloader against a local http.server / file:// URL: verify, extract atomically, refuse bad checksums."""

import functools
import hashlib
import http.server
import json
import threading
import zipfile

import pytest

from hstu.trainer.data.download import download_dataset, fetch
from hstu.trainer.data.errors import DataError

UDATA = b"1\t10\t3\t100\n1\t11\t4\t200\n"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (www dir, base url)."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _make_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(cache):
    """Every file/dir under cache except the checksum record."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.name != "checksums.json")


def test_http_download_verify_extract_and_reuse(server, tmp_path):
    www, base = server
    digest = _make_zip(www / "ml-100k.zip", {"ml-100k/u.data": UDATA, "ml-100k/README": b"x"})
    cache = tmp_path / "cache"
    raw = download_dataset("ml-100k", cache, url=f"{base}/ml-100k.zip", sha256=digest, progress=False)
    assert raw == cache / "raw" / "ml-100k"
    assert (raw / "u.data").read_bytes() == UDATA
    assert not [p for p in (cache / "raw").iterdir() if p.name.startswith(".")]  # temp dir cleaned up
    (www / "ml-100k.zip").unlink()  # second call must not touch the network
    assert download_dataset("ml-100k", cache, url=f"{base}/ml-100k.zip", sha256=digest, progress=False) == raw


def test_checksum_mismatch_leaves_nothing_behind(server, tmp_path):
    www, base = server
    _make_zip(www / "ml-100k.zip", {"ml-100k/u.data": UDATA})
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="checksum mismatch.*expected sha256 0000"):
        download_dataset("ml-100k", cache, url=f"{base}/ml-100k.zip", sha256="0" * 64, progress=False)
    assert _leftovers(cache) == ["downloads"]  # no archive, no .part file, no raw dir


def test_archive_without_required_file_is_rejected(tmp_path):
    src = tmp_path / "ml-100k.zip"
    digest = _make_zip(src, {"ml-100k/README": b"no data here"})
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="u.data missing"):
        download_dataset("ml-100k", cache, url=src.as_uri(), sha256=digest, progress=False)
    assert not (cache / "raw" / "ml-100k").exists()
    assert not [p for p in (cache / "raw").iterdir()]  # temp extraction dir removed


def test_unknown_checksum_is_recorded_then_enforced(tmp_path):
    src = tmp_path / "src" / "ratings_Books.csv"
    src.parent.mkdir()
    src.write_bytes(b"A,B,5.0,1\n")
    cache = tmp_path / "cache"
    raw = download_dataset("amzn-books", cache, url=src.as_uri(), progress=False)
    assert (raw / "ratings_Books.csv").read_bytes() == b"A,B,5.0,1\n"
    record = json.loads((cache / "downloads" / "checksums.json").read_text())
    assert record == {src.as_uri(): hashlib.sha256(b"A,B,5.0,1\n").hexdigest()}
    # upstream changes: a fresh download (raw dir gone) must now fail the recorded checksum
    (raw / "ratings_Books.csv").unlink()
    raw.rmdir()
    src.write_bytes(b"A,B,1.0,1\n")
    with pytest.raises(DataError, match="checksum mismatch"):
        download_dataset("amzn-books", cache, url=src.as_uri(), progress=False)
    assert not raw.exists()


def test_fetch_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="download of .* failed"):
        fetch((tmp_path / "missing.zip").as_uri(), tmp_path / "out.zip", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="no download source"):
        download_dataset("nope", tmp_path)
