"""One manager saves and loads a run's state objects (torchtitan's CheckpointManager is the model).

Every piece of run state is a *Stateful* (``state_dict()`` / ``load_state_dict()``) registered once under a name
and a storage (trainer/train.py ``checkpoint_manager`` registers the run's):

    DCP   tensors saved collectively by torch.distributed.checkpoint (model, dense_optim, sparse_optim)
    META  JSON, global (the DCP entry ``meta``): progress (flat), scheduler, sparse_scheduler, loader
    RANK  this rank's ``rng_rank<r>.pt``: the RNG streams (flat), applied only with the saving world size

``flat=True`` merges an object's dict into its storage's top level: the key layout of the checkpoints written
before the manager existed (trainer/checkpoint.py module doc), which therefore still load. The directory side
(``step_N.tmp`` → manifest → rename → ``latest`` → prune, resolving, integrity) stays in trainer/checkpoint.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Any, Dict, List, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from hstu.trainer import checkpoint as ckpt
from hstu.trainer import integrity
from hstu.trainer.dcp_reader import RowRangeReader
from hstu.trainer.integrity import CheckpointError

log = logging.getLogger("hstu")
DCP, META, RANK = "dcp", "meta", "rank"


class Stateful(Protocol):
    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------------------ state objects
class DenseOptimizerState:
    """AdamW state keyed by parameter name (world-size independent), live tensors DCP saves from / loads into;
    every parameter gets its (zero) state first so a step-0 checkpoint has tensors (ckpt.init_dense_state)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> Dict[str, Any]:
        ckpt.init_dense_state(self.optimizer)
        return ckpt.dense_optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, live in self.state_dict().items():  # DCP loads into the live dicts: then nothing to copy
            if name in state and state[name] is not live:
                live.update(state[name])


class SchedulerState:
    """A LambdaLR without its (unpicklable) lambdas; loading also puts its last LRs into the optimizer's param
    groups (LambdaLR.load_state_dict does not)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if state is None:
            return
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **state})
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


class AttributeState:
    """JSON-able attributes ``keys`` of ``obj`` (the TrainState's step, epoch, tokens, best/final metrics ...)."""

    def __init__(self, obj: Any, keys: Tuple[str, ...]) -> None:
        self.obj, self.keys = obj, keys

    def state_dict(self) -> Dict[str, Any]:
        return {k: getattr(self.obj, k) for k in self.keys}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for k in self.keys:
            if k in state:
                setattr(self.obj, k, state[k])


class GlobalRNGState:
    """This process's torch / CUDA / numpy / python RNG states (dropout, shuffles outside the loaders)."""

    def state_dict(self) -> Dict[str, Any]:
        out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.get_rng_state()
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------ the manager
class CheckpointManager:
    """Saves / loads the registered state objects as ``<ckpt_dir>/step_<N>`` (see the module doc)."""

    def __init__(self, env: Any, ckpt_dir: str = "", keep_last: int = 0) -> None:
        self.env, self.ckpt_dir, self.keep_last = env, ckpt_dir, keep_last
        self.objects: List[Tuple[str, Any, str, bool]] = []  # (name, Stateful, storage, flat)

    def register(self, name: str, obj: Any, storage: str = META, flat: bool = False) -> "CheckpointManager":
        if storage not in (DCP, META, RANK) or (flat and storage == DCP):
            raise ValueError(f"state object {name!r}: storage {storage!r} (flat={flat}) is not one of "
                             f"{DCP}, {META}, {RANK} (flat only for {META}/{RANK})")
        if any(n == name for n, _, _, _ in self.objects):
            raise ValueError(f"state object {name!r} registered twice")
        self.objects.append((name, obj, storage, flat))
        return self

    def _of(self, storage: str) -> List[Tuple[str, Any, bool]]:
        return [(n, o, f) for n, o, s, f in self.objects if s == storage]

    def _collect(self, storage: str, **extra: Any) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for name, obj, flat in self._of(storage):
            state = obj.state_dict()
            out.update(state) if flat else out.__setitem__(name, state)
        return {**out, **extra}

    def _tensors(self, meta: str) -> Dict[str, Any]:
        return {**{name: obj.state_dict() for name, obj, _ in self._of(DCP)}, "meta": meta}

    @staticmethod
    def _apply(objects: List[Tuple[str, Any, bool]], stored: Dict[str, Any]) -> None:
        for name, obj, flat in objects:
            if flat:
                obj.load_state_dict(stored)
            elif stored.get(name) is not None:
                obj.load_state_dict(stored[name])

    def save(self, step: int) -> str:
        """Collective: write ``step_<step>`` atomically (tmp dir → manifest → rename → ``latest`` → prune);
        returns its path."""
        env, ckpt_dir = self.env, self.ckpt_dir
        if not ckpt_dir:
            raise ValueError("CheckpointManager.save: no checkpoint directory (this manager was made for loading)")
        name = f"step_{step:08d}"
        final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, name + ".tmp")
        local_tmp = ckpt.local_path(tmp)
        if env.is_main:
            if ckpt.pm.exists(tmp):
                shutil.rmtree(local_tmp)
            ckpt.pm.mkdirs(tmp)
        env.barrier()
        with ckpt.pm.open(os.path.join(tmp, f"rng_rank{env.rank}.pt"), "wb") as f:
            torch.save(self._collect(RANK, world_size=env.world_size), f)
        meta = self._collect(META, world_size=env.world_size, sharded=env.sharded)
        with ckpt.quiet_dcp():
            dcp.save(self._tensors(json.dumps(meta)), storage_writer=dcp.FileSystemWriter(local_tmp))
        env.barrier()  # every rank's files are written: each hashes its own, rank 0 writes the manifest last
        hashes = env.gather_object(integrity.hash_rank_files(local_tmp, env.rank))
        if env.is_main:
            integrity.write_manifest(local_tmp, step, env.world_size, hashes)
            ckpt._crash_point("before_rename")
            if ckpt.pm.exists(final):  # a complete but never-published checkpoint of this step (crash before latest)
                shutil.rmtree(ckpt.local_path(final))
            os.replace(local_tmp, ckpt.local_path(final))
            ckpt._crash_point("before_latest")
            ckpt.publish(ckpt_dir, name)
            ckpt.prune(ckpt_dir, self.keep_last, name)
        env.barrier()
        return final

    def load(self, path: str) -> Dict[str, Any]:
        """Load checkpoint ``path`` into every registered object in place; returns its meta dict with ``rng`` =
        this rank's RNG file content when it was saved with the same world size and applied (else None)."""
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        target = self._tensors("")
        ckpt.check_compatible(path, flatten_state_dict(target)[0])
        try:
            with ckpt.quiet_dcp():
                dcp.load(target, storage_reader=RowRangeReader(ckpt.local_path(path)))  # only the rows needed
        except Exception as e:  # noqa: BLE001 - DCP wraps read failures of damaged files in CheckpointException
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {first})") from e
        self._apply(self._of(DCP), target)
        meta = json.loads(target["meta"])
        self._apply(self._of(META), meta)
        meta["rng"] = self._load_rank_file(path, meta.get("world_size"))
        return meta

    def _load_rank_file(self, path: str, saved_world_size: Any) -> Optional[Dict[str, Any]]:
        env = self.env
        rng_file = os.path.join(path, f"rng_rank{env.rank}.pt")
        if saved_world_size != env.world_size:
            log.warning("checkpoint %s was written by %s processes, this run has %d: model, optimizers, schedule "
                        "and data position restored; RNG streams start fresh", path, saved_world_size,
                        env.world_size)
            return None
        if not ckpt.pm.exists(rng_file):  # resolve_resume refuses this; a checkpoint loaded directly may lack it
            log.warning("checkpoint %s has no %s: model, optimizers, schedule and data position restored; RNG "
                        "streams start fresh, so the run is not bit-identical to an uninterrupted one", path,
                        os.path.basename(rng_file))
            return None
        try:
            with ckpt.pm.open(rng_file, "rb") as f:
                stored = torch.load(f, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure of a damaged file
            raise CheckpointError(f"checkpoint {path}: cannot read {os.path.basename(rng_file)} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        self._apply(self._of(RANK), stored)
        return stored
