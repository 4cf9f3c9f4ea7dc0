"""Sampled-softmax cross-entropy with a fused C++ CPU kernel (``ops.backend=cpu``; csrc/sampled_softmax_cpu.cpp).

The same value and gradients as the reference route of modules/losses.py (``sampled_dot`` → mask of negatives
equal to the positive → / temperature → ``F.cross_entropy``), with no [V, K] temporaries besides the logits:
one pass computes the K = R + 1 dot products, the mask and the log-sum-exp per position; backward computes the
logit gradient and dq in one pass and the item-table gradient in another (no atomics; the sums do not depend on
the thread count: :data:`SPLIT_BYTES`).
"""

from __future__ import annotations

import torch

from hstu.ops.cpu.build import load_kernel

KERNEL = "sampled_softmax_cpu"
# The item-table gradient of a table whose 4 copies fit this many bytes is summed in 4 fixed row ranges of the
# queries, each into its own copy (then added): both cores work without sharing lines. Larger tables: rows owned
# by threads in blocks of 16. Both are deterministic for any thread count; they differ by float rounding.
SPLIT_BYTES = 64 << 20


class _SampledSoftmaxCE(torch.autograd.Function):
    """q [V, D], table [U, D] float32, idx [V, K] int64 (column 0 = positive) -> per-row loss [V]."""

    @staticmethod
    def forward(ctx, q, table, idx, temperature: float):
        loss, logits, lse = load_kernel(KERNEL).forward(q, table, idx, float(temperature))
        ctx.save_for_backward(q, table, idx, logits, lse)
        ctx.temperature = float(temperature)
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, table, idx, logits, lse = ctx.saved_tensors
        dq, dtable = load_kernel(KERNEL).backward(grad, q, table, idx, logits, lse, ctx.temperature,
                                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1], SPLIT_BYTES)
        return (dq if ctx.needs_input_grad[0] else None, dtable if ctx.needs_input_grad[1] else None, None, None)


def cpu_sampled_softmax_loss(q: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over V rows of CE([q·table[idx[v, 0]], q·table[idx[v, k]] (masked where idx[v, k] = idx[v, 0])] / T, 0).

    q [V, D], table [U, D] (cast to float32), idx [V, K] int64 row indices of table, injective on item ids (so
    equal rows mean equal items). Autograd to q and table."""
    if q.device.type != "cpu":
        raise ValueError(f"ops.backend=cpu needs CPU tensors, got {q.device} (use ops.backend=pytorch or triton)")
    rows = _SampledSoftmaxCE.apply(q.float().contiguous(), table.float().contiguous(), idx.long().contiguous(),
                                   temperature)
    return rows.mean()
