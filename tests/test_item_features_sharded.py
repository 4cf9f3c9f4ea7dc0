"""Sharded item-tower feature tables: a REAL 2-process run (gloo) with ``sharding.enabled=true`` and item
features — the id table AND the feature tables are TorchRec tables sharded row-wise over the 2 ranks, trained by
the fused rowwise AdamW; best.pt (gathered) and ``hstu export --checkpoint latest`` (DCP read back unsharded)
reproduce the sharded model's item vectors."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.timeout(300)

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=48", "data.synthetic.num_items=70",
    "data.synthetic.num_interests=6", "data.synthetic.max_seq_len=10", "data.max_seq_len=10",
    "data.batch_size=16", "data.eval_batch_size=24", "model.embedding_dim=8", "model.attention_dim=4",
    "model.linear_dim=4", "model.num_heads=2", "model.dropout=0.0", "loss.num_negatives=8", "train.epochs=1",
    "train.max_steps=2", "train.progress=false", "train.tensorboard=false", "eval.ks=[10]", "eval.ndcg_ks=[10]",
    "eval.popularity_baseline=false", "sharding.enabled=true", "sharding.sharding_type=row_wise",
    "checkpoint.every_steps=2", "model.item_features.enabled=true", "model.item_features.combine=mlp",
    "data.holdout_items_frac=0.1", "eval.item_groups=true",
]


def _cfg(run_dir: str, cache: str, pipeline: str):
    from hstu.trainer.config import load_config

    return load_config(None, CONFIG + [f"run_dir={run_dir}", f"data.cache_dir={cache}",
                                       f"sharding.pipeline={pipeline}"])


def _train_and_outputs(rank: int, world: int, run_dir: str, cache: str, pipeline: str) -> Dict[str, Any]:
    """Train on 2 ranks; then a fresh sharded model: its feature tables before loading (= the plain model's),
    and after loading the latest checkpoint its item vectors and the local shard sizes of each table."""
    from hstu.trainer import checkpoint as ckpt
    from hstu.trainer import distributed as hd
    from hstu.trainer.parallel.item_features import CollectionFeatureTables
    from hstu.trainer.tasks.retrieval import RetrievalTask
    from hstu.trainer.train import TrainState, build_optimizer, checkpoint_manager, train

    result = train(_cfg(run_dir, cache, pipeline))
    cfg = _cfg(run_dir + "-load", cache, pipeline)
    env = hd.setup(cfg)
    task = RetrievalTask(cfg)
    data = task.build_data(env)
    torch.manual_seed(7)  # the same plain model on both ranks (each rank's shard comes from its own copy)
    plain = task.build_model(env.device)
    ids = torch.arange(data.num_items + 1)
    with torch.no_grad():
        plain_items = plain.eval().item_vectors(ids)
    model, sparse = hd.shard_model(plain, cfg, env)
    inner = hd.unwrap(model).eval()
    assert not isinstance(inner.item_tower.tables, torch.nn.ModuleDict)
    assert isinstance(inner.item_tower.tables, CollectionFeatureTables)
    with torch.no_grad():
        sharded_at_init = inner.item_vectors(ids)  # collective lookups of both collections
    opt, sched = build_optimizer(model, cfg.optim)
    checkpoint_manager(TrainState(model, opt, sched, sparse), env).load(
        ckpt.latest_checkpoint(ckpt.checkpoint_dir(_cfg(run_dir, cache, pipeline))))
    with torch.no_grad():
        items = inner.item_vectors(ids)
    return {"plain_items": plain_items, "sharded_at_init": sharded_at_init, "items": items,
            "metrics": result.final_metrics,
            "dense": [n for n, p in model.named_parameters() if p.requires_grad and "item_tower.tables" in n]}


@pytest.mark.parametrize("pipeline", ["none", "prefetch"])
def test_two_process_sharded_feature_tables(tmp_path, pipeline):
    import torch.distributed.checkpoint as dcp

    import hstu.serving
    from hstu.serving.export import resolve_checkpoint
    from hstu.trainer.cli import main

    run_dir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    parts = run_distributed(_train_and_outputs, 2, (run_dir, cache, pipeline), timeout_s=280)
    for p in parts:
        torch.testing.assert_close(p["sharded_at_init"], p["plain_items"], rtol=0, atol=1e-6)
        assert p["dense"] == []  # the feature tables are not dense parameters: the fused optimizer trains them
        assert "unseen/hr@10" in p["metrics"] and "cold/num_users" in p["metrics"]
    torch.testing.assert_close(parts[0]["items"], parts[1]["items"], rtol=0, atol=0)
    assert not torch.allclose(parts[0]["items"], parts[0]["plain_items"])  # trained
    latest = resolve_checkpoint(run_dir, "latest")
    meta = dcp.FileSystemReader(latest).read_metadata().state_dict_metadata
    feature = [k for k in meta if k.startswith("model.") and "item_feature_cluster" in k and k.endswith("weight")]
    assert feature and len(meta[feature[0]].chunks) == 2  # really sharded: one row block per rank
    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", run_dir, "--out", out, "--checkpoint", "latest"]) == 0
    sm = hstu.serving.load(out)
    assert sm.item_tower is not None
    torch.testing.assert_close(sm.table.vectors(torch.arange(sm.num_items + 1)), parts[0]["items"], rtol=0,
                               atol=1e-6)
    # best.pt holds the gathered plain tables: it loads into a plain model (hstu eval)
    assert main(["eval", "--run-dir", run_dir, "--checkpoint", "best"]) == 0
