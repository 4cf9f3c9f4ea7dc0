"""World-size-independent initial values of embedding tables (``sharding.table_init=per_shard``).

Row ``r`` of table ``t`` gets values that depend only on ``(seed, t, r)``: rows are grouped in blocks of
:data:`BLOCK_ROWS`; block ``b`` is drawn, full width ``D``, from its own generator seeded by
``blake2b(seed, t, b)`` (GR's truncated normal: std 0.02, cut at ±2 std), and row 0 (padding) is zero. A rank
draws only the blocks that overlap its shards, so a table initialised at world size 1, 2 or 4, table-, row- or
column-wise, is the same table, and no rank ever holds more than its shards plus one ``[BLOCK_ROWS, D]`` block.

:func:`seeded_init_fn` is the ``init_fn`` of a TorchRec ``EmbeddingConfig``. DMP builds the sharded collection of a
meta-device collection with only the local shards allocated; the rowwise AdamW sharded collection
(``sharding.py``) then calls ``init_shards`` with those shards and their global offsets.
Torch only; no torchrec import.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

import torch

from hstu.modules.embeddings import INIT_STD

BLOCK_ROWS = 4096


def block_seed(seed: int, table: str, block: int) -> int:
    """63-bit generator seed of row block ``block`` of ``table`` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}/{table}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def fill_rows(out: torch.Tensor, seed: int, table: str, row_offset: int = 0, col_offset: int = 0,
              dim: Optional[int] = None, std: float = INIT_STD) -> torch.Tensor:
    """Write rows ``row_offset .. row_offset + R`` and columns ``col_offset .. col_offset + C`` of the seeded
    table into ``out [R, C]`` (any dtype/device; values drawn in fp32 on CPU). ``dim``: the table's full width D
    (default C: a full-width shard). Returns ``out``."""
    rows, cols = out.shape
    dim = cols if dim is None else dim
    if col_offset + cols > dim:
        raise ValueError(f"columns {col_offset}..{col_offset + cols} outside a table of width {dim}")
    block = torch.empty(BLOCK_ROWS, dim, dtype=torch.float32)
    r = row_offset
    end = row_offset + rows
    with torch.no_grad():
        while r < end:
            b = r // BLOCK_ROWS
            gen = torch.Generator().manual_seed(block_seed(seed, table, b))
            torch.nn.init.trunc_normal_(block, std=std, a=-2 * std, b=2 * std, generator=gen)
            if b == 0:
                block[0].zero_()  # padding row
            lo, hi = r - b * BLOCK_ROWS, min(end - b * BLOCK_ROWS, BLOCK_ROWS)
            out[r - row_offset: r - row_offset + hi - lo].copy_(block[lo:hi, col_offset:col_offset + cols])
            r += hi - lo
    return out


class SeededTableInit:
    """``init_fn`` of a TorchRec ``EmbeddingConfig`` (picklable) drawing table ``table`` from ``seed``.

    ``init(weight [R, D])`` fills a whole table (what an unsharded EmbeddingCollection passes);
    ``init_shards(shards, dim)`` fills local shards at their global offsets (the sharded collection of
    ``sharding.py`` calls it with each rank's shards: TorchRec itself hands init_fn only the local slice).
    """

    def __init__(self, seed: int, table: str, std: float = INIT_STD) -> None:
        self.seed, self.table, self.std = int(seed), table, std

    def __call__(self, weight: torch.Tensor) -> None:
        if weight.is_meta or weight.numel() == 0:
            return  # nothing materialised here (a meta collection; a table-wise table on another rank)
        if weight.dim() != 2:
            raise ValueError(f"table {self.table}: expected a [rows, dim] weight, got shape {tuple(weight.shape)}")
        fill_rows(weight.data, self.seed, self.table, 0, 0, int(weight.shape[1]), self.std)

    def init_shards(self, shards: Iterable[Any], dim: int) -> None:
        """shards: objects with ``.tensor [r, c]`` and ``.metadata.shard_offsets`` (row, col) in the table."""
        for shard in shards:
            r0, c0 = shard.metadata.shard_offsets
            fill_rows(shard.tensor, self.seed, self.table, int(r0), int(c0), dim, self.std)

    def __repr__(self) -> str:
        return f"SeededTableInit(seed={self.seed}, table={self.table!r}, std={self.std})"


def seeded_init_fn(seed: int, table: str, std: float = INIT_STD) -> SeededTableInit:
    """The ``init_fn`` for table ``table`` of a per-shard-initialised collection."""
    return SeededTableInit(seed, table, std)


__all__ = ["BLOCK_ROWS", "block_seed", "fill_rows", "SeededTableInit", "seeded_init_fn"]
