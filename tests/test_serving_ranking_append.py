"""Incremental user state of the ranking model (``RankingMFalcon.append``, serving/ranking.py): appending events /
side snapshots / a new query time to a cached state equals encoding the whole history (layout, K/V cache, rank
scores), and recomputes only the rows from the first changed one (2 per event, + the research old last row, + side
tokens merged in; everything after a window shift or a contextual change)."""

import dataclasses

import numpy as np
import pytest
import torch

from hstu.serving.ranking import RankingHistory, RankingState
from test_serving_ranking import MAX_LEN, MAX_SIDE, TOL, data, engine, history_of, make_model  # noqa: F401

LAYOUT_FIELDS = ("ids", "kinds", "features", "paired", "timestamps", "positions", "gaps")
CASES = [("production", True), ("production", False), ("research", True), ("research", False)]


def events(h, a, b, side=None):
    """Events [a, b) of history h as an append request (optionally with side snapshots)."""
    out = {"item_ids": h.item_ids[a:b], "actions": h.actions[a:b], "timestamps": h.timestamps[a:b]}
    if side is not None:
        out["side"] = side
    return out


def full(d, u):
    """User u's whole history (all events and side snapshots)."""
    return history_of(d, u, int(d.offsets[u + 1] - d.offsets[u]))


def first(h, n, side=True):
    """h's first n events (side: all its snapshots, or none)."""
    return RankingHistory(h.item_ids[:n], h.actions[:n], h.timestamps[:n], h.context, h.side if side else {})


def assert_same_state(eng, got: RankingState, ref: RankingState, cand=np.arange(1, 13)):
    for name in LAYOUT_FIELDS:
        assert torch.equal(getattr(got.layout, name), getattr(ref.layout, name)), name
    assert got.layout.contextual_len == ref.layout.contextual_len
    assert got.layout.last_event_time == ref.layout.last_event_time and got.query_time == ref.query_time
    torch.testing.assert_close(got.k, ref.k, **TOL)
    torch.testing.assert_close(got.v, ref.v, **TOL)
    a, b = eng.rank(got, cand), eng.rank(ref, cand)
    torch.testing.assert_close(a.logits, b.logits, **TOL)
    torch.testing.assert_close(a.regression, b.regression, **TOL)


@pytest.fixture(scope="module")
def engines(data):
    return {v: engine(make_model(data, v), data, micro_batch=5) for v in ("production", "research")}


@pytest.mark.parametrize("variant,side", CASES)
def test_append_equals_encode(engines, data, variant, side):
    eng = engines[variant]
    research = int(variant == "research")
    for u, n, k in [(0, 2, 1), (1, 4, 3), (2, 3, 3), (2, 5, 3), (3, 7, 1), (4, 0, 1), (4, 1, 3)]:
        h = full(data, u)
        state = eng.encode(first(h, n, side))
        got = eng.append(state, events(h, n, n + k))
        ref = eng.encode(first(h, n + k, side))
        assert_same_state(eng, got, ref)
        assert ref.recomputed == ref.length
        if n == 0:  # the contextual rows' time is the first event's: everything is re-encoded
            assert got.recomputed == ref.length
        elif side:  # 2 per event + the side tokens merged in before them (+ research: the old last row)
            assert got.recomputed == ref.length - state.length + research
        else:
            assert got.recomputed == 2 * k + research
            assert ref.length - state.length == 2 * k


@pytest.mark.parametrize("variant,side", CASES)
def test_successive_appends_across_the_window(engines, data, variant, side):
    """One event at a time from 1 to 16 events (the window is MAX_LEN = 8): every state equals a full encode;
    past the window every append re-encodes (the first event changes), before it only the new rows run."""
    eng = engines[variant]
    for u in (0, 2):
        h = full(data, u)
        state = eng.encode(first(h, 1, side))
        for n in range(1, 16):
            state = eng.append(state, events(h, n, n + 1))
            ref = eng.encode(first(h, n + 1, side))
            assert_same_state(eng, state, ref)
            if n + 1 > MAX_LEN:
                assert state.recomputed == ref.length
            elif not side:
                assert state.recomputed == 2 + (variant == "research")
        assert state.history.item_ids.numel() == MAX_LEN  # events before the window are not kept
        two = eng.append(eng.append(eng.encode(first(h, 2, side)), events(h, 2, 3)), events(h, 3, 6))
        assert_same_state(eng, two, eng.encode(first(h, 6, side)))
        far = eng.append(eng.encode(first(h, 6, side)), events(h, 6, 11))  # one append crossing max_seq_len
        assert_same_state(eng, far, eng.encode(first(h, 11, side)))
        assert far.recomputed == far.length


@pytest.mark.parametrize("variant", ["production", "research"])
def test_append_side_snapshots(engines, data, variant):
    """Snapshots arrive with later events (by name or index, new series too), at the last event's time (merged
    BEFORE it: ties put side first, so the cache is cut there) and with no event at all (not in the layout until
    an event follows it); also when more than max_side_tokens are in the window (the oldest drop: re-encode)."""
    eng = engines[variant]
    h = full(data, 3)
    t = h.timestamps
    base = RankingHistory(h.item_ids[:5], h.actions[:5], t[:5], h.context, {"creator": ([6], [t[0] - 2])})
    state = eng.encode(base)
    got = eng.append(state, events(h, 5, 7, side={0: ([4, 5], [t[5], t[6] - 1])}))
    ref = eng.encode(RankingHistory(h.item_ids[:7], h.actions[:7], t[:7], h.context,
                                    {"creator": ([6, 4, 5], [t[0] - 2, t[5], t[6] - 1])}))
    assert_same_state(eng, got, ref)
    assert got.recomputed == 4 + 2 + (variant == "research")  # 2 events + 2 side tokens (+ old last row)
    tie = eng.append(got, {"item_ids": [], "actions": [], "timestamps": [], "side": {"creator": ([2], [t[6]])}})
    ref_tie = eng.encode(dataclasses.replace(ref.history, side={0: ([6, 4, 5, 2], [t[0] - 2, t[5], t[6] - 1, t[6]])}))
    assert_same_state(eng, tie, ref_tie)
    assert tie.recomputed == 3  # the new side token before event 6's two rows
    later = eng.append(tie, {"item_ids": [], "actions": [], "timestamps": [],
                             "side": {"region": ([5], [t[6] + 10])}})
    assert later.recomputed == 0 and later.length == tie.length  # after the last event: not in the layout yet
    nxt = eng.append(later, events(h, 7, 8))
    assert nxt.recomputed == 3 + (variant == "research")
    assert_same_state(eng, nxt, eng.encode(RankingHistory(
        h.item_ids[:8], h.actions[:8], t[:8], h.context,
        {"creator": ([6, 4, 5, 2], [t[0] - 2, t[5], t[6] - 1, t[6]]), "region": ([5], [t[6] + 10])})))
    # more side tokens than max_side_tokens: the oldest one leaves the window -> everything after it changes
    many = {"creator": ([1 + i % 2 for i in range(MAX_SIDE + 2)], [int(t[1]) + i for i in range(MAX_SIDE + 2)])}
    crowded = eng.append(eng.encode(first(h, 2, side=False)), events(h, 2, 4, side=many))
    assert_same_state(eng, crowded, eng.encode(RankingHistory(h.item_ids[:4], h.actions[:4], t[:4], h.context, many)))


@pytest.mark.parametrize("variant", ["production", "research"])
def test_query_time_and_context_changes(engines, data, variant):
    eng = engines[variant]
    h = history_of(data, 1, 9)
    state = eng.encode(h)
    qt = int(h.timestamps[-1]) + 3_600
    moved = eng.append(state, events(h, 9, 9), query_time=qt)
    assert_same_state(eng, moved, eng.encode(h, query_time=qt))
    # research: only the last row's t_next (qt) changed; production: no layer reads the query time
    assert moved.recomputed == (variant == "research")
    same = eng.append(moved, events(h, 9, 9))  # no events: keeps the state's query time
    assert same.recomputed == 0 and same.query_time == qt
    assert list(h.context) == [4, 1]
    ctx = eng.append(state, {"item_ids": [], "actions": [], "timestamps": [], "context": [4, 3]})
    assert_same_state(eng, ctx, eng.encode(dataclasses.replace(h, context=[4, 3])))
    assert ctx.recomputed == ctx.length  # the prefix rows see each other: a change in row 1 re-encodes row 0 too


def test_append_errors(engines, data):
    eng = engines["research"]
    h = history_of(data, 0, 6)
    state = eng.encode(h)
    last = int(h.timestamps[-1])
    with pytest.raises(ValueError, match=rf"timestamps\[0\] = {last - 1} is earlier than the cached history's last "
                                         rf"event \({last}\)"):
        eng.append(state, {"item_ids": [3], "actions": [1], "timestamps": [last - 1]})
    with pytest.raises(ValueError, match=rf"timestamps must be non-decreasing.*timestamps\[1\] = {last + 2}"):
        eng.append(state, {"item_ids": [3, 4], "actions": [1, 1], "timestamps": [last + 9, last + 2]})
    with pytest.raises(ValueError, match=rf"actions: ids must lie in 1\.\.{data.num_actions}, got 1\.\.99"):
        eng.append(state, {"item_ids": [3], "actions": [99], "timestamps": [last]})
    with pytest.raises(ValueError, match="item_ids: ids must lie in"):
        eng.append(state, {"item_ids": [0], "actions": [1], "timestamps": [last]})
    with pytest.raises(ValueError, match="differ in length"):
        eng.append(state, {"item_ids": [3, 4], "actions": [1], "timestamps": [last]})
    creator_last = int(np.max(h.side["creator"][1]))
    with pytest.raises(ValueError, match=r"side\['creator'\] timestamps: new snapshot at .* before the series' "
                                         rf"last cached one \({creator_last}\)"):
        eng.append(state, {"item_ids": [], "actions": [], "timestamps": [],
                           "side": {"creator": ([2], [creator_last - 1])}})
    with pytest.raises(ValueError, match="side series 'nope': unknown"):
        eng.append(state, {"item_ids": [], "actions": [], "timestamps": [], "side": {"nope": ([1], [last])}})
    with pytest.raises(ValueError, match="no stored history"):
        eng.append(dataclasses.replace(state, history=None), events(h, 0, 0))
