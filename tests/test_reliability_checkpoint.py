"""A damaged checkpoint never costs the good ones (issue 14 §1; docs/reliability.md), through the real CLI.

Setup (once): a run killed right after publishing its step-10 checkpoint (checkpoints step_8 and step_10,
`latest` -> step_10, best.pt and metrics.jsonl of epochs so far), and an uninterrupted run of the same config (the
reference). Each case copies the killed run, applies ONE damage and reruns the same `hstu train` command
(train.resume defaults to true): it must resume from the newest checkpoint that verifies — step_8 when step_10 is
damaged (a warning names the bad file), step_10 when only the `latest` pointer is bad — and every step's loss
must equal the uninterrupted run's (bit-identical). Nothing intact is ever deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

import hstu.trainer.checkpoint as ckpt
import hstu.trainer.train as train_mod
from hstu.trainer.cli import main
from reliability_utils import CONFIG, flip_bits, losses, run_cli, snapshot, train_argv, truncate

pytestmark = pytest.mark.timeout(300)

OLDER, NEWEST = "step_00000008", "step_00000010"  # the older (fallback) and the newest checkpoint


class Killed(BaseException):
    """Stands for kill -9 right after a checkpoint is published (no cleanup code of ours may catch it)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(reference run dir, killed run dir, cache dir): built once."""
    root = tmp_path_factory.mktemp("reliability")
    cache, ref, killed = root / "cache", root / "ref", root / "killed"
    assert main(train_argv(ref, cache)) == 0
    real = train_mod.save_checkpoint

    def save_then_die(state, ctx, position):
        real(state, ctx, position)
        if state.step == 10:
            raise Killed()

    train_mod.save_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            main(train_argv(killed, cache))
    finally:
        train_mod.save_checkpoint = real
    cdir = killed / "checkpoints"
    assert sorted(os.listdir(cdir)) == ["latest", OLDER, NEWEST]
    assert (cdir / "latest").read_text().strip() == NEWEST
    assert (killed / "best.pt").exists() and max(losses(killed)) == 10
    return ref, killed, cache


def copy_of(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    return run


def _newest(run):
    return run / "checkpoints" / NEWEST


DAMAGE = {  # name: (damage(run_dir), checkpoint expected to be resumed, file the warning names)
    "truncate_distcp": (lambda r: truncate(_newest(r) / "__0_0.distcp"), OLDER, "__0_0.distcp"),
    "truncate_metadata": (lambda r: truncate(_newest(r) / ".metadata"), OLDER, ".metadata"),
    "truncate_rng": (lambda r: truncate(_newest(r) / "rng_rank0.pt"), OLDER, "rng_rank0.pt"),
    "delete_metadata": (lambda r: os.remove(_newest(r) / ".metadata"), OLDER, ".metadata"),
    "delete_rng": (lambda r: os.remove(_newest(r) / "rng_rank0.pt"), OLDER, "rng_rank0.pt"),
    "flip_bits_distcp": (lambda r: flip_bits(_newest(r) / "__0_0.distcp"), OLDER, "__0_0.distcp"),
    "delete_manifest": (lambda r: os.remove(_newest(r) / "manifest.json"), OLDER, "manifest.json"),
    "latest_garbage": (lambda r: (r / "checkpoints" / "latest").write_bytes(b"\x00garbage\xff\n"), NEWEST, None),
    "latest_missing_step": (lambda r: (r / "checkpoints" / "latest").write_text("step_00000999\n"), NEWEST, None),
    "latest_deleted": (lambda r: os.remove(r / "checkpoints" / "latest"), NEWEST, None),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_falls_back_to_the_newest_good_checkpoint(case, runs, tmp_path, capsys):
    ref, _, cache = runs
    damage, want_from, bad_file = DAMAGE[case]
    run = copy_of(runs, tmp_path)
    damage(run)
    code, _, err = run_cli(capsys, *train_argv(run, cache))
    assert code == 0, err
    log = (run / "train.log").read_text()
    assert f"resumed from {run / 'checkpoints' / want_from}: step {int(want_from[5:])}" in log
    if bad_file:  # a warning names the damaged file; the directory is kept aside, never deleted
        warning = next(line for line in log.splitlines() if "is unusable" in line)
        assert bad_file in warning and NEWEST in warning and "falling back to" in warning
        assert (run / "checkpoints" / (NEWEST + ".damaged")).is_dir()
    else:  # the pointer was bad: a warning says so, the newest checkpoint is used, nothing starts fresh
        assert "starting fresh" not in log and "using" in log
    assert losses(run) == losses(ref)  # every step, bit-identical to the uninterrupted run
    assert sorted(n for n in os.listdir(run / "checkpoints") if not n.endswith(".damaged")) == \
        ["latest", "step_00000010", "step_00000012"]  # keep_last=2 of the resumed run's own checkpoints
    assert "Traceback" not in err


def test_no_checkpoint_verifies_is_a_one_line_error_and_deletes_nothing(runs, tmp_path):
    _, _, cache = runs
    run = copy_of(runs, tmp_path)
    truncate(run / "checkpoints" / NEWEST / "__0_0.distcp")
    os.remove(run / "checkpoints" / OLDER / ".metadata")
    before = snapshot(run)
    proc = subprocess.run([sys.executable, "-m", "hstu.trainer.cli", *train_argv(run, cache)], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("hstu: error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert f"no checkpoint in {run / 'checkpoints'} verifies" in err[0]
    assert "__0_0.distcp" in err[0] and ".metadata" in err[0]
    assert snapshot(run) == before  # not one byte changed


def test_missing_rng_file_in_a_directly_loaded_checkpoint_warns_accurately(runs, tmp_path):
    """loading a checkpoint whose rng file is gone (resolve_resume refuses it; a direct load may not):
    the warning says the file is missing and determinism is lost — not 'written by 1 processes, this run has 1'."""
    from hstu.trainer.config import load_config
    from hstu.trainer.tasks.retrieval import build_data, build_model_for
    from hstu.trainer.train import TrainState, build_optimizer, checkpoint_manager

    run = copy_of(runs, tmp_path)
    os.remove(_newest(run) / "rng_rank0.pt")
    cfg = load_config(None, CONFIG + [f"data.cache_dir={runs[2]}", f"run_dir={run}"])
    seqs, _, _ = build_data(cfg)
    model = build_model_for(cfg, seqs.num_items, train_mod.torch.device("cpu"))
    opt, sched = build_optimizer(model, cfg.optim)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("hstu").addHandler(handler)
    try:
        env = type("Env", (), {"rank": 0, "world_size": 1})()
        meta = checkpoint_manager(TrainState(model, opt, sched), env).load(str(_newest(run)))
    finally:
        logging.getLogger("hstu").removeHandler(handler)
    assert meta["rng"] is None and meta["step"] == 10
    text = "\n".join(records)
    assert "has no rng_rank0.pt" in text and "not bit-identical" in text and "processes" not in text


def test_keep_last_never_prunes_the_fallback_target_for_a_bad_checkpoint(tmp_path):
    """Pruning counts only checkpoints that verify, and only older than the one just written."""
    from hstu.trainer import integrity

    cdir = tmp_path / "checkpoints"

    def fake(step, good=True):
        d = cdir / f"step_{step:08d}"
        d.mkdir(parents=True)
        for n in (".metadata", "rng_rank0.pt", "__0_0.distcp"):
            (d / n).write_bytes(b"x" * step)
        integrity.write_manifest(str(d), step, 1, [])
        if not good:
            truncate(d / "__0_0.distcp")

    fake(2)
    fake(4, good=False)  # a damaged newer one must not count as one of keep_last
    fake(6)
    ckpt.prune(str(cdir), keep_last=2, current="step_00000006")
    assert sorted(os.listdir(cdir)) == ["step_00000002", "step_00000004", "step_00000006"]
    fake(8)
    ckpt.prune(str(cdir), keep_last=2, current="step_00000008")
    assert sorted(os.listdir(cdir)) == ["step_00000004", "step_00000006", "step_00000008"]
    fake(10, good=False)  # the new one does not verify: nothing is pruned
    ckpt.prune(str(cdir), keep_last=1, current="step_00000010")
    assert "step_00000006" in os.listdir(cdir) and "step_00000008" in os.listdir(cdir)


def test_two_processes_fall_back_past_a_damaged_rank_1_file(tmp_path):
    """torchrun, world 2, sharded table: rank 1's shard file of the newest checkpoint is truncated; both ranks
    resume from the previous checkpoint (rank 0 verifies every rank's files against the manifest it wrote from
    their hashes) and re-run the lost steps bit-identically."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    sharded = ["sharding.enabled=true", "sharding.sharding_type=row_wise", "train.num_threads=1",
               "checkpoint.keep_last=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def hstu_train(max_steps):
        argv = train_argv(run, cache, *sharded, f"train.max_steps={max_steps}")
        return subprocess.run([sys.executable, "-m", "hstu.trainer.cli", argv[0], "--nproc-per-node", "2",
                               *argv[1:]], env=env, capture_output=True, text=True, timeout=240)

    done = hstu_train(4)
    assert done.returncode == 0, done.stderr[-3000:]
    first = losses(run)
    step4 = run / "checkpoints" / "step_00000004"
    assert sorted(first) == [1, 2, 3, 4] and (step4 / "__1_0.distcp").exists() and (step4 / "rng_rank1.pt").exists()
    truncate(step4 / "__1_0.distcp")
    done = hstu_train(6)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "__1_0.distcp" in log and "falling back to" in log
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}: step 2" in log
    again = losses(run)
    assert sorted(again) == [1, 2, 3, 4, 5, 6] and {s: again[s] for s in first} == first
