"""Item-tower feature tables of the RANKING model on the sharded path: REAL 1- and 2-process gloo runs with
``sharding.enabled=true`` and ``model.item_features.enabled=true`` — the id/action/contextual/side tables and the
feature table are TorchRec tables (two collections) trained by the fused rowwise AdamW. 2 ranks train the same
model as 1 (losses, best.pt), the sharded run starts from the plain run's initialisation (same first loss), the
feature table is really split over the ranks in the DCP checkpoint, and best.pt / ``hstu export --checkpoint
latest`` give the plain model's names and a working artifact."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest
import torch

from dist_utils import run_distributed
from hstu.trainer.metrics_log import read_metrics
from test_ranking_distributed import CONFIG

pytestmark = pytest.mark.timeout(300)
EXTRA = ["model.item_features.enabled=true", "model.item_features.combine=mlp"]
SHARDED = ["sharding.enabled=true", "sharding.sharding_type=row_wise", "checkpoint.every_steps=5"]


def _cfg(run_dir: str, *extra: str):
    from hstu.trainer.config import load_config

    return load_config(None, CONFIG + EXTRA + [f"run_dir={run_dir}", *extra])


def _worker(rank: int, world: int, run_dir: str, *extra: str) -> Dict[str, Any]:
    from hstu.modules.embeddings import tables_on
    from hstu.trainer import distributed as hd
    from hstu.trainer.parallel.item_embeddings import full_table
    from hstu.trainer.parallel.item_features import CollectionFeatureTables
    from hstu.trainer.tasks import get_task
    from hstu.trainer.train import train

    train(_cfg(run_dir, *SHARDED, *extra))
    cfg = _cfg(run_dir + "-probe", *SHARDED, *extra)  # a fresh sharded model: are its feature tables a collection?
    env = hd.setup(cfg)
    task = get_task(cfg)
    task.build_data(env)
    torch.manual_seed(cfg.train.seed)
    with tables_on("meta" if cfg.sharding.table_init == "per_shard" else None):  # as train() builds it
        plain = task.build_model(env.device)
    model, _ = hd.shard_model(plain, cfg, env)
    inner = hd.unwrap(model)
    init = [full_table(v) for k, v in model.state_dict().items() if "item_feature_cluster_table" in k]  # collective
    return {"collection": isinstance(inner.item_tower.tables, CollectionFeatureTables), "init": init[0],
            "dense": [n for n, p in model.named_parameters() if p.requires_grad and "item_tower.tables" in n]}


def _losses(run_dir: str) -> List[float]:
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind="train")]


def _best(run_dir: str) -> Dict[str, torch.Tensor]:
    return torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)


def test_sharded_ranking_feature_tables_one_and_two_processes(tmp_path):
    import torch.distributed.checkpoint as dcp

    import hstu.serving
    from hstu.serving.export import resolve_checkpoint
    from hstu.trainer.cli import evaluate_run, main
    from hstu.trainer.train import train

    plain, w1, w2, ps = (str(tmp_path / k) for k in ("plain", "w1", "w2", "per_shard"))
    train(_cfg(plain))
    parts1 = run_distributed(_worker, 1, (w1,), timeout_s=240)
    parts2 = run_distributed(_worker, 2, (w2,), timeout_s=280)
    per_shard = run_distributed(_worker, 2, (ps, "sharding.table_init=per_shard"), timeout_s=280)
    for p in parts1 + parts2 + per_shard:
        assert p["collection"] and p["dense"] == []  # the fused rowwise optimizer trains the feature table
    l0, l1, l2 = _losses(plain), _losses(w1), _losses(w2)
    assert len(l1) == len(l2) == 10
    assert l1[0] == pytest.approx(l0[0], rel=1e-6)  # the sharded tables start from the plain initialisation
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    b1, b2 = _best(w1), _best(w2)
    assert b1.keys() == b2.keys() == _best(plain).keys()  # the plain model's names
    assert "item_tower.tables.cluster.weight" in b2 and not any("collection" in k for k in b2)
    for k in b1:
        torch.testing.assert_close(b2[k], b1[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    assert not torch.allclose(b2["item_tower.tables.cluster.weight"], _best(plain)["item_tower.tables.cluster.weight"])
    # per_shard: the feature table is drawn per shard from (train.seed, table, row), not copied from the plain init
    from hstu.trainer.parallel.table_init import fill_rows

    lp = _losses(ps)
    assert len(lp) == 10 and all(v == v for v in lp) and lp[0] != pytest.approx(l0[0], rel=1e-6)
    seeded = fill_rows(torch.empty_like(b1["item_tower.tables.cluster.weight"]), 42, "item_feature_cluster_table")
    assert torch.equal(per_shard[0]["init"], seeded)  # gathered from the 2 ranks' shards
    copied = parts2[0]["init"]  # the copy init: the plain model's table, another draw
    assert copied.shape == seeded.shape and not torch.allclose(copied, seeded)
    assert "item_tower.tables.cluster.weight" in torch.load(os.path.join(ps, "best.pt"), weights_only=True)
    latest = resolve_checkpoint(w2, "latest")
    meta = dcp.FileSystemReader(latest).read_metadata().state_dict_metadata
    feature = [k for k in meta if k.startswith("model.") and "item_feature_cluster" in k and k.endswith("weight")]
    assert feature and len(meta[feature[0]].chunks) == 2  # one row block per rank
    best = read_metrics(os.path.join(w2, "metrics.jsonl"), kind="eval")
    again = evaluate_run(w2)["metrics"]  # best.pt in the plain model reproduces a logged evaluation
    assert any(again["ne_mean"] == pytest.approx(e["ne_mean"], abs=1e-6) for e in best if e["split"] == "test")
    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", w2, "--out", out, "--checkpoint", "latest"]) == 0
    sm = hstu.serving.load(out, task="ranking")
    assert sm.manifest["ranking"]["item_features"] == ["cluster"] and max(sm.verify().values()) < 1e-4
