"""Jagged HSTU attention on CPU with a fused C++ elementwise kernel (``Backend.CPU``).

Same plan and semantics as the PyTorch reference (ops/pytorch/hstu_attention.py: sequences packed into length
groups padded to L, one batched matmul per group). Per group the reference runs ~10 elementwise passes over
[G, H, L, L] (rab gathers, add, SiLU, mask multiply; in backward SiLU', mask, and a scatter-add of the
time-bias gradient); here they are two C++ passes (csrc/hstu_attention_cpu.cpp):

    forward:  s = (alpha·q) kᵀ (bmm) -> z = s + rab, a = z·σ(z)·w (one pass, z kept) -> out = a v (bmm)
    backward: da = g vᵀ, dv = aᵀ g (bmm) -> ds = da·w·σ·(1 + z(1 − σ)) and the rab gradients (one pass,
              per-thread bucket sums, no atomics) -> dq = alpha·ds k, dk = alpha·dsᵀ q (bmm)

Rows go in blocks of ``ROW_BLOCK``: a block multiplies only the key columns its rows can see (causal: the
upper triangle is mostly skipped, in the matmuls too), and the kernel skips columns past each row's last
unmasked key. The whole batch is one
autograd node: q, k, v are gathered into the grouped-padded layout once, every group writes its slice of one
output buffer, and backward writes dq, dk, dv slices the same way (no per-group cat / split copies). The time
bias uses int16 bucket indices computed by the kernel when the plan is built (:func:`cpu_attention_plan`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from hstu.ops.attention_args import AttentionArgs
from hstu.ops.cpu.build import load_kernel
from hstu.ops.pytorch.hstu_attention import AttentionPlan, GroupPlan, attention_plan, check_plan

KERNEL = "hstu_attention_cpu"
ROW_BLOCK = 64  # rows per block: block r multiplies only the key columns its rows can see (causal: ~1/2 + 1/nb)


def cpu_time_buckets(t_next: torch.Tensor, t: torch.Tensor, base: float, num_buckets: int) -> torch.Tensor:
    """[G, L, L] int16 time-bucket indices of row-aligned t_next, t [G, L] int64 (the plan's ``time_bucket_fn``;
    same float32 arithmetic as ``pairwise_time_buckets``)."""
    return load_kernel(KERNEL).time_buckets(t_next, t, float(base), int(num_buckets))


def cpu_attention_plan(offsets: torch.Tensor, **kwargs) -> Optional[AttentionPlan]:
    """``attention_plan`` with the kernel's int16 time buckets (same arguments)."""
    return attention_plan(offsets, time_bucket_fn=cpu_time_buckets, **kwargs)


def row_blocks(row_end: torch.Tensor, L: int, block: int) -> List[Tuple[int, int, int]]:
    """[(r0, r1, c1)]: rows r0..r1-1 see no key column ≥ c1 (c1 = their largest row_end, at least 1)."""
    ends = row_end.amax(dim=0).tolist() if row_end.numel() else [0] * L
    return [(r0, min(r0 + block, L), max(1, max(ends[r0:r0 + block]))) for r0 in range(0, L, block)]


def group_kernel_inputs(g: GroupPlan, table_sizes: Tuple[Optional[int], Optional[int]]):
    """(weights [1|G, L, L] float32, row_end [1|G, L] int32: 1 + last column with a non-zero mask weight per row,
    time_idx [G, L, L] int16 or None, row blocks (:func:`row_blocks`)), built once per batch and kept in
    ``g.cache`` for every layer. table_sizes: the plan's (pos_table_size, time_table_size)."""
    if "row_end" not in g.cache:
        L = g.L
        w = g.weights.to(torch.float32).contiguous()
        cols = torch.arange(1, L + 1, dtype=torch.int32, device=w.device)
        g.cache["weights"] = w
        g.cache["row_end"] = ((w != 0).to(torch.int32) * cols).amax(dim=-1).to(torch.int32).contiguous()
        ti = g.time_idx
        if ti is not None and ti.numel():  # the kernel reads time_weights[ti] unchecked
            lo, hi = (int(x) for x in torch.aminmax(ti))
            if lo < 0 or hi > min(torch.iinfo(torch.int16).max, table_sizes[1] - 1):
                raise ValueError(f"time bucket indices [{lo}, {hi}] outside the time table's {table_sizes[1]} values "
                                 "(ops.backend=cpu: at most 32767 buckets)")
        if ti is not None and ti.dtype != torch.int16:
            ti = ti.to(torch.int16)
        g.cache["time_idx16"] = None if ti is None else ti.contiguous()
        g.cache["blocks"] = row_blocks(g.cache["row_end"], L, ROW_BLOCK)
    return g.cache["weights"], g.cache["row_end"], g.cache["time_idx16"], g.cache["blocks"]


def _group_views(x: torch.Tensor, G: int, L: int) -> torch.Tensor:
    """A group's slice [G·L, H, d] of a grouped-padded buffer -> [G, H, L, d] (a view)."""
    return x.view(G, L, x.shape[1], x.shape[2]).transpose(1, 2)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, written in place when out is a contiguous view (one head), else through a copy."""
    if out.is_contiguous():
        torch.matmul(a, b, out=out)
    else:
        out.copy_(torch.matmul(a, b))


class _FusedJaggedAttention(torch.autograd.Function):
    """q, k [T, H, dqk], v [T, H, dv], pos_weights [2P−1] | None, time_weights [NB] | None -> [T, H, dv]."""

    @staticmethod
    def forward(ctx, q, k, v, pos_weights, time_weights, plan: AttentionPlan, alpha: float):
        ext = load_kernel(KERNEL)
        empty = q.new_empty(0)
        qa, ka, va = (x.index_select(0, plan.gather_rows) for x in (q, k, v))  # [P, H, d]
        out_pad = v.new_empty(va.shape)
        saved: List[Tuple[torch.Tensor, torch.Tensor]] = []
        start = 0
        for g, size in zip(plan.groups, plan.sizes):
            G, L = g.rows.size(0), g.L
            w, row_end, time_idx, blocks = group_kernel_inputs(g, (plan.pos_table_size, plan.time_table_size))
            qg, kg, vg, og = (_group_views(x[start:start + size], G, L) for x in (qa, ka, va, out_pad))
            if alpha != 1.0:
                qg = qg * alpha
            bias2d = pos_weights.detach().take(g.pos_idx).contiguous() if pos_weights is not None else empty
            tw = empty if time_weights is None else time_weights.detach()
            ti = time_idx if time_weights is not None else empty.short()
            group_saved = []
            for r0, r1, c1 in blocks:  # s = (alpha q) kᵀ of the block; the kernel turns it into z, returns a
                s = torch.matmul(qg[:, :, r0:r1], kg[:, :, :c1].transpose(-1, -2)).contiguous()  # [G, H, R, C]
                a = ext.forward(s, bias2d, tw, ti, w, row_end, r0)
                _matmul_into(og[:, :, r0:r1], a, vg[:, :, :c1])
                group_saved.append((s, a))
            saved.append(group_saved)
            start += size
        ctx.save_for_backward(qa, ka, va)
        ctx.saved_groups, ctx.plan, ctx.alpha = saved, plan, alpha
        ctx.pos_size = None if pos_weights is None else pos_weights.numel()
        ctx.num_buckets = 0 if time_weights is None else time_weights.numel()
        return out_pad.index_select(0, plan.inverse)

    @staticmethod
    def backward(ctx, grad):
        qa, ka, va = ctx.saved_tensors
        plan, alpha = ctx.plan, ctx.alpha
        ext = load_kernel(KERNEL)
        go = grad.contiguous().index_select(0, plan.gather_rows)
        go.index_fill_(0, plan.pad_slots, 0.0)  # padded query rows carry no gradient
        dqa, dka, dva = torch.empty_like(qa), torch.zeros_like(ka), torch.zeros_like(va)
        want_pos = ctx.pos_size is not None and ctx.needs_input_grad[3]
        want_time = ctx.num_buckets > 0 and ctx.needs_input_grad[4]
        dpos = qa.new_zeros(ctx.pos_size) if want_pos else None
        dtime = qa.new_zeros(ctx.num_buckets) if want_time else None
        start = 0
        for g, size, group_saved in zip(plan.groups, plan.sizes, ctx.saved_groups):
            G, L = g.rows.size(0), g.L
            w, row_end, time_idx, blocks = group_kernel_inputs(g, (plan.pos_table_size, plan.time_table_size))
            qg, kg, vg, gg, dqg, dkg, dvg = (_group_views(x[start:start + size], G, L)
                                             for x in (qa, ka, va, go, dqa, dka, dva))
            ti = time_idx if ctx.num_buckets else qa.new_empty(0).short()
            for (r0, r1, c1), (z, a) in zip(blocks, group_saved):
                g_blk = gg[:, :, r0:r1]
                dvg[:, :, :c1] += torch.matmul(a.transpose(-1, -2), g_blk)
                ds = torch.matmul(g_blk, vg[:, :, :c1].transpose(-1, -2)).contiguous()  # da -> ds in place
                db2d, dtw = ext.backward(ds, z, w, row_end, ti, ctx.num_buckets, want_pos, r0)
                if want_pos:
                    dpos.index_add_(0, g.pos_idx[r0:r1, :c1].reshape(-1), db2d.reshape(-1))
                if want_time:
                    dtime += dtw
                if alpha != 1.0:
                    ds.mul_(alpha)
                _matmul_into(dqg[:, :, r0:r1], ds, kg[:, :, :c1])
                dkg[:, :, :c1] += torch.matmul(ds.transpose(-1, -2), qg[:, :, r0:r1])
            start += size
        ctx.saved_groups = None
        inv = plan.inverse
        return dqa.index_select(0, inv), dka.index_select(0, inv), dva.index_select(0, inv), dpos, dtime, None, None


def cpu_jagged_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs, *,
                              plan: Optional[AttentionPlan] = None) -> torch.Tensor:
    """Jagged HSTU attention, q/k [T, H, dqk], v [T, H, dv] float32 CPU -> [T, H, dv]; the contract of
    ``pytorch_jagged_hstu_attention`` (same plan, same autograd targets), C++ elementwise kernel per group."""
    if q.dtype != torch.float32 or q.device.type != "cpu":
        raise ValueError(f"ops.backend=cpu needs float32 CPU tensors, got {q.dtype} on {q.device} "
                         "(use ops.backend=pytorch or triton)")
    plan, empty_out = check_plan(q, k, v, args, plan, cpu_attention_plan)
    if empty_out is not None:
        return empty_out
    return _FusedJaggedAttention.apply(q, k, v, args.pos_weights, args.time_weights, plan, float(args.alpha))
