"""Serving inputs: errors, not garbage (issue 14 §4). The in-process engine (MFalcon.from_model) and a loaded
artifact (hstu.serving.load) share one argument checker (serving/inputs.py): an empty history has no user
vector (retrieval raises; ranking scores candidates that see only themselves, documented), k <= 0, decreasing
timestamps, an append earlier than the cached state, a non-finite query time, out-of-range ids and mismatched
lengths are ValueErrors naming the argument (and index) and the rule."""

from __future__ import annotations

import os

import pytest
import torch

import hstu.serving
from hstu.modules.model import build_model
from hstu.serving.mfalcon import MFalcon
from hstu.serving.retrieval import ItemTable, topk_inner_product
from hstu.trainer import run_dir as rd
from hstu.trainer.cli import main
from hstu.trainer.config import RunConfig, save_config

from test_serving_ranking import data, engine, history_of, make_model  # noqa: F401

NUM_ITEMS, MAX_LEN = 60, 8
IDS, TS = [3, 5, 7], [10, 20, 30]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(in-process engine wrapped like the artifact, loaded artifact) of one small research model."""
    root = tmp_path_factory.mktemp("served")
    cfg = RunConfig()
    cfg.run_dir, cfg.data.max_seq_len = str(root / "run"), MAX_LEN
    m = cfg.model
    m.embedding_dim, m.num_layers, m.num_heads, m.attention_dim, m.linear_dim = 8, 1, 1, 4, 4
    torch.manual_seed(0)
    model = build_model(cfg, NUM_ITEMS).eval()
    os.makedirs(cfg.run_dir)
    save_config(cfg, os.path.join(cfg.run_dir, rd.CONFIG_FILE))
    rd.save_state_dict(model, os.path.join(cfg.run_dir, rd.CHECKPOINT_FILE))
    assert main(["export", "--run-dir", cfg.run_dir, "--out", str(root / "art")]) == 0
    return MFalcon.from_model(model), hstu.serving.load(str(root / "art"))


def test_empty_history_retrieval_is_an_error_not_ids_1_to_k(served):
    engine_, art = served
    with pytest.raises(ValueError, match="history_ids is empty: retrieval needs at least one history event"):
        art.retrieve([], [], k=5)
    with pytest.raises(ValueError, match="history_ids is empty"):
        art.user_vector([], [])
    with pytest.raises(ValueError, match="history_ids is empty"):
        engine_.user_vector(engine_.encode([], [], query_time=5))
    scores = art.rank([], [], [1, 2, 3], query_time=40)  # documented: candidates that see only themselves
    assert scores.shape == (3,) and bool(torch.isfinite(scores).all()) and len(set(scores.tolist())) == 3


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_k_must_be_a_positive_integer(served, k):
    _, art = served
    with pytest.raises(ValueError, match=r"^k = .* must be"):
        art.retrieve(IDS, TS, k=k)
    table = ItemTable(torch.randn(NUM_ITEMS + 1, 4))
    with pytest.raises(ValueError, match=r"^k = "):
        topk_inner_product(torch.randn(4), table, k)
    assert art.retrieve(IDS, TS, k=NUM_ITEMS + 10).ids.numel() == NUM_ITEMS  # large k: clamped to the catalog


@pytest.mark.parametrize("which", ["engine", "artifact"])
def test_history_and_append_rules(served, which):
    eng = served[0] if which == "engine" else served[1]
    with pytest.raises(ValueError, match=r"history_timestamps must be non-decreasing.*history_timestamps\[2\] = 5"):
        eng.encode(IDS, [10, 20, 5])
    state = eng.encode(IDS, TS)
    with pytest.raises(ValueError, match=r"timestamps\[0\] = 5 is earlier than the cached history's last event "
                                         r"\(30\)"):
        eng.append(state, [4], [5])
    with pytest.raises(ValueError, match=r"timestamps must be non-decreasing.*timestamps\[1\] = 31"):
        eng.append(state, [4, 6], [40, 31])
    assert eng.append(state, [4], [30]).timestamps.tolist() == [10, 20, 30, 30]  # equal times are in order
    for bad in (float("nan"), float("inf"), 1.5, "now"):
        with pytest.raises(ValueError, match=r"^query_time = .* must be"):
            eng.encode(IDS, TS, query_time=bad)
        with pytest.raises(ValueError, match=r"^query_time = "):
            eng.append(state, [4], [40], query_time=bad)
    assert eng.encode(IDS, TS, query_time=50.0).query_time == 50  # an integral float is a timestamp
    with pytest.raises(ValueError, match=rf"history_ids: item ids must lie in 1\.\.{NUM_ITEMS}, got 3\.\.61"):
        eng.encode([3, 61], [1, 2])
    with pytest.raises(ValueError, match=r"history_ids: item ids must lie in 1\.\.60, got 0\.\.3"):
        eng.encode([0, 3], [1, 2])
    with pytest.raises(ValueError, match="history_ids and history_timestamps differ in length: 3 vs 2"):
        eng.encode(IDS, TS[:2])
    with pytest.raises(ValueError, match=r"candidates: item ids must lie in 1\.\.60"):
        eng.rank(state, [1, 99]) if which == "engine" else eng.rank_state(state, [1, 99])


def test_ranking_engine_rules(data):  # noqa: F811 (pytest fixture)
    eng = engine(make_model(data, "research"), data)
    h = history_of(data, 0, 6)
    ts = torch.as_tensor(h.timestamps).clone()
    ts[3] = ts[2] - 1
    bad = hstu.serving.RankingHistory(h.item_ids, h.actions, ts, h.context, h.side)
    with pytest.raises(ValueError, match=r"timestamps must be non-decreasing.*timestamps\[3\]"):
        eng.encode(bad)
    for qt in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match=r"^query_time = "):
            eng.encode(h, query_time=qt)
