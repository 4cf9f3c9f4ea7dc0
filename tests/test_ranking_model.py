"""Ranking models (modules/ranking.py, modules/dlrm.py): interleaving / label alignment and no label leaks —
the action token of a target never reaches its own prediction, a later action never changes an earlier
prediction, candidates never see each other."""

import dataclasses

import numpy as np
import pytest
import torch

from hstu.modules.dlrm import DLRMRanking
from hstu.modules.ranking import HSTURankingModel, RankingSpec
from hstu.trainer.config import ModelConfig
from hstu.trainer.data.ranking import chronological_split
from hstu.trainer.data.ranking_batch import build_ranking_batch
from hstu.trainer.data.synthetic_ranking import generate_ranking
from hstu.trainer.ranking_config import SyntheticRankingConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return generate_ranking(SyntheticRankingConfig(num_users=6, num_items=60, num_clusters=3, creators_per_cluster=2,
                                                   min_seq_len=12, max_seq_len=16, follow_prob=0.2, seed=7))


def _spec(d, **kw):
    return RankingSpec(d.num_items, d.num_actions, tuple(d.context_vocab), tuple(d.side_vocab), tuple(d.task_names),
                       max_tokens=2 + 2 * 20 + 8 + 1, **kw)


def _models(d):
    torch.manual_seed(0)
    out = []
    for variant in ("production", "research"):
        cfg = ModelConfig(variant=variant, embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8,
                          linear_dim=8, dropout=0.0)
        out.append(HSTURankingModel(cfg, _spec(d, regression=True)).eval())
    out.append(DLRMRanking(16, _spec(d), mlp=(32,)).eval())
    return out


def _batch(d, predict, num_eval=4):
    sp = chronological_split(d, max_seq_len=20, num_eval_targets=num_eval)
    return build_ranking_batch(d, sp.rows, sp.hist_start, sp.hist_end, sp.num_candidates, predict, 8)


def _with(d, **arrays):
    return dataclasses.replace(d, **arrays)


@torch.no_grad()
def test_changing_an_action_never_changes_its_own_or_earlier_predictions(data):
    base = _batch(data, "history")
    u, k = 2, 5  # user 2, its 6th event
    ev = int(data.offsets[u]) + k
    actions = data.actions.copy()
    actions[ev] = actions[ev] % data.num_actions + 1  # a different action token
    changed = _batch(_with(data, actions=actions), "history")
    assert torch.equal(base.labels, changed.labels)  # labels are not inputs: only the token changed
    seq_of_pred = base.pred_seq
    k_of_pred = torch.cat([torch.arange(int((seq_of_pred == b).sum())) for b in range(base.batch_size)])
    own_or_earlier = (seq_of_pred == u) & (k_of_pred <= k)
    later = (seq_of_pred == u) & (k_of_pred > k)
    for model in _models(data):
        a, b = model(base)[0], model(changed)[0]
        assert torch.equal(a[own_or_earlier], b[own_or_earlier]), type(model).__name__
        assert torch.equal(a[seq_of_pred != u], b[seq_of_pred != u])  # other users untouched
        assert not torch.allclose(a[later], b[later]), type(model).__name__  # the action does matter later


@torch.no_grad()
def test_labels_are_not_inputs_and_candidates_do_not_see_each_other(data):
    base = _batch(data, "candidates")
    labels = data.labels.copy()
    labels[:] = 1.0 - labels  # flipping every label changes no input token
    flipped = _batch(_with(data, labels=labels), "candidates")
    for name in ("token_ids", "token_kinds", "paired_items", "positions", "time_gaps", "timestamps"):
        assert torch.equal(getattr(base, name), getattr(flipped, name)), name
    # replace user 1's 3rd candidate item (and its action, which is not in the batch anyway)
    sp = chronological_split(data, 20, 4)
    u = 1
    ev = int(data.offsets[u] + sp.hist_end[u]) + 2
    items, actions = data.item_ids.copy(), data.actions.copy()
    items[ev] = items[ev] % data.num_items + 1
    actions[ev] = actions[ev] % data.num_actions + 1
    changed = _batch(_with(data, item_ids=items, actions=actions), "candidates")
    cand = torch.cat([torch.arange(int(n)) for n in base.num_targets])
    same = ~((base.pred_seq == u) & (cand == 2))
    for model in _models(data):
        a, b = model(base)[0], model(changed)[0]
        assert torch.equal(a[same], b[same]), type(model).__name__
        assert not torch.allclose(a[~same], b[~same])


@torch.no_grad()
def test_eval_candidate_equals_next_train_position_without_later_history(data):
    """The first candidate sees exactly what the training position of the same event would see with the history
    cut just before it — so a candidate is scored like a training target (same position, gap, context).
    Exact for the production variant (time enters as an input embedding); the research variant's rab reads the
    next layout row's time, which for a candidate is another candidate's (docs/ranking.md)."""
    sp = chronological_split(data, 20, 3)
    ev_batch = build_ranking_batch(data, sp.rows, sp.hist_start, sp.hist_end, sp.num_candidates, "candidates", 8)
    tr_batch = build_ranking_batch(data, sp.rows, sp.hist_start, sp.hist_end + 1, np.zeros_like(sp.rows),
                                   "history", 8)
    first = torch.cat([torch.tensor([0]), torch.cumsum(ev_batch.num_targets, 0)[:-1]])  # first candidate per user
    last_item = torch.cumsum(torch.bincount(tr_batch.pred_seq), 0) - 1  # last train position per user
    # side tokens inserted right before the candidate event are not in the eval history: skip those users
    ok = [b for b in range(ev_batch.batch_size)
          if int(tr_batch.lengths[b]) == int(ev_batch.lengths[b] - ev_batch.num_targets[b] + 2)]
    assert len(ok) >= 3
    for model in _models(data)[:1]:
        a = model(ev_batch)[0][first[ok]]
        b = model(tr_batch)[0][last_item[ok]]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_heads_and_tables(data):
    hstu, _, dlrm = _models(data)
    b = _batch(data, "history")
    logits, reg = hstu(b)
    assert logits.shape == (b.num_predictions, 4) and reg.shape == (b.num_predictions,)
    assert dlrm(b)[1] is None
    # action / contextual / side tables are separate modules from the item table (shardable the same way)
    names = {n for n, _ in hstu.tables.named_modules()}
    assert {"items", "actions", "contextual.0", "contextual.1", "side.0", "side.1"} <= names
    assert hstu.tables.actions.weight.shape == (data.num_actions + 1, 16)
