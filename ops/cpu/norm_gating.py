"""Fused layer norm x U gating x seeded dropout on CPU (``ops.backend=cpu``; csrc/norm_gating_cpu.cpp).

    g = U ⊙ LN(A),  y = dropout(g)  or  y = dropout(cat[U, A, g])      (semantics: ops/pytorch/norm_gating.py)

One C++ pass per direction instead of the reference's layer_norm + mul (+ cat) + dropout forward and their
backward ops: the forward saves only mean and rstd [N] (fp32); the backward recomputes x̂, LN and the dropout
mask (regenerated from the seed with the same counter-based Philox as the reference and the Triton kernel, so
no mask tensor is stored), writes dA and dU, and sums dweight / dbias per fixed row block (results do not
depend on the thread count). float32 CPU tensors only: the dispatcher (ops/norm_gating.py) sends other dtypes
and devices to the PyTorch reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from hstu.ops.cpu.build import load_kernel

KERNEL = "norm_gating_cpu"

__all__ = ["cpu_norm_gating", "cpu_kernel_applies"]


def cpu_kernel_applies(a: torch.Tensor, u: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor]) -> bool:
    """True when the C++ kernel takes these inputs: float32 CPU a, u (and weight / bias), D > 0, at least one row."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in (a, u, weight, bias)) \
        and a.numel() > 0


class _CpuNormGating(torch.autograd.Function):
    """a, u [N, D] float32, weight / bias [D] | None -> [N, D] | [N, 3D]."""

    @staticmethod
    def forward(ctx, a, u, weight, bias, eps: float, dropout_p: float, seed: int, concat: bool):
        empty = a.new_empty(0)
        w = empty if weight is None else weight.detach().contiguous()
        b = empty if bias is None else bias.detach().contiguous()
        a, u = a.contiguous(), u.contiguous()
        y, mean, rstd = load_kernel(KERNEL).forward(a, u, w, b, float(eps), float(dropout_p), int(seed), bool(concat))
        ctx.save_for_backward(a, u, w, b, mean, rstd)
        ctx.args = (float(dropout_p), int(seed), bool(concat))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        a, u, w, b, mean, rstd = ctx.saved_tensors
        dropout_p, seed, concat = ctx.args
        want_dw, want_db = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        da, du, dw, db = load_kernel(KERNEL).backward(dy, a, u, w, b, mean, rstd, dropout_p, seed, concat,
                                                      want_dw, want_db)
        return (da if ctx.needs_input_grad[0] else None, du if ctx.needs_input_grad[1] else None,
                dw if want_dw else None, db if want_db else None, None, None, None, None)


def cpu_norm_gating(
    a: torch.Tensor,
    u: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    seed: int = 0,
    concat: bool = False,
) -> torch.Tensor:
    """Same contract as hstu.ops.pytorch.norm_gating.pytorch_norm_gating (a, u [N, D] float32 CPU, N ≥ 1, D ≥ 1);
    autograd to a, u, weight, bias."""
    if not cpu_kernel_applies(a, u, weight, bias):
        raise ValueError(f"ops.backend=cpu norm_gating needs non-empty float32 CPU tensors, got {a.dtype} "
                         f"{tuple(a.shape)} on {a.device}")
    return _CpuNormGating.apply(a, u, weight, bias, eps, dropout_p, seed, concat)
