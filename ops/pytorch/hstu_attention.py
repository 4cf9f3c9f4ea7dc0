"""PyTorch reference of jagged HSTU attention (see ops/README.md for the exact semantics).

    out_i = Σ_{j valid(i)} SiLU(alpha · q_i·k_j + rab_ij) / norm · v_j
    rab_ij = pos_weights[j − i + P − 1] + time_weights[bucket(t_next(i) − t_j)]       (P = max_pos)

Efficiency: no padding to the batch max. Sequences are sorted by length and greedily packed into groups whose
padded work (G · L_max²) stays within ``PAD_TOLERANCE`` of the real work (Σ L²) plus a small constant; each
group runs as one batched matmul [G, H, L, L]. Remaining padding: see ops/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from hstu.ops.attention_args import AttentionArgs
from hstu.ops.jagged import next_timestamps

PAD_TOLERANCE = 0.25  # allowed padded work per group, relative to its real Σ L² work
PAD_SLACK = 4096  # ... plus this many padded score entries (tiny groups are cheaper merged than launched)


def time_bucket_ids(delta: torch.Tensor, base: float, num_buckets: int) -> torch.Tensor:
    """Log time buckets: clamp(floor(ln(max(|Δ|, 1)) / base), 0, num_buckets) as int64 (float32 log, as GR)."""
    mag = delta.long().abs().clamp(min=1).to(torch.float32)
    return torch.floor(torch.log(mag) / base).clamp(0, num_buckets).long()


def pairwise_time_buckets(t_next: torch.Tensor, t: torch.Tensor, base: float, num_buckets: int) -> torch.Tensor:
    """[G, L, L] int64 bucket(t_next[g, i] − t[g, j]) of row-aligned t_next, t [G, L] int64."""
    return time_bucket_ids(t_next.unsqueeze(2) - t.unsqueeze(1), base, num_buckets)


def relative_position_ids(rows: torch.Tensor, cols: torch.Tensor, max_pos: int) -> torch.Tensor:
    """Toeplitz index j − i + max_pos − 1 (broadcast of rows [..., 1] and cols [1, ...]), clamped to the table."""
    return (cols - rows + (max_pos - 1)).clamp(0, 2 * max_pos - 2)


def max_pos_from_table(pos_weights: torch.Tensor) -> int:
    """P from a Toeplitz table of 2P − 1 values."""
    n = pos_weights.numel()
    if n % 2 != 1:
        raise ValueError(f"pos_weights must have 2*max_pos-1 (odd) values, got {n}")
    return (n + 1) // 2


def length_groups(lengths: List[int], tol: float = PAD_TOLERANCE, slack: int = PAD_SLACK) -> List[Tuple[int, List[int]]]:
    """Pack non-empty sequences into (padded_len, [seq indices]) groups, longest first.

    A sequence joins the current group while G·L_max² − Σ L² ≤ tol·Σ L² + slack (cumulative over the group)."""
    order = sorted((b for b, n in enumerate(lengths) if n > 0), key=lambda b: -lengths[b])
    groups: List[Tuple[int, List[int]]] = []
    members: List[int] = []
    l_max = real = 0
    for b in order:
        n = lengths[b]
        if members:
            new_real = real + n * n
            if (len(members) + 1) * l_max * l_max - new_real > tol * new_real + slack:
                groups.append((l_max, members))
                members = []
        if not members:
            l_max, real = n, 0
        members.append(b)
        real += n * n
    if members:
        groups.append((l_max, members))
    return groups


class _GatherRows(torch.autograd.Function):
    """x [T, ...] -> x[rows] [P, ...] where ``rows`` [P] holds every token exactly once plus padding slots that
    repeat some real row (their values are never used: the mask zeroes padded keys, padded queries are dropped).
    Because it is a permutation on the real slots, backward is a gather by ``inverse`` [T] (position of token t
    in rows) instead of a scatter-add, which is ~10x slower on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _ScatterRows(torch.autograd.Function):
    """Adjoint of :class:`_GatherRows`: y [P, ...] (grouped, padded) -> y[inverse] [T, ...] (jagged)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return y.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return torch.cat([grad, grad.new_zeros((1,) + grad.shape[1:])]).index_select(0, rows), None, None


class _TableGather(torch.autograd.Function):
    """table [n] gathered at idx (any shape, int64 in 0..n-1) -> [idx.shape]; backward is one 1-D scatter_add_
    into the n scalars (~5x faster on CPU than ``index_put_`` accumulate or a weighted bincount)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.n = table.numel()
        return table.take(idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.n).scatter_add_(0, idx.reshape(-1), grad.reshape(-1)), None


@dataclass
class GroupPlan:
    """One length group: L padded length, idx [G] member sequences, lens [G], rows [G, L] token index (padding
    -> T), pos_idx [L, L] Toeplitz index (None without a position table), time_idx [G, L, L] time-bucket index
    (None without a time table), weights [1|G, L, L] = valid(i, j) / norm in the score dtype."""

    L: int
    idx: torch.Tensor
    lens: torch.Tensor
    rows: torch.Tensor
    pos_idx: Optional[torch.Tensor]
    time_idx: Optional[torch.Tensor]
    weights: torch.Tensor
    cache: Dict[str, Any] = field(default_factory=dict)  # per-batch derived forms other backends build once


@dataclass
class AttentionPlan:
    """What a jagged batch's attention needs besides q, k, v and the rab tables: the jagged -> grouped-padded
    permutation (all_rows [P], inverse [T], sizes) and every group's indices and mask. It depends only on the
    batch and the config, so a layer stack builds it once per batch (:func:`attention_plan`)."""

    T: int
    groups: List[GroupPlan]
    all_rows: torch.Tensor
    gather_rows: torch.Tensor
    pad_slots: torch.Tensor
    inverse: torch.Tensor
    sizes: List[int]
    pos_table_size: Optional[int]
    time_table_size: Optional[int]
    cache: Dict[str, Any] = field(default_factory=dict)  # per-batch layouts other backends build once


def slot_inverse(rows: torch.Tensor, real: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int64: the slot of each of the n source rows in a gathered layout whose slot s holds source row
    rows[s] (real[s] True; the other slots are padding). Every source row must occupy exactly one real slot."""
    inverse = torch.empty(n, dtype=torch.long, device=rows.device)
    inverse[rows[real]] = torch.arange(rows.numel(), device=rows.device)[real]
    return inverse


def attention_plan(
    offsets: torch.Tensor,
    *,
    norm: float,
    causal: bool = True,
    pos_table_size: Optional[int] = None,
    time_table_size: Optional[int] = None,
    timestamps: Optional[torch.Tensor] = None,
    query_timestamps: Optional[torch.Tensor] = None,
    time_bucket_base: float = 0.301,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    dtype: torch.dtype = torch.float32,
    num_tokens: Optional[int] = None,
    time_bucket_fn: Optional[Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor]] = None,
) -> Optional[AttentionPlan]:
    """Plan of a jagged batch (offsets [B+1], num_tokens T rows, default offsets[-1]) for tables of
    pos_table_size = 2P − 1 / time_table_size = num_buckets + 1 values (None: no such bias); None when the batch
    has no token. time_bucket_fn(t_next [G, L], t [G, L] int64, base, num_buckets) -> [G, L, L] bucket indices
    (default :func:`pairwise_time_buckets`; another backend may return a narrower integer dtype)."""
    lengths_t = (offsets[1:] - offsets[:-1]).long()
    lengths = lengths_t.tolist()
    T = num_tokens if num_tokens is not None else (int(offsets[-1]) if offsets.numel() > 0 else 0)
    if T == 0 or not lengths:
        return None
    device = offsets.device
    ts_ext = t_next_ext = None
    if time_table_size is not None:
        if timestamps is None:
            raise ValueError("time_weights given without timestamps")
        zero = lambda x: torch.cat([x, x.new_zeros((1,) + x.shape[1:])])  # noqa: E731  append padding row T
        ts_ext = zero(timestamps.long())
        t_next_ext = zero(next_timestamps(timestamps, offsets, query_timestamps))
    P = None
    if pos_table_size is not None:
        if pos_table_size % 2 != 1:
            raise ValueError(f"pos_weights must have 2*max_pos-1 (odd) values, got {pos_table_size}")
        P = (pos_table_size + 1) // 2
    starts = offsets[:-1].long()
    groups: List[GroupPlan] = []
    for L, members in length_groups(lengths):
        idx = torch.tensor(members, device=device)
        lens = lengths_t[idx]
        G = len(members)
        pos = torch.arange(L, device=device)
        valid = pos.view(1, L) < lens.view(-1, 1)  # [G, L]
        rows = torch.where(valid, starts[idx].view(-1, 1) + pos.view(1, L), torch.full_like(valid, T, dtype=torch.long))
        pos_idx = relative_position_ids(pos.view(L, 1), pos.view(1, L), P) if P is not None else None
        time_idx = None
        if ts_ext is not None:
            time_idx = (time_bucket_fn or pairwise_time_buckets)(t_next_ext[rows], ts_ext[rows], time_bucket_base,
                                                                 time_table_size - 1)
        # valid(i, j): causal (j <= i) or, non-causal, j inside the sequence; candidates don't see other candidates
        if causal:
            mask = (pos.view(L, 1) >= pos.view(1, L)).unsqueeze(0)  # [1, L, L]
        else:
            mask = (pos.view(1, L) < lens.view(G, 1)).unsqueeze(1)  # [G, 1, L]
        nt = None if num_targets is None else num_targets.long()[idx]
        if nt is not None:
            cand = pos.view(1, L) >= (lens - nt).view(G, 1)  # [G, L]
            cross = cand.unsqueeze(2) & cand.unsqueeze(1) & (pos.view(L, 1) != pos.view(1, L))
            mask = mask & ~cross
        if contextual_len > 0:  # prefix of C = min(contextual_len, n - num_targets) rows visible to every query
            hist = lens - nt if nt is not None else lens
            C = hist.clamp(min=0, max=contextual_len)
            mask = mask | (pos.view(1, 1, L) < C.view(G, 1, 1))
        groups.append(GroupPlan(L, idx, lens, rows, pos_idx, time_idx, mask.to(dtype) * (1.0 / norm)))
    # One permutation jagged -> grouped-padded for q, k, v (and back for the output).
    all_rows = torch.cat([g.rows.reshape(-1) for g in groups])
    real = all_rows < T
    inverse = slot_inverse(all_rows, real, T)
    gather_rows = torch.where(real, all_rows, torch.zeros_like(all_rows))
    pad_slots = (~real).nonzero().view(-1)
    return AttentionPlan(T, groups, all_rows, gather_rows, pad_slots, inverse, [g.rows.numel() for g in groups], pos_table_size,
                         time_table_size)


def _group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: GroupPlan, alpha: float,
                     pos_weights: Optional[torch.Tensor], time_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """One length group: q/k [G*L, H, dqk], v [G*L, H, dv] already gathered (padding rows hold unused values).
    Returns [G, L, H, dv] (padded rows are garbage)."""
    L = g.L
    G = g.rows.size(0)
    H = q.size(1)
    q = q.view(G, L, H, -1).transpose(1, 2)  # [G, H, L, dqk]
    k = k.view(G, L, H, -1).transpose(1, 2)
    v = v.view(G, L, H, -1).transpose(1, 2)  # [G, H, L, dv]
    scores = torch.matmul(q * alpha if alpha != 1.0 else q, k.transpose(-1, -2))  # [G, H, L, L]
    bias: Optional[torch.Tensor] = None
    if pos_weights is not None:
        bias = _TableGather.apply(pos_weights, g.pos_idx)  # [L, L]
    if time_weights is not None:
        tb = _TableGather.apply(time_weights, g.time_idx)  # [G, L, L]
        bias = tb if bias is None else bias + tb
    if bias is not None:
        scores = scores + bias.to(scores.dtype).unsqueeze(-3)
    attn = F.silu(scores) * g.weights.to(scores.dtype).unsqueeze(-3)  # [G, H, L, L]
    return torch.matmul(attn, v).transpose(1, 2)  # [G, L, H, dv]


def check_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs, plan: Optional[AttentionPlan],
               build: Callable[..., Optional[AttentionPlan]] = None) -> Tuple[Optional[AttentionPlan],
                                                                          Optional[torch.Tensor]]:
    """(plan, None): the given plan checked against the inputs, or one built by ``build`` (default
    :func:`attention_plan`); (None, zeros [T, H, dv]) when the batch has no token."""
    pos_weights, time_weights = args.pos_weights, args.time_weights
    T, H, dv = v.shape
    if plan is None:
        plan = (build or attention_plan)(
            args.offsets, norm=args.norm, causal=args.causal,
            pos_table_size=None if pos_weights is None else pos_weights.numel(),
            time_table_size=None if time_weights is None else time_weights.numel(),
            timestamps=args.timestamps, query_timestamps=args.query_timestamps,
            time_bucket_base=args.time_bucket_base, num_targets=args.num_targets, contextual_len=args.contextual_len,
            dtype=q.dtype, num_tokens=T)
    if plan is None:
        return None, v.new_zeros(T, H, dv) + 0.0 * (q.sum() + k.sum() + v.sum())
    if plan.T != T or plan.pos_table_size != (None if pos_weights is None else pos_weights.numel()) or \
            plan.time_table_size != (None if time_weights is None else time_weights.numel()):
        raise ValueError("attention plan does not match the inputs (tokens or rab tables differ)")
    return plan, None


def pytorch_jagged_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs, *,
                                  plan: Optional[AttentionPlan] = None) -> torch.Tensor:
    """Jagged HSTU attention, q/k [T, H, dqk], v [T, H, dv] -> [T, H, dv] (autograd to q, k, v, args.pos_weights,
    args.time_weights). ``args.max_len`` is only an upper bound here (lengths are read from args.offsets).
    ``plan``: the batch's :class:`AttentionPlan` (built by the caller once for a stack of layers; it must come
    from the same offsets / timestamps / masks / norm); None builds it here."""
    H, dv = v.shape[1:]
    plan, empty_out = check_plan(q, k, v, args, plan)
    if empty_out is not None:
        return empty_out
    qa, ka, va = (_GatherRows.apply(x, plan.gather_rows, plan.inverse) for x in (q, k, v))
    outs: List[torch.Tensor] = []
    for g, qg, kg, vg in zip(plan.groups, qa.split(plan.sizes), ka.split(plan.sizes), va.split(plan.sizes)):
        outs.append(_group_attention(qg, kg, vg, g, args.alpha, args.pos_weights, args.time_weights)
                    .reshape(-1, H, dv))
    return _ScatterRows.apply(torch.cat(outs), plan.all_rows, plan.inverse)
