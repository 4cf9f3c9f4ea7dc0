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
autograd node: q, k, v are gathered once into the kernel's layout (:class:`CpuLayout`: keys/values per group
[G, H, L, d], queries/outputs per row block [G, H, R, d]), so every matmul reads and writes its operands in
place — no per-block copies of q, k, v slices or outputs, no per-group cat / split — and backward writes dq, dk,
dv the same way; one gather back to [T, H, d] at the end. The time bias uses int16 bucket indices computed by
the kernel when the plan is built (:func:`cpu_attention_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from hstu.ops.attention_args import AttentionArgs
from hstu.ops.cpu.build import load_kernel
from hstu.ops.pytorch.hstu_attention import AttentionPlan, GroupPlan, attention_plan, check_plan, slot_inverse

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


@dataclass
class CpuLayout:
    """Where every (token, head) row of q/k/v [T, H, d] sits in the kernel's buffers, built once per batch and
    head count (kept in ``plan.cache``). Keys and values (and dk, dv): per group [G, H, L, d] ("head-major"), so
    a key prefix [:, :, :c1] is a strided batch of matrices; queries and outputs (and their gradients): per group
    and row block [G, H, R, d] ("block-major"), so a block's rows are one contiguous batch of matrices. Every
    matmul then reads and writes its operands in place — for H > 1 the group views of a [P, H, d] buffer were
    not, and each block copied its q, k, v slices and its output. kv_rows / q_rows [N] index rows of the [T·H, d]
    view (padding slots repeat row 0); kv_inverse / q_inverse [T·H] the way back; q_pad [n] the padded query
    slots; kv_starts / q_starts: each group's (each group's blocks') first row."""

    kv_rows: torch.Tensor
    q_rows: torch.Tensor
    kv_inverse: torch.Tensor
    q_inverse: torch.Tensor
    q_pad: torch.Tensor
    kv_starts: List[int]
    q_starts: List[List[int]]


def cpu_layout(plan: AttentionPlan, H: int) -> CpuLayout:
    """The :class:`CpuLayout` of ``plan`` for H heads (cached in ``plan.cache``)."""
    key = ("cpu_layout", H)
    if key in plan.cache:
        return plan.cache[key]
    T = plan.T
    heads = torch.arange(H, dtype=torch.long)
    kv_parts, q_parts, kv_real, q_real = [], [], [], []
    kv_starts: List[int] = []
    q_starts: List[List[int]] = []
    kv_at = q_at = 0
    for g in plan.groups:
        _, _, _, blocks = group_kernel_inputs(g, (plan.pos_table_size, plan.time_table_size))
        valid = g.rows < T  # [G, L]
        real = valid.unsqueeze(1).expand(-1, H, -1)  # [G, H, L]
        idx = torch.where(valid, g.rows, torch.zeros_like(g.rows)).unsqueeze(1) * H + heads.view(1, H, 1)
        kv_starts.append(kv_at)
        kv_parts.append(idx.reshape(-1))
        kv_real.append(real.reshape(-1))
        kv_at += idx.numel()
        starts = []
        for r0, r1, _ in blocks:
            block = idx[:, :, r0:r1].reshape(-1)
            starts.append(q_at)
            q_parts.append(block)
            q_real.append(real[:, :, r0:r1].reshape(-1))
            q_at += block.numel()
        q_starts.append(starts)
    kv_rows, q_rows = torch.cat(kv_parts), torch.cat(q_parts)
    kv_real_all, q_real_all = torch.cat(kv_real), torch.cat(q_real)
    layout = CpuLayout(kv_rows, q_rows, slot_inverse(kv_rows, kv_real_all, T * H),
                       slot_inverse(q_rows, q_real_all, T * H), (~q_real_all).nonzero().view(-1), kv_starts, q_starts)
    plan.cache[key] = layout
    return layout


class _FusedJaggedAttention(torch.autograd.Function):
    """q, k [T, H, dqk], v [T, H, dv], pos_weights [2P−1] | None, time_weights [NB] | None -> [T, H, dv]."""

    @staticmethod
    def forward(ctx, q, k, v, pos_weights, time_weights, plan: AttentionPlan, alpha: float):
        ext = load_kernel(KERNEL)
        empty = q.new_empty(0)
        T, H, dqk, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[2]
        lay = cpu_layout(plan, H)
        qb = q.reshape(T * H, dqk).index_select(0, lay.q_rows)  # block-major [N, dqk]
        kh = k.reshape(T * H, dqk).index_select(0, lay.kv_rows)  # head-major [N, dqk]
        vh = v.reshape(T * H, dv).index_select(0, lay.kv_rows)
        if alpha != 1.0:
            qb.mul_(alpha)
        out = v.new_empty(qb.shape[0], dv)
        saved: List[List[Tuple[torch.Tensor, torch.Tensor]]] = []
        tw = empty if time_weights is None else time_weights.detach()
        for gi, g in enumerate(plan.groups):
            G, L = g.rows.size(0), g.L
            w, row_end, time_idx, blocks = group_kernel_inputs(g, (plan.pos_table_size, plan.time_table_size))
            k0 = lay.kv_starts[gi]
            kg = kh[k0:k0 + G * H * L].view(G * H, L, dqk)
            vg = vh[k0:k0 + G * H * L].view(G * H, L, dv)
            bias2d = pos_weights.detach().take(g.pos_idx).contiguous() if pos_weights is not None else empty
            ti = time_idx if time_weights is not None else empty.short()
            group_saved = []
            for (r0, r1, c1), q0 in zip(blocks, lay.q_starts[gi]):  # s = (alpha q) kᵀ of the block -> z, a
                R = r1 - r0
                s = torch.bmm(qb[q0:q0 + G * H * R].view(G * H, R, dqk), kg[:, :c1].transpose(1, 2)).view(G, H, R, c1)
                a = ext.forward(s, bias2d, tw, ti, w, row_end, r0)
                torch.bmm(a.view(G * H, R, c1), vg[:, :c1], out=out[q0:q0 + G * H * R].view(G * H, R, dv))
                group_saved.append((s, a))
            saved.append(group_saved)
        ctx.save_for_backward(qb, kh, vh)
        ctx.saved_groups, ctx.plan, ctx.alpha, ctx.dims = saved, plan, alpha, (T, H, dqk, dv)
        ctx.pos_size = None if pos_weights is None else pos_weights.numel()
        ctx.num_buckets = 0 if time_weights is None else time_weights.numel()
        return out.index_select(0, lay.q_inverse).view(T, H, dv)

    @staticmethod
    def backward(ctx, grad):
        qb, kh, vh = ctx.saved_tensors  # qb holds alpha·q
        plan, alpha = ctx.plan, ctx.alpha
        T, H, dqk, dv = ctx.dims
        lay = cpu_layout(plan, H)
        ext = load_kernel(KERNEL)
        go = grad.contiguous().view(T * H, dv).index_select(0, lay.q_rows)
        go.index_fill_(0, lay.q_pad, 0.0)  # padded query rows carry no gradient
        dqb, dkh, dvh = torch.empty_like(qb), torch.zeros_like(kh), torch.zeros_like(vh)
        want_pos = ctx.pos_size is not None and ctx.needs_input_grad[3]
        want_time = ctx.num_buckets > 0 and ctx.needs_input_grad[4]
        dpos = qb.new_zeros(ctx.pos_size) if want_pos else None
        dtime = qb.new_zeros(ctx.num_buckets) if want_time else None
        for gi, (g, group_saved) in enumerate(zip(plan.groups, ctx.saved_groups)):
            G, L = g.rows.size(0), g.L
            w, row_end, time_idx, blocks = group_kernel_inputs(g, (plan.pos_table_size, plan.time_table_size))
            k0 = lay.kv_starts[gi]
            kg, dkg = (x[k0:k0 + G * H * L].view(G * H, L, dqk) for x in (kh, dkh))
            vg, dvg = (x[k0:k0 + G * H * L].view(G * H, L, dv) for x in (vh, dvh))
            ti = time_idx if ctx.num_buckets else qb.new_empty(0).short()
            for (r0, r1, c1), q0, (z, a) in zip(blocks, lay.q_starts[gi], group_saved):
                R = r1 - r0
                rows = slice(q0, q0 + G * H * R)
                g_blk = go[rows].view(G * H, R, dv)
                dvg[:, :c1] += torch.bmm(a.view(G * H, R, c1).transpose(1, 2), g_blk)
                ds = torch.bmm(g_blk, vg[:, :c1].transpose(1, 2))  # da -> ds in place
                db2d, dtw = ext.backward(ds.view(G, H, R, c1), z, w, row_end, ti, ctx.num_buckets, want_pos, r0)
                if want_pos:
                    dpos.index_add_(0, g.pos_idx[r0:r1, :c1].reshape(-1), db2d.reshape(-1))
                if want_time:
                    dtime += dtw
                torch.bmm(ds, kg[:, :c1], out=dqb[rows].view(G * H, R, dqk))  # d(alpha q) = ds k
                dkg[:, :c1] += torch.bmm(ds.transpose(1, 2), qb[rows].view(G * H, R, dqk))  # dk = dsᵀ (alpha q)
        ctx.saved_groups = None
        if alpha != 1.0:
            dqb.mul_(alpha)
        dq = dqb.index_select(0, lay.q_inverse).view(T, H, dqk)
        dk = dkh.index_select(0, lay.kv_inverse).view(T, H, dqk)
        dvv = dvh.index_select(0, lay.kv_inverse).view(T, H, dv)
        return dq, dk, dvv, dpos, dtime, None, None


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
