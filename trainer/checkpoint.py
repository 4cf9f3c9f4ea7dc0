"""Resumable training checkpoints: torch.distributed.checkpoint (DCP) in an iopath directory (docs/distributed.md).

Layout of ``checkpoint.dir`` (default ``<run_dir>/checkpoints``)::

    step_00000040/          a complete checkpoint: DCP files (.metadata, __<rank>_0.distcp) + rng_rank<r>.pt
    step_00000060.tmp/      being written (or left by a crash): never read, removed by the next run
    latest                  one line, the name of the newest complete checkpoint ("step_00000040")

DCP state: ``model`` (sharded table as ShardedTensor + dense weights, or the plain model), ``dense_optim``
(AdamW state keyed by parameter name), ``sparse_optim`` (``dmp.fused_optimizer``: momentum1, exp_avg_sq
sharded like the table, step), ``meta`` (a JSON string: step, epoch, tokens, best/final metrics, LR schedulers,
loader position). Per rank ``rng_rank<r>.pt``: torch / CUDA / numpy / python RNG states and the negative-
sampling and Stochastic-Length generator states. Saving is collective; loading works with another world size
or sharding type (RNG files are then not applied: a warning says so).

Atomicity: every rank writes into ``step_N.tmp/``; after a barrier rank 0 renames it to ``step_N/`` and only
then replaces ``latest`` (write ``latest.tmp``, fsync, ``os.replace``), then prunes to ``keep_last``. A kill at
any point leaves ``latest`` naming a complete checkpoint (or no ``latest``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from iopath.common.file_io import PathManager

log = logging.getLogger("hstu")
pm = PathManager()
LATEST = "latest"
_NAME = re.compile(r"^step_(\d+)$")


def _crash_point(stage: str) -> None:
    """Test hook (tests monkeypatch it to raise): stages 'before_rename', 'before_latest'."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


def _local(path: str) -> str:
    return pm.get_local_path(path)


def _complete(ckpt_dir: str) -> List[str]:
    """Names of complete checkpoints, oldest first."""
    if not pm.exists(ckpt_dir):
        return []
    names = [n for n in pm.ls(ckpt_dir) if _NAME.match(n) and pm.isdir(os.path.join(ckpt_dir, n))]
    return sorted(names, key=lambda n: int(_NAME.match(n).group(1)))


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Path named by ``latest`` when it holds a complete checkpoint, else None."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not pm.exists(pointer):
        return None
    with pm.open(pointer, "r") as f:
        name = f.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not (_NAME.match(name) and pm.exists(os.path.join(path, ".metadata"))):
        log.warning("checkpoint pointer %s names %r, which is not a complete checkpoint: starting fresh", pointer,
                    name)
        return None
    return path


def clean_dir(ckpt_dir: str, fresh: bool) -> None:
    """Rank 0 at start: remove partial ``*.tmp`` checkpoints; with ``fresh`` (no resume) all of ours."""
    if not pm.exists(ckpt_dir):
        return
    for n in pm.ls(ckpt_dir):
        if n.endswith(".tmp") or (fresh and (_NAME.match(n) or n == LATEST)):
            p = _local(os.path.join(ckpt_dir, n))
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


# ------------------------------------------------------------------------------------------------ state dicts
def _named_params(model: torch.nn.Module) -> Dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


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
    names = _named_params(model)
    return {names[id(p)]: optimizer.state[p] for g in optimizer.param_groups for p in g["params"]}


def _scheduler_state(sched: Any) -> Optional[Dict[str, Any]]:
    if sched is None:
        return None
    return {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}


def _load_scheduler(sched: Any, state: Optional[Dict[str, Any]]) -> None:
    """Restore a LambdaLR and put its last LRs into the optimizer's param groups (load_state_dict does not)."""
    if sched is None or state is None:
        return
    sched.load_state_dict({**sched.state_dict(), **state})
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr


def _rng_state(position: Dict[str, Any], world_size: int) -> Dict[str, Any]:
    out = {"world_size": world_size, "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate(), "neg_generator": position["neg_generator"],
           "sl_generator": position["sl_generator"]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(rng: Dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _state(state: Any, meta: str) -> Dict[str, Any]:
    """The DCP state dict of a TrainState (live tensors: DCP saves from / loads into them)."""
    out = {"model": state.model.state_dict(), "dense_optim": dense_optimizer_state(state.model, state.optimizer),
           "meta": meta}
    if state.sparse_optimizer is not None:
        out["sparse_optim"] = state.sparse_optimizer.state_dict()
    return out


# ------------------------------------------------------------------------------------------------ save / load
def save(ckpt_dir: str, state: Any, env: Any, meta: Dict[str, Any], position: Dict[str, Any],
         keep_last: int) -> str:
    """Collective save of ``state`` (a TrainState) as ``step_<state.step>``; returns its path (see module doc).

    meta: JSON-able run state (the caller's); position: the data position (pipeline.capture_position)."""
    name = f"step_{state.step:08d}"
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, name + ".tmp")
    if env.is_main:
        if pm.exists(tmp):
            shutil.rmtree(_local(tmp))
        pm.mkdirs(tmp)
    env.barrier()
    with pm.open(os.path.join(tmp, f"rng_rank{env.rank}.pt"), "wb") as f:
        torch.save(_rng_state(position, env.world_size), f)
    init_dense_state(state.optimizer)  # no-op after the first step; a step-0 checkpoint needs it
    meta = {**meta, "loader": position["loader"], "world_size": env.world_size, "sharded": env.sharded}
    with _quiet():
        dcp.save(_state(state, json.dumps(meta)), storage_writer=dcp.FileSystemWriter(_local(tmp)))
    env.barrier()
    if env.is_main:
        _crash_point("before_rename")
        if pm.exists(final):  # a complete but never-published checkpoint of this step (crash before `latest`)
            shutil.rmtree(_local(final))
        os.replace(_local(tmp), _local(final))
        _crash_point("before_latest")
        _publish(ckpt_dir, name)
        _prune(ckpt_dir, keep_last, name)
    env.barrier()
    return final


def _publish(ckpt_dir: str, name: str) -> None:
    """Atomically point ``latest`` at ``name``."""
    pointer = _local(os.path.join(ckpt_dir, LATEST))
    with open(pointer + ".tmp", "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer + ".tmp", pointer)


def _prune(ckpt_dir: str, keep_last: int, current: str) -> None:
    names = _complete(ckpt_dir)
    for n in names[: max(0, len(names) - keep_last)]:
        if n != current:
            shutil.rmtree(_local(os.path.join(ckpt_dir, n)))


def _check_compatible(path: str, expected: Dict[str, Any]) -> None:
    """Every tensor this run loads exists in the checkpoint with the same GLOBAL size (else a clear error)."""
    stored = dcp.FileSystemReader(_local(path)).read_metadata().state_dict_metadata
    missing = sorted(k for k in expected if k not in stored)
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match this run (sharding.enabled or the model config "
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
        raise RuntimeError(f"checkpoint {path} does not match this run: global sizes differ (name: checkpoint vs "
                           f"this run) " + "; ".join(f"{k}: {a} vs {b}" for k, a, b in wrong[:5]) + hint)


def load(path: str, state: Any, env: Any) -> Dict[str, Any]:
    """Load a checkpoint into ``state`` (model, both optimizers) in place; returns the meta dict, with
    ``rng`` = this rank's RNG file content when it was saved with the same world size (else None)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    init_dense_state(state.optimizer)
    target = _state(state, "")
    _check_compatible(path, flatten_state_dict(target)[0])
    with _quiet():
        dcp.load(target, storage_reader=dcp.FileSystemReader(_local(path)))
    state.model.load_state_dict(target["model"])
    if state.sparse_optimizer is not None:
        state.sparse_optimizer.load_state_dict(target["sparse_optim"])
    meta = json.loads(target["meta"])
    _load_scheduler(state.scheduler, meta.get("scheduler"))
    _load_scheduler(getattr(state, "sparse_scheduler", None), meta.get("sparse_scheduler"))
    rng_file = os.path.join(path, f"rng_rank{env.rank}.pt")
    meta["rng"] = None
    if meta.get("world_size") == env.world_size and pm.exists(rng_file):
        with pm.open(rng_file, "rb") as f:
            meta["rng"] = torch.load(f, weights_only=False)
        _restore_rng(meta["rng"])
    else:
        log.warning("checkpoint %s was written by %s processes, this run has %d: model, optimizers, schedule and "
                    "data position restored; RNG streams start fresh", path, meta.get("world_size"), env.world_size)
    return meta


def rewind_metrics(path: str, step: int) -> None:
    """Keep only metrics.jsonl records with step <= ``step`` (what the resumed run will log again is dropped)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)
