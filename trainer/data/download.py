"""Download official dataset archives into the cache, verified and extracted atomically.

Layout under ``cache_dir``: ``downloads/<file>`` (verified archives), ``raw/<dataset>/`` (extracted files),
``downloads/checksums.json`` (sha256 recorded on first download for sources without a known checksum).

Checksums: the MovieLens zips have known sha256 constants (the values TensorFlow Datasets pins in
``url_checksums/movielens.txt``); ML-1M's ``ratings.dat`` is also checked after extraction. Amazon Books has no
published checksum: the first download records its sha256 ("trust on first use") and every later download of
the same URL must match it (delete the entry in checksums.json if upstream legitimately changes).
Everything is written to a temporary name and renamed into place, so an interrupted or rejected download never
leaves a half-written archive or directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from tqdm import tqdm

from hstu.trainer.data.errors import DataError
from hstu.trainer.integrity import sha256_file  # noqa: F401 (the one file checksum; re-exported for callers)

ML_BASE = "https://files.grouplens.org/datasets/movielens/"


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from. ``archive``: zip file name, or None when ``url`` is the data file itself."""

    url: str
    files: Tuple[str, ...]  # files that must exist in raw/<dataset>/ afterwards
    sha256: Optional[str] = None  # of the downloaded file
    archive_dir: Optional[str] = None  # folder inside the zip holding ``files``
    file_sha256: Tuple[Tuple[str, str], ...] = ()  # known checksums of extracted files

    @property
    def is_zip(self) -> bool:
        return self.url.endswith(".zip")


SOURCES: Dict[str, Source] = {
    "ml-1m": Source(
        ML_BASE + "ml-1m.zip",
        ("ratings.dat",),
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        "ml-1m",
        (("ratings.dat", "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f"),),
    ),
    "ml-20m": Source(
        ML_BASE + "ml-20m.zip",
        ("ratings.csv",),
        "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        "ml-20m",
    ),
    "ml-100k": Source(
        ML_BASE + "ml-100k.zip",
        ("u.data",),
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        "ml-100k",
    ),
    "amzn-books": Source(
        "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/ratings_Books.csv", ("ratings_Books.csv",)
    ),
}


def fetch(url: str, dest: "str | Path", expected_sha256: Optional[str] = None, progress: bool = True) -> str:
    """Download ``url`` (http/https/file) to ``dest`` via a temp file; verify sha256; return it.

    On a checksum mismatch or any error, nothing is left at ``dest`` and DataError is raised."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=not progress) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        digest = h.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise DataError(f"checksum mismatch for {url}: expected sha256 {expected_sha256}, got {digest}",
                            path=str(dest))
        os.replace(tmp, dest)
        return digest
    except DataError:
        raise
    except Exception as e:  # network / IO errors
        raise DataError(f"download of {url} failed: {e}", path=str(dest)) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _recorded_checksums(path: Path) -> Dict[str, str]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable checksum record: {e}", path=str(path)) from None


def _record_checksum(path: Path, url: str, digest: str) -> None:
    record = _recorded_checksums(path)
    record[url] = digest
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _extract_zip(zip_path: Path, work: Path, member_dir: Optional[str]) -> Path:
    """Extract into ``work`` (a fresh temp dir) refusing unsafe member names; return the folder with the files."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for name in zf.namelist():
                target = (work / name).resolve()
                if not str(target).startswith(str(work.resolve()) + os.sep) and target != work.resolve():
                    raise DataError(f"unsafe path in archive: {name!r}", path=str(zip_path))
            zf.extractall(work)
    except zipfile.BadZipFile as e:
        raise DataError(f"not a valid zip archive: {e}", path=str(zip_path)) from None
    return work / member_dir if member_dir else work


def download_dataset(
    name: str,
    cache_dir: "str | Path",
    *,
    url: Optional[str] = None,
    sha256: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Ensure ``cache_dir/raw/<name>/`` holds the dataset's raw files (download + verify + extract once).

    ``url`` / ``sha256`` override the registry (mirrors, tests). Returns the raw directory."""
    if name not in SOURCES:
        raise DataError(f"no download source for dataset {name!r} (known: {', '.join(SOURCES)})")
    src = SOURCES[name]
    cache_dir = Path(cache_dir).expanduser()
    raw_dir = cache_dir / "raw" / name
    if all((raw_dir / f).is_file() for f in src.files):
        return raw_dir
    url = url or src.url
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    record_path = downloads / "checksums.json"
    expected = sha256 or src.sha256 or _recorded_checksums(record_path).get(url)
    file_name = url.rstrip("/").rsplit("/", 1)[-1]
    archive = downloads / file_name
    if archive.is_file() and expected is not None and sha256_file(archive) == expected:
        digest = expected
    else:
        digest = fetch(url, archive, expected, progress=progress)
    if expected is None:
        _record_checksum(record_path, url, digest)

    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=raw_dir.parent))
    try:
        if src.is_zip:
            folder = _extract_zip(archive, work / "x", src.archive_dir)
        else:
            folder = work / "x"
            folder.mkdir()
            os.replace(archive, folder / src.files[0])  # the plain data file moves into raw/ (no second copy)
        for f in src.files:
            if not (folder / f).is_file():
                raise DataError(f"{f} missing from the downloaded {file_name}", path=str(archive))
        for f, want in src.file_sha256:
            got = sha256_file(folder / f)
            if got != want:
                raise DataError(f"checksum mismatch for extracted {f}: expected {want}, got {got}",
                                path=str(archive))
        try:
            os.rename(folder, raw_dir)  # atomic; fails if another process finished first
        except OSError as e:
            if not all((raw_dir / f).is_file() for f in src.files):
                raise DataError(f"cannot move the extracted files into place ({e}); if {raw_dir} is an incomplete "
                                "earlier download, remove it and retry", path=str(raw_dir)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return raw_dir
