"""Stochastic Length (SL, hstu-spec.md): subsample long training sequences so expected attention cost is O(N^α).

With N = data.max_seq_len: threshold = ⌊N^(α/2)⌋; a sequence of length L > threshold is cut, with probability
1 − N^α / L², to ``threshold`` items. (For L ≤ N^(α/2) that probability is ≤ 0, i.e. never.)

Which items are kept: the paper's Γ(S, L) is a sampled subsequence; GR's public code only has the length part
(``apply_sampling`` in generative_recommenders/common.py, used by its attention benchmarks, and the research
trainer has no SL at all — GR issue #2). We keep a uniformly random subset of ``threshold`` positions of the
sequence, in their original (chronological) order; next-item labels are then derived from the cut sequence.
Train time only: evaluation always sees the full history.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch


def sl_threshold(max_seq_len: int, alpha: float) -> int:
    """⌊N^(α/2)⌋ (a tiny epsilon guards exact powers such as 100^(2/2) against float round-down)."""
    return int(math.floor(max_seq_len ** (alpha / 2.0) + 1e-9))


def cut_probability(lengths: torch.Tensor, max_seq_len: int, alpha: float) -> torch.Tensor:
    """Probability [B] that each sequence is cut: 1 − N^α/L² for L > threshold, else 0."""
    L = lengths.double().clamp(min=1.0)
    p = 1.0 - (float(max_seq_len) ** alpha) / (L * L)
    p = torch.where(lengths > sl_threshold(max_seq_len, alpha), p, torch.zeros_like(p))
    return p.clamp(0.0, 1.0)


def sample_keep_mask(
    offsets: torch.Tensor, max_seq_len: int, alpha: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Bool [T]: which positions survive SL. offsets [B+1] int64 (CPU); randomness from ``generator``."""
    offsets = offsets.cpu()
    lengths = offsets[1:] - offsets[:-1]
    B, T = lengths.numel(), int(offsets[-1])
    threshold = sl_threshold(max_seq_len, alpha)
    cut = torch.rand(B, generator=generator, dtype=torch.float64) < cut_probability(lengths, max_seq_len, alpha)
    seg = torch.repeat_interleave(torch.arange(B), lengths)  # [T] sequence of each position
    # random order inside each sequence: sort by (sequence, uniform key); a position is kept when its rank
    # inside its sequence is < threshold (or when its sequence is not cut).
    keys = seg.double() * 2.0 + torch.rand(T, generator=generator, dtype=torch.float64)
    order = torch.argsort(keys)
    rank = torch.empty(T, dtype=torch.long)
    rank[order] = torch.arange(T) - offsets[seg[order]]
    return ~cut[seg] | (rank < threshold)


def _subset_batch(batch: Any, keep: torch.Tensor) -> Any:
    """New jagged batch with only the positions in ``keep`` [T] (order kept); per-sequence fields unchanged."""
    device = batch.item_ids.device
    keep = keep.to(device)
    seg = torch.repeat_interleave(torch.arange(batch.offsets.numel() - 1, device=device), batch.lengths.to(device))
    lengths = torch.bincount(seg[keep], minlength=batch.offsets.numel() - 1).to(batch.lengths.dtype)
    offsets = torch.zeros_like(batch.offsets)
    offsets[1:] = torch.cumsum(lengths, 0)
    changes = dict(
        item_ids=batch.item_ids[keep],
        timestamps=batch.timestamps[keep],
        offsets=offsets,
        lengths=lengths,
        max_len=int(lengths.max()) if lengths.numel() else 0,
    )
    if getattr(batch, "ratings", None) is not None:
        changes["ratings"] = batch.ratings[keep]
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **changes)
    fields = dict(vars(batch))
    fields.update(changes)
    return type(batch)(**fields)


def apply_stochastic_length(
    batch: Any, max_seq_len: int, alpha: float, generator: Optional[torch.Generator] = None
) -> Any:
    """Stochastic Length on a JaggedBatch: returns a new batch (the input is not modified)."""
    keep = sample_keep_mask(batch.offsets, max_seq_len, alpha, generator)
    if bool(keep.all()):
        return batch
    return _subset_batch(batch, keep)
