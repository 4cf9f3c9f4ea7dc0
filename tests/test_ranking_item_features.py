"""Item content features in the RANKING models (issue 20): the item tower (modules/item_tower.py) gives every item
row of HSTURankingModel / DLRMRanking — item tokens, the items paired with actions, DLRM's candidate and history
means; task=ranking trains and evaluates with it (content-only rows for items without training events), the
exported artifact (tower baked into its items table) scores as the training model, and the synthetic ranking
world's ``cluster`` feature is the world's cluster of every item."""

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hstu.serving
from hstu.modules.dlrm import DLRMRanking
from hstu.modules.item_tower import build_item_tower
from hstu.modules.ranking import HSTURankingModel, RankingSpec
from hstu.trainer import run_dir as rd
from hstu.trainer.cli import evaluate_run, main
from hstu.trainer.config import ModelConfig, load_config, save_config
from hstu.trainer.data.item_features import ranking_synthetic_table
from hstu.trainer.data.synthetic_ranking import build_world, generate_ranking
from hstu.trainer.metrics_log import read_metrics
from hstu.trainer.ranking_config import SyntheticRankingConfig
from test_ranking_distributed import CONFIG
from test_serving_ranking import MAX_LEN, MAX_SIDE, history_of, training_batch

torch.set_num_threads(1)
WORLD = SyntheticRankingConfig(num_users=5, num_items=60, num_clusters=3, creators_per_cluster=2, min_seq_len=14,
                               max_seq_len=18, follow_prob=0.4, seed=3)
FEATURES = ["model.item_features.enabled=true"]


@pytest.fixture(scope="module")
def data():
    return generate_ranking(WORLD)


def _model_cfg(variant="production", combine="sum"):
    cfg = ModelConfig(variant=variant, embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, linear_dim=8,
                      dropout=0.0)
    cfg.item_features.enabled, cfg.item_features.combine = True, combine
    return cfg


def _spec(d):
    return RankingSpec(d.num_items, d.num_actions, tuple(d.context_vocab), tuple(d.side_vocab), tuple(d.task_names),
                       regression=True, max_tokens=len(d.context_vocab) + 2 * MAX_LEN + MAX_SIDE + 1)


def _models(d):
    table = ranking_synthetic_table(WORLD, d.num_items)
    out = []
    for variant, combine in (("production", "sum"), ("research", "mlp")):
        torch.manual_seed(0)
        out.append(HSTURankingModel(_model_cfg(variant, combine), _spec(d), item_features=table).eval())
    torch.manual_seed(0)
    out.append(DLRMRanking(16, _spec(d), mlp=(32,), item_tower=build_item_tower(_model_cfg(), table, d.num_items)))
    return out


def _baked(model):
    """The same model without a tower, its id table replaced by the tower's vector of every item."""
    ref = copy.deepcopy(model)
    weight = model.tables.items.table.weight
    rows = model.item_tower(torch.arange(weight.shape[0]), weight)
    ref.item_tower = None
    with torch.no_grad():
        ref.tables.items.table.weight.copy_(rows)
    return ref


def test_cluster_feature_is_the_ranking_worlds_cluster():
    world = build_world(WORLD)
    table = ranking_synthetic_table(WORLD, WORLD.num_items)
    assert table.names == ("cluster",) and table.cardinalities == (WORLD.num_clusters + 1,)
    assert table.values[0, 0] == 0
    seen = 0
    for c in range(world.num_clusters):  # item_of (cluster, rank) -> item: an independent path to the cluster
        k = np.arange(int(world.cluster_size(np.array([c]))[0]))
        items = world.item_of(np.full_like(k, c), k)
        assert (table.values[items, 0] == c + 1).all()
        seen += items.size
    assert seen == WORLD.num_items


def test_tower_shapes_gradients_and_equivalence_to_baked_item_rows(data):
    batch = training_batch(data, 1, 10, np.array([3, 17, 42]), data.timestamps[[20, 21, 22]], alone=False)
    batch_items = torch.cat([batch.token_ids[batch.token_kinds == 1], batch.paired_items])
    for model in _models(data):
        logits, reg = model(batch)
        assert logits.shape == (3, len(data.task_names)) and reg.shape == (3,)
        with torch.no_grad():  # item rows through the tower = the plain model over a table of tower vectors
            want = _baked(model)(batch)
        torch.testing.assert_close(logits, want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reg, want[1], rtol=1e-5, atol=1e-6)
        model.train()
        logits, reg = model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)) + reg.square().mean()
        loss.backward()
        grad = model.item_tower.tables["cluster"].weight.grad
        used = set(model.item_tower.feature_values[batch_items[batch_items > 0], 0].tolist())
        assert grad[0].abs().sum() == 0  # padding
        for c in range(1, grad.shape[0]):  # exactly the clusters of the batch's items get a gradient
            assert (grad[c].abs().sum() > 0) == (c in used), c
        assert model.tables.items.table.weight.grad.abs().sum() > 0  # the id part too
        # the features are inputs: another cluster for every item changes the predictions
        with torch.no_grad():
            model.eval()
            before = model(batch)[0]
            model.item_tower.feature_values[1:, 0] = model.item_tower.feature_values[1:, 0] % 3 + 1
            assert not torch.allclose(model(batch)[0], before)


def _train(run_dir, *extra):
    from hstu.trainer.train import train

    return train(load_config(None, CONFIG + FEATURES + [f"run_dir={run_dir}", *extra]))


@pytest.mark.parametrize("arch", ["hstu", "dlrm"])
def test_tiny_ranking_run_with_features_trains_evaluates_and_exports(tmp_path, data, arch):
    from hstu.trainer.tasks import get_task

    run = str(tmp_path / arch)
    extra = ["model.arch=dlrm", "ranking.dlrm_mlp=[32]"] if arch == "dlrm" else []
    result = _train(run, *extra)
    train_log = read_metrics(os.path.join(run, "metrics.jsonl"), kind="train")
    assert len(train_log) == 10 and all(np.isfinite(r["loss"]) for r in train_log)
    best = torch.load(os.path.join(run, rd.CHECKPOINT_FILE), weights_only=True)
    assert "item_tower.tables.cluster.weight" in best and "item_tower.feature_values" in best
    # content-only rows: items without a training-window event (reference: a loop over the training windows)
    task = get_task(load_config(None, CONFIG + FEATURES + [f"run_dir={run}-x", *extra]))
    task.build_data()
    d, s = task.data, task.split
    trained = set()
    for i, row in enumerate(s.rows):
        a = int(d.offsets[row])
        trained.update(d.item_ids[a + int(s.train_start[i]):a + int(s.train_end[i])].tolist())
    want = torch.tensor([float(i in trained) for i in range(d.num_items + 1)])
    torch.testing.assert_close(best["item_tower.id_weight"], want, rtol=0, atol=0)
    assert 0 < want[1:].sum() < d.num_items  # both kinds exist in this data
    # `hstu eval` of best.pt reproduces the logged best evaluation
    again = evaluate_run(run)["metrics"]
    for k in ("ne_mean", "auc_mean", "gauc_mean"):
        assert again[k] == pytest.approx(result.best_metrics[k], abs=1e-6), k
    if arch == "dlrm":
        return
    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", run, "--out", out]) == 0
    sm = hstu.serving.load(out, task="ranking")
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["ranking"]["item_features"] == ["cluster"]
    assert max(sm.verify().values()) < 1e-4
    model = task.build_model(torch.device("cpu"))
    model.load_state_dict(best)
    model.eval()
    assert model.item_tower is not None
    # serving scores = the training model's (tower applied per token) on fresh requests
    cfg = load_config(None, CONFIG)
    g = np.random.default_rng(0)
    for u in (0, 7, 21):
        e = int(d.offsets[u + 1] - d.offsets[u]) - 1
        hist = _history(d, u, e)
        qt = int(hist.timestamps[-1]) + 600
        cand = g.integers(1, d.num_items + 1, 5)
        got = sm.rank(hist, cand, query_time=qt)
        with torch.no_grad():
            logits, _ = model(_alone_batch(d, u, e, cand, qt, cfg))
        torch.testing.assert_close(got.logits, logits, rtol=1e-4, atol=1e-5)


def _history(d, u, e):
    return history_of(d, u, e)


def _alone_batch(d, u, e, cand, qt, cfg):
    """The trainer's batch of each candidate alone after user u's first e events (the run's layout sizes)."""
    import test_serving_ranking as tsr

    saved = tsr.MAX_LEN, tsr.MAX_SIDE
    tsr.MAX_LEN, tsr.MAX_SIDE = cfg.data.max_seq_len, cfg.ranking.max_side_tokens
    try:
        return training_batch(d, u, e, cand, np.full(len(cand), qt), alone=True)
    finally:
        tsr.MAX_LEN, tsr.MAX_SIDE = saved


def test_export_of_a_features_model_from_a_saved_state(tmp_path, data):
    """export_ranking_state rebuilds the tower from the state alone (features_from_state): int8 artifact, records
    replay, items table = the tower's quantised rows, and the quantisation error is measured against the tower."""
    model = _models(data)[1]
    with torch.no_grad():
        model.item_tower.drop_ids(torch.arange(data.num_items + 1) % 4 == 0)
    run = tmp_path / "run"
    cfg = load_config(None, ["task=ranking", "data.name=synthetic", f"data.max_seq_len={MAX_LEN}",
                             f"ranking.max_side_tokens={MAX_SIDE}", "ranking.regression_weight=0.5",
                             "model.variant=research", "model.embedding_dim=16", "model.num_layers=2",
                             "model.num_heads=2", "model.attention_dim=8", "model.linear_dim=8",
                             "model.item_features.enabled=true", "model.item_features.combine=mlp",
                             f"run_dir={run}"])
    os.makedirs(run)
    save_config(cfg, str(run / rd.CONFIG_FILE))
    rd.save_state_dict(model, str(run / rd.CHECKPOINT_FILE))
    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", str(run), "--out", out, "--embedding-dtype", "int8"]) == 0
    sm = hstu.serving.load(out, task="ranking")
    assert max(sm.verify().values()) < 1e-4
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["quantization_max_abs_logit_error"] < 0.05
    items = sm.engine.tables.items.lookup(torch.arange(data.num_items + 1))
    want = model.item_rows()
    assert (items - want).abs().max() <= want.abs().max() / 127  # int8 rowwise of the tower's vectors
    hist = history_of(data, 2, 11)
    qt = int(hist.timestamps[-1]) + 300
    cand = np.array([5, 9, 33, 60])
    with torch.no_grad():
        logits, _ = model(training_batch(data, 2, 11, cand, np.full(4, qt), alone=True))
    assert (sm.rank(hist, cand, query_time=qt).logits - logits).abs().max() < 0.05
    # add_items: a new item from its features alone is the twin of a trained content-only item (id dropped)
    x = 4
    assert model.item_tower.id_weight[x] == 0 and model.item_tower.id_weight[x + 1] == 1
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert [f["name"] for f in man["item_tower"]["features"]] == ["cluster"] and "item_tower" in sm.verify()
    new = sm.add_items([{"cluster": [int(model.item_tower.feature_values[x, 0])]}])
    assert new.tolist() == [data.num_items + 1] and sm.num_items == data.num_items + 1
    items = sm.engine.tables.items
    torch.testing.assert_close(items.lookup(new), items.lookup(torch.tensor([x])), rtol=0, atol=1e-6)
    twin = sm.rank(hist, [x, 9, int(new)], query_time=qt).logits
    torch.testing.assert_close(twin[2], twin[0], rtol=0, atol=1e-5)
    swapped = dict(item_ids=hist.item_ids.copy(), actions=hist.actions, timestamps=hist.timestamps,
                   context=hist.context, side=hist.side)
    swapped["item_ids"][[0, 3]] = x
    with_new = dict(swapped, item_ids=np.where(swapped["item_ids"] == x, int(new), swapped["item_ids"]))
    torch.testing.assert_close(sm.rank(with_new, cand, query_time=qt).logits,
                               sm.rank(swapped, cand, query_time=qt).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown feature 'genre'"):
        sm.add_items([{"genre": [1]}])
    with pytest.raises(ValueError, match=r"feature 'cluster' = \[9\] must be at most 1 values in 1..3"):
        sm.add_items([{"cluster": [9]}])


MOVIES = b"".join(f"{i}::{t}::{g}\n".encode() for i, t, g in [
    (10, "GoldenEye (1995)", "Action|Adventure|Thriller"), (11, "American President, The (1995)", "Comedy|Drama"),
    (12, "Dracula: Dead and Loving It (1995)", "Comedy|Horror"), (13, "Balto (1995)", "Animation|Children's"),
    (14, "Nixon (1995)", "Drama")])  # item 15 has no row


def test_ml1m_ranking_task_reads_movies_dat(tmp_path):
    """task=ranking on ML-1M files: movies.dat next to users.dat / ratings.dat gives the tower its features."""
    from hstu.trainer.data.item_features import ML1M_GENRES, title_words, year_bucket
    from hstu.trainer.tasks import get_task
    from test_ranking_data import _cfg as ml1m_cfg, _write

    _write(tmp_path)
    (tmp_path / "movies.dat").write_bytes(MOVIES)
    cfg = ml1m_cfg(tmp_path, *FEATURES, "model.item_features.features=[genre,year,title]",
                   "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2")
    task = get_task(cfg)
    task.build_data()
    table = task.item_features
    assert table.names == ("genre", "year", "title") and table.num_items == task.data.num_items
    genre = table.block("genre")
    assert sorted(genre[10][genre[10] > 0].tolist()) == [ML1M_GENRES.index(g) + 1 for g in
                                                           ("Action", "Adventure", "Thriller")]
    assert table.block("year")[14, 0] == year_bucket(1995, cfg.model.item_features.year_bucket_years)
    assert sorted(table.block("title")[13][table.block("title")[13] > 0].tolist()) == sorted(
        title_words("Balto", cfg.model.item_features.title_buckets))
    assert not table.values[15].any() and not table.values[0].any()
    model = task.build_model(torch.device("cpu")).eval()
    # training windows hold event 0 of each user: items 10 and 11 (users 1, 2 -> 10; user 4 -> 11)
    assert torch.nonzero(model.item_tower.id_weight).flatten().tolist() == [10, 11]
    batch = next(iter(task.eval_loader))
    with torch.no_grad():
        logits, reg = model(batch)
    assert logits.shape == (6, 2) and torch.isfinite(logits).all() and reg is None
