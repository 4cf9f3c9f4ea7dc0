"""Run directories: default names, creation, the previous-run swap, atomic checkpoint/JSON writes.

A run directory holds: config.yaml (resolved config, written at start), metrics.jsonl, train.log,
tensorboard/, best.pt (state_dict of the best-epoch model) + best.pt.manifest.json (its size and sha256,
trainer/integrity.py), results.json (final summary), eval.json (`hstu eval`), checkpoints/.

A fresh run over a previous run's directory never deletes that run up front (docs/reliability.md):
:func:`stash_previous` moves its files into ``.previous-run/`` (and its checkpoints into
``<checkpoint dir>/.previous-run/``), the new run writes beside them, and :func:`commit_run` deletes the stash
only once the new run has its own first checkpoint or result. A failure before that (:func:`restore_previous`,
or :func:`recover` on the next start after a kill) puts the previous run back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import torch

from hstu.trainer.integrity import SIDECAR_SUFFIX, STEP_NAME, drop_sidecar, verify_step_dir, write_sidecar

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "best.pt"
BEST_DIR = "best"  # checkpoint.best_format=dcp: the best epoch's model as a DCP checkpoint (best/step_N, latest)
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


def config_name(config_path: Optional[str]) -> str:
    """Run-name stem of a config file: the path below a ``configs/`` folder joined by '-'
    (``configs/ml-1m/hstu.yaml`` -> ``ml-1m-hstu``), else the file stem (``/tmp/tiny.yaml`` -> ``tiny``);
    None -> ``default``."""
    if not config_path:
        return "default"
    parts = os.path.normpath(os.path.abspath(config_path)).split(os.sep)
    parts[-1] = os.path.splitext(parts[-1])[0]
    if "configs" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("configs")
        return "-".join(parts[last + 1:])
    return parts[-1]


def default_run_dir(name: str, root: str = "runs") -> str:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (a numeric suffix is added if that directory already exists)."""
    base = os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, i = base, 1
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    return path


RUN_FILES = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE, CHECKPOINT_FILE, CHECKPOINT_FILE + SIDECAR_SUFFIX,
             "train.log", "eval.json")
RUN_DIRS = ("tensorboard", BEST_DIR)
PREVIOUS = ".previous-run"  # a previous run's files while a fresh run in the same directory has no result yet


def prepare_run_dir(path: str, keep: bool = False, ckpt_dir: Optional[str] = None) -> List[str]:
    """Create the run directory and remove stale ``<run file>.tmp`` files (a kill during an atomic write; one
    run owns its directory). Unless ``keep`` (a resumed run), a previous run's files there are moved aside
    (:func:`stash_previous`) so runs never mix; returns what was moved."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".tmp") and name[:-4] in RUN_FILES and os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    return [] if keep else stash_previous(path, ckpt_dir)


def _ckpt_entries(ckpt_dir: str) -> List[str]:
    """A checkpoint directory's run-owned entries: step_* (also .damaged ones) and the ``latest`` pointer."""
    if not os.path.isdir(ckpt_dir):
        return []
    return [n for n in os.listdir(ckpt_dir)
            if n == "latest" or (STEP_NAME.match(n.split(".")[0]) and not n.endswith(".tmp"))]


def _run_entries(run_dir: str) -> List[str]:
    return [n for n in RUN_FILES + RUN_DIRS if os.path.exists(os.path.join(run_dir, n))]


def _groups(run_dir: str, ckpt_dir: Optional[str]) -> Dict[str, List[str]]:
    """{directory: its run-owned entries} for the run directory and the checkpoint directory."""
    groups = {os.path.normpath(run_dir): _run_entries(run_dir)}
    if ckpt_dir:
        key = os.path.normpath(ckpt_dir)
        groups[key] = groups.get(key, []) + _ckpt_entries(ckpt_dir)
    return groups


def stash_previous(run_dir: str, ckpt_dir: Optional[str] = None) -> List[str]:
    """Move a previous run's files (RUN_FILES, tensorboard/) into ``run_dir/.previous-run/`` and its
    checkpoints (step_*, latest) into ``ckpt_dir/.previous-run/``; returns what was moved (renames only)."""
    moved = []
    for directory, names in _groups(run_dir, ckpt_dir).items():
        if not names:
            continue
        stash = os.path.join(directory, PREVIOUS)
        if os.path.isdir(stash):  # recover() runs first, so this is never a previous run's only copy
            raise RuntimeError(f"{stash} exists: recover() must run first")
        os.makedirs(stash)
        for n in names:
            os.replace(os.path.join(directory, n), os.path.join(stash, n))
            moved.append(n + ("/" if os.path.isdir(os.path.join(stash, n)) else ""))
    return moved


def _stashes(run_dir: str, ckpt_dir: Optional[str]) -> List[str]:
    return [os.path.join(d, PREVIOUS) for d in _groups(run_dir, ckpt_dir) if os.path.isdir(os.path.join(d, PREVIOUS))]


def commit_run(run_dir: str, ckpt_dir: Optional[str] = None) -> bool:
    """This run has its own first checkpoint or result: delete the stashed previous run (if any)."""
    stashes = _stashes(run_dir, ckpt_dir)
    for stash in stashes:
        shutil.rmtree(stash)
    return bool(stashes)


def restore_previous(run_dir: str, ckpt_dir: Optional[str] = None) -> bool:
    """This run failed before it had a checkpoint or result: remove its files and move the stashed previous
    run back. Returns whether there was one."""
    restored = False
    for directory, current in _groups(run_dir, ckpt_dir).items():
        stash = os.path.join(directory, PREVIOUS)
        if not os.path.isdir(stash):
            continue
        for n in current:
            p = os.path.join(directory, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        for n in os.listdir(stash):
            os.replace(os.path.join(stash, n), os.path.join(directory, n))
        os.rmdir(stash)
        restored = True
    return restored


def has_own_result(run_dir: str, ckpt_dir: Optional[str] = None) -> bool:
    """Whether the run now in ``run_dir`` has a result (best.pt or best/, results.json) or a complete checkpoint."""
    if any(os.path.isfile(os.path.join(run_dir, n)) for n in (CHECKPOINT_FILE, RESULTS_FILE)):
        return True
    return any(verify_step_dir(os.path.join(d, n), full=False) is None
               for d in (ckpt_dir or "", os.path.join(run_dir, BEST_DIR)) for n in _ckpt_entries(d)
               if STEP_NAME.match(n))


def recover(run_dir: str, ckpt_dir: Optional[str] = None) -> Optional[str]:
    """At start (rank 0): finish a swap a kill interrupted. A stash left behind means a fresh run was killed:
    if it had produced a checkpoint or result the stash is deleted (the swap completes), else the previous run
    is moved back. Returns 'committed' | 'restored' | None (nothing to do)."""
    if not _stashes(run_dir, ckpt_dir):
        return None
    if has_own_result(run_dir, ckpt_dir):
        commit_run(run_dir, ckpt_dir)
        return "committed"
    restore_previous(run_dir, ckpt_dir)
    return "restored"


def save_state_dict(module: torch.nn.Module, path: str) -> None:
    """torch.save(module.state_dict()) to ``path.tmp`` then rename: a crash never leaves a half-written file."""
    save_tensors(module.state_dict(), path)


def save_tensors(state: Dict[str, Any], path: str) -> None:
    """torch.save(state) to ``path.tmp`` then rename; its sidecar ``path.manifest.json`` (size + sha256) is
    dropped before the rename and written after (trainer/integrity.py), so it never describes other bytes."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    drop_sidecar(path)
    os.replace(tmp, path)
    write_sidecar(path)


def write_json(obj: Dict[str, Any], path: str) -> None:
    """Write JSON atomically (tmp + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
