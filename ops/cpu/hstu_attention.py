"""Jagged HSTU attention on CPU, one fused C++ call per length group (``Backend.CPU``).

Same plan and semantics as the PyTorch reference (ops/pytorch/hstu_attention.py: sequences packed into length
groups). The reference gathers q, k, v into groups padded to L, materialises [G, H, L, L] scores and runs ~10
elementwise passes over them; here (csrc/hstu_attention_cpu.cpp) each (sequence, head, block of ``ROW_BLOCK``
query rows) reads q, k, v in place from the jagged [T, H, d] tensors and computes its scores into a per-thread
tile that stays in cache:

    forward:  s = alpha·q kᵀ (gemm) -> z = s + rab, a = z·σ(z)·w (one pass over the tile) -> out = a v (gemm)
    backward: z, a and f = w·σ(z)(1 + z(1 − σ(z))) recomputed the same way; dv += aᵀ g, ds = (g vᵀ)·f and the
              rab gradients (per fixed lane, no atomics), dq = alpha·ds k, dk += alpha·dsᵀ q

Nothing of size L² is saved for backward (q, k, v only), nothing is gathered or padded (a sequence's padding
rows in its group are skipped), and a block multiplies only the key columns its rows can see (causal: the upper
triangle is mostly skipped). The group's mask, time buckets (int16, computed by the kernel when the plan is built:
:func:`cpu_attention_plan`) and row ends are built once per batch (:func:`group_kernel_inputs`). Results do not
depend on the thread count (bit-identical; test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from hstu.ops.attention_args import AttentionArgs
from hstu.ops.cpu.build import load_kernel
from hstu.ops.pytorch.hstu_attention import AttentionPlan, GroupPlan, attention_plan, check_plan

KERNEL = "hstu_attention_cpu"
ROW_BLOCK = 32  # query rows per tile: the causal waste of a block is ~ROW_BLOCK/2 columns per row


def cpu_time_buckets(t_next: torch.Tensor, t: torch.Tensor, base: float, num_buckets: int) -> torch.Tensor:
    """[G, L, L] int16 time-bucket indices of row-aligned t_next, t [G, L] int64 (the plan's ``time_bucket_fn``;
    same float32 arithmetic as ``pairwise_time_buckets``)."""
    return load_kernel(KERNEL).time_buckets(t_next, t, float(base), int(num_buckets))


def cpu_attention_plan(offsets: torch.Tensor, **kwargs) -> Optional[AttentionPlan]:
    """``attention_plan`` with the kernel's int16 time buckets (same arguments)."""
    return attention_plan(offsets, time_bucket_fn=cpu_time_buckets, **kwargs)


@dataclass
class GroupInputs:
    """A group's kernel inputs, built once per batch and kept in ``g.cache`` for every layer: weights
    [1|G, L, L] float32 (mask / norm), row_end [1|G, L] int32 (1 + last column with a non-zero weight per row),
    lens [G] int32 (tokens per sequence), starts [G] int64 (first row of each sequence in [T, ...]), time_idx
    [G, L, L] int16 or None."""

    weights: torch.Tensor
    row_end: torch.Tensor
    lens: torch.Tensor
    starts: torch.Tensor
    time_idx: Optional[torch.Tensor]


def group_kernel_inputs(g: GroupPlan, table_sizes: Tuple[Optional[int], Optional[int]]) -> GroupInputs:
    """The :class:`GroupInputs` of ``g`` (cached); table_sizes: the plan's (pos_table_size, time_table_size)."""
    if "inputs" not in g.cache:
        L = g.L
        w = g.weights.to(torch.float32)
        if w.size(1) == 1:  # non-causal masks are [G, 1, L]: one row for every query
            w = w.expand(-1, L, -1)
        w = w.contiguous()
        cols = torch.arange(1, L + 1, dtype=torch.int32, device=w.device)
        row_end = ((w != 0).to(torch.int32) * cols).amax(dim=-1).to(torch.int32).contiguous()
        ti = g.time_idx
        if ti is not None and ti.numel():  # the kernel reads time_weights[ti] unchecked
            lo, hi = (int(x) for x in torch.aminmax(ti))
            if lo < 0 or hi > min(torch.iinfo(torch.int16).max, table_sizes[1] - 1):
                raise ValueError(f"time bucket indices [{lo}, {hi}] outside the time table's {table_sizes[1]} values "
                                 "(ops.backend=cpu: at most 32767 buckets)")
        if ti is not None and ti.dtype != torch.int16:
            ti = ti.to(torch.int16)
        g.cache["inputs"] = GroupInputs(w, row_end, g.lens.to(torch.int32).contiguous(),
                                        g.rows[:, 0].to(torch.int64).contiguous(), None if ti is None else ti.contiguous())
    return g.cache["inputs"]


def _rows_in_place(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, d] as the kernel reads it: any row stride (a view of the projection's [T, 4·H·d] output is read in
    place), each row's [H, d] contiguous; copied otherwise."""
    if x.stride(2) == 1 and (x.size(1) == 1 or x.stride(1) == x.size(2)) and x.stride(0) >= x.size(1) * x.size(2):
        return x
    return x.contiguous()


def _covers_all_rows(plan: AttentionPlan) -> bool:
    """Whether the plan's sequences hold all of its T rows (then the kernel writes every output row)."""
    if "covers_all_rows" not in plan.cache:
        plan.cache["covers_all_rows"] = sum(int(g.lens.sum()) for g in plan.groups) == plan.T
    return plan.cache["covers_all_rows"]


class _FusedJaggedAttention(torch.autograd.Function):
    """q, k [T, H, dqk], v [T, H, dv], pos_weights [2P−1] | None, time_weights [NB] | None -> [T, H, dv]."""

    @staticmethod
    def forward(ctx, q, k, v, pos_weights, time_weights, plan: AttentionPlan, alpha: float):
        ext = load_kernel(KERNEL)
        empty = q.new_empty(0)
        q, k, v = (_rows_in_place(x) for x in (q, k, v))
        alloc = torch.empty if _covers_all_rows(plan) else torch.zeros  # rows outside every sequence: zero
        out = alloc(v.shape, dtype=v.dtype)
        tw = empty if time_weights is None else time_weights.detach().to(torch.float32).contiguous()
        biases = []
        for g in plan.groups:
            gi = group_kernel_inputs(g, (plan.pos_table_size, plan.time_table_size))
            bias2d = pos_weights.detach().take(g.pos_idx).contiguous() if pos_weights is not None else empty
            ti = gi.time_idx if time_weights is not None else empty.short()
            ext.forward(q, k, v, alpha, bias2d, tw, ti, gi.weights, gi.row_end, gi.lens, gi.starts, ROW_BLOCK, out)
            biases.append(bias2d)
        ctx.save_for_backward(q, k, v, tw)
        ctx.biases, ctx.plan, ctx.alpha, ctx.row_block = biases, plan, alpha, ROW_BLOCK
        ctx.pos_size = None if pos_weights is None else pos_weights.numel()
        ctx.num_buckets = 0 if time_weights is None else time_weights.numel()
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, tw = ctx.saved_tensors
        plan = ctx.plan
        ext = load_kernel(KERNEL)
        grad = grad.contiguous()
        alloc = torch.empty if _covers_all_rows(plan) else torch.zeros
        dq, dk, dv = (alloc(x.shape, dtype=x.dtype) for x in (q, k, v))  # contiguous
        want_pos = ctx.pos_size is not None and ctx.needs_input_grad[3]
        want_time = ctx.num_buckets > 0 and ctx.needs_input_grad[4]
        dpos = q.new_zeros(ctx.pos_size) if want_pos else None
        dtime = q.new_zeros(ctx.num_buckets) if want_time else None
        for g, bias2d in zip(plan.groups, ctx.biases):
            gi = group_kernel_inputs(g, (plan.pos_table_size, plan.time_table_size))
            ti = gi.time_idx if ctx.num_buckets else q.new_empty(0).short()
            db2d, dtw = ext.backward(grad, q, k, v, ctx.alpha, bias2d, tw, ti, gi.weights, gi.row_end, gi.lens,
                                     gi.starts, ctx.row_block, ctx.num_buckets if want_time else 0, want_pos, dq, dk, dv)
            if want_pos:
                dpos.index_add_(0, g.pos_idx.reshape(-1), db2d.reshape(-1))
            if want_time:
                dtime += dtw
        ctx.biases = None
        return dq, dk, dv, dpos, dtime, None, None


def cpu_jagged_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs, *,
                              plan: Optional[AttentionPlan] = None) -> torch.Tensor:
    """Jagged HSTU attention, q/k [T, H, dqk], v [T, H, dv] float32 CPU -> [T, H, dv]; the contract of
    ``pytorch_jagged_hstu_attention`` (same plan, same autograd targets), one fused C++ call per group."""
    if q.dtype != torch.float32 or q.device.type != "cpu":
        raise ValueError(f"ops.backend=cpu needs float32 CPU tensors, got {q.dtype} on {q.device} "
                         "(use ops.backend=pytorch or triton)")
    plan, empty_out = check_plan(q, k, v, args, plan, cpu_attention_plan)
    if empty_out is not None:
        return empty_out
    return _FusedJaggedAttention.apply(q, k, v, args.pos_weights, args.time_weights, plan, float(args.alpha))
