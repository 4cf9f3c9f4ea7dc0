"""`hstu export --checkpoint latest` from a REAL 2-process sharded run: the retrieval model trains on 2 gloo ranks
with a row-wise sharded item table and DCP checkpoints; the export (one process, no process group) reads the
sharded checkpoint back unsharded, and the artifact reproduces the trained, sharded model's outputs."""

from __future__ import annotations

import os
from typing import Any, Dict

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.timeout(300)

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=48", "data.synthetic.num_items=70",
    "data.synthetic.max_seq_len=10", "data.max_seq_len=10", "data.batch_size=16", "data.eval_batch_size=24",
    "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2",
    "model.dropout=0.0", "loss.num_negatives=8", "optim.warmup_steps=1", "train.epochs=1", "train.max_steps=2",
    "train.log_every_steps=1", "train.progress=false", "train.tensorboard=false", "eval.ks=[10]",
    "eval.ndcg_ks=[10]", "eval.popularity_baseline=false", "sharding.enabled=true",
    "sharding.sharding_type=row_wise", "checkpoint.every_steps=2",
]


def _cfg(run_dir: str, cache: str):
    from hstu.trainer.config import load_config

    return load_config(None, CONFIG + [f"run_dir={run_dir}", f"data.cache_dir={cache}"])


def _train_and_outputs(rank: int, world: int, run_dir: str, cache: str) -> Dict[str, Any]:
    """Train on 2 ranks, then load the latest checkpoint back into the sharded model (fresh run dir) and return
    this rank's eval slice (histories, query times) with the sharded model's user vectors and all item vectors."""
    from hstu.trainer import checkpoint as ckpt
    from hstu.trainer import distributed as hd
    from hstu.trainer.tasks.retrieval import build_data, build_model_for
    from hstu.trainer.train import TrainState, build_optimizer, checkpoint_manager, train

    train(_cfg(run_dir, cache))
    cfg = _cfg(run_dir + "-load", cache)
    env = hd.setup(cfg)
    seqs, _, eval_loader = build_data(cfg, env.rank, env.world_size)
    model, sparse = hd.shard_model(build_model_for(cfg, seqs.num_items, env.device), cfg, env)
    opt, sched = build_optimizer(model, cfg.optim)
    checkpoint_manager(TrainState(model, opt, sched, sparse), env).load(
        ckpt.latest_checkpoint(ckpt.checkpoint_dir(_cfg(run_dir, cache))))
    inner = hd.unwrap(model).eval()
    batch = next(iter(eval_loader))
    with torch.no_grad():
        return {"item_ids": batch.item_ids, "timestamps": batch.timestamps, "offsets": batch.offsets,
                "query_times": batch.target_timestamps, "users": inner.user_vectors(batch),
                "items": inner.item_vectors(torch.arange(seqs.num_items + 1))}


def test_export_from_two_process_sharded_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    import hstu.serving
    from hstu.serving.export import resolve_checkpoint
    from hstu.trainer.cli import main

    run_dir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    parts = run_distributed(_train_and_outputs, 2, (run_dir, cache), timeout_s=240)
    latest = resolve_checkpoint(run_dir, "latest")
    assert latest.endswith("step_00000002")
    meta = dcp.FileSystemReader(latest).read_metadata().state_dict_metadata
    table = [k for k in meta if k.startswith("model.") and "item_id" in k]
    assert table and len(meta[table[0]].chunks) == 2  # really sharded: one row block per rank

    out = str(tmp_path / "art")
    assert main(["export", "--run-dir", run_dir, "--out", out, "--checkpoint", "latest"]) == 0
    sm = hstu.serving.load(out)
    assert sm.manifest["source"]["checkpoint"] == os.path.abspath(latest)
    n = 0
    for p in parts:
        torch.testing.assert_close(sm.table.vectors(torch.arange(sm.num_items + 1)), p["items"], rtol=0, atol=1e-6)
        for b in range(p["offsets"].numel() - 1):
            s, e = int(p["offsets"][b]), int(p["offsets"][b + 1])
            state = sm.encode(p["item_ids"][s:e], p["timestamps"][s:e], int(p["query_times"][b]))
            torch.testing.assert_close(state.last, p["users"][b], rtol=1e-4, atol=1e-5)
            n += 1
    assert n >= 2
    from hstu.trainer.integrity import CheckpointError

    with pytest.raises(CheckpointError, match="no best.pt"):
        resolve_checkpoint(str(tmp_path), "best")
