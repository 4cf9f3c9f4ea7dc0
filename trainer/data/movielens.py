"""MovieLens parsers: ML-1M ``ratings.dat``, ML-20M ``ratings.csv``, ML-100K ``u.data``.

Raw item ids are kept (ML-1M ids <= 3952; ``num_items`` = max id in the file). Ratings are stored as int8:
ML-1M / ML-100K whole stars 1..5; ML-20M half stars are stored doubled (``rating * 2``, 1..10).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.sequences import UserSequences, build_user_sequences
from hstu.trainer.data.textparse import Field, TableFormat, read_table

_INT_IDS = (Field("user", "int", min_value=1), Field("item", "int", min_value=1))
_TS = Field("timestamp", "int", min_value=0)

ML_FORMATS: Dict[str, TableFormat] = {
    "ml-1m": TableFormat(b"::", _INT_IDS + (Field("rating", "int", 0, 5), _TS)),
    "ml-100k": TableFormat(b"\t", _INT_IDS + (Field("rating", "int", 0, 5), _TS)),
    "ml-20m": TableFormat(
        b",",
        _INT_IDS + (Field("rating", "decimal", 0, 5, step=0.5), _TS),
        header=("userId", "movieId", "rating", "timestamp"),
    ),
}
ML_FILES = {"ml-1m": "ratings.dat", "ml-20m": "ratings.csv", "ml-100k": "u.data"}
RATING_SCALE = {"ml-1m": 1, "ml-100k": 1, "ml-20m": 2}


@dataclass
class RawEvents:
    """Flat events, all [N]: user int64, item int64 (>= 1), timestamp int64, rating int8."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])


def ratings_file(name: str, data_dir: "str | Path") -> Path:
    """The ratings file of dataset ``name`` in ``data_dir`` (or in ``data_dir/<name>/``)."""
    if name not in ML_FILES:
        raise DataError(f"unknown MovieLens dataset {name!r} (known: {', '.join(ML_FILES)})")
    return dataset_file(name, data_dir, ML_FILES[name])


def dataset_file(name: str, data_dir: "str | Path", filename: str) -> Path:
    """``data_dir/filename`` or ``data_dir/<name>/filename`` (the first that exists), else DataError."""
    data_dir = Path(data_dir).expanduser()
    for candidate in (data_dir / filename, data_dir / name / filename):
        if candidate.is_file():
            return candidate
    raise DataError(f"{name}: {filename} not found in {data_dir}", path=str(data_dir / filename))


def read_movielens_events(name: str, path: "str | Path", progress: bool = True) -> RawEvents:
    """Parse one MovieLens ratings file -> RawEvents (raises DataError on any malformed row)."""
    cols = read_table(path, ML_FORMATS[name], progress=progress)
    if cols["user"].size == 0:
        raise DataError("no ratings in file", path=str(path))
    rating = np.round(cols["rating"] * RATING_SCALE[name]).astype(np.int8)
    return RawEvents(cols["user"], cols["item"], cols["timestamp"], rating)


def load_movielens(
    name: str,
    data_dir: "str | Path",
    max_seq_len: int,
    min_seq_len: int,
    progress: bool = True,
    stats: Optional[Dict[str, int]] = None,
    tie_order: str = "random",
    tie_seed: int = 0,
) -> UserSequences:
    """data_dir with the ratings file -> UserSequences (raw ids, num_items = max item id); same-second events in
    ``tie_order`` (build_user_sequences; note ML-20M's ratings.csv lists a user's events by item id, so ``file``
    order carries the id there too). ``stats``, when given, receives the file's raw counts (raw_events, ...)."""
    ev = read_movielens_events(name, ratings_file(name, data_dir), progress=progress)
    if stats is not None:
        stats.update(raw_events=len(ev), raw_users=int(np.unique(ev.user).size), raw_items=int(np.unique(ev.item).size))
    return build_user_sequences(ev.user, ev.item, ev.timestamp, ev.rating, max_seq_len, min_seq_len,
                                tie_order=tie_order, tie_seed=tie_seed)
