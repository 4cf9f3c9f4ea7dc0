"""Sharding / sparse-optimizer configuration for the TorchRec embedding path (docs/rowwise_adamw.md,
docs/distributed.md). :class:`ShardingConfig` is ``RunConfig.sharding`` (config key ``sharding.*``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
OPTIMIZERS = ("rowwise_adamw",)
STATE_PLACEMENTS = ("host", "device")
PIPELINES = ("none", "prefetch")
# standalone defaults of the rowwise AdamW hyper-parameters (the trainer fills None from optim.* instead)
DEFAULT_HPARAMS = {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.0}
WEIGHT_DTYPES = ("float32", "bfloat16")
TABLE_INITS = ("copy", "per_shard")


@dataclass
class ShardingConfig:
    """How the item table is sharded and optimised.

    - ``enabled``: False = plain ``nn.Embedding`` + dense AdamW (single process only); True = TorchRec
      EmbeddingCollection sharded by the planner into DistributedModelParallel, dense tower in DDP.
    - ``pipeline``: none | prefetch (prepare batch k+1 and start its input all-to-all before batch k trains).
    - ``sharding_type``: table_wise | row_wise | column_wise (one type for the table; planner picks ranks).
    - ``optimizer``: rowwise_adamw (the only sparse optimizer; update runs inside backward).
    - ``state_placement``: host (host DRAM; on CUDA pinned + mapped into the GPU) | device (beside the weights).
    - ``weight_dtype``: float32 | bfloat16 (optimizer state is always float32).
    - ``hbm_cap_bytes`` / ``ddr_cap_bytes``: per-rank planner Topology budgets; 0 = torchrec default.
    - ``lr``, ``betas``, ``eps``, ``weight_decay``: rowwise AdamW hyper-parameters (decoupled weight decay);
      None = the trainer uses ``optim.*`` (standalone users get ``DEFAULT_HPARAMS``).
    - ``batch_size``: per-rank batch size hint for the planner's perf/storage estimates.
    - ``table_init``: copy (every rank builds the full plain tables, then copies them in: the sharded run starts
      from the plain run's exact initialisation, but the table must fit one process) | per_shard (tables are
      created on the meta device; each rank materialises and initialises only its shards, values a function of
      (train.seed, table, row): the same table at any world size / sharding type; docs/distributed.md).
    """

    enabled: bool = False
    pipeline: str = "none"
    sharding_type: str = "row_wise"
    optimizer: str = "rowwise_adamw"
    state_placement: str = "device"
    weight_dtype: str = "float32"
    hbm_cap_bytes: int = 0
    ddr_cap_bytes: int = 0
    lr: Optional[float] = None
    betas: Optional[Tuple[float, float]] = None
    eps: Optional[float] = None
    weight_decay: Optional[float] = None
    batch_size: int = 128
    table_init: str = "copy"

    def resolved(self, **defaults) -> "ShardingConfig":
        """Copy with every None hyper-parameter taken from ``defaults`` (e.g. optim's), else DEFAULT_HPARAMS."""
        fill = {k: defaults.get(k, v) if getattr(self, k) is None else getattr(self, k)
                for k, v in DEFAULT_HPARAMS.items()}
        fill["betas"] = tuple(fill["betas"])
        return dataclasses.replace(self, **fill)

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        for name, val, allowed in (
            ("sharding_type", self.sharding_type, SHARDING_TYPES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("state_placement", self.state_placement, STATE_PLACEMENTS),
            ("weight_dtype", self.weight_dtype, WEIGHT_DTYPES),
            ("pipeline", self.pipeline, PIPELINES),
            ("table_init", self.table_init, TABLE_INITS),
        ):
            if val not in allowed:
                raise ValueError(f"sharding.{name} = {val!r} is not one of {list(allowed)}")
        hp = self.resolved()
        if hp.lr < 0 or hp.eps <= 0 or hp.weight_decay < 0:
            raise ValueError(f"sharding: need lr >= 0, eps > 0, weight_decay >= 0 (got {hp.lr}, {hp.eps}, "
                             f"{hp.weight_decay})")
        if not all(0.0 <= b < 1.0 for b in hp.betas):
            raise ValueError(f"sharding.betas must be in [0, 1), got {self.betas}")
        if self.hbm_cap_bytes < 0 or self.ddr_cap_bytes < 0 or self.batch_size <= 0:
            raise ValueError("sharding: hbm_cap_bytes/ddr_cap_bytes must be >= 0 and batch_size > 0")
