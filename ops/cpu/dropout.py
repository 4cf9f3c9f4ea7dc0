"""Seeded counter-based dropout on CPU (``ops.backend=cpu``; csrc/dropout_cpu.cpp).

Element e of x (row-major) is kept iff ``philox_uniform(seed, e) >= p`` (ops/pytorch/norm_gating.py), scaled by
1/(1 − p): the same mask the PyTorch reference of norm_gating and the Triton kernel draw for the same seed, made
~3x faster than torch's ``bernoulli_`` by vectorised Philox. The seed comes from torch's CPU generator
(``draw_seed``), so runs are reproducible under ``torch.manual_seed`` and resume with the generator state.
"""

from __future__ import annotations

from typing import Optional

import torch

from hstu.ops.cpu.build import load_kernel
from hstu.ops.norm_gating import draw_seed

KERNEL = "dropout_cpu"


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int):
        y, mask = load_kernel(KERNEL).forward(x, float(p), int(seed))
        ctx.save_for_backward(mask)
        ctx.p = float(p)
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return load_kernel(KERNEL).backward(grad, mask, ctx.p), None, None


def cpu_seeded_dropout(x: torch.Tensor, p: float, training: bool = True, seed: Optional[int] = None) -> torch.Tensor:
    """Dropout of rate p on a float32 CPU tensor (identity when not training or p = 0; zeros when p ≥ 1)."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"ops.backend=cpu dropout needs float32 CPU tensors, got {x.dtype} on {x.device}")
    return _SeededDropout.apply(x.contiguous(), p, draw_seed() if seed is None else seed)
