"""Process group, rank and device of a run, and the sharded model (docs/distributed.md).

``setup(cfg) -> DistEnv``: under torchrun (WORLD_SIZE/RANK/LOCAL_RANK set) or inside an already initialised
process group, the run has that world; otherwise one process. ``sharding.enabled=true`` always runs under a
process group (a private world of 1 when started as a plain process), world sizes > 1 require it.
Backend: gloo on CPU, nccl on CUDA; device ``cuda:LOCAL_RANK`` when ``train.device`` is cuda.

``shard_model(model, cfg, env, task)`` has the task (trainer/tasks/) swap its plain tables for a TorchRec
EmbeddingCollection and wraps the model in DistributedModelParallel: the tables are sharded by the planner
(``sharding.sharding_type``) and trained by the fused rowwise AdamW; every other parameter (the dense tower) is
replicated and synchronised by DDP.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from hstu.trainer.config import ConfigError, RunConfig

RANK_SEED_STRIDE = 1_000_003  # per-rank offset of the seeds of rank-local randomness (negatives, SL, dropout)


@dataclass
class DistEnv:
    """Where this process sits: rank / world_size / local_rank, its device, whether the item table is sharded
    (a DMP model) and whether :func:`setup` created the process group (then :func:`teardown` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    sharded: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM over ranks (identity for a single process); returns ``t``."""
        if self.distributed and self.world_size > 1:
            dist.all_reduce(t)
        return t

    def gather_object(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj`` (by rank) on rank 0, None on the others; collective (all ranks must call it)."""
        if not self.distributed or self.world_size == 1:
            return [obj]
        out: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def setup(cfg: RunConfig) -> DistEnv:
    """Join (or create) the process group the config needs; see the module docstring."""
    owns = False
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world > 1 and not cfg.sharding.enabled:
        raise ConfigError(f"world size {world} needs the sharded path: add sharding.enabled=true "
                          "(the plain nn.Embedding path is single-process)")
    device = torch.device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if cfg.sharding.enabled and not (dist.is_available() and dist.is_initialized()):
        timeout = datetime.timedelta(minutes=30)
        if "MASTER_ADDR" in os.environ:  # torchrun / SLURM-style env
            dist.init_process_group(backend_for(device.type), timeout=timeout)
        else:  # a plain process: a private world of 1
            dist.init_process_group(backend_for(device.type), init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
        owns = True
    return DistEnv(rank, world, local_rank, device, cfg.sharding.enabled, owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, cfg: RunConfig, env: DistEnv,
                task: Any = None) -> Tuple[torch.nn.Module, Any]:
    """The task's plain model -> (DistributedModelParallel, fused rowwise-AdamW optimizer of the tables).

    The task (``task``, default the config's: trainer/tasks/) swaps its plain tables for TorchRec collections
    (retrieval: the item table; ranking: all its tables as one collection); DMP shards them. Rowwise AdamW
    hyper-parameters left None in ``sharding.*`` come from ``optim.*``. Tables the task built on the meta device
    (``sharding.table_init=per_shard``) are materialised per shard by DMP and initialised from train.seed."""
    from hstu.trainer.parallel.sharding import shard_embedding_collection

    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)  # notices about dry-run planning
    if task is None:
        from hstu.trainer.tasks import get_task

        task = get_task(cfg)
    task.wrap_sharded_tables(model, cfg.sharding.weight_dtype, cfg.train.seed)
    o = cfg.optim
    sharding = cfg.sharding.resolved(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    dmp = shard_embedding_collection(model, sharding, device=env.device)
    return dmp, dmp.fused_optimizer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DMP (its sharded modules stay sharded), else the model itself."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    return model.module if isinstance(model, DistributedModelParallel) else model


def reduce_step(env: DistEnv, loss: torch.Tensor, valid: int, tokens: int) -> Tuple[float, float, int]:
    """Make the per-rank mean losses one global mean: returns (global mean loss, local loss scale, global tokens).

    With V_r valid positions on rank r and V = Σ V_r, backward of ``scale · loss_r`` with scale = V_r·W / V
    gives, after DDP's (and TorchRec's) division by W, the gradient of Σ_r V_r·loss_r / V: the loss of the
    global batch, whatever its split over ranks. One all_reduce of 3 numbers per step."""
    if env.world_size == 1:
        return float(loss.detach()), 1.0, tokens
    t = torch.tensor([float(loss.detach()) * valid, valid, tokens], dtype=torch.float64)
    env.all_reduce_sum(t)
    total_valid = float(t[1])
    scale = valid * env.world_size / total_valid if total_valid > 0 else 0.0
    return float(t[0]) / max(total_valid, 1.0), scale, int(t[2])


def rank_seed(seed: int, env: Optional[DistEnv]) -> int:
    """Seed of rank-local randomness: ``seed`` on rank 0 (so world size 1 is unchanged), shifted on others."""
    return seed + RANK_SEED_STRIDE * (env.rank if env is not None else 0)
