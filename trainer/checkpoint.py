"""Resumable training checkpoints: torch.distributed.checkpoint (DCP) in an iopath directory (docs/distributed.md).

Layout of ``checkpoint.dir`` (default ``<run_dir>/checkpoints``)::

    step_00000040/          a complete checkpoint: DCP files (.metadata, __<rank>_0.distcp) + rng_rank<r>.pt
    step_00000060.tmp/      being written (or left by a crash): never read, removed by the next run
    latest                  one line, the name of the newest complete checkpoint ("step_00000040")

DCP state (written and read by the CheckpointManager, trainer/checkpoint_manager.py, from the state objects
trainer/train.py ``checkpoint_manager`` registers): ``model`` (sharded table as ShardedTensor + dense weights, or
the plain model), ``dense_optim`` (AdamW state keyed by parameter name), ``sparse_optim`` (``dmp.fused_optimizer``:
momentum1, exp_avg_sq sharded like the table, step), ``meta`` (a JSON string: step, epoch, tokens, best/final
metrics, LR schedulers, loader position, world_size, sharded). Per rank ``rng_rank<r>.pt``: torch / CUDA / numpy /
python RNG states and the negative-sampling and Stochastic-Length generator states. Saving is collective; loading
works with another world size or sharding type (RNG files are then not applied: a warning says so). This module
owns the directory side: layout, resolving, set-aside, publishing, pruning, the compatibility check.

Atomicity and integrity (trainer/integrity.py, docs/reliability.md): every rank writes into ``step_N.tmp/`` and
hashes the files it wrote; rank 0 gathers the hashes, adds ``.metadata``'s and writes ``manifest.json`` (sizes +
sha256, the last file), renames ``step_N.tmp/`` to ``step_N/`` and only then replaces ``latest`` (write
``latest.tmp``, fsync, ``os.replace``), then prunes to ``keep_last`` verified checkpoints. Resuming never trusts
``latest``: :func:`resolve_resume` scans the ``step_*`` directories newest first and takes the first whose
manifest verifies (a damaged or incomplete newer one is named in a warning and moved aside to
``step_N.damaged``), so a kill at any point, a damaged newest checkpoint or a bad pointer never costs an older
good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed.checkpoint as dcp

from hstu.trainer import integrity
from hstu.trainer.integrity import CheckpointError

try:
    from iopath.common.file_io import PathManager
except ImportError:  # a machine without iopath (the GPU check's, docs/install.md "GPU"): local paths only
    PathManager = None


class LocalPaths:
    """The part of iopath's PathManager the checkpoint code uses, for local paths; stands in when iopath is not
    installed (a URI such as ``manifold://...`` is then a clear error)."""

    @staticmethod
    def get_local_path(path: str) -> str:
        if "://" in str(path):
            raise ValueError(f"checkpoint path {path!r} is a URI but iopath is not installed; install "
                             "iopath==0.1.10 (requirements/cpu.txt) or use a local directory")
        return path

    def exists(self, path: str) -> bool:
        return os.path.exists(self.get_local_path(path))

    def ls(self, path: str) -> List[str]:
        return os.listdir(self.get_local_path(path))

    def mkdirs(self, path: str) -> None:
        os.makedirs(self.get_local_path(path), exist_ok=True)

    def open(self, path: str, mode: str = "r"):
        return open(self.get_local_path(path), mode)


pm = PathManager() if PathManager is not None else LocalPaths()
LATEST = "latest"
_NAME = re.compile(r"^step_(\d+)$")


def _crash_point(stage: str) -> None:
    """Test hook (tests monkeypatch it to raise): stages 'before_rename', 'before_latest'."""


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """Silence DCP's 'single process' notice and TorchRec 1.8's ShardedTensor deprecation (both expected)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
        yield


def checkpoint_dir(cfg: Any) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")


def checkpoint_step(path: str) -> int:
    """Step of a checkpoint path (``.../step_00000040`` -> 40)."""
    return int(_NAME.match(os.path.basename(os.path.normpath(path))).group(1))


def local_path(path: str) -> str:
    return pm.get_local_path(path)


def _complete(ckpt_dir: str) -> List[str]:
    """Names of checkpoints with a manifest whose files have the recorded sizes (no hashing), oldest first."""
    if not pm.exists(ckpt_dir):
        return []
    names = [n for n in integrity.step_dirs(local_path(ckpt_dir))
             if integrity.verify_step_dir(local_path(os.path.join(ckpt_dir, n)), full=False) is None]
    return names[::-1]


def resolve_resume(ckpt_dir: str) -> integrity.Resolution:
    """The checkpoint to resume from: the newest ``step_*`` that verifies, found by scanning (``latest`` is a
    hint). Raises CheckpointError (one line, naming the directory) when checkpoints exist but none verifies."""
    return integrity.resolve(local_path(ckpt_dir)) if pm.exists(ckpt_dir) else integrity.Resolution(None)


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Path of the newest checkpoint that verifies (warning about newer ones that do not), else None."""
    res = resolve_resume(ckpt_dir)
    res.warn()
    return res.path


def set_aside(ckpt_dir: str, skipped: List[Any]) -> List[str]:
    """Rank 0 when resuming past damaged newer checkpoints: rename each ``step_N`` to ``step_N.damaged`` (kept
    for inspection, never deleted, no longer scanned or pruned); returns the new names."""
    moved = []
    for path, _ in skipped:
        dst, i = path + ".damaged", 1
        while os.path.exists(dst):
            dst, i = f"{path}.damaged-{i}", i + 1
        os.replace(path, dst)
        moved.append(dst)
    return moved


def clean_dir(ckpt_dir: str) -> None:
    """Rank 0 at start: remove partial ``step_*.tmp`` checkpoints (a crashed save; never read)."""
    if not pm.exists(ckpt_dir):
        return
    for n in pm.ls(ckpt_dir):
        if n.endswith(".tmp") and n.startswith(("step_", LATEST)):
            p = local_path(os.path.join(ckpt_dir, n))
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


# ------------------------------------------------------------------------------------------------ save steps
def init_dense_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of an Adam/AdamW optimizer its (zero) state, as its first step would, so DCP has
    tensors to load into (a fresh torch optimizer has no state and DCP would silently skip it)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def dense_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """{parameter name: its optimizer state dict (live tensors)}: world-size independent keys for DCP."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: optimizer.state[p] for g in optimizer.param_groups for p in g["params"]}


def publish(ckpt_dir: str, name: str) -> None:
    """Atomically point ``latest`` at ``name``."""
    pointer = local_path(os.path.join(ckpt_dir, LATEST))
    with open(pointer + ".tmp", "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer + ".tmp", pointer)


def prune(ckpt_dir: str, keep_last: int, current: str) -> None:
    """Keep ``current`` and the ``keep_last - 1`` newest older checkpoints that verify (sizes); delete older
    ones. Nothing is pruned unless ``current`` itself verifies, and incomplete or newer directories are never
    counted or deleted here, so a fallback target survives until a newer checkpoint is complete."""
    if keep_last <= 0 or integrity.verify_step_dir(local_path(os.path.join(ckpt_dir, current)), full=False):
        return
    step = checkpoint_step(current)
    older = [n for n in _complete(ckpt_dir) if checkpoint_step(n) < step]  # oldest first
    for n in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(local_path(os.path.join(ckpt_dir, n)))


def check_compatible(path: str, expected: Dict[str, Any]) -> None:
    """Every tensor this run loads exists in the checkpoint with the same GLOBAL size (else a clear error)."""
    try:
        stored = dcp.FileSystemReader(local_path(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a damaged .metadata (unpickling) fails in many ways
        raise CheckpointError(f"checkpoint {path}: cannot read .metadata ({type(e).__name__})") from e
    missing = sorted(k for k in expected if k not in stored)
    if missing:
        raise CheckpointError(f"checkpoint {path} does not match this run (sharding.enabled or the model config "
                              f"differ): missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    wrong = [(k, tuple(stored[k].size), tuple(v.size())) for k, v in expected.items()
             if isinstance(v, torch.Tensor) and hasattr(stored[k], "size") and tuple(stored[k].size) != tuple(v.size())]
    if wrong:
        hint = ""
        if any("exp_avg_sq" in k for k, _, _ in wrong):
            hint = (" — the rowwise AdamW second moment has one value per row per column shard under "
                    "sharding.sharding_type=column_wise (docs/rowwise_adamw.md), so a column_wise checkpoint only "
                    "loads into the same column split (same sharding type and number of column shards), and vice "
                    "versa; resume with the saving run's sharding settings, or start fresh (train.resume=false)")
        raise CheckpointError(f"checkpoint {path} does not match this run: global sizes differ (name: checkpoint "
                              f"vs this run) " + "; ".join(f"{k}: {a} vs {b}" for k, a, b in wrong[:5]) + hint)


def rewind_metrics(path: str, step: int) -> None:
    """Keep only metrics.jsonl records with step <= ``step`` (what the resumed run will log again is dropped)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)
