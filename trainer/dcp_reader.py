"""A DCP storage reader whose tensor reads load only the requested rows (docs/distributed.md, issue 18).

torch's ``FileSystemReader`` loads every saved chunk a rank needs *whole* (``torch.load`` of its blob) and then
narrows it: reloading a row-wise table at another world size (2 -> 4) makes each rank hold a whole saved shard
(its own shard x the world-size ratio) beside its own, which breaks a per-rank memory cap sized for one shard.
:class:`RowRangeReader` reads the same files, but when a saved chunk is a plain ``torch.save`` blob (one
contiguous little-endian tensor, stored uncompressed — what DCP writes without storage transforms) and the request
covers whole rows, it reads exactly those rows' bytes into the destination (one ``readinto``); anything else goes
through ``FileSystemReader``'s own path. Peak memory of a load is then the destination, not the saved chunk.

``raw_tensor_offset`` finds where such a blob's data starts; serving/table_stream.py uses it for the streamed
export.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Any, Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

__all__ = ["FileView", "raw_tensor_offset", "RowRangeReader"]


class FileView(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) of an open binary file."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def raw_tensor_offset(f: Any, offset: int, length: int, dtype: torch.dtype, sizes: Tuple[int, ...]) -> Optional[int]:
    """Absolute byte offset of the raw row-major data of the torch.save blob at [offset, offset + length) of
    ``f`` holding one contiguous tensor ``sizes`` of ``dtype`` (little-endian, stored uncompressed); None when the
    blob is not laid out so."""
    view = FileView(f, offset, length)
    try:
        meta = torch.load(view, map_location="meta", weights_only=True)
        view.seek(0)
        zf = zipfile.ZipFile(view)
    except Exception:  # noqa: BLE001 - not a torch.save zip (a transform): the caller loads it whole
        return None
    if (not isinstance(meta, torch.Tensor) or meta.dtype != dtype or tuple(meta.shape) != tuple(sizes)
            or not meta.is_contiguous() or meta.storage_offset() != 0):
        return None
    nbytes = meta.numel() * meta.element_size()
    data = [i for i in zf.infolist() if "/data/" in i.filename and not i.filename.endswith("/")]
    order = [i for i in zf.infolist() if i.filename.endswith("/byteorder")]
    if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or data[0].file_size != nbytes:
        return None
    if order and zf.read(order[0]).strip() != b"little":
        return None
    f.seek(offset + data[0].header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return offset + data[0].header_offset + 30 + name_len + extra_len


class RowRangeReader(FileSystemReader):
    """``FileSystemReader`` that reads only the requested rows of plain stored tensor chunks (module doc).
    ``direct_reads`` / ``whole_reads``: how many tensor requests took each path (tests, logs)."""

    def __init__(self, path: Any, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._metadata: Any = None
        self._raw: Dict[Any, Optional[int]] = {}
        self.direct_reads = self.whole_reads = 0

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._metadata = metadata
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def _chunk(self, req: Any) -> Optional[Tuple[torch.dtype, Tuple[int, ...]]]:
        """(dtype, sizes) of the saved chunk a tensor request reads; None if unknown."""
        md = self._metadata.state_dict_metadata.get(req.storage_index.fqn) if self._metadata is not None else None
        if md is None or not hasattr(md, "chunks"):
            return None
        want = tuple(req.storage_index.offset)
        for c in md.chunks:
            if tuple(c.offsets) == want:
                return md.properties.dtype, tuple(int(s) for s in c.sizes)
        return None

    def _direct(self, stream: Any, req: Any, planner: LoadPlanner) -> bool:
        """Read ``req`` straight from its rows' bytes into the destination; False when it must go the whole way."""
        item = self.storage_data[req.storage_index]
        chunk = self._chunk(req)
        if chunk is None or getattr(item, "transform_descriptors", None):
            return False
        dtype, sizes = chunk
        offs, lens = tuple(int(x) for x in req.storage_offsets), tuple(int(x) for x in req.lengths)
        if len(sizes) == 0 or len(offs) != len(sizes) or any(o != 0 for o in offs[1:]) or lens[1:] != sizes[1:]:
            return False  # not whole rows of the chunk
        if req.storage_index not in self._raw:
            self._raw[req.storage_index] = raw_tensor_offset(stream, item.offset, item.length, dtype, sizes)
        raw = self._raw[req.storage_index]
        if raw is None:
            return False
        target = planner.resolve_tensor(req).detach()
        if tuple(target.shape) != lens:
            raise AssertionError(f"req {req.storage_index} mismatch sizes {tuple(target.shape)} vs {lens}")
        row_bytes = dtype.itemsize
        for s in sizes[1:]:
            row_bytes *= s
        buf = target if (target.dtype == dtype and target.is_contiguous() and target.device.type == "cpu") else \
            torch.empty(lens, dtype=dtype)
        stream.seek(raw + offs[0] * row_bytes)
        view = memoryview(buf.view(torch.uint8).numpy()).cast("B") if buf.numel() else memoryview(b"")
        if stream.readinto(view) != len(view):
            raise ValueError(f"{self.path}: truncated while reading {req.storage_index.fqn}")
        if buf is not target:
            target.copy_(buf)
        planner.commit_tensor(req, target)
        self.direct_reads += 1
        return True

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        rest = []
        by_file: Dict[str, list] = {}
        for req in plan.items:
            if req.type == LoadItemType.TENSOR:
                by_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
            else:
                rest.append(req)
        for relative_path, reqs in by_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                for req in reqs:
                    if not self._direct(stream, req, planner):
                        rest.append(req)
                        self.whole_reads += 1
        return super().read_data(LoadPlan(rest, getattr(plan, "storage_data", None)), planner)
