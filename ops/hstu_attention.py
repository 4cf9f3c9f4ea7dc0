"""Dispatcher for jagged HSTU attention: one signature, backend chosen by :class:`hstu.ops.backend.Backend`.

    out_i = Σ_{j valid(i)} SiLU(alpha · q_i·k_j + rab_ij) / norm · v_j                       [T, H, dv]

Semantics (bias, time buckets, masks) are specified in ops/README.md; ``ops/pytorch/hstu_attention.py`` is the
reference every other backend is tested against.
"""

from __future__ import annotations

from typing import Any

import torch

from hstu.ops.attention_args import AttentionArgs
from hstu.ops.backend import Backend, BackendLike, resolve_backend

__all__ = ["AttentionArgs", "jagged_hstu_attention"]


def jagged_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs, *,
                          backend: BackendLike = Backend.PYTORCH, plan: Any = None) -> torch.Tensor:
    """Jagged HSTU attention.

    Args:
        q, k: [T, H, dqk]; v: [T, H, dv]; args: the call's :class:`AttentionArgs` (offsets, max_len, alpha,
            norm, masks, rab tables and timestamps).
        backend: Backend / "pytorch" / "triton" / "cpu" (C++ kernel, float32 CPU tensors) / OpsConfig.
        plan: PyTorch and CPU backends, the batch's precomputed ``attention_plan`` (groups, rab indices, masks)
            shared by a stack of layers; ignored by Triton.
    Returns:
        [T, H, dv], differentiable w.r.t. q, k, v, args.pos_weights, args.time_weights.
    """
    args.check(q, k, v)
    backend = resolve_backend(backend)
    if backend == Backend.TRITON:
        from hstu.ops.triton.hstu_attention import triton_jagged_hstu_attention

        return triton_jagged_hstu_attention(q, k, v, args)
    if backend == Backend.CPU:
        from hstu.ops.cpu.hstu_attention import cpu_jagged_hstu_attention

        return cpu_jagged_hstu_attention(q, k, v, args, plan=plan)
    from hstu.ops.pytorch.hstu_attention import pytorch_jagged_hstu_attention

    return pytorch_jagged_hstu_attention(q, k, v, args, plan=plan)
