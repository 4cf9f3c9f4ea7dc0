"""Raw id <-> id maps of a prepared event-log dataset (``vocab/users.parquet``, ``vocab/items.parquet``; written by
trainer/data/events_prepare.py), so export / serving code can take the raw ids of the logs.

    items = IdVocab.load(dataset_dir, "items")
    items.to_ids(["sku-1", "never-seen"])   # -> [17, oov_id]  (item_ids=raw datasets: unknown -> 0)
    items.to_raw([17])                      # -> ["sku-1"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from hstu.trainer.data.errors import DataError


class IdVocab:
    """raw [V] (any order) and ids [V] (None / NaN = OOV) -> a sorted map; ``unknown``: the id of raw values it
    does not hold (the OOV id of items, else 0 = padding)."""

    def __init__(self, raw: np.ndarray, ids: Sequence[Optional[int]], unknown: int) -> None:
        raw = np.asarray(raw)
        ids = np.array([unknown if i is None or i != i else int(i) for i in ids], dtype=np.int64)
        order = np.argsort(raw, kind="stable")
        self.raw, self.ids, self.unknown = raw[order], ids[order], int(unknown)
        self._by_id = {int(i): r for r, i in zip(self.raw.tolist(), self.ids.tolist()) if i != unknown}

    @classmethod
    def load(cls, dataset_dir: "str | Path", name: str) -> "IdVocab":
        """``name``: users | items, from the dataset folder (its manifest gives the OOV id)."""
        import duckdb

        folder = Path(dataset_dir)
        path = folder / "vocab" / f"{name}.parquet"
        if name not in ("users", "items") or not path.is_file():
            raise DataError(f"no {name} vocabulary in the prepared dataset", path=str(path))
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        oov = manifest["counts"].get("oov_id") if name == "items" else None
        got = duckdb.connect().execute(f"SELECT raw, id FROM read_parquet('{path}')").fetchnumpy()
        ids = got["id"]
        mask = np.ma.getmaskarray(ids)
        ids = [None if m else int(v) for v, m in zip(np.ma.getdata(ids), mask)]
        raw = got["raw"]
        raw = np.asarray(raw.astype(str) if raw.dtype == object else np.ma.getdata(raw))
        return cls(raw, ids, oov or 0)

    def __len__(self) -> int:
        return int(self.raw.size)

    def to_ids(self, raw_values: Any) -> np.ndarray:
        """Raw ids -> ids [N] int64 (unknown raw values -> ``self.unknown``)."""
        values = np.asarray(raw_values, dtype=self.raw.dtype if self.raw.dtype.kind in "iu" else str)
        pos = np.clip(np.searchsorted(self.raw, values), 0, max(len(self) - 1, 0))
        hit = (self.raw[pos] == values) if len(self) else np.zeros(values.shape, dtype=bool)
        return np.where(hit, self.ids[pos], self.unknown).astype(np.int64)

    def to_raw(self, ids: Any) -> list:
        """Ids -> raw ids (None for the OOV / padding id or an id the vocabulary does not hold)."""
        return [self._by_id.get(int(i)) for i in np.asarray(ids).ravel()]
