"""Own logs' item side-feature table as the item tower's feature source (issue 20): the prepared
``vocab/item_features.parquet`` becomes an ItemFeatureTable (categorical -> width-1 blocks, multi-valued -> bags,
the table's columns = the feature names), checked against an independent reference built from the raw table; a
retrieval run on a generated Parquet log trains with it and exports it; config errors name the key."""

import json
import os

import numpy as np
import pytest
import torch

from events_utils import write_table
from hstu.trainer.config import ConfigError, load_config
from hstu.trainer.data import load_item_features, prepare
from hstu.trainer.data.events_vocab import IdVocab
from test_data_events import TINY

T0 = 1_000_000_000
GENRES = ["drama", "comedy", "noir", None]


def _log(rng, n=700, users=30, items=40):
    user = rng.integers(0, users, n)
    item = rng.integers(1, items + 1, n)
    return {"uid": np.array([f"u{u:03d}" for u in user], dtype=object),
            "sku": np.array([f"sku-{i}" for i in item], dtype=object), "ts": T0 + rng.integers(0, 50_000, n)}


def _side_table(rng, items=40):
    """Items 1..items except every 7th (no row), plus two items the log never mentions."""
    skus = [i for i in range(1, items + 1) if i % 7] + [900, 901]
    genre = np.array([GENRES[i % 4] for i in skus], dtype=object)
    tags = ["|".join(f"t{int(t)}" for t in rng.choice(9, size=i % 4, replace=False)) for i in skus]
    return {"sku": np.array([f"sku-{i}" for i in skus], dtype=object), "genre": genre,
            "tags": np.array(tags, dtype=object)}


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evfeat")
    rng = np.random.default_rng(4)
    log = write_table(root / "log.parquet", _log(rng))
    table = _side_table(rng)
    side = write_table(root / "items.csv", table, fmt="csv")
    opts = ["data.name=events", f"data.events.paths=[{log}]", "data.events.time_unit=s",
            "data.events.user_column=uid", "data.events.item_column=sku", "data.events.time_column=ts",
            f"data.cache_dir={root / 'cache'}", f"data.events.item_features.paths=[{side}]",
            "data.events.item_features.columns=[genre]", "data.events.item_features.multi_columns=[tags]",
            "model.item_features.enabled=true"]
    return root, opts, table


def test_side_table_becomes_the_feature_table(logs):
    root, opts, table = logs
    cfg = load_config(None, opts)
    summary = prepare(cfg.data, progress=False)
    folder = summary["dataset_dir"]
    num_items = json.load(open(os.path.join(folder, "manifest.json")))["num_items"]
    got = load_item_features(cfg.data, cfg.model.item_features, num_items)
    assert got.names == ("genre", "tags")
    genres = sorted({g for g in table["genre"] if g is not None})
    tags = sorted({t for s in table["tags"] for t in s.split("|") if t})
    assert got.cardinalities == (len(genres) + 1, len(tags) + 1)
    assert got.widths == (1, 3)  # the longest tag list
    # reference: each raw row of the side table through the item vocabulary and sorted value vocabularies
    want = np.zeros((num_items + 1, 4), dtype=np.int64)
    vocab = IdVocab.load(folder, "items")
    for item, g, t in zip(vocab.to_ids(table["sku"]), table["genre"], table["tags"]):
        if item == vocab.unknown:
            continue  # items the log never mentions are dropped (the OOV row keeps zeros)
        want[item, 0] = genres.index(g) + 1 if g is not None else 0
        vals = [tags.index(x) + 1 for x in t.split("|") if x]
        want[item, 1:1 + len(vals)] = vals
    np.testing.assert_array_equal(got.values, want)
    assert (want[1:, 0] > 0).any() and (want[1:, 0] == 0).any() and (want[1:, 1:] > 0).sum(1).max() == 3
    # only some columns: features=[tags]
    part = load_item_features(cfg.data, load_config(None, opts + ["model.item_features.features=[tags]"])
                              .model.item_features, num_items, dataset_dir=folder)
    assert part.names == ("tags",)
    np.testing.assert_array_equal(part.values, want[:, 1:])


def test_retrieval_run_on_own_logs_with_side_features_trains_and_exports(logs, tmp_path):
    import hstu.serving
    from hstu.trainer.cli import main
    from hstu.trainer.train import train

    _, opts, _ = logs
    run = str(tmp_path / "run")
    result = train(load_config(None, [*TINY, *opts, f"run_dir={run}", "model.item_features.combine=mlp",
                                      "eval.item_groups=true"]))
    assert np.isfinite(result.final_metrics["ndcg@10"]) and "cold/num_users" in result.final_metrics
    best = torch.load(os.path.join(run, "best.pt"), weights_only=True)
    assert {"item_tower.tables.genre.weight", "item_tower.tables.tags.weight"} <= set(best)
    assert best["item_tower.feature_values"].shape[1] == 4
    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", run, "--out", out]) == 0
    sm = hstu.serving.load(out)
    assert sm.item_tower is not None
    features = {f["name"]: f for f in sm.manifest["item_tower"]["features"]}
    assert list(features) == ["genre", "tags"] and "vocab/feature-genre.parquet" in features["genre"]["encoding"]
    assert max(sm.verify().values()) < 1e-4


def test_config_errors_name_the_key(logs):
    _, opts, _ = logs
    no_table = [o for o in opts if "item_features.paths" not in o and "item_features.columns" not in o
                and "multi_columns" not in o]
    with pytest.raises(ConfigError, match=r"data\.name=events needs an item side-feature table"):
        load_config(None, no_table)
    with pytest.raises(ConfigError, match=r"model\.item_features\.features\[0\]"):
        load_config(None, opts + ["model.item_features.features=[year]"])


def test_ranking_on_own_logs_reads_the_side_table_of_the_dataset_it_prepared(tmp_path):
    """task=ranking + data.name=events + item features: the tower's table comes from the ranking's own prepared
    folder (its widened max_seq_len is part of the cache key) -- one prepared dataset, not a second prepare."""
    from test_ranking_events import TINY as RANKING_TINY
    from hstu.trainer.train import train

    rng = np.random.default_rng(9)
    log = _log(rng)
    log["stars"] = rng.integers(1, 6, len(log["ts"]))
    f = write_table(tmp_path / "log.parquet", log)
    side = write_table(tmp_path / "items.csv", _side_table(rng), fmt="csv")
    cache = tmp_path / "cache"
    opts = ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s", "data.events.user_column=uid",
            "data.events.item_column=sku", "data.events.time_column=ts", "data.events.rating_column=stars",
            f"data.cache_dir={cache}", f"data.events.item_features.paths=[{side}]",
            "data.events.item_features.columns=[genre]", "data.events.item_features.multi_columns=[tags]",
            "model.item_features.enabled=true", f"run_dir={tmp_path / 'run'}"]
    result = train(load_config(None, [*RANKING_TINY, *opts]))
    assert np.isfinite(result.final_metrics["ne_like"])
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert any(k.startswith("item_tower.tables.genre") for k in best)
    assert len([d for d in os.listdir(cache / "events") if d.startswith("events-")]) == 1
