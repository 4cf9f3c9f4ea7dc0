"""No orphan workers (issue 14 §3): SIGKILL of the `hstu train --nproc-per-node 2` launcher (which runs the
torchrun agent in-process) must take both training processes with it; a worker must not train on and write
results.json with nobody watching. Workers are found by a marker in their environment, so the check does not
depend on the process tree (they are reparented once the launcher dies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from typing import List

import pytest

pytestmark = pytest.mark.timeout(300)

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=200", "data.synthetic.num_items=150",
    "data.synthetic.max_seq_len=24", "data.max_seq_len=24", "data.batch_size=16", "data.eval_batch_size=64",
    "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2",
    "loss.num_negatives=16", "train.epochs=1000", "train.max_steps=100000", "train.eval_every_epochs=1000",
    "train.log_every_steps=1", "train.progress=false", "train.tensorboard=false", "train.num_threads=1",
    "eval.ks=[10]", "eval.ndcg_ks=[10]", "sharding.enabled=true",
]
MARKER_ENV = "HSTU_TEST_ORPHAN_MARKER"


def processes_with_marker(marker: str) -> List[int]:
    """Pids of live (non-zombie) processes whose environment holds MARKER_ENV=marker."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def _kill_all(pids: List[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_launcher_kills_its_workers(tmp_path):
    marker = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", MARKER_ENV: marker}
    cmd = [sys.executable, "-m", "hstu.trainer.cli", "train", "--nproc-per-node", "2", "--run-dir",
           str(tmp_path / "run"), *CONFIG, f"data.cache_dir={tmp_path / 'cache'}"]
    log = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline:  # workers are up once rank 0 has logged a few training steps
            if metrics.exists() and metrics.read_text().count('"train"') >= 3:
                break
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("training did not start in 240 s")
        workers = [p for p in processes_with_marker(marker) if p != launcher.pid]
        assert len(workers) >= 2, workers  # the two training processes
        launcher.kill()  # SIGKILL: the torchrun agent inside it gets no chance to stop its workers
        launcher.wait(timeout=30)
        time.sleep(10)
        survivors = processes_with_marker(marker)
        assert survivors == [], f"workers {survivors} outlived their launcher"
        assert not (tmp_path / "run" / "results.json").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
        _kill_all(processes_with_marker(marker))
        log.close()
