"""PyTorch reference of jagged HSTU attention (see ops/README.md for the exact semantics).

    out_i = Σ_{j valid(i)} SiLU(alpha · q_i·k_j + rab_ij) / norm · v_j
    rab_ij = pos_weights[j − i + P − 1] + time_weights[bucket(t_next(i) − t_j)]       (P = max_pos)

Efficiency: no padding to the batch max. Sequences are sorted by length and greedily packed into groups whose
padded work (G · L_max²) stays within ``PAD_TOLERANCE`` of the real work (Σ L²) plus a small constant; each
group runs as one batched matmul [G, H, L, L]. Remaining padding: see ops/README.md.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from hstu.ops.jagged import next_timestamps

PAD_TOLERANCE = 0.25  # allowed padded work per group, relative to its real Σ L² work
PAD_SLACK = 4096  # ... plus this many padded score entries (tiny groups are cheaper merged than launched)


def time_bucket_ids(delta: torch.Tensor, base: float, num_buckets: int) -> torch.Tensor:
    """Log time buckets: clamp(floor(ln(max(|Δ|, 1)) / base), 0, num_buckets) as int64 (float32 log, as GR)."""
    mag = delta.long().abs().clamp(min=1).to(torch.float32)
    return torch.floor(torch.log(mag) / base).clamp(0, num_buckets).long()


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
    """x [T, ...] -> x_ext[rows] [P, ...] where x_ext = x plus a zero row T and ``rows`` [P] holds every token
    exactly once (padding slots = T). Because it is a permutation, backward is a gather by ``inverse`` [T]
    (position of token t in rows) instead of a scatter-add, which is ~10x slower on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return torch.cat([x, x.new_zeros((1,) + x.shape[1:])]).index_select(0, rows)

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


def _group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    L: int,
    *,
    alpha: float,
    norm: float,
    causal: bool,
    pos_weights: Optional[torch.Tensor],
    time_weights: Optional[torch.Tensor],
    ts_ext: Optional[torch.Tensor],
    t_next_ext: Optional[torch.Tensor],
    time_bucket_base: float,
    num_targets: Optional[torch.Tensor],
    contextual_len: int = 0,
) -> torch.Tensor:
    """One length group: q/k [G*L, H, dqk], v [G*L, H, dv] already gathered (padding rows are zero);
    rows [G, L] token index (padding -> T) for the time bias. Returns [G, L, H, dv] (padded rows are garbage)."""
    G = rows.size(0)
    H = q.size(1)
    q = q.view(G, L, H, -1).transpose(1, 2)  # [G, H, L, dqk]
    k = k.view(G, L, H, -1).transpose(1, 2)
    v = v.view(G, L, H, -1).transpose(1, 2)  # [G, H, L, dv]
    scores = torch.matmul(q * alpha if alpha != 1.0 else q, k.transpose(-1, -2))  # [G, H, L, L]

    pos = torch.arange(L, device=rows.device)
    bias: Optional[torch.Tensor] = None
    if pos_weights is not None:
        P = max_pos_from_table(pos_weights)
        bias = pos_weights[relative_position_ids(pos.view(L, 1), pos.view(1, L), P)]  # [L, L]
    if time_weights is not None:
        assert ts_ext is not None and t_next_ext is not None
        delta = t_next_ext[rows].unsqueeze(2) - ts_ext[rows].unsqueeze(1)  # [G, L, L]
        tb = time_weights[time_bucket_ids(delta, time_bucket_base, time_weights.numel() - 1)]
        bias = tb if bias is None else bias + tb
    if bias is not None:
        scores = scores + bias.to(scores.dtype).unsqueeze(-3)

    # valid(i, j): causal (j <= i) or, non-causal, j inside the sequence; candidates don't see other candidates.
    if causal:
        mask = (pos.view(L, 1) >= pos.view(1, L)).unsqueeze(0)  # [1, L, L]
    else:
        mask = (pos.view(1, L) < lengths.view(G, 1)).unsqueeze(1)  # [G, 1, L]
    if num_targets is not None:
        cand = pos.view(1, L) >= (lengths - num_targets).view(G, 1)  # [G, L]
        cross = cand.unsqueeze(2) & cand.unsqueeze(1) & (pos.view(L, 1) != pos.view(1, L))
        mask = mask & ~cross
    if contextual_len > 0:  # prefix of C = min(contextual_len, n - num_targets) rows visible to every query
        hist = lengths - num_targets if num_targets is not None else lengths
        C = hist.clamp(min=0, max=contextual_len)
        mask = mask | (pos.view(1, 1, L) < C.view(G, 1, 1))
    weights = mask.to(scores.dtype) * (1.0 / norm)
    attn = F.silu(scores) * weights.unsqueeze(-3)  # [G, H, L, L]
    return torch.matmul(attn, v).transpose(1, 2)  # [G, L, H, dv]


def pytorch_jagged_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_len: int,
    *,
    alpha: float,
    norm: float,
    causal: bool = True,
    pos_weights: Optional[torch.Tensor] = None,
    time_weights: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    query_timestamps: Optional[torch.Tensor] = None,
    time_bucket_base: float = 0.301,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
) -> torch.Tensor:
    """Jagged HSTU attention, q/k [T, H, dqk], v [T, H, dv], offsets [B+1] -> [T, H, dv] (autograd to q, k, v,
    pos_weights, time_weights). ``max_len`` is only an upper bound here (lengths are read from offsets)."""
    T, H, dv = v.shape
    lengths_t = (offsets[1:] - offsets[:-1]).long()
    lengths = lengths_t.tolist()
    if T == 0 or not lengths:
        return v.new_zeros(T, H, dv) + 0.0 * (q.sum() + k.sum() + v.sum())
    zero = lambda x: torch.cat([x, x.new_zeros((1,) + x.shape[1:])])  # noqa: E731  append padding row T
    ts_ext = t_next_ext = None
    if time_weights is not None:
        if timestamps is None:
            raise ValueError("time_weights given without timestamps")
        ts_ext = zero(timestamps.long())
        t_next_ext = zero(next_timestamps(timestamps, offsets, query_timestamps))
    starts = offsets[:-1].long()
    plan = []  # (L, member index, lengths, rows [G, L], valid [G, L])
    for L, members in length_groups(lengths):
        idx = torch.tensor(members, device=offsets.device)
        lens = lengths_t[idx]
        pos = torch.arange(L, device=offsets.device)
        valid = pos.view(1, L) < lens.view(-1, 1)  # [G, L]
        rows = torch.where(valid, starts[idx].view(-1, 1) + pos.view(1, L), torch.full_like(valid, T, dtype=torch.long))
        plan.append((L, idx, lens, rows, valid))
    # One permutation jagged -> grouped-padded for q, k, v (and back for the output).
    all_rows = torch.cat([rows.reshape(-1) for _, _, _, rows, _ in plan])
    inverse = torch.empty(T, dtype=torch.long, device=offsets.device)
    real = all_rows < T
    inverse[all_rows[real]] = torch.arange(all_rows.numel(), device=offsets.device)[real]
    qa, ka, va = (_GatherRows.apply(x, all_rows, inverse) for x in (q, k, v))
    sizes = [rows.numel() for _, _, _, rows, _ in plan]  # split (not slicing): its backward is one cat
    outs: List[torch.Tensor] = []
    for (L, idx, lens, rows, valid), qg, kg, vg in zip(plan, qa.split(sizes), ka.split(sizes), va.split(sizes)):
        out = _group_attention(
            qg, kg, vg, rows, lens, L,
            alpha=alpha, norm=norm, causal=causal, pos_weights=pos_weights, time_weights=time_weights,
            ts_ext=ts_ext, t_next_ext=t_next_ext, time_bucket_base=time_bucket_base,
            num_targets=None if num_targets is None else num_targets.long()[idx], contextual_len=contextual_len,
        )
        outs.append(out.reshape(-1, H, dv))
    return _ScatterRows.apply(torch.cat(outs), all_rows, inverse)
