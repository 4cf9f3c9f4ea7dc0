"""Feature sequentialization (trainer/data/sequentialize.py) on hand-made series, and the token layout of ranking
batches (trainer/data/ranking_batch.py) checked against the plain-Python reference."""

import numpy as np
import pytest

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.ranking import RankingData, chronological_split
from hstu.trainer.data.ranking_batch import KIND_ACTION, KIND_CONTEXT, KIND_ITEM, KIND_SIDE, build_ranking_batch
from hstu.trainer.data.sequentialize import (contextual_matrix, run_starts, sequentialize_series, sequentialize_user,
                                             window_side_tokens)


def test_run_starts_keeps_earliest_entry_of_each_run_per_user():
    offsets = np.array([0, 5, 8, 8, 9])
    values = np.array([3, 3, 4, 4, 3, 3, 7, 7, 5])  # user 1 starts with 3 like user 0 ends: still a new run
    assert run_starts(offsets, values).tolist() == [True, False, True, False, True, True, True, False, True]
    with pytest.raises(DataError, match="offsets"):
        run_starts(np.array([0, 4]), values)


def test_worked_example_of_docs():
    """docs/ranking.md, 'Worked example' (keep both in sync)."""
    tokens = sequentialize_user(
        main=[(100, 11, 5), (200, 12, 3), (300, 13, 4), (400, 14, 1)],
        slow={"creator": [(90, 7), (100, 7), (200, 7), (250, 8), (300, 8), (400, 7)],
              "region": [(100, 2), (200, 2), (300, 2), (400, 2)]},
        contextual={"gender": 2, "age": 3},
        dense={"watch_seconds": [12.0, 3.5, 60.0, 0.0]},
    )
    assert tokens == [
        ("ctx:gender", 2, None), ("ctx:age", 3, None),
        ("creator", 7, 90),
        ("region", 2, 100), ("item", 11, 100), ("action", 5, 100),
        ("item", 12, 200), ("action", 3, 200),
        ("creator", 8, 250),
        ("item", 13, 300), ("action", 4, 300),
        ("creator", 7, 400), ("item", 14, 400), ("action", 1, 400),
    ]


def test_vectorised_series_match_reference():
    main_off = np.array([0, 4, 6])
    main_ts = np.array([100, 200, 300, 400, 50, 60])
    creator = (np.array([0, 6, 8]), np.array([7, 7, 7, 8, 8, 7, 1, 2]), np.array([90, 100, 200, 250, 300, 400, 10, 60]))
    region = (np.array([0, 4, 6]), np.array([2, 2, 2, 2, 3, 3]), np.array([100, 200, 300, 400, 50, 60]))
    side = sequentialize_series(main_off, main_ts, {"creator": creator, "region": region})
    assert side.names == ("creator", "region") and side.offsets.tolist() == [0, 4, 7]
    got = list(zip(side.feature.tolist(), side.values.tolist(), side.timestamps.tolist(), side.insert_at.tolist()))
    # user 0: creator 7@90 (before event 0), region 2@100 (tie with event 0: side first), creator 8@250 (before
    # event 2), creator 7@400 (before event 3); user 1: region 3@50, creator 1@10, creator 2@60 (tie -> before 1)
    assert got == [(0, 7, 90, 0), (1, 2, 100, 0), (0, 8, 250, 2), (0, 7, 400, 3),
                   (0, 1, 10, 0), (1, 3, 50, 0), (0, 2, 60, 1)]
    with pytest.raises(DataError, match=">= 1"):
        sequentialize_series(main_off, main_ts, {"bad": (np.array([0, 1, 1]), np.array([0]), np.array([5]))})


def test_window_carries_state_at_window_start_and_caps_tokens():
    side = sequentialize_series(np.array([0, 6]), np.arange(6) * 10 + 10,
                                {"f": (np.array([0, 4]), np.array([1, 2, 3, 4]), np.array([0, 15, 25, 45])),
                                 "g": (np.array([0, 1]), np.array([9]), np.array([0]))})
    # insert_at: f1 -> 0, f2 -> 1, f3 -> 2, f4 -> 4; g9 -> 0
    keep, rel, off = window_side_tokens(side, np.array([2]), np.array([6]), max_tokens=10)
    picked = [(side.feature[k], side.values[k]) for k in keep]
    # window starts at event 2: f3 (insert_at 2 == start) and g9 (earlier) carried to rel 0; f4 inside (rel 2)
    assert picked == [(1, 9), (0, 3), (0, 4)]
    assert rel.tolist() == [0, 0, 2] and off.tolist() == [0, 3]
    keep, rel, off = window_side_tokens(side, np.array([2]), np.array([6]), max_tokens=1)
    assert side.values[keep].tolist() == [4] and off.tolist() == [0, 1]


def test_contextual_matrix_unknown_users_get_zero():
    m = contextual_matrix(np.array([1, 2, 9]), {"a": {1: 3, 2: 1}, "b": {2: 5}})
    assert m.tolist() == [[3, 0], [1, 5], [0, 0]]


def _tiny_data():
    """Two users with side tokens and 2 contextual features."""
    offsets = np.array([0, 5, 8])
    ts = np.array([100, 200, 300, 400, 500, 10, 20, 30])
    items = np.array([11, 12, 13, 14, 15, 21, 22, 23])
    actions = np.array([1, 2, 3, 4, 5, 2, 2, 1])
    side = sequentialize_series(offsets, ts, {"creator": (np.array([0, 3, 4]), np.array([7, 8, 9, 4]),
                                                          np.array([90, 250, 450, 15]))})
    return RankingData(
        user_ids=np.array([1, 2]), offsets=offsets, item_ids=items, timestamps=ts, actions=actions,
        labels=np.stack([actions >= 4, actions == 5], 1).astype(np.float32), task_names=("like", "love"),
        num_items=30, num_actions=5, context=np.array([[1, 2], [2, 3]]), context_names=("g", "a"),
        context_vocab=(3, 4), side=side, side_vocab=(10,))


def _reference_tokens(d, u, start, end):
    o = d.offsets[u]
    main = [(d.timestamps[o + k], d.item_ids[o + k], d.actions[o + k]) for k in range(start, end)]
    s0, s1 = d.side.offsets[u], d.side.offsets[u + 1]
    slow = {"creator": [(d.side.timestamps[j], d.side.values[j]) for j in range(s0, s1)]}
    return sequentialize_user(main, slow, {"g": d.context[u, 0], "a": d.context[u, 1]})


def test_batch_layout_matches_reference_and_labels_align():
    d = _tiny_data()
    sp = chronological_split(d, max_seq_len=10, num_eval_targets=2)
    assert sp.hist_end.tolist() == [3, 1] and sp.num_candidates.tolist() == [2, 2]
    b = build_ranking_batch(d, sp.rows, sp.hist_start, sp.hist_end, sp.num_candidates, "history")
    names = {KIND_CONTEXT: "ctx", KIND_ITEM: "item", KIND_ACTION: "action", KIND_SIDE: "creator"}
    for u in range(2):
        lo, hi = int(b.offsets[u]), int(b.offsets[u + 1])
        got = [names[int(k)] for k in b.token_kinds[lo:hi]]
        ref = _reference_tokens(d, u, 0, int(sp.hist_end[u]))
        # side tokens inserted after the window's last event are not part of the window
        ref = [t for t in ref if not (t[0] == "creator" and t[2] is not None and t[2] > d.timestamps[
            d.offsets[u] + sp.hist_end[u] - 1])]
        assert got == [r[0].split(":")[0] for r in ref]
        assert b.token_ids[lo:hi].tolist() == [r[1] for r in ref]
        assert b.positions[lo:hi].tolist() == list(range(hi - lo))
    assert int(b.num_targets.sum()) == 0 and b.contextual_len == 2
    # every prediction sits on an item token; the next token is that event's action; labels are its labels
    assert (b.token_kinds[b.pred_rows] == KIND_ITEM).all()
    assert (b.token_kinds[b.pred_rows + 1] == KIND_ACTION).all()
    assert (b.paired_items[b.pred_rows + 1] == b.token_ids[b.pred_rows]).all()
    assert b.token_ids[b.pred_rows + 1].tolist() == [1, 2, 3, 2]  # actions of events 0..2 (u0) and 0 (u1)
    assert b.labels.tolist() == [[0, 0], [0, 0], [0, 0], [0, 0]]
    # eval: candidates appended (no action tokens), all at the first candidate slot, predicted
    e = build_ranking_batch(d, sp.rows, sp.hist_start, sp.hist_end, sp.num_candidates, "candidates")
    assert e.num_targets.tolist() == [2, 2]
    assert e.pred_items.tolist() == [14, 15, 22, 23] and e.labels[:, 0].tolist() == [1, 1, 0, 0]
    last = e.offsets[1:] - 1
    assert (e.token_kinds[e.pred_rows] == KIND_ITEM).all() and set(e.pred_rows.tolist()) >= set(last.tolist())
    assert e.positions[e.pred_rows].tolist() == [10, 10, 4, 4]  # u0: 2 ctx + 2 side + 3 pairs; u1: 2 ctx + 1 pair
    assert e.time_gaps[e.pred_rows].tolist() == [100, 200, 10, 20]  # since the last history event
