"""Ranking-model M-FALCON (serving/ranking.py) against the training model on the trainer's own batch format
(``build_ranking_batch``): each candidate alone as the target == M-FALCON; all candidates as targets (the eval
batch) == M-FALCON for production, and for research up to the documented position-bias shift."""

import dataclasses

import numpy as np
import pytest
import torch

from hstu.modules.ranking import HSTURankingModel, RankingSpec
from hstu.serving.ranking import RankingHistory, RankingMFalcon
from hstu.trainer.config import ModelConfig
from hstu.trainer.data.ranking_batch import build_ranking_batch
from hstu.trainer.data.sequentialize import SideTokens
from hstu.trainer.data.synthetic_ranking import generate_ranking
from hstu.trainer.ranking_config import SyntheticRankingConfig

torch.set_num_threads(1)
MAX_LEN, MAX_SIDE = 8, 5
TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module")
def data():
    return generate_ranking(SyntheticRankingConfig(num_users=5, num_items=60, num_clusters=3, creators_per_cluster=2,
                                                   min_seq_len=14, max_seq_len=18, follow_prob=0.4, seed=3))


def make_model(d, variant, seed=0, **kw):
    torch.manual_seed(seed)
    spec = RankingSpec(d.num_items, d.num_actions, tuple(d.context_vocab), tuple(d.side_vocab), tuple(d.task_names),
                       regression=True, max_tokens=len(d.context_vocab) + 2 * MAX_LEN + MAX_SIDE + 1)
    cfg = ModelConfig(variant=variant, embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, linear_dim=8,
                      dropout=0.3, **kw)  # dropout must be inert in eval
    model = HSTURankingModel(cfg, spec).eval()
    with torch.no_grad():  # non-trivial rab / LN so every term matters
        for name, p in model.named_parameters():
            if "weights" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def engine(model, d, **kw):
    return RankingMFalcon.from_model(model, max_seq_len=MAX_LEN, max_side_tokens=MAX_SIDE,
                                     side_names=d.side.names, **kw)


def history_of(d, u, e):
    """RankingHistory of user u's first e events with ALL its side tokens (the layout drops later ones)."""
    a, b = int(d.offsets[u]), int(d.offsets[u]) + e
    sa, sb = int(d.side.offsets[u]), int(d.side.offsets[u + 1])
    side = {}
    for f, name in enumerate(d.side.names):
        sel = np.flatnonzero(d.side.feature[sa:sb] == f) + sa
        if sel.size:
            side[name] = (d.side.values[sel], d.side.timestamps[sel])
    return RankingHistory(d.item_ids[a:b], d.actions[a:b], d.timestamps[a:b], d.context[u], side)


def training_batch(d, u, e, cand, cand_ts, alone):
    """The trainer's eval batch for user u's history [0, e): one sequence per candidate (alone) or one with all
    candidates as targets; candidates are appended as events [e, e + K) with timestamps cand_ts."""
    a = int(d.offsets[u])
    users = [[c] for c in range(len(cand))] if alone else [list(range(len(cand)))]
    ids, ts, acts, offsets = [], [], [], [0]
    for group in users:
        ids += [d.item_ids[a:a + e], cand[group]]
        ts += [d.timestamps[a:a + e], cand_ts[group]]
        acts += [d.actions[a:a + e], np.ones(len(group), np.int64)]
        offsets.append(offsets[-1] + e + len(group))
    sa, sb = int(d.side.offsets[u]), int(d.side.offsets[u + 1])
    keep = np.arange(sa, sb)[d.side.insert_at[sa:sb] < e]
    U = len(users)
    side = SideTokens(d.side.names, np.arange(U + 1) * keep.size, np.tile(d.side.feature[keep], U),
                      np.tile(d.side.values[keep], U), np.tile(d.side.timestamps[keep], U),
                      np.tile(d.side.insert_at[keep], U))
    E = offsets[-1]
    dd = dataclasses.replace(d, user_ids=np.arange(U), offsets=np.array(offsets), item_ids=np.concatenate(ids),
                             timestamps=np.concatenate(ts), actions=np.concatenate(acts),
                             labels=np.zeros((E, len(d.task_names)), np.float32),
                             context=np.repeat(d.context[u:u + 1], U, 0),
                             side=side, regression=np.zeros(E, np.float32))
    k = np.array([len(g) for g in users])
    return build_ranking_batch(dd, np.arange(U), np.full(U, max(0, e - MAX_LEN)), np.full(U, e), k, "candidates",
                               MAX_SIDE)


VARIANTS = [("production", {}), ("research", {}), ("research", {"use_rab_position": False})]


@pytest.mark.parametrize("variant,kw", VARIANTS)
def test_mfalcon_equals_training_model(data, variant, kw):
    model = make_model(data, variant, **kw)
    eng = engine(model, data, micro_batch=3)
    g = np.random.default_rng(0)
    for u, e in [(0, 1), (1, 5), (2, 12), (3, 14)]:  # shorter and longer than the window (carried side tokens)
        hist = history_of(data, u, e)
        qt = int(hist.timestamps[-1]) + 7_200
        cand = g.integers(1, data.num_items + 1, 7)
        cand[2] = cand[5]  # duplicates are scored independently
        state = eng.encode(hist, query_time=qt)
        got = eng.rank(state, cand)
        with torch.no_grad():
            logits, reg = model(training_batch(data, u, e, cand, np.full(7, qt), alone=True))
            torch.testing.assert_close(got.logits, logits, **TOL)
            torch.testing.assert_close(got.regression, reg, **TOL)
            torch.testing.assert_close(got.probabilities, torch.sigmoid(logits), **TOL)
            all_logits, _ = model(training_batch(data, u, e, cand, np.full(7, qt), alone=False))
        if variant == "production" or not kw.get("use_rab_position", True):  # research: time rab exact at qt
            torch.testing.assert_close(all_logits, got.logits, **TOL)
        else:  # research with position rab: the op shifts candidate c's relative positions by c
            torch.testing.assert_close(all_logits[:1], got.logits[:1], **TOL)
            assert not torch.allclose(all_logits[1:], got.logits[1:], **TOL)
        torch.testing.assert_close(eng.rank(state, cand, micro_batch=100).logits, got.logits, **TOL)


def test_research_all_targets_exact_when_position_bias_is_shift_invariant(data):
    model = make_model(data, "research")
    with torch.no_grad():
        for layer in model.layers:
            layer.pos_weights.fill_(0.17)  # same bias for every relative position: the op's shift is invisible
    eng = engine(model, data)
    hist, cand = history_of(data, 4, 13), np.arange(1, 11)
    qt = int(hist.timestamps[-1]) + 99
    with torch.no_grad():
        all_logits, _ = model(training_batch(data, 4, 13, cand, np.full(10, qt), alone=False))
    torch.testing.assert_close(eng.rank(eng.encode(hist, qt), cand).logits, all_logits, **TOL)


def test_production_candidate_timestamps_equal_eval_batch(data):
    """Production: per-candidate impression times (the eval layout's own timestamps) are supported."""
    model = make_model(data, "production", seed=1)
    eng = engine(model, data)
    hist = history_of(data, 1, 10)
    cand = np.array([3, 9, 27, 3, 50])
    cts = int(hist.timestamps[-1]) + np.array([0, 60, 3_600, 86_400, 10**6])
    got = eng.rank(eng.encode(hist), cand, candidate_timestamps=cts)
    with torch.no_grad():
        all_logits, _ = model(training_batch(data, 1, 10, cand, cts, alone=False))
    torch.testing.assert_close(got.logits, all_logits, **TOL)
    with pytest.raises(ValueError, match="research variant"):
        engine(make_model(data, "research"), data).rank(eng.encode(hist), cand, candidate_timestamps=cts)


def test_rank_batch_equals_per_user_calls(data):
    eng = engine(make_model(data, "research"), data)
    hists = [history_of(data, u, e) for u, e in [(0, 3), (1, 0), (2, 16)]]
    cands = [np.array([1, 2, 3]), np.array([5]), np.arange(1, 30)]
    qts = [None, 1_700_000_000, int(hists[2].timestamps[-1]) + 5]
    out = eng.rank_batch(hists, cands, query_times=qts, micro_batch=4)
    for h, c, qt, got in zip(hists, cands, qts, out):
        ref = eng.rank(eng.encode(h, qt), c, micro_batch=4)
        torch.testing.assert_close(got.probabilities, ref.probabilities, rtol=0, atol=0)
        assert got.probabilities.shape == (len(c), len(data.task_names))
    with pytest.raises(ValueError, match="candidate lists"):
        eng.rank_batch(hists, cands[:2])


def test_bad_requests_raise(data):
    eng = engine(make_model(data, "production"), data)
    hist = history_of(data, 0, 4)
    with pytest.raises(ValueError, match="differ in length"):
        eng.encode(dataclasses.replace(hist, actions=hist.actions[:2]))
    with pytest.raises(ValueError, match="contextual features"):
        eng.encode(dataclasses.replace(hist, context=[1]))
    with pytest.raises(ValueError, match="actions"):
        eng.encode(dataclasses.replace(hist, actions=np.full(4, data.num_actions + 1)))
    with pytest.raises(ValueError, match="unknown"):
        eng.encode(dataclasses.replace(hist, side={"nope": ([1], [5])}))
    with pytest.raises(ValueError, match="candidates"):
        eng.rank(eng.encode(hist), [0])
