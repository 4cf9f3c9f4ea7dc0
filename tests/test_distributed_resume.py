"""SIGKILL a 2-process training run (torchrun via `hstu train --nproc-per-node 2`) mid-training, resume it, and
get bit-identical per-step losses (and evaluations) to an uninterrupted run.

The run exercises everything a checkpoint must carry: sharded table + rowwise AdamW state, dense weights +
AdamW, warmup LR schedule, loader position inside an epoch, dropout RNG, Stochastic Length and negative-sampling
generators, and the prefetch pipeline (whose loader runs one batch ahead of training).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import List

import pytest

from hstu.trainer.metrics_log import read_metrics

pytestmark = pytest.mark.timeout(300)

STEPS, EVERY, KILL_AFTER = 100, 20, 25  # 12 batches/epoch -> the resumed part crosses epoch ends and evals
CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=200", "data.synthetic.num_items=150",
    "data.synthetic.max_seq_len=24", "data.max_seq_len=24", "data.batch_size=16", "data.eval_batch_size=64",
    "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2",
    "model.dropout=0.2", "loss.num_negatives=16", "optim.lr=0.003", "optim.warmup_steps=30",
    "train.stochastic_length.enabled=true", "train.stochastic_length.alpha=1.5",
    f"train.epochs=50", f"train.max_steps={STEPS}", "train.eval_every_epochs=3", "train.log_every_steps=1",
    "train.progress=false", "train.tensorboard=false", "train.num_threads=1", "eval.ks=[10]", "eval.ndcg_ks=[10]",
    "sharding.enabled=true", "sharding.sharding_type=row_wise", "sharding.pipeline=prefetch",
    f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2",
]


def _cmd(run_dir: str, cache: str) -> List[str]:
    return [sys.executable, "-m", "hstu.trainer.cli", "train", "--nproc-per-node", "2", "--run-dir", run_dir,
            *CONFIG, f"data.cache_dir={cache}"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _descendants(pid: int) -> List[int]:
    """All descendants of ``pid`` (torchrun starts its workers in new sessions, so killpg would miss them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _train_losses(run_dir: str) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind="train")}


def _max_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        return max(_train_losses(run_dir), default=0) if os.path.exists(path) else 0
    except ValueError:  # a line being written
        return 0


def kill_after_step(cmd: List[str], run_dir: str, step: int) -> None:
    """Start ``cmd`` (a 2-process `hstu train`) and SIGKILL it and all its workers once ``run_dir`` logged ``step``."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while _max_step(run_dir) < step:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "victim run made no progress"
        time.sleep(0.02)
    for pid in _descendants(proc.pid)[::-1] + [proc.pid]:  # workers first, then the torchrun agent
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)
    proc.stderr.close()


def test_sigkill_and_resume_gives_identical_losses(tmp_path):
    cache = str(tmp_path / "cache")
    ref, victim = str(tmp_path / "ref"), str(tmp_path / "victim")
    done = subprocess.run(_cmd(ref, cache), env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    kill_after_step(_cmd(victim, cache), victim, KILL_AFTER)
    killed_at = _max_step(victim)
    latest = open(os.path.join(victim, "checkpoints", "latest")).read().strip()
    resumed_from = int(latest.split("_")[1])
    assert EVERY <= resumed_from < killed_at < STEPS, (resumed_from, killed_at)
    assert resumed_from + 50 <= STEPS

    done = subprocess.run(_cmd(victim, cache), env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from" in open(os.path.join(victim, "train.log")).read()

    want, got = _train_losses(ref), _train_losses(victim)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))  # the rewound log has no duplicates
    nxt = range(resumed_from + 1, resumed_from + 51)
    assert [got[s] for s in nxt] == [want[s] for s in nxt]  # bit-identical (exact float equality)
    assert got == want
    evals = [read_metrics(os.path.join(d, "metrics.jsonl"), kind="eval") for d in (ref, victim)]
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in recs]  # noqa: E731
    assert strip(evals[0]) == strip(evals[1]) and len(evals[0]) >= 2


def test_nproc_per_node_without_sharding_is_a_usage_error(capsys, tmp_path):
    from hstu.trainer.cli import main

    code = main(["train", "--nproc-per-node", "2", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "sharding.enabled=true" in err and "Traceback" not in err
