"""The sharded train loop (trainer/train.py with sharding.enabled) in 1 and 2 gloo ranks (spawned processes):

(c) world size 1 vs 2 on the same data give the same table, dense weights and losses after a few steps (each
    rank trains on half of every global batch; the loss is the global batch's, gradients are averaged over ranks
    by DDP and divided by the world size by TorchRec, docs/rowwise_adamw.md);
(b) a checkpoint written by 2 ranks loads into 1 rank and vice versa: model outputs equal the saving run's
    (compared through best.pt, the plain-model export of the same weights);
    and the prefetch pipeline trains bit-identically to the plain loop.

Negatives are made a function of the positive item (a test hook around pipeline.prepare_batch), because random
negatives are drawn per rank and so differ between world sizes.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import pytest
import torch

from dist_utils import run_distributed
from hstu.trainer.metrics_log import read_metrics

pytestmark = pytest.mark.timeout(300)

R = 16  # negatives
CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=96", "data.synthetic.num_items=120",
    "data.synthetic.max_seq_len=16", "data.max_seq_len=16", "data.batch_size=16", "data.eval_batch_size=32",
    "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2",
    "model.dropout=0.0", f"loss.num_negatives={R}", "optim.lr=0.005", "optim.warmup_steps=2",
    "train.epochs=1", "train.max_steps=4", "train.log_every_steps=1", "train.progress=false",
    "train.tensorboard=false", "eval.ks=[10]", "eval.ndcg_ks=[10]", "eval.popularity_baseline=false",
    "sharding.enabled=true", "checkpoint.every_steps=4",
]


def _label_negatives(prepare):
    def wrapped(batch, ctx):
        out = prepare(batch, ctx)
        pos = out.labels[out.valid]
        out.negatives = (pos[:, None] * 7 + torch.arange(1, R + 1) * 13) % ctx.num_items + 1
        return out  # 121 items <= R * D: the all-items route, lookup_ids = 0..N stays valid
    return wrapped


def _cfg(run_dir: str, cache: str, *extra: str):
    from hstu.trainer.config import load_config

    return load_config(None, CONFIG + [f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra])


def _outputs_after_load(cfg: Any, path: str) -> Dict[str, Any]:
    """Build the sharded model as train() does, load checkpoint ``path``, return this rank's user vectors of
    its eval slice (with user ids) and all item vectors."""
    from hstu.trainer import distributed as hd
    from hstu.trainer.tasks.retrieval import build_data, build_model_for
    from hstu.trainer.train import TrainState, build_optimizer, checkpoint_manager, warmup_schedule

    env = hd.setup(cfg)
    seqs, _, eval_loader = build_data(cfg, env.rank, env.world_size)
    model, sparse = hd.shard_model(build_model_for(cfg, seqs.num_items, env.device), cfg, env)
    opt, sched = build_optimizer(model, cfg.optim)
    state = TrainState(model, opt, sched, sparse, warmup_schedule(sparse, cfg.optim))
    meta = checkpoint_manager(state, env).load(path)
    inner = hd.unwrap(model).eval()
    batch = next(iter(eval_loader))
    with torch.no_grad():
        return {"user_ids": batch.user_ids, "users": inner.user_vectors(batch),
                "items": inner.item_vectors(torch.arange(seqs.num_items + 1)), "step": meta["step"],
                "lr": sparse.param_groups[0]["lr"]}


def _worker(rank: int, world: int, runs: List[List[str]], cache: str, load: str = "",
            load_extra: Tuple[str, ...] = ()) -> Dict[str, Any]:
    import hstu.trainer.pipeline as pipeline
    from hstu.trainer.train import train

    pipeline.prepare_batch = _label_negatives(pipeline.prepare_batch)
    for run in runs:
        train(_cfg(run[0], cache, *run[1:]))
    return _outputs_after_load(_cfg(runs[0][0] + "-load", cache, *load_extra), load) if load else {}


def _load_error(rank: int, world: int, run_dir: str, cache: str, load: str, extra: Tuple[str, ...]) -> str:
    """The message of the error loading checkpoint ``load`` into a run with overrides ``extra`` ('' if none)."""
    try:
        _outputs_after_load(_cfg(run_dir, cache, *extra), load)
    except (RuntimeError, ValueError) as e:  # CheckpointError is a ConfigError (ValueError)
        return str(e)
    return ""


def _losses(run_dir: str) -> List[float]:
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind="train")]


def _best(run_dir: str) -> Dict[str, torch.Tensor]:
    return torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)


def _plain_outputs(run_dir: str, cache: str, user_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The saving run's model as a plain RetrievalModel (best.pt) on the same users."""
    from hstu.trainer.tasks.retrieval import build_data, build_model_for

    cfg = _cfg(run_dir, cache)
    seqs, _, eval_loader = build_data(cfg)
    model = build_model_for(cfg, seqs.num_items, torch.device("cpu"))
    model.load_state_dict(_best(run_dir))
    model.eval()
    batch = next(iter(eval_loader))
    keep = torch.isin(batch.user_ids, user_ids)
    with torch.no_grad():
        users = model.user_vectors(batch)[keep]
        items = model.item_vectors(torch.arange(seqs.num_items + 1))
    return {"user_ids": batch.user_ids[keep], "users": users, "items": items}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    d = {k: str(root / k) for k in ("w1", "w2", "w2_prefetch")}
    cache = str(root / "cache")
    run_distributed(_worker, 1, ([[d["w1"]]], cache), timeout_s=240)
    w2 = run_distributed(_worker, 2, ([[d["w2"]], [d["w2_prefetch"], "sharding.pipeline=prefetch"]], cache,
                                      os.path.join(d["w1"], "checkpoints", "step_00000004")), timeout_s=240)
    w1 = run_distributed(_worker, 1, ([[d["w1"] + "-again"]], cache,
                                      os.path.join(d["w2"], "checkpoints", "step_00000004")), timeout_s=240)
    return {"dirs": d, "cache": cache, "loaded_into_2": w2, "loaded_into_1": w1}


def test_world_size_1_and_2_train_the_same_model(runs):
    d = runs["dirs"]
    l1, l2 = _losses(d["w1"]), _losses(d["w2"])
    assert len(l1) == len(l2) == 4
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    b1, b2 = _best(d["w1"]), _best(d["w2"])
    assert b1.keys() == b2.keys() and "item_embeddings.table.weight" in b1
    table0 = b1["item_embeddings.table.weight"]
    for k in b1:
        torch.testing.assert_close(b2[k], b1[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    moved = (table0[1:] != 0).any()
    assert moved


def test_prefetch_pipeline_is_bit_identical(runs):
    d = runs["dirs"]
    assert _losses(d["w2_prefetch"]) == _losses(d["w2"])
    a, b = _best(d["w2"]), _best(d["w2_prefetch"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("saved,loaded", [("w1", "loaded_into_2"), ("w2", "loaded_into_1")])
def test_checkpoint_loads_into_another_world_size(runs, saved, loaded):
    parts = runs[loaded]
    assert all(p["step"] == 4 for p in parts)
    assert all(p["lr"] == pytest.approx(0.005) for p in parts)  # warmup finished: schedule restored
    ids = torch.cat([p["user_ids"] for p in parts])
    users = torch.cat([p["users"] for p in parts])
    want = _plain_outputs(runs["dirs"][saved], runs["cache"], ids)
    order = torch.argsort(ids)
    assert torch.equal(ids[order], want["user_ids"])  # eval slices of the ranks = the single-rank batch
    for p in parts:
        torch.testing.assert_close(p["items"], want["items"], rtol=0, atol=1e-6)
    torch.testing.assert_close(users[order], want["users"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("users,batch", [(23, 5), (21, 5), (40, 8)])
def test_loader_slices_partition_every_global_batch(users, batch):
    import numpy as np

    from hstu.trainer.data.loader import SequenceLoader
    from hstu.trainer.data.sequences import UserSequences

    offsets = np.arange(users + 1) * 3
    seqs = UserSequences(np.arange(users), offsets, np.arange(offsets[-1]) % 9 + 1, np.arange(offsets[-1]), None, 9)
    single = SequenceLoader(seqs, batch, shuffle=True, seed=3).plan(2)
    for world in (2, 3):
        loaders = [SequenceLoader(seqs, batch, shuffle=True, seed=3, rank=r, world_size=world) for r in range(world)]
        plans = [ld.plan(2) for ld in loaders]
        assert len({len(p) for p in plans} | {len(ld) for ld in loaders}) == 1  # same step count on every rank
        for step, parts in enumerate(zip(*plans)):
            assert all(p.size > 0 for p in parts)
            if step < len(plans[0]) - 1:  # global batch `step` = the single-process batch
                assert np.array_equal(np.concatenate(parts), single[step])
        assert np.array_equal(np.sort(np.concatenate([np.concatenate(p) for p in plans])), np.arange(users))


def test_column_wise_checkpoint_loads_into_the_same_split_and_refuses_another(tmp_path):
    """A 2-rank column_wise checkpoint reloads into 2 column_wise ranks (outputs = the saving run's best.pt);
    into 1 row_wise rank it is refused with an error naming the rowwise state and column_wise (its second
    moment is per row per column shard, docs/rowwise_adamw.md), before any tensor is overwritten."""
    run, cache = str(tmp_path / "col"), str(tmp_path / "cache")
    col = ("sharding.sharding_type=column_wise",)
    ckpt = os.path.join(run, "checkpoints", "step_00000004")
    parts = run_distributed(_worker, 2, ([[run, *col]], cache, ckpt, col), timeout_s=240)
    ids = torch.cat([p["user_ids"] for p in parts])
    users = torch.cat([p["users"] for p in parts])
    want = _plain_outputs(run, cache, ids)
    order = torch.argsort(ids)
    assert torch.equal(ids[order], want["user_ids"])
    torch.testing.assert_close(users[order], want["users"], rtol=0, atol=1e-6)
    for p in parts:
        torch.testing.assert_close(p["items"], want["items"], rtol=0, atol=1e-6)
    (msg,) = run_distributed(_load_error, 1, (run + "-w1", cache, ckpt, ("sharding.sharding_type=row_wise",)),
                             timeout_s=120)
    assert "global sizes differ" in msg and "exp_avg_sq" in msg and "column_wise" in msg, msg

