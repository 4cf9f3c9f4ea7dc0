"""M-FALCON (serving/mfalcon.py) and the cached layer path (modules/hstu.py forward_cached) against the full model:
candidates scored in micro-batches == each candidate scored alone; incremental appends == full re-encode."""

import pytest
import torch

from hstu.modules.model import RetrievalModel
from hstu.serving.export import reference_rank_scores, reference_user_vector
from hstu.serving.mfalcon import MFalcon
from hstu.trainer.config import ModelConfig

NUM_ITEMS, MAX_LEN = 300, 12
TOL = dict(rtol=1e-5, atol=2e-6)


def _model(variant, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(variant=variant, embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, linear_dim=8,
               dropout=0.3)  # dropout must be inert in eval
    cfg.update(kw)
    model = RetrievalModel(ModelConfig(**cfg), NUM_ITEMS, MAX_LEN).eval()
    with torch.no_grad():  # non-trivial rab / LN affine so every term matters
        for name, p in model.named_parameters():
            if "weights" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _history(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, NUM_ITEMS + 1, (n,), generator=g)
    gaps = torch.randint(0, 200_000, (n,), generator=g)
    gaps[n // 2:n // 2 + 2] = 0  # equal timestamps happen
    return ids, 1_600_000_000 + gaps.cumsum(0)


VARIANTS = [("research", {}), ("production", {}), ("research", {"use_rab_time": False}),
            ("production", {"input_time_bucket_fn": "log"})]


@pytest.mark.parametrize("variant,kw", VARIANTS)
def test_mfalcon_equals_each_candidate_alone(variant, kw):
    model = _model(variant, **kw)
    for n, qt_gap, bm in [(1, 0, 4), (5, 3600, 3), (MAX_LEN, 10**6, 64), (MAX_LEN + 7, 7, 5)]:
        ids, ts = _history(n, seed=n)
        qt = int(ts[-1]) + qt_gap
        cand = torch.randint(1, NUM_ITEMS + 1, (11,), generator=torch.Generator().manual_seed(n))
        cand[3] = cand[7]  # duplicates are scored independently
        eng = MFalcon.from_model(model, micro_batch=bm)
        state = eng.encode(ids, ts, qt)
        got = eng.rank(state, cand)
        ref = reference_rank_scores(model, ids[-MAX_LEN:], ts[-MAX_LEN:], qt, cand)
        torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(eng.user_vector(state), reference_user_vector(model, ids[-MAX_LEN:],
                                                                                  ts[-MAX_LEN:], qt), **TOL)
        # micro-batching changes nothing; a different query time changes the scores
        torch.testing.assert_close(eng.rank(state, cand, micro_batch=1), got, **TOL)
    changed = not torch.allclose(eng.rank(eng.encode(ids, ts, qt + 10**7), cand), got)
    assert changed == (variant == "production" or kw.get("use_rab_time", True))


def test_default_query_time_and_empty_history():
    model = _model("research")
    eng = MFalcon.from_model(model)
    ids, ts = _history(6, 3)
    cand = torch.arange(1, 40)
    # default query time = last history timestamp = the model's behaviour without a target time
    torch.testing.assert_close(eng.rank(eng.encode(ids, ts), cand),
                               reference_rank_scores(model, ids, ts, int(ts[-1]), cand), **TOL)
    empty = eng.encode([], [], query_time=1_600_000_000)  # candidates see only themselves
    torch.testing.assert_close(eng.rank(empty, cand),
                               reference_rank_scores(model, ids[:0], ts[:0], 1_600_000_000, cand), **TOL)
    assert torch.equal(empty.last, torch.zeros(16))


@pytest.mark.parametrize("variant", ["research", "production"])
def test_cached_encoding_of_every_row_equals_forward(variant):
    """Chunked prefill through forward_cached (causal continuation of a cache) == the jagged training forward."""
    model = _model(variant)
    ids, ts = _history(MAX_LEN, 11)
    qt = int(ts[-1]) + 99
    from hstu.serving.export import _batch

    full = model.encode(_batch([(ids, ts)], [qt]))
    eng = MFalcon.from_model(model, prefill_chunk=5)  # chunks of 5, 5, 2 rows
    rows = []
    state = eng.empty_state(qt)
    for s in range(0, MAX_LEN, 4):  # feed through the engine's extend step chunk by chunk, collecting rows
        e = min(MAX_LEN, s + 4)
        t_next = torch.cat([ts[1:], torch.tensor([qt])])[s:e]
        with torch.no_grad():
            enc, k, v = eng.extend(model.embed_items(ids[s:e]), torch.arange(s, e), ts[s:e], t_next,
                                   torch.full((e - s,), qt), state.k, state.v, torch.arange(s), ts[:s])
        rows.append(enc)
        state = state.__class__(ids[:e], ts[:e], qt, torch.cat([state.k, k], 2), torch.cat([state.v, v], 2), enc[-1])
    torch.testing.assert_close(torch.cat(rows), full, **TOL)
    whole = eng.encode(ids, ts, qt)
    torch.testing.assert_close(whole.k, state.k, **TOL)
    torch.testing.assert_close(whole.v, state.v, **TOL)


@pytest.mark.parametrize("variant,kw", VARIANTS[:3])
def test_incremental_append_equals_full_reencode(variant, kw):
    model = _model(variant, **kw)
    eng = MFalcon.from_model(model)
    ids, ts = _history(MAX_LEN + 3, 21)
    cand = torch.randint(1, NUM_ITEMS + 1, (9,), generator=torch.Generator().manual_seed(5))
    fixed_qt = int(ts[-1]) + 1000
    for qt_mode in ("default", "fixed"):
        qt_of = (lambda t: fixed_qt) if qt_mode == "fixed" else (lambda t: None)
        state = eng.encode(ids[:3], ts[:3], qt_of(ts[2]))
        # appends of 1 and 4 events, then 0 events with a new query time, then past max_seq_len (re-windowing)
        for a, b in [(3, 4), (4, 8), (8, 8), (8, MAX_LEN + 3)]:
            qt = qt_of(ts[b - 1])
            if a == b:
                qt = int(ts[b - 1]) + 777 if qt is None else qt
            state = eng.append(state, ids[a:b], ts[a:b], qt)
            lo = max(0, b - MAX_LEN)
            full = eng.encode(ids[lo:b], ts[lo:b], state.query_time)
            assert torch.equal(state.item_ids, ids[lo:b]) and torch.equal(state.timestamps, ts[lo:b])
            for name in ("k", "v", "last"):
                torch.testing.assert_close(getattr(state, name), getattr(full, name), **TOL)
            torch.testing.assert_close(eng.rank(state, cand),
                                       reference_rank_scores(model, ids[lo:b], ts[lo:b], state.query_time, cand),
                                       **TOL)


def test_append_recomputes_only_the_last_row_for_research():
    """research: only row n-1 changes (its t_next); production with an unchanged query time: nothing changes."""
    calls = []
    model = _model("research")
    eng = MFalcon.from_model(model)
    inner = eng.extend
    eng.extend = lambda x, *a: calls.append(x.shape[0]) or inner(x, *a)
    ids, ts = _history(8, 4)
    state = eng.encode(ids[:6], ts[:6])
    calls.clear()
    eng.append(state, ids[6:8], ts[6:8])
    assert calls == [3]  # the old last row + 2 new rows
    model = _model("production")
    eng = MFalcon.from_model(model)
    inner2 = eng.extend
    eng.extend = lambda x, *a: calls.append(x.shape[0]) or inner2(x, *a)
    state = eng.encode(ids[:6], ts[:6], query_time=int(ts[-1]))
    calls.clear()
    eng.append(state, ids[6:8], ts[6:8], query_time=int(ts[-1]))
    assert calls == [2]


def test_bad_inputs_raise():
    eng = MFalcon.from_model(_model("research"))
    with pytest.raises(ValueError, match="differ in length"):
        eng.encode([1, 2], [5])
    with pytest.raises(ValueError, match=f"1..{NUM_ITEMS}"):
        eng.encode([0, 2], [5, 6])
    with pytest.raises(ValueError, match="candidates"):
        eng.rank(eng.encode([1], [5]), [NUM_ITEMS + 1])
    with pytest.raises(ValueError, match="integer"):
        eng.encode(torch.tensor([1.5]), [5])
