"""Dispatcher for the fused layer norm x U gating x dropout that follows HSTU attention.

    g = U ⊙ LN(A)        research:   y = dropout(g)                 [..., D]
                         production: y = dropout(cat[U, A, g])      [..., 3D]   (concat=True)

Semantics (LN, seeded counter-based dropout): ops/pytorch/norm_gating.py, the reference every backend matches.
"""

from __future__ import annotations

from typing import Optional

import torch

from hstu.ops.backend import Backend, BackendLike, resolve_backend

__all__ = ["norm_gating", "draw_seed"]


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A dropout seed in [0, 2^31) from torch's (CPU) generator: reproducible under torch.manual_seed, no device
    sync."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())


def norm_gating(
    a: torch.Tensor,
    u: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Optional[int] = None,
    concat: bool = False,
    backend: BackendLike = Backend.PYTORCH,
) -> torch.Tensor:
    """y = dropout(U ⊙ LN(A)) or dropout(cat[U, A, U ⊙ LN(A)]).

    Args:
        a, u: [..., D] (same shape). weight, bias: optional LN affine [D] (research: none; production: both).
        eps: LN epsilon. dropout_p: rate; applied only when training and > 0.
        seed: dropout seed in [0, 2^63); None -> draw_seed() (torch's generator). The same seed gives the same
            mask on every backend and device (element e of the output is kept iff philox_uniform(seed, e) >= p).
        concat: production variant (output width 3D).
        backend: Backend / "pytorch" / "triton" / "cpu" / OpsConfig. "cpu": the fused C++ kernel
            (ops/cpu/norm_gating.py) for float32 CPU tensors; other dtypes / devices and empty inputs run the
            PyTorch reference (same semantics, no error).
    Returns:
        [..., D] or [..., 3D] in a's dtype; differentiable w.r.t. a, u, weight, bias.
    """
    if a.shape != u.shape or a.dim() < 1:
        raise ValueError(f"a and u must have the same shape [..., D], got {tuple(a.shape)} and {tuple(u.shape)}")
    D = a.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (D,):
            raise ValueError(f"{name} must be [{D}], got {tuple(t.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed()
    seed = 0 if seed is None else int(seed)
    lead = a.shape[:-1]
    a2, u2 = a.reshape(-1, D), u.reshape(-1, D)
    kwargs = dict(eps=eps, dropout_p=p, seed=seed, concat=concat)
    resolved = resolve_backend(backend)
    if resolved == Backend.TRITON:
        from hstu.ops.triton.norm_gating import triton_norm_gating

        y = triton_norm_gating(a2, u2, weight, bias, **kwargs)
    else:
        y = None
        if resolved == Backend.CPU:
            from hstu.ops.cpu.norm_gating import cpu_kernel_applies, cpu_norm_gating

            if cpu_kernel_applies(a2, u2, weight, bias):
                y = cpu_norm_gating(a2, u2, weight, bias, **kwargs)
        if y is None:
            from hstu.ops.pytorch.norm_gating import pytorch_norm_gating

            y = pytorch_norm_gating(a2, u2, weight, bias, **kwargs)
    return y.reshape(*lead, y.shape[-1])
