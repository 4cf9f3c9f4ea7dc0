"""Per-user interaction sequences in CSR layout, built from flat event arrays, and the leave-one-out split.

Contract (docs/architecture.md, docs/model.md "Evaluation protocol"): events of a user are sorted by timestamp;
events with equal timestamps follow ``tie_order`` (``random``: a seeded shuffle, the default — it carries no
signal; ``file``: the order the source lists them; ``item_id``: ascending id). Only the last ``max_seq_len + 2``
events are kept. :func:`leave_one_out_split` holds out the last event as the test target (history: the
``max_seq_len`` events before it, the validation item included) and the second-to-last as the validation target
(history: the ``max_seq_len`` events before it); the train sequence ends before the validation item.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from hstu.trainer.config_checks import TIE_ORDERS  # the one definition (a stdlib-only module)
from hstu.trainer.data.errors import DataError

# per-event arrays besides item_ids (optional ones may be None)
EVENT_FIELDS = ("item_ids", "timestamps", "ratings", "action_types")
KEPT_BEYOND_MAX_LEN = 2  # events kept per user = max_seq_len + 2 (the validation and test targets)


@dataclass
class UserSequences:
    """All users of one dataset, CSR layout.

    user_ids [U] int64 (sorted ascending), offsets [U+1] int64, item_ids [E] int64 in 1..num_items,
    timestamps [E] int64 (non-decreasing within a user), ratings [E] int8 | None,
    action_types [E] int8 | None (extension: synthetic action types), num_items = max item id.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray
    ratings: Optional[np.ndarray]
    num_items: int
    action_types: Optional[np.ndarray] = None

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_events(self) -> int:
        return int(self.item_ids.shape[0])

    def lengths(self) -> np.ndarray:
        """[U] int64 number of events per user."""
        return np.diff(self.offsets)

    def user(self, u: int) -> np.ndarray:
        """Item ids of the u-th user (row index, not user id)."""
        return self.item_ids[self.offsets[u] : self.offsets[u + 1]]

    def validate(self) -> None:
        """Raise DataError when the CSR invariants do not hold (used by tests and after cache loads)."""
        U, E = self.num_users, self.num_events
        if self.offsets.shape != (U + 1,) or self.offsets[0] != 0 or self.offsets[-1] != E:
            raise DataError(f"offsets must have shape [{U + 1}] and run 0..{E}")
        if np.any(np.diff(self.offsets) < 0):
            raise DataError("offsets must be non-decreasing")
        if U > 1 and np.any(np.diff(self.user_ids) <= 0):
            raise DataError("user_ids must be strictly increasing")
        for name in EVENT_FIELDS:
            arr = getattr(self, name)
            if arr is not None and arr.shape != (E,):
                raise DataError(f"{name} must have shape [{E}], got {arr.shape}")
        if E and (self.item_ids.min() < 1 or self.item_ids.max() > self.num_items):
            raise DataError(f"item_ids must lie in 1..{self.num_items}")
        if E > 1:
            same_user = np.ones(E - 1, dtype=bool)
            cross = self.offsets[1:-1] - 1  # pairs (cross, cross+1) straddle a user boundary
            same_user[cross[(cross >= 0) & (cross < E - 1)]] = False
            if np.any(np.diff(self.timestamps)[same_user] < 0):
                raise DataError("timestamps must be non-decreasing within each user")

    def to_arrays(self) -> Dict[str, np.ndarray]:
        """Flat dict of arrays (None fields left out) for .npz caching."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "num_items"}
        out = {k: v for k, v in out.items() if v is not None}
        out["num_items"] = np.asarray(self.num_items, dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray]) -> "UserSequences":
        get = lambda k: np.asarray(arrays[k]) if k in arrays else None  # noqa: E731
        return cls(
            user_ids=get("user_ids"),
            offsets=get("offsets"),
            item_ids=get("item_ids"),
            timestamps=get("timestamps"),
            ratings=get("ratings"),
            num_items=int(arrays["num_items"]),
            action_types=get("action_types"),
        )


@dataclass
class EvalSequences:
    """Leave-one-out eval view: ``history`` (CSR, one row per user) + the held-out last event.

    target_ids [U] int64, target_timestamps [U] int64.
    """

    history: UserSequences
    target_ids: np.ndarray
    target_timestamps: np.ndarray


def gather_ranges(starts: np.ndarray, ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Flat indices of the concatenated ranges [starts[i], ends[i]) and the new offsets [N+1] (vectorised)."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts.astype(np.int64) - offsets[:-1], lengths)
    return idx, offsets


def select_ranges(seqs: UserSequences, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> UserSequences:
    """Users ``rows`` (row indices) restricted to event ranges [starts, ends) (absolute event indices)."""
    idx, offsets = gather_ranges(starts, ends)
    take = lambda a: None if a is None else a[idx]  # noqa: E731
    return UserSequences(
        user_ids=seqs.user_ids[rows],
        offsets=offsets,
        item_ids=seqs.item_ids[idx],
        timestamps=seqs.timestamps[idx],
        ratings=take(seqs.ratings),
        num_items=seqs.num_items,
        action_types=take(seqs.action_types),
    )


def truncate(seqs: UserSequences, keep_last: int, min_seq_len: int) -> UserSequences:
    """Keep the last ``keep_last`` events of each user; drop users with fewer than ``min_seq_len`` events
    (counted before truncation)."""
    lengths = seqs.lengths()
    rows = np.flatnonzero(lengths >= min_seq_len)
    ends = seqs.offsets[rows + 1]
    starts = np.maximum(seqs.offsets[rows], ends - keep_last)
    return select_ranges(seqs, rows, starts, ends)


def tie_break_key(n: int, item: np.ndarray, tie_order: str, seed: int) -> Optional[np.ndarray]:
    """[N] secondary sort key for events with equal (user, timestamp), or None (= file order, the sort is stable).

    ``random``: a random permutation of 0..N-1 from ``seed`` (the order within a tie group is a uniform shuffle of
    it, the same for the same file and seed); ``file``: None; ``item_id``: the item ids."""
    if tie_order == "random":
        return np.random.default_rng([int(seed), 0x7E5]).permutation(n)
    if tie_order == "file":
        return None
    if tie_order == "item_id":
        return item
    raise DataError(f"data.tie_order = {tie_order!r} is not one of {list(TIE_ORDERS)}")


def build_user_sequences(
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    rating: Optional[np.ndarray] = None,
    max_seq_len: int = 200,
    min_seq_len: int = 3,
    *,
    num_items: Optional[int] = None,
    action_types: Optional[np.ndarray] = None,
    tie_order: str = "random",
    tie_seed: int = 0,
) -> UserSequences:
    """Flat events (all [N], in file order) -> UserSequences.

    Sorts by (user, timestamp) — a stable sort — with events of equal timestamp ordered by ``tie_order``
    (:func:`tie_break_key`; ``random`` is seeded by ``tie_seed``), keeps each user's last ``max_seq_len + 2``
    events (train window + validation + test target) and drops users with fewer than ``min_seq_len`` events.
    ``num_items`` defaults to the max item id in ``item`` (ids are kept as given; 0 is reserved and rejected).
    """
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.int64)
    n = user.shape[0]
    for name, arr in (("item", item), ("ts", ts), ("rating", rating), ("action_types", action_types)):
        if arr is not None and np.shape(arr) != (n,):
            raise DataError(f"build_user_sequences: '{name}' has shape {np.shape(arr)}, expected ({n},)")
    if n == 0:
        raise DataError("build_user_sequences: no events")
    if item.min() < 1:
        raise DataError(f"build_user_sequences: item ids must be >= 1 (0 is padding), got {int(item.min())}")
    tie = tie_break_key(n, item, tie_order, tie_seed)
    order = np.lexsort((ts, user) if tie is None else (tie, ts, user))
    u_sorted = user[order]
    boundaries = np.flatnonzero(u_sorted[1:] != u_sorted[:-1]) + 1
    offsets = np.concatenate([[0], boundaries, [n]]).astype(np.int64)
    full = UserSequences(
        user_ids=u_sorted[offsets[:-1]],
        offsets=offsets,
        item_ids=item[order],
        timestamps=ts[order],
        ratings=None if rating is None else np.asarray(rating)[order].astype(np.int8),
        num_items=int(num_items if num_items is not None else item.max()),
        action_types=None if action_types is None else np.asarray(action_types)[order].astype(np.int8),
    )
    return truncate(full, max_seq_len + KEPT_BEYOND_MAX_LEN, min_seq_len)


@dataclass
class LeaveOneOutSplit:
    """Train sequences + the validation and test eval views of the same users (row-aligned).

    Per user with events s[0..n-1] (n >= 3): train = s[..n-3] (last ``max_seq_len``; the loader skips rows with
    < 2 events, which have no train target); validation = (history s[..n-3], target s[n-2]); test = (history
    s[..n-2], target s[n-1]). ``train`` and ``validation.history`` are the same object (read-only)."""

    train: UserSequences
    validation: EvalSequences
    test: EvalSequences


def _eval_view(seqs: UserSequences, rows: np.ndarray, target: np.ndarray, max_seq_len: int) -> EvalSequences:
    starts = np.maximum(seqs.offsets[rows], target - max_seq_len)
    history = select_ranges(seqs, rows, starts, target)
    return EvalSequences(history=history, target_ids=seqs.item_ids[target].copy(),
                         target_timestamps=seqs.timestamps[target].copy())


def leave_one_out_split(seqs: UserSequences, max_seq_len: int) -> LeaveOneOutSplit:
    """Leave-one-out with a validation target (see :class:`LeaveOneOutSplit`). Users with fewer than 3 events
    (no history before the validation target) are dropped from all three views."""
    rows = np.flatnonzero(seqs.lengths() >= 3)
    last = seqs.offsets[rows + 1] - 1  # index of the test target; last - 1: the validation target
    validation = _eval_view(seqs, rows, last - 1, max_seq_len)
    return LeaveOneOutSplit(train=validation.history, validation=validation,
                            test=_eval_view(seqs, rows, last, max_seq_len))


def leave_one_out(seqs: UserSequences, max_seq_len: int) -> Tuple[UserSequences, EvalSequences]:
    """Test-only split (no validation target; the trainer uses :func:`leave_one_out_split`): train =
    s[0..n-2] (last ``max_seq_len``) and eval = (same history, target s[n-1], its timestamp). Users with fewer
    than 2 events are dropped from both views. The train view and the eval history are the same object."""
    rows = np.flatnonzero(seqs.lengths() >= 2)
    last = seqs.offsets[rows + 1] - 1  # index of the held-out target
    starts = np.maximum(seqs.offsets[rows], last - max_seq_len)
    history = select_ranges(seqs, rows, starts, last)
    eval_view = EvalSequences(
        history=history, target_ids=seqs.item_ids[last].copy(), target_timestamps=seqs.timestamps[last].copy()
    )
    return history, eval_view


def concat_sequences(parts: Sequence[UserSequences]) -> UserSequences:
    """Concatenate user chunks (user ids must keep increasing across chunks)."""
    if not parts:
        raise DataError("concat_sequences: nothing to concatenate")
    sizes = np.cumsum([0] + [p.num_events for p in parts[:-1]])
    offsets = [np.zeros(1, dtype=np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, sizes)]

    def cat(name: str) -> Optional[np.ndarray]:
        arrs: List[Optional[np.ndarray]] = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrs) else np.concatenate(arrs)

    return UserSequences(
        user_ids=np.concatenate([p.user_ids for p in parts]),
        offsets=np.concatenate(offsets),
        item_ids=cat("item_ids"),
        timestamps=cat("timestamps"),
        ratings=cat("ratings"),
        num_items=max(p.num_items for p in parts),
        action_types=cat("action_types"),
    )
