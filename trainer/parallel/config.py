"""Sharding / sparse-optimizer configuration for the TorchRec embedding path (see docs/rowwise_adamw.md).

:class:`ShardingConfig` is self-contained; the lead hooks it into ``RunConfig`` later (``RunConfig.sharding``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
OPTIMIZERS = ("rowwise_adamw",)
STATE_PLACEMENTS = ("host", "device")
WEIGHT_DTYPES = ("float32", "bfloat16")


@dataclass
class ShardingConfig:
    """How the item table is sharded and optimised.

    - ``sharding_type``: table_wise | row_wise | column_wise (one type for the table; planner picks ranks).
    - ``optimizer``: rowwise_adamw (the only sparse optimizer; update runs inside backward).
    - ``state_placement``: host (host DRAM; on CUDA pinned + mapped into the GPU) | device (beside the weights).
    - ``weight_dtype``: float32 | bfloat16 (optimizer state is always float32).
    - ``hbm_cap_bytes`` / ``ddr_cap_bytes``: per-rank planner Topology budgets; 0 = torchrec default.
    - ``lr``, ``betas``, ``eps``, ``weight_decay``: rowwise AdamW hyper-parameters (decoupled weight decay).
    - ``batch_size``: per-rank batch size hint for the planner's perf/storage estimates.
    """

    sharding_type: str = "row_wise"
    optimizer: str = "rowwise_adamw"
    state_placement: str = "device"
    weight_dtype: str = "float32"
    hbm_cap_bytes: int = 0
    ddr_cap_bytes: int = 0
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = 128

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        for name, val, allowed in (
            ("sharding_type", self.sharding_type, SHARDING_TYPES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("state_placement", self.state_placement, STATE_PLACEMENTS),
            ("weight_dtype", self.weight_dtype, WEIGHT_DTYPES),
        ):
            if val not in allowed:
                raise ValueError(f"sharding.{name} = {val!r} is not one of {list(allowed)}")
        if self.lr < 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"sharding: need lr >= 0, eps > 0, weight_decay >= 0 (got {self.lr}, {self.eps}, "
                             f"{self.weight_decay})")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"sharding.betas must be in [0, 1), got {self.betas}")
        if self.hbm_cap_bytes < 0 or self.ddr_cap_bytes < 0 or self.batch_size <= 0:
            raise ValueError("sharding: hbm_cap_bytes/ddr_cap_bytes must be >= 0 and batch_size > 0")
