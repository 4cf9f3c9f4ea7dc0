"""Serving item table (fp32 | bf16 | int8 rowwise) and chunked exact top-K by inner product (torch only).

Top-K over the whole catalog never materialises [B, num_items] scores: items are scored ``chunk_size`` rows at
a time and merged into a running top-K, so memory is O(B·(chunk_size + k)) whatever the catalog size. The
order is total and deterministic: score descending, then item id ascending (ties broken by the smaller id),
exactly like a stable sort of the brute-force score row.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from hstu.serving.inputs import check_k

EMBEDDING_DTYPES = ("fp32", "bf16", "int8")
DEFAULT_CHUNK = 65536  # fp32 rows per top-K chunk; bf16 / int8 use 16384 (their fp32 copy then stays in cache)
COMPRESSED_CHUNK = 16384
RAW_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def map_raw(path: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The raw little-endian file ``path`` as a lazily memory-mapped tensor ``shape`` of ``dtype`` (its size must
    be exactly that); ValueError naming the file otherwise."""
    if sys.byteorder != "little":
        raise ValueError(f"{path}: raw tables are little-endian; this host is big-endian")
    numel = 1
    for n in shape:
        numel *= int(n)
    want = numel * torch.empty(0, dtype=dtype).element_size()
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size != want:
        raise ValueError(f"{path}: {size if size is not None else 'missing'} bytes, expected {want} "
                         f"({list(shape)} {str(dtype).replace('torch.', '')})")
    if numel == 0:
        return torch.empty(*shape, dtype=dtype)
    return torch.from_file(path, shared=False, size=numel, dtype=dtype).view(*shape)


class TopK(NamedTuple):
    ids: torch.Tensor  # [k] or [B, k] int64
    scores: torch.Tensor  # [k] or [B, k] float32


class ItemTable:
    """Rows 0..num_items of the item embedding table (row 0 = padding, never retrieved).

    fp32 / bf16: ``weight`` in that dtype. int8: symmetric rowwise quantisation, ``weight`` int8 and
    ``scale`` [rows] fp32 with row ≈ weight·scale (scale = max|row| / 127). ``l2_norm``: output vectors are
    L2-normalised (the model's ``l2_norm_output``); the per-row factor (scale / ‖row‖) is precomputed once, so
    scoring a chunk is one matmul plus one multiply."""

    def __init__(self, weight: torch.Tensor, scale: Optional[torch.Tensor] = None, *, l2_norm: bool = True,
                 eps: float = 1e-6, factor: Optional[torch.Tensor] = None) -> None:
        self.weight, self.scale, self.l2_norm, self.eps = weight, scale, bool(l2_norm), float(eps)
        self.dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}.get(weight.dtype)
        if self.dtype is None or (self.dtype == "int8") != (scale is not None):
            raise ValueError(f"unsupported item table: weight {weight.dtype}, "
                             f"scale {'given' if scale is not None else 'None'}")
        self.num_rows, self.dim = weight.shape
        # [rows] fp32 or None; ``factor``: precomputed (a memory-mapped artifact: loading touches no row)
        self.row_factor = factor if factor is not None else row_factor(self, self.l2_norm, self.eps)
        self.default_chunk = DEFAULT_CHUNK if self.dtype == "fp32" else COMPRESSED_CHUNK

    @classmethod
    def open_raw(cls, table_file: str, dtype: str, rows: int, dim: int, *, scale_file: Optional[str] = None,
                 factor_file: Optional[str] = None, l2_norm: bool = True, eps: float = 1e-6) -> "ItemTable":
        """A memory-mapped table of raw little-endian files (weight [rows, dim] in ``dtype``, int8: scale [rows]
        fp32, l2_norm: factor [rows] fp32): nothing is read until rows are used (copy-on-write private map)."""
        weight = map_raw(table_file, RAW_DTYPES[dtype], (rows, dim))
        scale = map_raw(scale_file, torch.float32, (rows,)) if scale_file else None
        factor = map_raw(factor_file, torch.float32, (rows,)) if factor_file else None
        if l2_norm and factor is None:
            raise ValueError(f"{table_file}: an L2-normalised table needs its row factor file")
        return cls(weight, scale, l2_norm=l2_norm, eps=eps, factor=factor)  # no l2: factor = scale | None

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: str, **kw) -> "ItemTable":
        """fp32 table -> ItemTable in ``dtype`` (fp32 | bf16 | int8 rowwise)."""
        w = weight.detach().float().contiguous()
        if dtype == "fp32":
            return cls(w, **kw)
        if dtype == "bf16":
            return cls(w.to(torch.bfloat16), **kw)
        if dtype == "int8":
            scale = w.abs().amax(dim=1) / 127.0
            q = torch.round(w / scale.clamp(min=1e-30).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
            return cls(q, scale.float(), **kw)
        raise ValueError(f"embedding dtype must be one of {EMBEDDING_DTYPES}, got {dtype!r}")

    def append(self, rows: torch.Tensor) -> torch.Tensor:
        """Add rows [M, D] (fp32 item vectors before normalisation, stored in this table's dtype) as new items
        num_rows..num_rows + M - 1; returns their ids [M]."""
        rows = rows.detach().float().reshape(-1, self.dim)
        new = ItemTable.quantize(rows, self.dtype, l2_norm=self.l2_norm, eps=self.eps)
        ids = torch.arange(self.num_rows, self.num_rows + rows.shape[0])
        self.weight = torch.cat([self.weight, new.weight])
        if self.scale is not None:
            self.scale = torch.cat([self.scale, new.scale])
        if self.row_factor is not None:
            self.row_factor = torch.cat([self.row_factor, new.row_factor])
        self.num_rows += rows.shape[0]
        return ids

    def state(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.weight} if self.scale is None else {"weight": self.weight, "scale": self.scale}

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> fp32 [..., D] dequantised rows (the model's input embeddings)."""
        rows = self.weight[ids].float()
        return rows * self.scale[ids].unsqueeze(-1) if self.scale is not None else rows

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> fp32 [..., D] output-side item vectors (L2-normalised when l2_norm)."""
        e = self.lookup(ids)
        return e / e.norm(dim=-1, keepdim=True).clamp(min=self.eps) if self.l2_norm else e

    def chunk_scores(self, query: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """query [B, D] fp32 -> [B, end − start] scores of rows start..end−1."""
        s = query @ self.weight[start:end].float().t()
        return s * self.row_factor[start:end] if self.row_factor is not None else s


def row_factor(table: "ItemTable", l2_norm: bool, eps: float) -> Optional[torch.Tensor]:
    """[rows] fp32 per-row score factor of ``table`` (scale / ||row|| with l2_norm, scale for int8, else None),
    computed DEFAULT_CHUNK rows at a time (row-wise: a row's factor does not depend on the others)."""
    if l2_norm:
        norms = torch.cat([table.lookup(torch.arange(s, min(s + DEFAULT_CHUNK, table.num_rows))).norm(dim=1)
                           for s in range(0, table.num_rows, DEFAULT_CHUNK)] or [torch.zeros(0)])
        factor = 1.0 / norms.clamp(min=eps)
        return factor * table.scale if table.scale is not None else factor
    return table.scale.float() if table.scale is not None else None


def _exclusion_mask(exclude, B: int, start: int, end: int) -> Optional[torch.Tensor]:
    if exclude is None:
        return None
    mask = torch.zeros(B, end - start, dtype=torch.bool)
    for b, ids in enumerate(exclude):
        ids = torch.as_tensor(ids, dtype=torch.int64)
        ids = ids[(ids >= start) & (ids < end)] - start
        mask[b, ids] = True
    return mask


def _chunk_topk(s: torch.Tensor, kk: int):
    """Top kk of each row of s, ties at the boundary resolved to the smallest column (torch.topk is not)."""
    vals, idx = s.topk(kk, dim=1)
    thr = vals[:, -1:]
    short = ((s == thr).sum(1) > (vals == thr).sum(1)).nonzero().flatten().tolist()
    for b in short:  # a tie straddles the boundary (rare for real scores): take the smallest columns among it
        gt = (s[b] > thr[b]).nonzero().flatten()
        eq = (s[b] == thr[b]).nonzero().flatten()[: kk - gt.numel()]
        cols = torch.cat([gt, eq])
        idx[b], vals[b] = cols, s[b, cols]
    return vals, idx


def topk_inner_product(query: torch.Tensor, table: ItemTable, k: int, *, chunk_size: Optional[int] = None,
                       exclude: Optional[Sequence[Union[torch.Tensor, List[int]]]] = None) -> TopK:
    """Exact top-k items 1..num_items by score(query, item) = <query, table.vectors(item)>.

    query [D] or [B, D]; exclude: per query, item ids to leave out (e.g. the history). Returns TopK with
    ids / scores [k] (or [B, k]), k (>= 1, else ValueError) clamped to num_items; excluded items score −inf if k exceeds the rest.
    chunk_size: rows scored at once (default: the table's, 65536 fp32 / 16384 bf16, int8)."""
    single = query.dim() == 1
    q = query.float().reshape(-1, table.dim)
    B = q.shape[0]
    if exclude is not None and len(exclude) != B:
        raise ValueError(f"exclude must hold one id list per query ({B}), got {len(exclude)}")
    k = min(check_k(k), table.num_rows - 1)
    chunk_size = int(chunk_size or table.default_chunk)
    best_s, best_i = q.new_zeros(B, 0), torch.zeros(B, 0, dtype=torch.int64)
    for start in range(1, table.num_rows if k else 1, chunk_size):
        end = min(table.num_rows, start + chunk_size)
        s = table.chunk_scores(q, start, end)
        mask = _exclusion_mask(exclude, B, start, end)
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        vals, idx = _chunk_topk(s, min(k, end - start))
        cand_s, cand_i = torch.cat([best_s, vals], 1), torch.cat([best_i, idx + start], 1)
        order = cand_i.argsort(dim=1)  # ids are unique: ascending id ...
        cand_s, cand_i = cand_s.gather(1, order), cand_i.gather(1, order)
        order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :k]  # ... then score desc
        best_s, best_i = cand_s.gather(1, order), cand_i.gather(1, order)
    return TopK(best_i[0], best_s[0]) if single else TopK(best_i, best_s)


def brute_force_topk(query: torch.Tensor, table: ItemTable, k: int) -> TopK:
    """Reference: all scores at once, stable sort (score desc, id asc). For tests and small catalogs."""
    single = query.dim() == 1
    q = query.float().reshape(-1, table.dim)
    s = table.chunk_scores(q, 1, table.num_rows)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    ids, scores = order + 1, s.gather(1, order)
    return TopK(ids[0], scores[0]) if single else TopK(ids, scores)
