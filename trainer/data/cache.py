"""Cache of preprocessed UserSequences as ``.npz`` files.

Key = sha256 of a canonical JSON document holding the sha256 of every source file (hashed in 1 MiB chunks)
plus the preprocessing options (dataset name, max_seq_len, min_seq_len, PARSER_VERSION, ...). Any change to
a source file or an option gives a new key, hence a new file ``<cache_dir>/sequences/<name>-<key16>.npz``.
Files are written under a temporary name and renamed, so readers never see a partial cache file. The writer
holds an exclusive ``flock`` on its temp file while writing; a temp file a killed writer left behind (its lock
died with it) is removed by the next load of the same cache folder once it is older than STALE_TMP_SECONDS —
both conditions, so a concurrent writer's file (locked) and one just created (not locked yet) are never touched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from hstu.trainer.data.download import sha256_file
from hstu.trainer.data.sequences import UserSequences

# Bump whenever parsing / preprocessing changes what ends up in the cached arrays.
PARSER_VERSION = 2  # 2: max_seq_len + 2 events kept (validation target), data.tie_order
STALE_TMP_SECONDS = 60.0  # a temp file this old and unlocked is a killed writer's (a writer locks it at once)
log = logging.getLogger(__name__)


def cache_key(sources: Sequence["str | Path"], options: Dict[str, Any]) -> str:
    """Hex sha256 over the source files' sha256 (with their base names) and the options."""
    doc = {
        "parser_version": PARSER_VERSION,
        "options": options,
        "sources": [[Path(p).name, sha256_file(p)] for p in sources],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir: "str | Path", name: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / "sequences" / f"{name}-{key[:16]}.npz"


def save_sequences(seqs: UserSequences, path: "str | Path", meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``seqs`` (+ a small JSON-able ``meta`` dict, e.g. raw counts) to ``path`` atomically
    (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # tells clean_stale_tmp that a live writer owns this file
            np.savez(f, **seqs.to_arrays(), meta_json=np.array(json.dumps(meta or {}, sort_keys=True)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def clean_stale_tmp(folder: "str | Path", older_than_s: float = STALE_TMP_SECONDS) -> list:
    """Remove ``*.npz.*.tmp`` files in ``folder`` left by killed writers: older than ``older_than_s`` (mtime)
    AND not locked (a live writer holds an exclusive flock). Returns the removed paths."""
    folder, removed, now = Path(folder), [], time.time()
    if not folder.is_dir():
        return removed
    for p in folder.glob("*.npz.*.tmp"):
        try:
            if now - p.stat().st_mtime < older_than_s:
                continue
            with open(p, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a writer holds it
                p.unlink()
            removed.append(str(p))
        except (BlockingIOError, FileNotFoundError):
            continue
        except OSError as e:  # e.g. permissions: leave it, say so
            log.warning("cannot remove stale cache temp file %s: %s", p, e)
    if removed:
        log.warning("removed %d stale cache temp file(s) left by an interrupted write: %s", len(removed),
                    ", ".join(os.path.basename(r) for r in removed))
    return removed


def load_cached(path: "str | Path") -> Tuple[UserSequences, Dict[str, Any]]:
    """Read a cache file written by :func:`save_sequences` -> (sequences, meta)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta_json", "{}")))
    seqs = UserSequences.from_arrays(arrays)
    seqs.validate()
    return seqs, meta


def load_or_build(
    cache_dir: "str | Path", name: str, key: str, build: Callable[[Dict[str, Any]], UserSequences]
) -> Tuple[UserSequences, Path, bool, Dict[str, Any]]:
    """Return (sequences, cache file, hit, meta). On a miss (or an unreadable cache file) call
    ``build(meta)`` -- it may fill ``meta`` with stats -- and save both."""
    path = cache_path(cache_dir, name, key)
    clean_stale_tmp(path.parent)
    if path.is_file():
        try:
            seqs, meta = load_cached(path)
            return seqs, path, True, meta
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("ignoring unreadable cache file %s (%s); rebuilding", path, e)
    meta: Dict[str, Any] = {}
    seqs = build(meta)
    save_sequences(seqs, path, meta)
    return seqs, path, False, meta
