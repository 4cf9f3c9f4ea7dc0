"""UserSequences construction (sort, tie order, truncation, filtering) and the leave-one-out splits."""

import numpy as np
import pytest

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.sequences import (build_user_sequences, concat_sequences, leave_one_out, leave_one_out_split,
                                        truncate)


def _events():
    # user, item, ts, rating -- deliberately unsorted, with timestamp ties inside user 7
    rows = [
        (7, 30, 100, 1), (3, 5, 10, 5), (7, 20, 100, 2), (7, 40, 50, 3), (3, 6, 5, 4),
        (7, 10, 200, 4), (9, 1, 1, 1), (3, 8, 20, 3), (7, 25, 100, 5),
    ]
    u, i, t, r = (np.array(c) for c in zip(*rows))
    return u, i, t, r


def _build(*args, **kw):
    """build_user_sequences with the item-id tie order (the order the hand-computed expectations below use)."""
    return build_user_sequences(*args, tie_order="item_id", **kw)


def test_sort_by_timestamp_then_item_and_csr_layout():
    u, i, t, r = _events()
    s = _build(u, i, t, r, max_seq_len=10, min_seq_len=1)
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


def test_item_id_tie_order_is_independent_of_input_order():
    u, i, t, r = _events()
    ref = _build(u, i, t, r, max_seq_len=10, min_seq_len=1)
    perm = np.random.default_rng(0).permutation(len(u))
    got = _build(u[perm], i[perm], t[perm], r[perm], max_seq_len=10, min_seq_len=1)
    for name in ("user_ids", "offsets", "item_ids", "timestamps", "ratings"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))


def test_truncation_keeps_last_max_plus_two_and_min_len_drops_users():
    u, i, t, r = _events()
    s = _build(u, i, t, r, max_seq_len=1, min_seq_len=2)
    assert s.user_ids.tolist() == [3, 7]  # user 9 has a single event
    assert s.user(0).tolist() == [6, 5, 8]  # 3 = max_seq_len + 2 events kept (train window + valid + test)
    assert s.user(1).tolist() == [25, 30, 10]  # the last 3 of [40, 20, 25, 30, 10]
    # min_seq_len counts events before truncation
    s4 = _build(u, i, t, r, max_seq_len=0, min_seq_len=4)
    assert s4.user_ids.tolist() == [7] and s4.user(0).tolist() == [30, 10]


def test_num_items_override_and_bad_input():
    u, i, t, r = _events()
    assert _build(u, i, t, None, 10, 1, num_items=100).num_items == 100
    assert _build(u, i, t, None, 10, 1).ratings is None
    with pytest.raises(DataError, match="item ids must be >= 1"):
        _build(u, np.where(i == 1, 0, i), t, None, 10, 1)
    with pytest.raises(DataError, match="shape"):
        _build(u, i[:-1], t, None, 10, 1)
    with pytest.raises(DataError, match="no events"):
        _build(u[:0], i[:0], t[:0], None, 10, 1)


def test_leave_one_out_hand_computed():
    u, i, t, r = _events()
    s = _build(u, i, t, r, max_seq_len=10, min_seq_len=1)
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
    s = _build(u, i, t, r, max_seq_len=10, min_seq_len=1)
    last2 = truncate(s, keep_last=2, min_seq_len=1)
    assert [last2.user(k).tolist() for k in range(3)] == [[5, 8], [30, 10], [1]]
    head = _build(u[u < 8], i[u < 8], t[u < 8], r[u < 8], 10, 1)
    tail = _build(u[u >= 8], i[u >= 8], t[u >= 8], r[u >= 8], 10, 1)
    cat = concat_sequences([head, tail])
    for name in ("user_ids", "offsets", "item_ids", "timestamps", "ratings"):
        np.testing.assert_array_equal(getattr(cat, name), getattr(s, name))


def test_validate_catches_broken_invariants():
    u, i, t, r = _events()
    s = _build(u, i, t, r, max_seq_len=10, min_seq_len=1)
    s.timestamps = s.timestamps.copy()
    s.timestamps[4] = 0  # goes back in time inside user 7
    with pytest.raises(DataError, match="non-decreasing"):
        s.validate()


# ------------------------------------------------------------------------------------------------ tie orders


def _ties():
    # user 1 lists five same-second events (ts 100) in file order 50, 10, 40, 20, 30, between an earlier (ts 5)
    # and a later (ts 900) event; user 2 has two same-second events listed 9, 3
    rows = [(1, 50, 100), (2, 9, 7), (1, 10, 100), (1, 7, 5), (1, 40, 100), (2, 3, 7), (1, 20, 100), (1, 30, 100),
            (1, 60, 900)]
    return tuple(np.array(c) for c in zip(*rows))


def test_tie_order_file_keeps_the_source_order():
    u, i, t = _ties()
    s = build_user_sequences(u, i, t, max_seq_len=10, min_seq_len=1, tie_order="file")
    assert s.user(0).tolist() == [7, 50, 10, 40, 20, 30, 60] and s.user(1).tolist() == [9, 3]


def test_tie_order_item_id_sorts_ties_by_id():
    u, i, t = _ties()
    s = build_user_sequences(u, i, t, max_seq_len=10, min_seq_len=1, tie_order="item_id")
    assert s.user(0).tolist() == [7, 10, 20, 30, 40, 50, 60] and s.user(1).tolist() == [3, 9]


def test_tie_order_random_is_a_seeded_shuffle_within_ties():
    u, i, t = _ties()
    orders = {}
    for seed in range(40):
        s = build_user_sequences(u, i, t, max_seq_len=10, min_seq_len=1, tie_order="random", tie_seed=seed)
        again = build_user_sequences(u, i, t, max_seq_len=10, min_seq_len=1, tie_order="random", tie_seed=seed)
        np.testing.assert_array_equal(s.item_ids, again.item_ids)  # deterministic per seed
        row = s.user(0).tolist()
        assert row[0] == 7 and row[-1] == 60 and sorted(row[1:6]) == [10, 20, 30, 40, 50]  # only ties move
        assert s.timestamps[s.offsets[0]:s.offsets[1]].tolist() == [5] + [100] * 5 + [900]
        orders[seed] = tuple(row[1:6])
    # another seed gives another order (5! = 120 orders: 40 seeds give many), and neither fixed order dominates
    assert len(set(orders.values())) >= 20
    assert orders[0] != orders[1]
    ascending = sum(o == (10, 20, 30, 40, 50) for o in orders.values())
    as_listed = sum(o == (50, 10, 40, 20, 30) for o in orders.values())
    assert ascending <= 3 and as_listed <= 3


def test_tie_order_rejects_unknown_names():
    u, i, t = _ties()
    with pytest.raises(DataError, match="tie_order"):
        build_user_sequences(u, i, t, max_seq_len=10, min_seq_len=1, tie_order="timestamp")


# ------------------------------------------------------------------------------------------------ validation split


def test_leave_one_out_split_hand_computed():
    u, i, t, r = _events()
    s = _build(u, i, t, r, max_seq_len=10, min_seq_len=1)
    split = leave_one_out_split(s, max_seq_len=2)
    # user 3: [6,5,8] -> train [6], validation (history [6], target 5), test (history [6,5], target 8)
    # user 7: [40,20,25,30,10] -> train = last 2 of [40,20,25] = [20,25]; validation target 30; test: last 2 of
    #         [40,20,25,30] = [25,30], target 10.  user 9 (1 event) is dropped.
    assert split.train.user_ids.tolist() == [3, 7] and split.train.offsets.tolist() == [0, 1, 3]
    assert split.train.item_ids.tolist() == [6, 20, 25]
    assert split.validation.history is split.train
    assert split.validation.target_ids.tolist() == [5, 30] and split.validation.target_timestamps.tolist() == [10, 100]
    assert split.test.history.item_ids.tolist() == [6, 5, 25, 30] and split.test.history.offsets.tolist() == [0, 2, 4]
    assert split.test.target_ids.tolist() == [8, 10] and split.test.target_timestamps.tolist() == [20, 200]


def _train_targets(train):
    """{user id: the items the train sequences are trained to predict (every item after the first)}."""
    return {int(uid): set(train.user(k)[1:].tolist()) for k, uid in enumerate(train.user_ids)}


def test_validation_and_test_items_never_train_targets_synthetic():
    from hstu.trainer.config import SyntheticConfig
    from hstu.trainer.data.synthetic import generate

    seqs = generate(SyntheticConfig(num_users=300, num_items=60, num_interests=4, min_seq_len=3, max_seq_len=30))
    split = leave_one_out_split(seqs, max_seq_len=8)
    assert split.train.num_users == seqs.num_users == split.test.history.num_users
    targets = _train_targets(split.train)
    for k, uid in enumerate(split.train.user_ids):
        full = seqs.user(k)
        # the train sequence is the events strictly before the validation event (positions, not only ids)
        assert split.train.user(k).tolist() == full[:-2][-8:].tolist()
        assert split.validation.target_ids[k] == full[-2] and split.test.target_ids[k] == full[-1]
        assert split.test.history.user(k).tolist() == full[:-1][-8:].tolist()
        # item ids repeat in synthetic data: an id may legitimately be an earlier train target too; what must
        # never happen is that the held-out *events* are trained on -> compare event timestamps
        ts = seqs.timestamps[seqs.offsets[k]:seqs.offsets[k + 1]]
        train_ts = split.train.timestamps[split.train.offsets[k]:split.train.offsets[k + 1]]
        assert train_ts.max() < ts[-2] < ts[-1]  # synthetic timestamps strictly increase
        if len(set(full.tolist())) == len(full):
            assert full[-2] not in targets[int(uid)] and full[-1] not in targets[int(uid)]


def test_validation_and_test_items_never_train_targets_ml1m_shaped():
    # ML-1M shape: every user rates each movie at most once, >= 20 ratings, many same-second ratings
    rng = np.random.default_rng(5)
    users, items, stamps = [], [], []
    for uid in range(1, 121):
        n = int(rng.integers(20, 60))
        items.append(rng.choice(np.arange(1, 400), size=n, replace=False))
        stamps.append(np.sort(rng.integers(0, n // 3 + 1, size=n)) * 60)  # ~3 events per timestamp
        users.append(np.full(n, uid))
    u, i, t = (np.concatenate(x) for x in (users, items, stamps))
    for tie_order in ("random", "file", "item_id"):
        s = build_user_sequences(u, i, t, max_seq_len=15, min_seq_len=4, tie_order=tie_order, tie_seed=3)
        split = leave_one_out_split(s, max_seq_len=15)
        targets = _train_targets(split.train)
        assert len(targets) == 120
        for k, uid in enumerate(split.train.user_ids):
            assert split.validation.target_ids[k] not in targets[int(uid)]
            assert split.test.target_ids[k] not in targets[int(uid)]
            assert split.validation.target_ids[k] not in split.train.user(k)  # not even as an input
            assert split.test.target_ids[k] not in split.test.history.user(k)
