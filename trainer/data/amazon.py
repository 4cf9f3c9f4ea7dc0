"""Amazon Books ``ratings_Books.csv`` (no header: user,item,rating,timestamp; string ids).

Pipeline: parse -> iterative k-core filter (default 5: repeat dropping users and items with < 5 events until
stable) -> remap surviving user and item ids to 1..N in sorted (byte-wise) order of the original string ids,
which makes the mapping deterministic -> UserSequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.sequences import UserSequences, build_user_sequences
from hstu.trainer.data.textparse import Field, TableFormat, read_table

AMAZON_FILE = "ratings_Books.csv"
AMAZON_FORMAT = TableFormat(
    b",",
    (
        Field("user", "str"),
        Field("item", "str"),
        Field("rating", "decimal", 0, 5),
        Field("timestamp", "int", min_value=0),
    ),
)


def amazon_file(data_dir: "str | Path") -> Path:
    """``ratings_Books.csv`` in ``data_dir`` (or ``data_dir/amzn-books/``)."""
    data_dir = Path(data_dir).expanduser()
    for candidate in (data_dir / AMAZON_FILE, data_dir / "amzn-books" / AMAZON_FILE):
        if candidate.is_file():
            return candidate
    raise DataError(f"amzn-books: {AMAZON_FILE} not found in {data_dir}", path=str(data_dir / AMAZON_FILE))


def k_core_mask(user: np.ndarray, item: np.ndarray, k: int = 5) -> np.ndarray:
    """[N] bool: events that survive iterative k-core filtering (users and items with >= k events).

    user, item: [N] dense int codes (0..U-1, 0..I-1)."""
    keep = np.ones(user.shape[0], dtype=bool)
    while True:
        u_cnt = np.bincount(user[keep], minlength=int(user.max(initial=-1)) + 1)
        i_cnt = np.bincount(item[keep], minlength=int(item.max(initial=-1)) + 1)
        new_keep = keep & (u_cnt[user] >= k) & (i_cnt[item] >= k)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def remap_ids(codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """[N] codes -> ([N] ids in 1..M preserving code order, [M] the distinct codes)."""
    uniq, inverse = np.unique(codes, return_inverse=True)
    return inverse.astype(np.int64) + 1, uniq


def load_amazon_books(
    data_dir: "str | Path",
    max_seq_len: int,
    min_seq_len: int,
    core: int = 5,
    progress: bool = True,
    stats: Optional[Dict[str, int]] = None,
    tie_order: str = "random",
    tie_seed: int = 0,
) -> UserSequences:
    """data_dir with ratings_Books.csv -> UserSequences with users and items remapped to 1..N (same-second events
    in ``tie_order``, see build_user_sequences; Amazon timestamps are whole days, so ties are common).
    ``stats``, when given, receives raw_* counts (whole file) and core_* counts (after the k-core filter)."""
    path = amazon_file(data_dir)
    cols = read_table(path, AMAZON_FORMAT, progress=progress)
    if cols["user"].size == 0:
        raise DataError("no ratings in file", path=str(path))
    _, user_code = np.unique(cols["user"], return_inverse=True)
    _, item_code = np.unique(cols["item"], return_inverse=True)
    keep = k_core_mask(user_code.ravel(), item_code.ravel(), core)
    if not keep.any():
        raise DataError(f"no events survive the {core}-core filter", path=str(path))
    user_ids, users = remap_ids(user_code.ravel()[keep])
    item_ids, items = remap_ids(item_code.ravel()[keep])
    if stats is not None:
        stats.update(raw_events=int(keep.size), raw_users=int(user_code.max()) + 1, raw_items=int(item_code.max()) + 1,
                     core_events=int(keep.sum()), core_users=int(users.size), core_items=int(items.size))
    rating = np.round(cols["rating"][keep]).astype(np.int8)
    return build_user_sequences(user_ids, item_ids, cols["timestamp"][keep], rating, max_seq_len, min_seq_len,
                                tie_order=tie_order, tie_seed=tie_seed)
