"""CheckpointManager (trainer/checkpoint_manager.py): the on-disk key layout stays the one earlier checkpoints
have (so they still load), registered state objects round-trip through real DCP, bad registrations fail."""

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from hstu.trainer import integrity
from hstu.trainer.checkpoint_manager import (DCP, META, RANK, AttributeState, CheckpointManager,
                                             DenseOptimizerState, GlobalRNGState, SchedulerState)
from hstu.trainer.config import load_config
from hstu.trainer.distributed import DistEnv
from hstu.trainer.train import build_optimizer, train

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=40", "data.synthetic.num_items=30",
    "data.synthetic.max_seq_len=16", "data.max_seq_len=16", "data.batch_size=16", "data.eval_batch_size=64",
    "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2",
    "loss.num_negatives=4", "optim.warmup_steps=3", "train.epochs=1", "train.max_steps=2",
    "train.progress=false", "train.tensorboard=false", "eval.ks=[10]", "eval.ndcg_ks=[10]",
    "eval.popularity_baseline=false", "checkpoint.every_steps=1", "checkpoint.keep_last=1",
]

# the layout of checkpoints written before the manager existed (literal: a changed layout must fail here)
META_KEYS = {"step", "epoch", "tokens", "train_seconds", "best_value", "best_epoch", "best_metrics",
             "final_metrics", "best_validation", "final_validation", "final_epoch", "baseline_metrics",
             "epoch_loss_sum", "epoch_steps", "scheduler", "loader", "world_size", "sharded"}
RNG_KEYS = {"world_size", "torch", "numpy", "python", "neg_generator", "sl_generator"}


def test_train_writes_the_checkpoint_layout_earlier_versions_wrote(tmp_path):
    cfg = load_config(None, CONFIG + [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    train(cfg)
    path = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert integrity.verify_step_dir(str(path)) is None
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert {k.split(".")[0] for k in stored} == {"model", "dense_optim", "meta"}
    meta_holder = {"meta": ""}
    dcp.load(meta_holder, storage_reader=dcp.FileSystemReader(str(path)))
    meta = json.loads(meta_holder["meta"])
    assert set(meta) - {"sparse_scheduler"} == META_KEYS
    assert meta["step"] == 2 and meta["scheduler"]["last_epoch"] == 2 and meta["world_size"] == 1
    assert meta["loader"]["batches_consumed"] == 2
    rng = torch.load(path / "rng_rank0.pt", weights_only=False)
    assert set(rng) - {"cuda"} == RNG_KEYS


class _Progress:
    step, epoch, note = 0, 0, ""


def test_registered_objects_round_trip_through_dcp(tmp_path):
    """Save a model, its AdamW, LambdaLR, progress and the global RNGs; change all of them; load restores each."""
    cfg = load_config(None, CONFIG)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer(model, cfg.optim)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    progress = _Progress()
    progress.step, progress.epoch, progress.note = 7, 1, "x"

    def manager(m, o, s, p):
        return (CheckpointManager(DistEnv(), str(tmp_path / "ck"), keep_last=2)
                .register("model", m, DCP).register("dense_optim", DenseOptimizerState(m, o), DCP)
                .register("progress", AttributeState(p, ("step", "epoch", "note")), META, flat=True)
                .register("scheduler", SchedulerState(s), META).register("rng", GlobalRNGState(), RANK, flat=True))

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    path = manager(model, opt, sched, progress).save(7)
    want_draw = (torch.rand(3), random.random(), np.random.rand())
    assert os.path.basename(path) == "step_00000007"
    assert open(tmp_path / "ck" / "latest").read().strip() == "step_00000007"

    model2 = torch.nn.Linear(3, 2)
    opt2, sched2 = build_optimizer(model2, cfg.optim)
    progress2 = _Progress()
    meta = manager(model2, opt2, sched2, progress2).load(path)
    assert (progress2.step, progress2.epoch, progress2.note) == (7, 1, "x") and meta["step"] == 7
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    s1, s2 = opt.state[model.weight], opt2.state[model2.weight]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and int(s2["step"]) == 1
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    got_draw = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got_draw[0], want_draw[0]) and got_draw[1:] == want_draw[1:]


def test_bad_registrations_fail_with_the_name():
    m = CheckpointManager(DistEnv()).register("model", torch.nn.Linear(1, 1), DCP)
    with pytest.raises(ValueError, match="'model' registered twice"):
        m.register("model", torch.nn.Linear(1, 1), DCP)
    with pytest.raises(ValueError, match="'x': storage 'disk'"):
        m.register("x", GlobalRNGState(), "disk")
    with pytest.raises(ValueError, match="flat only"):
        m.register("y", GlobalRNGState(), DCP, flat=True)
    with pytest.raises(ValueError, match="no checkpoint directory"):
        m.save(1)
