"""Checkpoint integrity: manifests of per-file sizes + sha256, their verification, and the one resolver that picks
the newest checkpoint that verifies (docs/reliability.md). Torch-free (hashlib + json), so serving can use it.

- A DCP step directory (trainer/checkpoint.py) is complete only when its ``manifest.json`` exists and every file
  it lists (``.metadata``, ``__<rank>_<i>.distcp``, ``rng_rank<r>.pt`` for every rank of the saving world) has the
  recorded size and sha256. The manifest is written last (temp name, fsync, rename) by rank 0 from the hashes
  every rank computed over the files it wrote, so a directory without a verifying manifest is incomplete.
- A single-file artefact (``best.pt``) gets a sidecar ``best.pt.manifest.json``: the sidecar is removed before
  the file is replaced and written after, so a sidecar that exists always describes the file beside it; a
  file without one (an older version, or a kill in that window) loads with a warning that it is unverified.
- :func:`resolve` scans ``step_*`` directories newest first (the ``latest`` pointer is a hint, never trusted),
  verifies each and returns the first good one plus the reasons the newer ones were skipped.

sha256 (hashlib, OpenSSL): ~1 GB/s per core here, and each rank hashes its own files in parallel at save time;
a crc32 would be ~2x faster but a checksum of the same family as the artefact and data-cache manifests
(serving/export.py, trainer/data/cache.py) keeps one rule and also resists deliberate tampering.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from hstu.trainer.config import ConfigError

log = logging.getLogger("hstu")

MANIFEST = "manifest.json"
SIDECAR_SUFFIX = ".manifest.json"
LATEST = "latest"
FORMAT, VERSION = "hstu-checkpoint", 1
STEP_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint cannot be used (incomplete, damaged, not a checkpoint, does not fit the model); the one-line
    message names the file or directory and the reason. A ConfigError, so the CLI prints it without a traceback
    (exit status 2)."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str) -> Dict[str, object]:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def _write_json_atomic(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- DCP step dirs
def rank_files(directory: str, rank: int) -> List[str]:
    """Names of the files rank ``rank`` wrote into a DCP step directory: DCP's ``__<rank>_<i>.distcp`` and our
    ``rng_rank<rank>.pt``."""
    prefix = f"__{rank}_"
    return sorted(n for n in os.listdir(directory)
                  if (n.startswith(prefix) and n.endswith(".distcp")) or n == f"rng_rank{rank}.pt")


def hash_rank_files(directory: str, rank: int) -> Dict[str, Dict[str, object]]:
    """{name: {bytes, sha256}} of this rank's files (every rank calls it on its own files, in parallel)."""
    return {n: file_record(os.path.join(directory, n)) for n in rank_files(directory, rank)}


def write_manifest(directory: str, step: int, world_size: int,
                   per_rank: Sequence[Dict[str, Dict[str, object]]]) -> Dict[str, object]:
    """Rank 0, after every rank wrote and hashed its files: hash what no rank claimed (``.metadata``), then
    write ``manifest.json`` atomically (the last file of the checkpoint)."""
    files: Dict[str, Dict[str, object]] = {}
    for records in per_rank:
        files.update(records)
    for n in sorted(os.listdir(directory)):
        p = os.path.join(directory, n)
        if n not in files and n != MANIFEST and not n.endswith(".tmp") and os.path.isfile(p):
            files[n] = file_record(p)
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
                "algorithm": "sha256", "files": files}
    _write_json_atomic(manifest, os.path.join(directory, MANIFEST))
    return manifest


def _required(world_size: int) -> List[str]:
    return [".metadata"] + [f"rng_rank{r}.pt" for r in range(world_size)]


def read_manifest(directory: str) -> Tuple[Optional[dict], Optional[str]]:
    """(manifest, None) or (None, reason)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None, f"{path}: missing (the checkpoint was never completed)"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files, world = manifest["files"], int(manifest["world_size"])
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not an hstu checkpoint manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path}: unreadable ({type(e).__name__}: {e})"
    missing = [n for n in _required(world) if n not in files]
    if missing:
        return None, f"{path}: does not list {missing[0]} (world size {world})"
    return manifest, None


def verify_step_dir(directory: str, full: bool = True) -> Optional[str]:
    """None when ``directory`` is a complete checkpoint, else the reason (naming the bad file). ``full=False``
    checks presence and sizes only (no hashing: used right after writing, when the hashes were just taken)."""
    if not os.path.isdir(directory):
        return f"{directory}: not a directory"
    manifest, reason = read_manifest(directory)
    if manifest is None:
        return reason
    for name, rec in sorted(manifest["files"].items()):
        p = os.path.join(directory, name)
        try:
            if not os.path.isfile(p):
                return f"{p}: missing"
            size = os.path.getsize(p)
            if size != rec["bytes"]:
                return f"{p}: {size} bytes, the manifest says {rec['bytes']} (truncated or overwritten)"
            if full and sha256_file(p) != rec["sha256"]:
                return f"{p}: sha256 differs from the manifest (the file is damaged)"
        except OSError as e:  # unreadable, or removed meanwhile (pruned by a run writing this directory)
            return f"{p}: cannot be read ({type(e).__name__}: {e.strerror or e})"
    return None


def step_dirs(ckpt_dir: str) -> List[str]:
    """Names of ``step_<N>`` directories in ``ckpt_dir``, newest first (complete or not)."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in os.listdir(ckpt_dir) if STEP_NAME.match(n) and os.path.isdir(os.path.join(ckpt_dir, n))]
    return sorted(names, key=lambda n: int(STEP_NAME.match(n).group(1)), reverse=True)


def read_pointer(ckpt_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """(name ``latest`` holds, or None; a note when it is missing / not a step name)."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        return None, f"{pointer} is missing"
    try:
        with open(pointer, encoding="utf-8", errors="replace") as f:
            name = f.read(256).strip()
    except OSError as e:
        return None, f"{pointer} is unreadable ({e})"
    if not STEP_NAME.match(name):
        return None, f"{pointer} holds {name[:40]!r}, not a checkpoint name"
    return name, None


@dataclass
class Resolution:
    """What :func:`resolve` found: ``path`` (None: no checkpoint at all), ``skipped`` [(dir, reason)] newer
    directories that failed verification, ``note``: what was wrong with the ``latest`` pointer, if anything."""

    path: Optional[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    note: Optional[str] = None

    def warn(self, log_: logging.Logger = log) -> None:
        for directory, reason in self.skipped:
            log_.warning("checkpoint %s is unusable: %s — %s", directory, reason,
                         f"falling back to {self.path}" if self.path else "no older checkpoint verifies")
        if self.note and self.path:
            log_.warning("%s; using %s, the newest checkpoint that verifies", self.note, self.path)
        elif self.note:
            log_.warning("%s and there is no step_* checkpoint: nothing to resume", self.note)


def resolve(ckpt_dir: str) -> Resolution:
    """The newest ``step_*`` checkpoint in ``ckpt_dir`` that verifies (see module doc). Raises CheckpointError
    when step directories exist but none verifies; Resolution(None) when there are none."""
    name, note = read_pointer(ckpt_dir)
    names = step_dirs(ckpt_dir)
    skipped: List[Tuple[str, str]] = []
    for n in names:
        path = os.path.join(ckpt_dir, n)
        reason = verify_step_dir(path)
        if reason is None:
            if note is None and name not in names:  # naming an older good one is a kill before `latest`
                note = f"{os.path.join(ckpt_dir, LATEST)} names {name}, which does not exist"
            return Resolution(path, skipped, note)
        skipped.append((path, reason))
    if skipped:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies: " + "; ".join(
            f"{os.path.basename(d)}: {r}" for d, r in skipped[:3]) + (f"; and {len(skipped) - 3} more"
                                                                        if len(skipped) > 3 else ""))
    if not os.path.exists(os.path.join(ckpt_dir, LATEST)):
        return Resolution(None)
    return Resolution(None, [], note or f"{os.path.join(ckpt_dir, LATEST)} names {name}, which does not exist")


# ------------------------------------------------------------------------------------------- single files
def sidecar(path: str) -> str:
    return path + SIDECAR_SUFFIX


def drop_sidecar(path: str) -> None:
    """Before ``path`` is replaced: its sidecar must not outlive the content it describes."""
    try:
        os.remove(sidecar(path))
    except FileNotFoundError:
        pass


def write_sidecar(path: str) -> None:
    """After ``path`` was written (renamed into place): record its size and sha256."""
    _write_json_atomic({"format": FORMAT, "version": VERSION, "algorithm": "sha256",
                        "files": {os.path.basename(path): file_record(path)}}, sidecar(path))


def verify_file(path: str) -> Tuple[Optional[str], bool]:
    """(reason it is bad or None, whether a sidecar verified it). A file without a sidecar is not bad (older
    version / killed between the rename and the sidecar): (None, False)."""
    if not os.path.isfile(path):
        return f"{path}: missing", False
    side = sidecar(path)
    if not os.path.isfile(side):
        return None, False
    try:
        with open(side, encoding="utf-8") as f:
            rec = json.load(f)["files"][os.path.basename(path)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{side}: unreadable ({type(e).__name__}: {e})", False
    try:
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            return f"{path}: {size} bytes, {side} says {rec['bytes']} (truncated or overwritten)", False
        if sha256_file(path) != rec["sha256"]:
            return f"{path}: sha256 differs from {side} (the file is damaged)", False
    except OSError as e:
        return f"{path}: cannot be read ({type(e).__name__}: {e.strerror or e})", False
    return None, True


def verify_source(path: str) -> str:
    """A checkpoint named by the user (a state_dict file, a DCP step directory, or a checkpoint directory of
    step dirs): verified (a checkpoint directory resolves to its newest good step); returns the path to load.
    A DCP directory without manifest.json named explicitly (another tool's, or written before manifests) is
    loaded unverified with a warning — never picked by a scan. Raises CheckpointError with a one-line reason."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MANIFEST)):
            reason = verify_step_dir(path)
            if reason:
                raise CheckpointError(f"checkpoint {path} is unusable: {reason}")
            return path
        if os.path.exists(os.path.join(path, ".metadata")):  # named explicitly: another tool's / older DCP dir
            log.warning("checkpoint %s has no %s (written by another tool or an older version): loading it "
                        "unverified", path, MANIFEST)
            return path
        if step_dirs(path) or os.path.exists(os.path.join(path, LATEST)):
            res = resolve(path)
            if res.path is None:
                raise CheckpointError(f"no checkpoint in {path}")
            res.warn()
            return res.path
        raise CheckpointError(f"{path} is a directory but not a checkpoint (no {MANIFEST}, no step_* directories)")
    reason, verified = verify_file(path)
    if reason:
        raise CheckpointError(f"checkpoint {path} is unusable: {reason}")
    if not verified:
        log.debug("checkpoint %s has no %s: loading it unverified", path, sidecar(path))
    return path


def describe_mismatch(own: Dict[str, Tuple[int, ...]], stored: Dict[str, Tuple[int, ...]],
                      shown: int = 4) -> Optional[str]:
    """'missing [...]; unexpected [...]; shapes [...]' (a few of each, then 'and N more') between a model's
    {name: shape} and a checkpoint's, or None when they match."""
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    shapes = [f"{k}: checkpoint {tuple(stored[k])} vs model {tuple(own[k])}" for k in sorted(own)
              if k in stored and tuple(stored[k]) != tuple(own[k])]

    def few(what: str, items: Iterable[str]) -> str:
        items = list(items)
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return f"{what} {', '.join(items[:shown])}{more}" if items else ""

    parts = [few("missing", missing), few("unexpected", unexpected), few("shapes differ:", shapes)]
    parts = [p for p in parts if p]
    return "; ".join(parts) if parts else None


def resolve_run_checkpoint(run_dir: str, checkpoint: Optional[str] = None, ckpt_dir: Optional[str] = None) -> str:
    """What ``hstu eval`` / ``hstu export --checkpoint X`` load, verified: X = "best" (RUN_DIR/best.pt, else the
    DCP best checkpoint RUN_DIR/best/step_N of checkpoint.best_format=dcp), "latest" (the newest checkpoint in
    ``ckpt_dir`` — the run's checkpoint.dir, default RUN_DIR/checkpoints — that verifies; damaged newer ones are
    skipped with a warning), None (best if present, else latest) or a path (state_dict file, DCP step directory
    or checkpoint directory). Raises CheckpointError (one line)."""
    ckpt_dir = ckpt_dir or os.path.join(run_dir, "checkpoints")
    if checkpoint not in (None, "", "best", "latest"):
        return verify_source(checkpoint)
    best = os.path.join(run_dir, "best.pt")
    if checkpoint != "latest" and os.path.exists(best):
        return verify_source(best)
    best_dir = os.path.join(run_dir, "best")  # run_dir.BEST_DIR (run_dir imports this module)
    if checkpoint != "latest" and os.path.isdir(best_dir):
        res = resolve(best_dir)
        if res.path is not None:
            res.warn()
            return res.path
    if checkpoint == "best":
        raise CheckpointError(f"no checkpoint in {run_dir}: no best.pt nor a checkpoint in {best_dir} (the run "
                              "saves one after its first evaluation)")
    res = resolve(ckpt_dir)
    if res.path is None:
        wanted = "best.pt nor a checkpoint in " if checkpoint is None else "checkpoint in "
        raise CheckpointError(f"no checkpoint in {run_dir}: no {wanted}{ckpt_dir}")
    res.warn()
    return res.path
