"""SiLU then a column split on CPU (``ops.backend=cpu``; csrc/silu_split_cpu.cpp): the HSTU projection's
``silu(x).split(widths, 1)`` -> u, v, q, k as views of one [T, W] output.

Forward is torch's ``F.silu`` (the same values as the reference). Backward reads the parts' gradients in place and
writes dx = g·σ(x)(1 + x(1 − σ(x))) in one pass: the reference's autograd first concatenates the parts' gradients
into a [T, W] copy (``SplitWithSizesBackward``), then runs ``silu_backward`` over it. Equal to the reference within
float rounding (tests/test_ops_cpu_silu_split.py).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from hstu.ops.cpu.build import load_kernel

KERNEL = "silu_split_cpu"


class _SiluSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, widths: List[int]):
        ctx.save_for_backward(x)
        ctx.widths = list(widths)
        return tuple(F.silu(x).split(ctx.widths, dim=1))

    @staticmethod
    def backward(ctx, *grads):
        (x,) = ctx.saved_tensors
        empty = x.new_empty(0)
        parts = [empty if g is None else g for g in grads]
        return load_kernel(KERNEL).backward(x, parts, ctx.widths), None


def cpu_silu_split(x: torch.Tensor, widths: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """silu(x) [T, W] split into columns of ``widths`` (sum W) -> views [T, w_p]; float32 CPU."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        raise ValueError(f"ops.backend=cpu silu_split needs a float32 CPU [T, W] tensor, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if sum(widths) != x.shape[1]:
        raise ValueError(f"silu_split: widths {list(widths)} do not sum to the {x.shape[1]} columns of x")
    return _SiluSplit.apply(x.contiguous(), list(widths))
