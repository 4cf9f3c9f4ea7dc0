"""SIGKILL a 2-process run that streams its own shards of a prepared event log (data.events.stream, sharded
item table), resume it, and get bit-identical per-step losses and evaluations to an uninterrupted run: the
streaming loader's position (epoch, batches consumed -> shard, offset; permutation seed) lives in the DCP
checkpoint. Kill/resume helpers: tests/test_distributed_resume.py."""

import os
import subprocess
import sys

import pytest

import test_distributed_resume as dr
from events_utils import ml1m_like, write_table
from hstu.trainer.config import load_config
from hstu.trainer.data import prepare
from hstu.trainer.metrics_log import read_metrics

pytestmark = pytest.mark.timeout(300)
STEPS, EVERY, KILL_AFTER = 40, 8, 13


def _overrides(log, cache):
    return ["data.name=events", f"data.events.paths=[{log}]", "data.events.time_unit=s", "data.events.num_shards=4",
            "data.events.stream=true", f"data.cache_dir={cache}", "data.max_seq_len=16", "data.batch_size=16",
            "data.eval_batch_size=32", "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8",
            "model.num_heads=2", "model.dropout=0.2", "loss.num_negatives=16", "optim.lr=0.003",
            "train.epochs=50", f"train.max_steps={STEPS}", "train.eval_every_epochs=2", "train.log_every_steps=1",
            "train.progress=false", "train.tensorboard=false", "train.num_threads=1", "eval.ks=[10]",
            "eval.ndcg_ks=[10]", "sharding.enabled=true", "sharding.sharding_type=row_wise",
            f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2"]


def _cmd(run_dir, overrides):
    return [sys.executable, "-m", "hstu.trainer.cli", "train", "--nproc-per-node", "2", "--run-dir", run_dir,
            *overrides]


def test_sigkill_streamed_run_resumes_bit_identically(tmp_path):
    log = write_table(tmp_path / "log.parquet", ml1m_like(num_users=160, num_items=120, seed=4))
    overrides = _overrides(log, tmp_path / "cache")
    prepare(load_config(None, overrides).data, progress=False)  # once, before the ranks start
    ref, victim = str(tmp_path / "ref"), str(tmp_path / "victim")
    done = subprocess.run(_cmd(ref, overrides), env=dr._env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    dr.kill_after_step(_cmd(victim, overrides), victim, KILL_AFTER)
    resumed_from = int(open(os.path.join(victim, "checkpoints", "latest")).read().strip().split("_")[1])
    assert EVERY <= resumed_from < dr._max_step(victim) < STEPS
    done = subprocess.run(_cmd(victim, overrides), env=dr._env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in open(os.path.join(victim, "train.log")).read()
    want, got = dr._train_losses(ref), dr._train_losses(victim)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1)) and got == want
    evals = [read_metrics(os.path.join(d, "metrics.jsonl"), kind="eval") for d in (ref, victim)]
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in recs]  # noqa: E731
    assert strip(evals[0]) == strip(evals[1]) and len(evals[0]) >= 1
