"""A run never removes or overwrites a previous run's files before it has its own first checkpoint or result
(issue 14 §2 run-directory lifecycle; trainer/run_dir.py), and stale temp files of killed writers are cleaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import hstu.trainer.run_dir as rd
import hstu.trainer.train as train_mod
from hstu.trainer.config import ConfigError
from reliability_utils import losses, run_cli, snapshot, train_argv

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """A finished run (checkpoints, best.pt, results.json, metrics.jsonl, train.log) to rerun over."""
    root = tmp_path_factory.mktemp("previous")
    run, cache = root / "run", root / "cache"
    from hstu.trainer.cli import main

    assert main(train_argv(run, cache, "train.max_steps=6")) == 0
    for n in ("best.pt", "results.json", "metrics.jsonl", "config.yaml", "train.log"):
        assert (run / n).exists(), n
    return run, cache


def _copy(previous, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(previous[0], run)
    return run


def _fail_after_start(monkeypatch, exc):
    """The optimizer build (after the run directory was prepared) raises ``exc`` — e.g. a config value only
    torch rejects."""
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(train_mod, "build_optimizer", boom)


@pytest.mark.parametrize("resume", ["false", "true"])
def test_fresh_run_failing_after_start_leaves_the_previous_run_intact(previous, tmp_path, monkeypatch, capsys,
                                                                       resume):
    run = _copy(previous, tmp_path)
    if resume == "true":  # no checkpoint to resume: also a fresh run over the previous files
        import shutil

        shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    _fail_after_start(monkeypatch, ConfigError("key 'optim.betas' = [2.0, 0.9]: invalid"))
    code, _, err = run_cli(capsys, *train_argv(run, previous[1], f"train.resume={resume}"))
    assert code == 2 and "optim.betas" in err and "Traceback" not in err
    assert snapshot(run) == before  # every file byte-identical, nothing left behind (.previous-run is gone)


def test_kill_before_the_first_checkpoint_is_undone_by_the_next_run(previous, tmp_path, monkeypatch, capsys):
    """kill -9 of a fresh run before it had a checkpoint or result (no cleanup code runs): the next run puts
    the previous run back first and resumes it."""
    run = _copy(previous, tmp_path)
    _fail_after_start(monkeypatch, KeyboardInterrupt())
    monkeypatch.setattr(rd, "restore_previous", lambda *a, **k: False)  # killed: no cleanup
    run_cli(capsys, *train_argv(run, previous[1], "train.resume=false"))
    assert (run / rd.PREVIOUS).is_dir() and not (run / "best.pt").exists()
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *train_argv(run, previous[1], "train.max_steps=8"))
    assert code == 0, err
    log = (run / "train.log").read_text()
    assert "undone (the previous run is back)" in log and "resumed from" in log and "step 6" in log
    assert not (run / rd.PREVIOUS).exists() and not (run / "checkpoints" / rd.PREVIOUS).exists()
    got, want = losses(run), losses(previous[0])
    assert sorted(got) == list(range(1, 9)) and {s: got[s] for s in want} == want  # the previous run, continued


def test_fresh_run_replaces_the_previous_run_once_it_has_a_checkpoint(previous, tmp_path, capsys):
    run = _copy(previous, tmp_path)
    old_results = (run / "results.json").read_bytes()
    code, _, err = run_cli(capsys, *train_argv(run, previous[1], "train.resume=false", "train.max_steps=4"))
    assert code == 0, err
    assert not (run / rd.PREVIOUS).exists() and not (run / "checkpoints" / rd.PREVIOUS).exists()
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]
    assert (run / "results.json").read_bytes() != old_results and sorted(losses(run)) == [1, 2, 3, 4]
    assert "moved to .previous-run until this run has a checkpoint or result" in (run / "train.log").read_text()


def test_recover_completes_a_swap_whose_new_run_has_a_result(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("old")
    rd.stash_previous(str(run), str(run / "checkpoints"))
    (run / "best.pt").write_bytes(b"new")  # the new run's own result, then a kill before commit_run
    assert rd.recover(str(run), str(run / "checkpoints")) == "committed"
    assert sorted(os.listdir(run)) == ["best.pt"]


def test_stale_cache_temp_file_of_a_killed_writer_is_removed(tmp_path):
    """kill -9 during the data-cache write leaves ``*.npz.<rand>.tmp``; the next load removes it once it is
    old and unlocked — never a live writer's (locked) or a brand-new one."""
    from hstu.trainer.data import cache

    folder = tmp_path / "sequences"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, numpy as np
        from hstu.trainer.data import cache
        def slow_savez(f, **arrays):
            f.write(b"partial")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        np.savez = slow_savez
        class S:
            def to_arrays(self):
                return {{}}
        cache.save_sequences(S(), {str(folder / 'x-0123.npz')!r})
    """)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    (tmp,) = folder.glob("*.npz.*.tmp")
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    assert cache.clean_stale_tmp(folder) == []  # the live writer holds its lock
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    fresh = folder / "y-4567.npz.abcd.tmp"
    fresh.write_bytes(b"just created")
    assert cache.clean_stale_tmp(folder) == [str(tmp)]  # the killed writer's; the new one stays
    assert not tmp.exists() and fresh.exists()
