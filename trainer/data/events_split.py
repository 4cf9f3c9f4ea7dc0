"""Own event logs: the splits of a prepared shard and reading shards back (docs/data.md "Split options").

``leave_one_out`` (as for the built-in datasets, trainer/data/sequences.py): the last event of a user is the test
target, the second-to-last the validation target, training sequences end before it.

``time`` (global cutoff T, ``data.events.time_cutoff``): a shard keeps, per user, the last ``max_seq_len + 1``
events before T and the first event at/after T (``num_pre`` [U] = how many are before T). Test target = the
first event >= T (users that have one), history = the events before T; validation target = the last event before
T; training sequences end before it. Nothing at/after T is ever trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from hstu.trainer.data.download import sha256_file
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.sequences import (KEPT_BEYOND_MAX_LEN, LeaveOneOutSplit, UserSequences, _eval_view,
                                         leave_one_out_split, select_ranges)


def event_window(full: UserSequences, max_seq_len: int, min_seq_len: int, cutoff: Optional[int], after: int = 1
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The events a shard keeps -> (rows, first, end, num_pre): users ``rows`` with >= min_seq_len events keep
    events [first, end) (absolute indices). leave_one_out (``cutoff`` None): the last max_seq_len + 2 events
    (as sequences.truncate), num_pre None. time: users with >= 1 event before ``cutoff`` keep their last
    max_seq_len + 1 events before it + the first ``after`` at/after it (task=ranking: its test candidates);
    num_pre [U] int32 = how many are before it."""
    lengths = full.lengths()
    if cutoff is None:
        rows = np.flatnonzero(lengths >= min_seq_len)
        end = full.offsets[rows + 1]
        return rows, np.maximum(full.offsets[rows], end - (max_seq_len + KEPT_BEYOND_MAX_LEN)), end, None
    before = np.zeros(full.num_events + 1, dtype=np.int64)
    np.cumsum(full.timestamps < cutoff, out=before[1:])
    pre = before[full.offsets[1:]] - before[full.offsets[:-1]]  # events before the cutoff, per user
    rows = np.flatnonzero((lengths >= min_seq_len) & (pre >= 1))
    start, pre_end = full.offsets[rows], full.offsets[rows] + pre[rows]
    first = np.maximum(start, pre_end - (max_seq_len + 1))
    end = np.minimum(full.offsets[rows + 1], pre_end + after)
    return rows, first, end, (pre_end - first).astype(np.int32)


def time_split(seqs: UserSequences, num_pre: np.ndarray, max_seq_len: int) -> LeaveOneOutSplit:
    """The ``time`` split of a windowed shard (see the module docstring); views are row subsets of ``seqs``."""
    num_pre = num_pre.astype(np.int64)
    pre_end = seqs.offsets[:-1] + num_pre
    val_rows = np.flatnonzero(num_pre >= 2)
    validation = _eval_view(seqs, val_rows, pre_end[val_rows] - 1, max_seq_len)
    test_rows = np.flatnonzero(seqs.lengths() > num_pre)
    return LeaveOneOutSplit(train=validation.history, validation=validation,
                            test=_eval_view(seqs, test_rows, pre_end[test_rows], max_seq_len))


def split_shard(seqs: UserSequences, num_pre: Optional[np.ndarray], max_seq_len: int) -> LeaveOneOutSplit:
    """leave_one_out (num_pre None) or time split of one shard (or of all shards concatenated)."""
    return leave_one_out_split(seqs, max_seq_len) if num_pre is None else time_split(seqs, num_pre, max_seq_len)


def train_view(seqs: UserSequences, num_pre: Optional[np.ndarray], max_seq_len: int) -> UserSequences:
    """Only the training sequences of :func:`split_shard` (what the streaming loader needs of a shard): each
    user's last ``max_seq_len`` events before the validation target."""
    if num_pre is None:
        rows = np.flatnonzero(seqs.lengths() >= 3)
        target = seqs.offsets[rows + 1] - 2
    else:
        rows = np.flatnonzero(num_pre >= 2)
        target = seqs.offsets[rows] + num_pre[rows].astype(np.int64) - 1
    return select_ranges(seqs, rows, np.maximum(seqs.offsets[rows], target - max_seq_len), target)


def load_shard(folder: "str | Path", record: Dict[str, Any], verify: bool = False
               ) -> Tuple[UserSequences, Optional[np.ndarray]]:
    """One shard of a prepared dataset -> (sequences, num_pre or None); ``verify``: check its sha256 first."""
    path = Path(folder) / record["file"]
    if not path.is_file():
        raise DataError("shard of the prepared dataset is missing (run `hstu prepare` again)", path=str(path))
    if verify and sha256_file(path) != record["sha256"]:
        raise DataError("shard checksum differs from manifest.json (damaged; delete the folder and prepare "
                        "again)", path=str(path))
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    num_pre = arrays.pop("num_pre", None)
    return UserSequences.from_arrays(arrays), num_pre


def sort_by_user(seqs: UserSequences, num_pre: Optional[np.ndarray]) -> Tuple[UserSequences, Optional[np.ndarray]]:
    """Rows in ascending user id (shards hold users uid % num_shards; concatenated they interleave)."""
    order = np.argsort(seqs.user_ids, kind="stable")
    if np.array_equal(order, np.arange(order.size)):
        return seqs, num_pre
    out = select_ranges(seqs, order, seqs.offsets[order], seqs.offsets[order + 1])
    return out, None if num_pre is None else num_pre[order]
