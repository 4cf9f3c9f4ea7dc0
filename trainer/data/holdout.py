"""Never-seen items (``data.holdout_items_frac``) and per-item training counts (cold items, id dropout).

A random share of the items that occur in the data (seeded by ``data.seed``) is removed from every TRAINING
sequence; validation and test histories and targets keep them, and they stay in the catalog (candidates). The
model therefore never trains on their events — with ids alone it cannot rank them; with content features it can.
"""

from __future__ import annotations

import numpy as np

from hstu.trainer.data.sequences import UserSequences, gather_ranges


def holdout_items(seqs: UserSequences, frac: float, seed: int) -> np.ndarray:
    """Sorted int64 ids: round(frac * #distinct items in ``seqs``) of them, drawn without replacement."""
    items = np.unique(seqs.item_ids)
    n = int(round(frac * items.size))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0x401D])
    return np.sort(rng.choice(items, size=n, replace=False)).astype(np.int64)


def remove_items(seqs: UserSequences, items: np.ndarray) -> UserSequences:
    """A copy of ``seqs`` without the events of ``items`` (users keep their rows, possibly shorter or empty)."""
    if items.size == 0:
        return seqs
    keep = ~np.isin(seqs.item_ids, items)
    idx = np.flatnonzero(keep)
    counts = np.add.reduceat(keep.astype(np.int64), seqs.offsets[:-1]) if seqs.num_events else np.zeros(0)
    counts = np.where(np.diff(seqs.offsets) > 0, counts, 0)  # reduceat gives a value for empty rows too
    offsets = np.zeros(seqs.num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    take = lambda a: None if a is None else a[idx]  # noqa: E731
    return UserSequences(user_ids=seqs.user_ids.copy(), offsets=offsets, item_ids=seqs.item_ids[idx],
                         timestamps=seqs.timestamps[idx], ratings=take(seqs.ratings), num_items=seqs.num_items,
                         action_types=take(seqs.action_types))


def train_item_counts(train: UserSequences) -> np.ndarray:
    """[num_items + 1] int64: how often each item occurs in the training sequences (the events the model trains
    on: every event of a train row with >= 2 events — the loader skips shorter rows)."""
    lengths = train.lengths()
    rows = np.flatnonzero(lengths >= 2)
    idx, _ = gather_ranges(train.offsets[rows], train.offsets[rows + 1])
    return np.bincount(train.item_ids[idx], minlength=train.num_items + 1)[: train.num_items + 1].astype(np.int64)
