"""Small jagged-tensor index helpers (pure PyTorch, any device). A jagged batch is ``values [T, ...]`` plus
``offsets [B+1]`` (int64, offsets[0] = 0, sequence b is rows ``offsets[b]:offsets[b+1]``)."""

from __future__ import annotations

from typing import Optional

import torch


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """[B+1] -> [B] sequence lengths."""
    return offsets[1:] - offsets[:-1]


def sequence_ids(offsets: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """[B+1] -> [T] int64: the sequence index b of every row."""
    lengths = lengths_from_offsets(offsets)
    batch = torch.arange(lengths.numel(), device=offsets.device)
    return torch.repeat_interleave(batch, lengths, output_size=total)


def positions_in_sequence(offsets: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """[B+1] -> [T] int64: 0-based position of every row inside its own sequence."""
    seq = sequence_ids(offsets, total)
    return torch.arange(seq.numel(), device=offsets.device) - offsets[:-1].long()[seq]


def last_rows(offsets: torch.Tensor) -> torch.Tensor:
    """[B+1] -> [B] int64 row index of each sequence's last element (-1 for an empty sequence)."""
    return offsets[1:].long() - 1


def next_timestamps(
    timestamps: torch.Tensor, offsets: torch.Tensor, query_timestamps: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """t_next [T] int64: row i gets t_{i+1} of the same sequence; the last row of sequence b gets
    ``query_timestamps[b]`` when given, else its own timestamp (so Δ on the diagonal is 0)."""
    t = timestamps.long()
    total = t.numel()
    if total == 0:
        return t.clone()
    t_next = torch.cat([t[1:], t[-1:]])
    last = last_rows(offsets)
    nonempty = last >= offsets[:-1].long()
    last = last[nonempty]
    fill = t[last] if query_timestamps is None else query_timestamps.long()[nonempty]
    return t_next.index_copy(0, last, fill)


def padded_row_index(offsets: torch.Tensor, max_len: int, total: Optional[int] = None) -> torch.Tensor:
    """[T] int64: flat index b·max_len + position of every jagged row inside a [B, max_len] padded layout."""
    seq = sequence_ids(offsets, total)
    return seq * max_len + positions_in_sequence(offsets, total)


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """[T, D] -> [B, max_len, D] zero-padded (pure torch, any dtype, autograd; same as fbgemm
    jagged_to_padded_dense for max_len ≥ every length)."""
    B = offsets.numel() - 1
    idx = padded_row_index(offsets, max_len, values.size(0))
    flat = values.new_zeros((B * max_len,) + values.shape[1:])
    return flat.index_copy(0, idx, values).view((B, max_len) + values.shape[1:])


def padded_to_jagged(padded: torch.Tensor, offsets: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """[B, N, D] -> [T, D]: the valid rows of each sequence, in jagged order."""
    B, N = padded.shape[:2]
    idx = padded_row_index(offsets, N, total)
    return padded.reshape((B * N,) + padded.shape[2:]).index_select(0, idx)
