"""Item-table rows of a checkpoint read in bounded chunks, and the streamed raw table files of an artifact.

``hstu export`` never holds the whole item table (issue 18): :func:`open_item_rows` gives a reader of the
checkpoint's item table ``[rows, D]`` that returns any row range or id list on demand —

- a DCP checkpoint (any world size / sharding type): every saved chunk (one per shard: ``offsets``, ``sizes``)
  is a ``torch.save`` zip blob inside a ``.distcp`` file; its storage record is stored uncompressed, so a row
  range of it is one ``readinto`` at a computed byte offset (the blob's pickle is read on the meta device to check
  dtype, shape and contiguity). A blob that is not laid out so (a storage transform, a non-contiguous save) is
  loaded whole, one shard at a time (bounded by the largest shard, logged).
- a ``torch.save`` state_dict file (best.pt): memory-mapped (``torch.load(mmap=True)``), rows copied per chunk.
- a tensor in memory (:class:`TensorRows`, the in-process ``export_model`` API).

:func:`write_raw_item_table` streams such a reader into the artifact's raw little-endian files (format 3,
docs/serving.md): ``item_table.bin`` [rows, D] fp32 | bf16 | int8, ``item_scale.bin`` [rows] fp32 (int8 only),
``item_factor.bin`` [rows] fp32 (the per-row score factor scale / ||row||, when l2_norm), ``chunk_rows`` rows at a time:
the same bytes a whole-table ``ItemTable.quantize`` gives (the quantisation and row factor are row-wise).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from hstu.serving.retrieval import DEFAULT_CHUNK, ItemTable, row_factor
from hstu.trainer.dcp_reader import FileView as _FileView
from hstu.trainer.dcp_reader import raw_tensor_offset as _raw_offset

log = logging.getLogger(__name__)

TABLE_FILE, SCALE_FILE, FACTOR_FILE = "item_table.bin", "item_scale.bin", "item_factor.bin"
DEFAULT_EXPORT_CHUNK_ROWS = 1 << 18  # rows per streamed chunk: 64 MiB of fp32 rows at D = 64 (peak ~4x: int8)


class TensorRows:
    """Rows of an in-memory (or memory-mapped) tensor [rows, D]."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.shape, self.dtype = tuple(self.weight.shape), self.weight.dtype

    def read(self, start: int, end: int) -> torch.Tensor:
        return self.weight[start:end].clone()

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]

    def close(self) -> None:
        pass


class DcpRows:
    """Rows of one tensor of a DCP checkpoint, read chunk by chunk from its per-shard blobs (module doc)."""

    def __init__(self, path: str, key: str, metadata: Any) -> None:
        md = metadata.state_dict_metadata[key]
        self.path, self.key = path, key
        self.shape, self.dtype = tuple(md.size), md.properties.dtype
        if len(self.shape) != 2:
            raise ValueError(f"{path}: {key} has shape {self.shape}, expected [rows, dim]")
        self._files: Dict[str, Any] = {}
        self._cache: Tuple[Optional[int], Optional[torch.Tensor]] = (None, None)
        self.chunks: List[Dict[str, Any]] = []
        by_offset = {tuple(idx.offset): info for idx, info in metadata.storage_data.items() if idx.fqn == key}
        for c in md.chunks:
            info = by_offset.get(tuple(c.offsets))
            if info is None:
                raise ValueError(f"{path}: no storage entry for {key} chunk at {tuple(c.offsets)}")
            file = os.path.join(path, info.relative_path)
            raw = None
            if not getattr(info, "transform_descriptors", None):
                raw = _raw_offset(self._open(file), info.offset, info.length, self.dtype, tuple(c.sizes))
            if raw is None:
                log.warning("%s: %s chunk at %s is not a plain stored tensor: loaded whole when read", path, key,
                            tuple(c.offsets))
            self.chunks.append({"row0": int(c.offsets[0]), "col0": int(c.offsets[1]), "rows": int(c.sizes[0]),
                                "cols": int(c.sizes[1]), "file": file, "raw": raw, "info": info})

    def _open(self, file: str) -> Any:
        if file not in self._files:
            self._files[file] = open(file, "rb")
        return self._files[file]

    def _chunk_rows(self, i: int, c: Dict[str, Any], a: int, b: int) -> torch.Tensor:
        """Rows a..b-1 (chunk-relative) of chunk i: [b - a, cols]."""
        if c["raw"] is not None:
            out = torch.empty(b - a, c["cols"], dtype=self.dtype)
            f = self._open(c["file"])
            f.seek(c["raw"] + a * c["cols"] * out.element_size())
            buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{c['file']}: truncated while reading {self.key}")
            return out
        if self._cache[0] != i:  # not a plain stored blob: load that shard whole (one at a time)
            self._cache = (None, None)
            view = _FileView(self._open(c["file"]), c["info"].offset, c["info"].length)
            self._cache = (i, torch.load(view, map_location="cpu", weights_only=True))
        return self._cache[1][a:b].clone()

    def read(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end-1 -> [end - start, D] in the checkpoint's dtype; reads only the bytes of those rows."""
        out = torch.empty(end - start, self.shape[1], dtype=self.dtype)
        covered = 0
        for i, c in enumerate(self.chunks):
            a, b = max(start, c["row0"]), min(end, c["row0"] + c["rows"])
            if a >= b:
                continue
            out[a - start:b - start, c["col0"]:c["col0"] + c["cols"]] = self._chunk_rows(
                i, c, a - c["row0"], b - c["row0"])
            covered += (b - a) * c["cols"]
        if covered != out.numel():
            raise ValueError(f"{self.path}: the chunks of {self.key} do not cover rows {start}..{end - 1}")
        return out

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., D] (a few rows: one read per id)."""
        flat = ids.reshape(-1).tolist()
        rows = [self.read(int(i), int(i) + 1) for i in flat]
        out = torch.cat(rows) if rows else torch.empty(0, self.shape[1], dtype=self.dtype)
        return out.reshape(*ids.shape, self.shape[1])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def open_item_rows(source: str, plain_key: str) -> Any:
    """A row reader (``shape``, ``dtype``, ``read(start, end)``, ``take(ids)``, ``close()``) of the tensor whose
    plain name (trainer/plain_weights.py) is ``plain_key`` in ``source`` (a state_dict file or a DCP directory);
    KeyError when it has none."""
    from hstu.trainer.plain_weights import _collection_key, plain_name

    if os.path.isfile(source):
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        for name, t in state.items():
            if plain_name(name) == plain_key:
                return TensorRows(t)
        raise KeyError(f"{source}: no {plain_key}")
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(source).read_metadata()
    coll = _collection_key()
    for key in metadata.state_dict_metadata:
        if key.startswith("model.") and plain_name(key[len("model."):], coll) == plain_key:
            return DcpRows(source, key, metadata)
    raise KeyError(f"{source}: no {plain_key}")


def _write(f: Any, t: torch.Tensor) -> None:
    f.write(memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B"))


def write_raw_item_table(directory: str, num_rows: int, dim: int, read: Callable[[int, int], torch.Tensor],
                         dtype: str, *, l2_norm: bool, eps: float,
                         chunk_rows: int = DEFAULT_EXPORT_CHUNK_ROWS) -> Dict[str, Any]:
    """Stream rows 0..num_rows-1 (``read(start, end)`` -> fp32 item vectors [n, D] before normalisation) into
    ``directory``/item_table.bin (+ item_scale.bin for int8, + item_factor.bin when l2_norm), quantised
    to ``dtype`` chunk by chunk; returns the manifest's ``embedding`` fields for those files."""
    if sys.byteorder != "little":
        raise RuntimeError("the raw item table is little-endian; exporting on a big-endian host is not supported")
    if chunk_rows < 1:
        raise ValueError(f"export chunk rows must be >= 1, got {chunk_rows}")
    files = {"table": open(os.path.join(directory, TABLE_FILE), "wb")}
    if dtype == "int8":
        files["scale"] = open(os.path.join(directory, SCALE_FILE), "wb")
    if l2_norm:
        files["factor"] = open(os.path.join(directory, FACTOR_FILE), "wb")
    try:
        for start in range(0, num_rows, chunk_rows):
            end = min(num_rows, start + chunk_rows)
            rows = read(start, end)
            if tuple(rows.shape) != (end - start, dim):
                raise ValueError(f"item rows {start}..{end - 1}: got shape {tuple(rows.shape)}, expected "
                                 f"{(end - start, dim)}")
            part = ItemTable.quantize(rows, dtype, l2_norm=False, eps=eps)  # row-wise: = the whole-table bytes
            _write(files["table"], part.weight)
            if "scale" in files:
                _write(files["scale"], part.scale)
            if "factor" in files:
                for s in range(start, end, DEFAULT_CHUNK):  # the blocks ItemTable itself uses (row-wise anyway)
                    e = min(end, s + DEFAULT_CHUNK)
                    sub = ItemTable(part.weight[s - start:e - start],
                                    None if part.scale is None else part.scale[s - start:e - start], l2_norm=False)
                    _write(files["factor"], row_factor(sub, l2_norm, eps))
    finally:
        for f in files.values():
            f.close()
    emb: Dict[str, Any] = {"file": TABLE_FILE, "layout": "raw little-endian row-major [rows, dim]",
                           "dtype": dtype, "rows": num_rows, "dim": dim, "chunk_rows": chunk_rows}
    if dtype == "int8":
        emb["scale_file"] = SCALE_FILE
    if l2_norm:
        emb["factor_file"] = FACTOR_FILE
    return emb
