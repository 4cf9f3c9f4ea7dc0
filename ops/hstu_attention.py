"""Dispatcher for jagged HSTU attention: one signature, backend chosen by :class:`hstu.ops.backend.Backend`.

    out_i = Σ_{j valid(i)} SiLU(alpha · q_i·k_j + rab_ij) / norm · v_j                       [T, H, dv]

Semantics (bias, time buckets, masks) are specified in ops/README.md; ``ops/pytorch/hstu_attention.py`` is the
reference every other backend is tested against.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from hstu.ops.backend import Backend, BackendLike, resolve_backend


def _check_inputs(q, k, v, offsets, max_len, pos_weights, time_weights, timestamps, query_timestamps, num_targets):
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [T, H, dqk] and v [T, H, dv], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32/int64 [B+1], got {offsets.dtype} {tuple(offsets.shape)}")
    if not isinstance(max_len, int):
        raise TypeError(f"max_len must be a Python int, got {type(max_len).__name__}")
    B = offsets.numel() - 1
    if pos_weights is not None and (pos_weights.dim() != 1 or pos_weights.numel() % 2 != 1):
        raise ValueError(f"pos_weights must be 1-D with 2*max_pos-1 values, got {tuple(pos_weights.shape)}")
    if time_weights is not None:
        if time_weights.dim() != 1 or time_weights.numel() < 1:
            raise ValueError(f"time_weights must be 1-D [num_buckets+1], got {tuple(time_weights.shape)}")
        if timestamps is None or timestamps.shape != (q.shape[0],):
            raise ValueError("time_weights needs timestamps [T] int64")
    if query_timestamps is not None and query_timestamps.shape != (B,):
        raise ValueError(f"query_timestamps must be [B={B}], got {tuple(query_timestamps.shape)}")
    if num_targets is not None and num_targets.shape != (B,):
        raise ValueError(f"num_targets must be [B={B}], got {tuple(num_targets.shape)}")


def jagged_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    *,
    alpha: float,
    norm: float,
    causal: bool = True,
    pos_weights: Optional[torch.Tensor] = None,
    time_weights: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    query_timestamps: Optional[torch.Tensor] = None,
    time_bucket_base: float = 0.301,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    backend: BackendLike = Backend.PYTORCH,
    plan: Any = None,
) -> torch.Tensor:
    """Jagged HSTU attention.

    Args:
        q, k: [T, H, dqk]; v: [T, H, dv]; offsets: [B+1] int64; max_len: Python int ≥ max sequence length.
        alpha: scale of q·k; norm: divisor after SiLU (a constant, e.g. max_seq_len).
        causal: j ≤ i. pos_weights: [2·P−1] Toeplitz table, index j − i + P − 1 (clamped).
        time_weights: [num_buckets+1], index bucket(t_next(i) − t_j); needs timestamps [T] int64.
        query_timestamps: [B] time used as t_next of each sequence's last row (default: the row's own time).
        num_targets: [B] the last num_targets[b] rows are candidates (see history + themselves only).
        contextual_len: the first min(contextual_len, n − num_targets) rows of each sequence are a contextual
            prefix visible to every query (and to each other, even under the causal mask).
        backend: Backend / "pytorch" / "triton" / OpsConfig.
        plan: PyTorch backend, the batch's precomputed ``attention_plan`` (groups, rab indices, masks) shared by
            a stack of layers; ignored by other backends.
    Returns:
        [T, H, dv], differentiable w.r.t. q, k, v, pos_weights, time_weights.
    """
    _check_inputs(q, k, v, offsets, max_len, pos_weights, time_weights, timestamps, query_timestamps, num_targets)
    kwargs = dict(
        alpha=alpha, norm=norm, causal=causal, pos_weights=pos_weights, time_weights=time_weights,
        timestamps=timestamps, query_timestamps=query_timestamps, time_bucket_base=time_bucket_base,
        num_targets=num_targets, contextual_len=contextual_len,
    )
    backend = resolve_backend(backend)
    if backend == Backend.TRITON:
        from hstu.ops.triton.hstu_attention import triton_jagged_hstu_attention

        return triton_jagged_hstu_attention(q, k, v, offsets, max_len, **kwargs)
    from hstu.ops.pytorch.hstu_attention import pytorch_jagged_hstu_attention

    return pytorch_jagged_hstu_attention(q, k, v, offsets, max_len, plan=plan, **kwargs)
