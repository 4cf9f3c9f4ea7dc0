"""Checkpoint atomicity and resume in one process (plain path, and the sharded path as a world of 1).

(d) A crash injected between writing a checkpoint and publishing it (before the tmp -> final rename, or after it
but before `latest` is replaced) leaves the previous `latest` loadable; the next run resumes from the newest
complete checkpoint found by scanning (the renamed one carries its verified manifest, so after the rename it is
that one even though `latest` was not updated), cleans the partial checkpoint and reproduces an uninterrupted
run's losses exactly; keep_last prunes old checkpoints.
"""

from __future__ import annotations

import os

import pytest
import torch

import hstu.trainer.checkpoint as ckpt
from hstu.trainer.config import load_config
from hstu.trainer.metrics_log import read_metrics
from hstu.trainer.tasks.retrieval import build_data, build_model_for
from hstu.trainer.train import TrainState, build_optimizer, checkpoint_manager, train

pytestmark = pytest.mark.timeout(240)

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=120", "data.synthetic.num_items=90",
    "data.synthetic.max_seq_len=16", "data.max_seq_len=16", "data.batch_size=16", "data.eval_batch_size=64",
    "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2",
    "model.dropout=0.2", "loss.num_negatives=8", "optim.warmup_steps=3", "train.stochastic_length.enabled=true",
    "train.stochastic_length.alpha=1.2", "train.epochs=3", "train.max_steps=12", "train.eval_every_epochs=1",
    "train.log_every_steps=1", "train.progress=false", "train.tensorboard=false", "eval.ks=[10]",
    "eval.ndcg_ks=[10]", "eval.popularity_baseline=false", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
]


class Crash(RuntimeError):
    pass


def _cfg(tmp_path, name, sharded):
    return load_config(None, CONFIG + [f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                                       f"sharding.enabled={str(sharded).lower()}"])


def _losses(cfg):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"), kind="train")}


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """Losses of an uninterrupted run, per sharded flag (computed once)."""
    root, cache = tmp_path_factory.mktemp("ref"), {}

    def get(sharded):
        if sharded not in cache:
            cfg = _cfg(root, f"ref-{sharded}", sharded)
            train(cfg)
            cache[sharded] = _losses(cfg)
        return cache[sharded]
    return get


@pytest.mark.parametrize("stage,sharded", [("before_latest", False), ("before_rename", False),
                                           ("before_latest", True)])
def test_crash_between_save_and_publish_keeps_previous_latest(tmp_path, monkeypatch, reference_losses, stage,
                                                              sharded):
    want = reference_losses(sharded)
    cfg = _cfg(tmp_path, "crash", sharded)
    calls = {"n": 0}

    def crash(at):
        if at == stage:
            calls["n"] += 1
            if calls["n"] == 2:  # while saving step 4: step 2 is published
                raise Crash(at)

    monkeypatch.setattr(ckpt, "_crash_point", crash)
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.undo()
    cdir = ckpt.checkpoint_dir(cfg)
    assert open(os.path.join(cdir, "latest")).read().strip() == "step_00000002"
    left = "step_00000004" + (".tmp" if stage == "before_rename" else "")
    assert os.path.isdir(os.path.join(cdir, left))
    latest = ckpt.latest_checkpoint(cdir)
    assert latest == os.path.join(cdir, "step_00000002" if stage == "before_rename" else "step_00000004")

    if not sharded:  # the published checkpoint loads on its own (fresh model and optimizer)
        seqs, _, _ = build_data(cfg)
        model = build_model_for(cfg, seqs.num_items, torch.device("cpu"))
        opt, sched = build_optimizer(model, cfg.optim)
        env = type("Env", (), {"rank": 0, "world_size": 1})()
        meta = checkpoint_manager(TrainState(model, opt, sched), env).load(latest)
        step = ckpt.checkpoint_step(latest)
        assert meta["step"] == step and int(opt.state[next(iter(model.parameters()))]["step"]) == step
        assert sched.last_epoch == step and opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr)

    result = train(cfg)  # resumes from step 2 (train.resume defaults to true)
    assert result.steps == 12
    assert "resumed from" in open(os.path.join(cfg.run_dir, "train.log")).read()
    assert _losses(cfg) == want  # bit-identical continuation
    names = sorted(os.listdir(cdir))
    assert names == ["latest", "step_00000010", "step_00000012"], names  # keep_last=2, partial ones removed
    assert open(os.path.join(cdir, "latest")).read().strip() == "step_00000012"


def test_resume_false_starts_over(tmp_path):
    cfg = _cfg(tmp_path, "run", False)
    train(cfg)
    again = load_config(None, CONFIG + [f"run_dir={cfg.run_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                                        "train.resume=false", "train.max_steps=4"])
    result = train(again)
    assert result.steps == 4 and sorted(_losses(again)) == [1, 2, 3, 4]
    assert sorted(os.listdir(ckpt.checkpoint_dir(again))) == ["latest", "step_00000002", "step_00000004"]
