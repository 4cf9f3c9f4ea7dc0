"""Trivially simple dense padded reference of HSTU attention (tests only; Python loops over every (b, i, j))."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from hstu.ops.attention_args import AttentionArgs
from hstu.ops.pytorch.hstu_attention import max_pos_from_table, time_bucket_ids


def padded_hstu_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    args: AttentionArgs) -> torch.Tensor:
    """Same contract as ``jagged_hstu_attention`` (no contextual prefix); pads every sequence to ``max_len`` and
    builds the bias and mask element by element from the formulas. [T, H, d] -> [T, H, dv]."""
    if args.contextual_len:
        raise ValueError(f"the dense reference has no contextual prefix, got contextual_len={args.contextual_len}")
    offsets, max_len, alpha, norm, causal = args.offsets, args.max_len, args.alpha, args.norm, args.causal
    pos_weights, time_weights, timestamps = args.pos_weights, args.time_weights, args.timestamps
    query_timestamps, time_bucket_base, num_targets = args.query_timestamps, args.time_bucket_base, args.num_targets
    B = offsets.numel() - 1
    T, H, dv = v.shape
    N = max(int(max_len), 1)
    bounds = [(int(offsets[b]), int(offsets[b + 1])) for b in range(B)]

    def pad(x: torch.Tensor) -> torch.Tensor:  # [T, H, d] -> [B, N, H, d], zero padding
        return torch.stack([F.pad(x[s:e], (0, 0, 0, 0, 0, N - (e - s))) for s, e in bounds])

    qp, kp, vp = pad(q), pad(k), pad(v)
    scores = alpha * torch.einsum("bihd,bjhd->bhij", qp, kp)  # [B, H, N, N]
    bias = torch.zeros(B, N, N, dtype=q.dtype)
    mask = torch.zeros(B, N, N, dtype=torch.bool)
    P = max_pos_from_table(pos_weights) if pos_weights is not None else 0
    bias_rows = []
    for b in range(B):
        s, e = int(offsets[b]), int(offsets[b + 1])
        n = e - s
        nt = int(num_targets[b]) if num_targets is not None else 0
        rows = []
        for i in range(N):
            row = []
            for j in range(N):
                val = torch.zeros((), dtype=q.dtype)
                if i < n and j < n:
                    cand_i, cand_j = i >= n - nt, j >= n - nt
                    mask[b, i, j] = (j <= i or not causal) and not (cand_i and cand_j and i != j)
                    if pos_weights is not None:
                        val = val + pos_weights[min(max(j - i + P - 1, 0), 2 * P - 2)]
                    if time_weights is not None:
                        if i + 1 < n:
                            t_next = int(timestamps[s + i + 1])
                        else:
                            t_next = int(query_timestamps[b]) if query_timestamps is not None else int(timestamps[s + i])
                        bucket = time_bucket_ids(torch.tensor(t_next - int(timestamps[s + j])), time_bucket_base,
                                                 time_weights.numel() - 1)
                        val = val + time_weights[bucket]
                row.append(val)
            rows.append(torch.stack(row))
        bias_rows.append(torch.stack(rows))
    if bias_rows:
        bias = torch.stack(bias_rows)
    attn = F.silu(scores + bias.unsqueeze(1)) / norm * mask.unsqueeze(1).to(q.dtype)
    out = torch.einsum("bhij,bjhd->bihd", attn, vp)  # [B, N, H, dv]
    return torch.cat([out[b, : e - s] for b, (s, e) in enumerate(bounds)]).view(T, H, dv)
