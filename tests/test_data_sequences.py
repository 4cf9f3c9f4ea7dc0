"""UserSequences construction (sort, tie-break, truncation, filtering) and the leave-one-out split."""

import numpy as np
import pytest

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.sequences import build_user_sequences, concat_sequences, leave_one_out, truncate


def _events():
    # user, item, ts, rating -- deliberately unsorted, with timestamp ties inside user 7
    rows = [
        (7, 30, 100, 1), (3, 5, 10, 5), (7, 20, 100, 2), (7, 40, 50, 3), (3, 6, 5, 4),
        (7, 10, 200, 4), (9, 1, 1, 1), (3, 8, 20, 3), (7, 25, 100, 5),
    ]
    u, i, t, r = (np.array(c) for c in zip(*rows))
    return u, i, t, r


def test_sort_by_timestamp_then_item_and_csr_layout():
    u, i, t, r = _events()
    s = build_user_sequences(u, i, t, r, max_seq_len=10, min_seq_len=1)
    s.validate()
    assert s.user_ids.tolist() == [3, 7, 9]
    assert s.offsets.tolist() == [0, 3, 8, 9]
    # user 7: ts 50 (40), then the three ts=100 events by item id 20, 25, 30, then ts 200 (10)
    assert s.user(1).tolist() == [40, 20, 25, 30, 10]
    assert s.timestamps[3:8].tolist() == [50, 100, 100, 100, 200]
    assert s.ratings[3:8].tolist() == [3, 2, 5, 1, 4]  # ratings travel with their events
    assert s.user(0).tolist() == [6, 5, 8]
    assert s.num_items == 40
    assert s.item_ids.dtype == np.int64 and s.ratings.dtype == np.int8


def test_tie_break_is_independent_of_input_order():
    u, i, t, r = _events()
    ref = build_user_sequences(u, i, t, r, max_seq_len=10, min_seq_len=1)
    perm = np.random.default_rng(0).permutation(len(u))
    got = build_user_sequences(u[perm], i[perm], t[perm], r[perm], max_seq_len=10, min_seq_len=1)
    for name in ("user_ids", "offsets", "item_ids", "timestamps", "ratings"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))


def test_truncation_keeps_last_max_plus_one_and_min_len_drops_users():
    u, i, t, r = _events()
    s = build_user_sequences(u, i, t, r, max_seq_len=2, min_seq_len=2)
    assert s.user_ids.tolist() == [3, 7]  # user 9 has a single event
    assert s.user(0).tolist() == [6, 5, 8]  # 3 = max_seq_len + 1 events kept
    assert s.user(1).tolist() == [25, 30, 10]  # the last 3 of [40, 20, 25, 30, 10]
    # min_seq_len counts events before truncation
    s4 = build_user_sequences(u, i, t, r, max_seq_len=1, min_seq_len=4)
    assert s4.user_ids.tolist() == [7] and s4.user(0).tolist() == [30, 10]


def test_num_items_override_and_bad_input():
    u, i, t, r = _events()
    assert build_user_sequences(u, i, t, None, 10, 1, num_items=100).num_items == 100
    assert build_user_sequences(u, i, t, None, 10, 1).ratings is None
    with pytest.raises(DataError, match="item ids must be >= 1"):
        build_user_sequences(u, np.where(i == 1, 0, i), t, None, 10, 1)
    with pytest.raises(DataError, match="shape"):
        build_user_sequences(u, i[:-1], t, None, 10, 1)
    with pytest.raises(DataError, match="no events"):
        build_user_sequences(u[:0], i[:0], t[:0], None, 10, 1)


def test_leave_one_out_hand_computed():
    u, i, t, r = _events()
    s = build_user_sequences(u, i, t, r, max_seq_len=10, min_seq_len=1)
    train, ev = leave_one_out(s, max_seq_len=3)
    # user 3: [6,5,8] -> history [6,5], target 8 @ ts 20
    # user 7: [40,20,25,30,10] -> history = last 3 of [40,20,25,30] = [20,25,30], target 10 @ ts 200
    # user 9: single event -> dropped
    assert train.user_ids.tolist() == [3, 7]
    assert train.offsets.tolist() == [0, 2, 5]
    assert train.item_ids.tolist() == [6, 5, 20, 25, 30]
    assert train.timestamps.tolist() == [5, 10, 100, 100, 100]
    assert train.ratings.tolist() == [4, 5, 2, 5, 1]
    assert ev.history is train
    assert ev.target_ids.tolist() == [8, 10]
    assert ev.target_timestamps.tolist() == [20, 200]
    # the last train target (label of the second-to-last history position) is the second-to-last item
    assert train.user(1)[-1] == 30


def test_truncate_and_concat_roundtrip():
    u, i, t, r = _events()
    s = build_user_sequences(u, i, t, r, max_seq_len=10, min_seq_len=1)
    last2 = truncate(s, keep_last=2, min_seq_len=1)
    assert [last2.user(k).tolist() for k in range(3)] == [[5, 8], [30, 10], [1]]
    head = build_user_sequences(u[u < 8], i[u < 8], t[u < 8], r[u < 8], 10, 1)
    tail = build_user_sequences(u[u >= 8], i[u >= 8], t[u >= 8], r[u >= 8], 10, 1)
    cat = concat_sequences([head, tail])
    for name in ("user_ids", "offsets", "item_ids", "timestamps", "ratings"):
        np.testing.assert_array_equal(getattr(cat, name), getattr(s, name))


def test_validate_catches_broken_invariants():
    u, i, t, r = _events()
    s = build_user_sequences(u, i, t, r, max_seq_len=10, min_seq_len=1)
    s.timestamps = s.timestamps.copy()
    s.timestamps[4] = 0  # goes back in time inside user 7
    with pytest.raises(DataError, match="non-decreasing"):
        s.validate()
