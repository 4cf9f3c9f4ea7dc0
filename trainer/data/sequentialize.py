"""Feature sequentialization (hstu-spec.md, docs/ranking.md): every categorical feature of a user becomes part of
ONE time-ordered token sequence.

- **main series**: the user's interactions (item, action), one (item, action) token pair per event;
- **slowly changing categorical series** (e.g. followed creators, region): recorded as snapshots (often one per
  event), compressed to the earliest entry of each run of equal consecutive values, then merged into the main
  series by timestamp. A side token is placed before the first main event whose timestamp is >= its own (ties:
  side before main — the state at an impression is known when the impression is served);
- **contextual (user-level) features** (demographics): one prefix token each, visible to every position;
- **dense (numerical) features**: dropped (they are aggregates of the categorical ones the model sees).

Vectorised CSR form (what the data pipeline stores): :class:`SideTokens`. Reference form (one user, plain Python,
used by the docs' worked example and by tests to check the vectorised path): :func:`sequentialize_user`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from hstu.trainer.data.errors import DataError

Token = Tuple[str, int, Optional[int]]  # (kind, value, timestamp | None); kind: "ctx:<name>", "item", "action", name


def _check_csr(name: str, offsets: np.ndarray, n: int) -> None:
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
        raise DataError(f"sequentialize: '{name}' offsets must be non-decreasing from 0 to {n}")


def run_starts(offsets: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bool [S]: True at the earliest entry of each run of equal consecutive values within each user.

    offsets [U+1] int64 (CSR over users), values [S] int64 (a user's snapshots in time order)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    values = np.asarray(values)
    _check_csr("series", offsets, values.shape[0])
    keep = np.ones(values.shape[0], dtype=bool)
    if values.shape[0] > 1:
        keep[1:] = values[1:] != values[:-1]
    firsts = offsets[:-1][np.diff(offsets) > 0]
    keep[firsts] = True  # a user's first snapshot always starts a run
    return keep


@dataclass
class SideTokens:
    """Compressed slowly changing series of all users, CSR (tokens of user u are [offsets[u], offsets[u+1])).

    names: series names (feature index f -> names[f]); feature [S] int64; values [S] int64 (>= 1, 0 = padding);
    timestamps [S] int64; insert_at [S] int64: index k (0..n_u, within the user's main events) of the main event
    the token precedes (n_u = after the last event). Within a user, tokens are sorted by (insert_at, timestamp,
    feature)."""

    names: Tuple[str, ...]
    offsets: np.ndarray
    feature: np.ndarray
    values: np.ndarray
    timestamps: np.ndarray
    insert_at: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.values.shape[0])

    def select_users(self, rows: np.ndarray) -> "SideTokens":
        """Users ``rows`` (row indices), in that order."""
        from hstu.trainer.data.sequences import gather_ranges

        rows = np.asarray(rows, dtype=np.int64)
        idx, offsets = gather_ranges(self.offsets[rows], self.offsets[rows + 1])
        return SideTokens(self.names, offsets, self.feature[idx], self.values[idx], self.timestamps[idx],
                          self.insert_at[idx])


def sequentialize_series(
    main_offsets: np.ndarray,
    main_timestamps: np.ndarray,
    series: Mapping[str, Tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> SideTokens:
    """Compress and merge slowly changing series into the main series' time line (vectorised).

    Args:
        main_offsets [U+1], main_timestamps [E] (non-decreasing within each user): the main series.
        series: name -> (offsets [U+1], values [S] int64 >= 1, timestamps [S] int64), snapshots per user in time
            order, CSR over the same users as the main series.
    Returns: :class:`SideTokens` (run starts only; ``insert_at`` = number of the user's main events with
    timestamp < the token's, so ties put the side token first).
    """
    main_offsets = np.asarray(main_offsets, dtype=np.int64)
    main_ts = np.asarray(main_timestamps, dtype=np.int64)
    _check_csr("main", main_offsets, main_ts.shape[0])
    U = main_offsets.size - 1
    names = tuple(series)
    parts = []  # (user row, feature, value, ts)
    for f, name in enumerate(names):
        offsets, values, ts = (np.asarray(a, dtype=np.int64) for a in series[name])
        if offsets.shape != (U + 1,):
            raise DataError(f"sequentialize: series '{name}' has {offsets.size - 1} users, main has {U}")
        if values.shape != ts.shape or values.shape != (int(offsets[-1]),):
            raise DataError(f"sequentialize: series '{name}' values/timestamps must have shape [{int(offsets[-1])}]")
        if values.size and values.min() < 1:
            raise DataError(f"sequentialize: series '{name}' values must be >= 1 (0 is padding)")
        keep = run_starts(offsets, values)
        users = np.repeat(np.arange(U, dtype=np.int64), np.diff(offsets))
        parts.append((users[keep], np.full(int(keep.sum()), f, dtype=np.int64), values[keep], ts[keep]))
    if parts:
        user, feature, value, ts = (np.concatenate([p[i] for p in parts]) for i in range(4))
    else:
        user = feature = value = ts = np.zeros(0, dtype=np.int64)
    # insert_at: main events of the same user strictly earlier than the token (global searchsorted on a
    # (user, time) key: user-major, so equal times of different users never mix)
    main_user = np.repeat(np.arange(U, dtype=np.int64), np.diff(main_offsets))
    main_key = np.stack([main_user, main_ts], 1)
    pos = _searchsorted_pairs(main_key, np.stack([user, ts], 1))
    insert_at = pos - main_offsets[user] if user.size else pos
    order = np.lexsort((feature, ts, insert_at, user))
    user, feature, value, ts, insert_at = user[order], feature[order], value[order], ts[order], insert_at[order]
    offsets = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=U), out=offsets[1:])
    return SideTokens(names, offsets, feature, value, ts, insert_at.astype(np.int64))


def _searchsorted_pairs(sorted_pairs: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Left insertion points of (a, b) pairs [Q, 2] into lexicographically sorted pairs [N, 2] (one lexsort:
    queries sort before equal pairs, so the number of pairs ahead of a query is its insertion point)."""
    n, q = sorted_pairs.shape[0], queries.shape[0]
    if q == 0:
        return np.zeros(0, dtype=np.int64)
    a = np.concatenate([sorted_pairs[:, 0], queries[:, 0]])
    b = np.concatenate([sorted_pairs[:, 1], queries[:, 1]])
    is_main = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(q, dtype=np.int64)])
    order = np.lexsort((is_main, b, a))
    mains_before = np.cumsum(is_main[order]) - is_main[order]
    out = np.empty(q, dtype=np.int64)
    qsel = order >= n
    out[order[qsel] - n] = mains_before[qsel]
    return out


def window_side_tokens(side: SideTokens, starts: np.ndarray, ends: np.ndarray, max_tokens: int
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Side tokens of main-event windows [starts[b], ends[b]) (indices within each user's events; ``side`` holds
    exactly the B users of the windows, in order).

    Kept: tokens with starts < insert_at < ends, plus, per feature, the latest token with insert_at <= starts
    (the state in force when the window opens; placed at the window start). At most ``max_tokens`` per user
    (the oldest dropped). Returns (token indices into ``side`` [M], window-relative insert points [M] in
    0..n_b-1, offsets [B+1]); tokens stay in time order within each user."""
    B = side.offsets.size - 1
    seq = np.repeat(np.arange(B, dtype=np.int64), np.diff(side.offsets))
    s, e = np.asarray(starts, dtype=np.int64)[seq], np.asarray(ends, dtype=np.int64)[seq]
    inside = (side.insert_at > s) & (side.insert_at < e)
    before = side.insert_at <= s
    carried = np.zeros_like(inside)
    if before.any():
        F = max(1, len(side.names))
        idx = np.flatnonzero(before)
        key = seq[idx] * F + side.feature[idx]
        # within a user tokens are time-ordered, so the last index of each (user, feature) key is the latest
        order = np.lexsort((idx, key))
        last = np.ones(order.size, dtype=bool)
        last[:-1] = key[order][1:] != key[order][:-1]
        carried[idx[order][last]] = True
    keep = np.flatnonzero(inside | carried)
    rel = np.where(carried[keep], 0, side.insert_at[keep] - s[keep])
    kseq = seq[keep]
    if max_tokens >= 0 and keep.size:
        counts = np.bincount(kseq, minlength=B)
        ends_k = np.cumsum(counts)
        from_end = ends_k[kseq] - np.arange(keep.size)  # 1 = newest token of its user
        sel = from_end <= max_tokens
        keep, rel, kseq = keep[sel], rel[sel], kseq[sel]
    order = np.lexsort((keep, rel, kseq))  # carried tokens (rel 0) first; then time order
    keep, rel, kseq = keep[order], rel[order], kseq[order]
    offsets = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(np.bincount(kseq, minlength=B), out=offsets[1:])
    return keep, rel, offsets


def sequentialize_user(
    main: Sequence[Tuple[int, int, int]],
    slow: Optional[Mapping[str, Sequence[Tuple[int, int]]]] = None,
    contextual: Optional[Mapping[str, int]] = None,
    dense: Optional[Mapping[str, object]] = None,
) -> List[Token]:
    """Reference sequentialization of ONE user (plain Python; the docs' worked example).

    main: [(timestamp, item, action)] in time order; slow: name -> [(timestamp, value)] snapshots in time order;
    contextual: name -> value; dense: ignored (dropped by design). Returns the token list:
    ``("ctx:<name>", value, None)`` prefix tokens (in the given order), then side tokens ``(name, value, ts)``
    and ``("item", item, ts), ("action", action, ts)`` pairs in time order (side before main on equal times;
    side features in the given order on equal times)."""
    del dense  # numerical features are dropped: they aggregate the categorical ones
    tokens: List[Token] = [(f"ctx:{k}", int(v), None) for k, v in (contextual or {}).items()]
    merged = []  # (ts, rank, feature order, seq, token)
    for f, (name, snaps) in enumerate((slow or {}).items()):
        prev = None
        for i, (ts, value) in enumerate(snaps):
            if value != prev:
                merged.append((int(ts), 0, f, i, (name, int(value), int(ts))))
            prev = value
    for i, (ts, item, action) in enumerate(main):
        merged.append((int(ts), 1, 0, 2 * i, ("item", int(item), int(ts))))
        merged.append((int(ts), 1, 0, 2 * i + 1, ("action", int(action), int(ts))))
    merged.sort(key=lambda m: m[:4])
    return tokens + [m[4] for m in merged]


def contextual_matrix(user_ids: np.ndarray, features: Mapping[str, Dict[int, int]]) -> np.ndarray:
    """[U, C] int64 contextual ids of ``user_ids`` (0 = unknown user) from name -> {user id: value id >= 1}."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    out = np.zeros((user_ids.size, len(features)), dtype=np.int64)
    for c, table in enumerate(features.values()):
        out[:, c] = [table.get(int(u), 0) for u in user_ids.tolist()]
    return out
