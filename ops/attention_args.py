"""The per-call options of jagged HSTU attention, one frozen object shared by the dispatcher and every backend.

Only the Triton ``autograd.Function`` boundary keeps a flat argument list (torch.library / autograd need one);
the Python side passes ``(q, k, v, args)``. Imports nothing GPU-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionArgs:
    """Everything but q, k, v of one attention call (semantics: ops/README.md).

    offsets [B+1] int32/int64; max_len: Python int ≥ every sequence length; alpha: scale of q·k; norm: divisor
    after SiLU; causal: j ≤ i. pos_weights [2·P−1] / time_weights [num_buckets+1]: the layer's rab tables
    (differentiable; autograd flows through them like through q, k, v). timestamps [T] int64 (needed by
    time_weights); query_timestamps [B] (t_next of each sequence's last row); num_targets [B] candidate rows at
    the end of each sequence; contextual_len: rows of a prefix visible to every query.
    """

    offsets: torch.Tensor
    max_len: int
    alpha: float
    norm: float
    causal: bool = True
    pos_weights: Optional[torch.Tensor] = None
    time_weights: Optional[torch.Tensor] = None
    timestamps: Optional[torch.Tensor] = None
    query_timestamps: Optional[torch.Tensor] = None
    time_bucket_base: float = 0.301
    num_targets: Optional[torch.Tensor] = None
    contextual_len: int = 0

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    def check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raises ValueError / TypeError naming the argument, its shape and the expected one."""
        if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
            raise ValueError(f"expected q, k [T, H, dqk] and v [T, H, dv], got {tuple(q.shape)}, {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")
        offsets = self.offsets
        if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"offsets must be int32/int64 [B+1], got {offsets.dtype} {tuple(offsets.shape)}")
        if not isinstance(self.max_len, int):
            raise TypeError(f"max_len must be a Python int, got {type(self.max_len).__name__}")
        B = self.batch_size
        pw, tw = self.pos_weights, self.time_weights
        if pw is not None and (pw.dim() != 1 or pw.numel() % 2 != 1):
            raise ValueError(f"pos_weights must be 1-D with 2*max_pos-1 values, got {tuple(pw.shape)}")
        if tw is not None:
            if tw.dim() != 1 or tw.numel() < 1:
                raise ValueError(f"time_weights must be 1-D [num_buckets+1], got {tuple(tw.shape)}")
            if self.timestamps is None or self.timestamps.shape != (q.shape[0],):
                raise ValueError("time_weights needs timestamps [T] int64")
        if self.query_timestamps is not None and self.query_timestamps.shape != (B,):
            raise ValueError(f"query_timestamps must be [B={B}], got {tuple(self.query_timestamps.shape)}")
        if self.num_targets is not None and self.num_targets.shape != (B,):
            raise ValueError(f"num_targets must be [B={B}], got {tuple(self.num_targets.shape)}")
