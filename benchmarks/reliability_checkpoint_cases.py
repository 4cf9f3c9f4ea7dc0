"""Checkpoint / run-directory reliability cases (issue 14 §1-2, docs/reliability.md) as data, for a runner such as
benchmarks/reliability.py: each case damages a copy of a prepared run, runs one ``hstu ...`` command in a
subprocess and classifies what happened.

    shared = prepare(root)                      # builds the base runs once (~10 s on 2 CPU cores)
    for case in CASES:
        run_dir = new_case_dir(root, case["name"], shared)   # a copy of the killed run (+ its cache)
        case["setup"](run_dir, shared)
        proc = subprocess.run(command(case, run_dir, shared), capture_output=True, text=True, timeout=600)
        observed = case["check"](run_dir, proc, shared)      # compare with case["expected"]

Case dict: ``name``, ``setup(run_dir, shared)`` (the damage), ``argv(run_dir, shared)`` -> the arguments after
``hstu``, ``expected`` (resume-bit-identical | fallback | clear-error | accepted), ``check(run_dir, proc,
shared)`` -> the observed class, or a failure class: traceback | unclear-error | lost-work | diverged | wrong-source
| silently-accepted. ``python -m benchmarks.reliability_checkpoint_cases [--root DIR]`` runs them all and prints
a table (no results file: the runner owns that).

The base: a run of a tiny synthetic config killed (an exception no cleanup handles) right after publishing its
step-10 checkpoint (checkpoints step_8 and step_10, ``latest`` -> step_10, best.pt of epoch 1, metrics.jsonl),
and the same config run uninterrupted (the reference for bit-identical losses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=120", "data.synthetic.num_items=90",
    "data.synthetic.max_seq_len=16", "data.max_seq_len=16", "data.batch_size=16", "data.eval_batch_size=64",
    "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2",
    "model.num_layers=2", "model.dropout=0.2", "loss.num_negatives=8", "optim.warmup_steps=3",
    "train.stochastic_length.enabled=true", "train.stochastic_length.alpha=1.2", "train.epochs=3",
    "train.max_steps=12", "train.eval_every_epochs=1", "train.log_every_steps=1", "train.progress=false",
    "train.tensorboard=false", "eval.ks=[10]", "eval.ndcg_ks=[10]", "eval.popularity_baseline=false",
    "checkpoint.every_steps=2", "checkpoint.keep_last=2",
]
OLDER, NEWEST = "step_00000008", "step_00000010"
CLASSES = ("resume-bit-identical", "fallback", "clear-error", "accepted")


class _Killed(BaseException):
    pass


# ------------------------------------------------------------------------------------------------ base runs
def train_argv(run_dir: str, cache: str, *extra: str) -> List[str]:
    return ["train", "--run-dir", str(run_dir), *CONFIG, f"data.cache_dir={cache}", *extra]


def prepare(root: str) -> Dict[str, str]:
    """Build the reference and the killed run under ``root`` (in this process); returns their paths."""
    import hstu.trainer.train as train_mod
    from hstu.trainer.cli import main

    shared = {"root": root, "cache": os.path.join(root, "cache"), "ref": os.path.join(root, "ref"),
              "killed": os.path.join(root, "killed")}
    for d in ("ref", "killed", "cases"):  # a reused --root: start from scratch (the data cache is kept)
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    if main(train_argv(shared["ref"], shared["cache"])) != 0:
        raise RuntimeError("reference run failed")
    real = train_mod.save_checkpoint

    def save_then_die(state, ctx, position):  # stands for kill -9 right after the step-10 checkpoint
        real(state, ctx, position)
        if state.step == 10:
            raise _Killed()

    train_mod.save_checkpoint = save_then_die
    try:
        main(train_argv(shared["killed"], shared["cache"]))
    except _Killed:
        pass
    finally:
        train_mod.save_checkpoint = real
    assert sorted(os.listdir(os.path.join(shared["killed"], "checkpoints"))) == ["latest", OLDER, NEWEST]
    return shared


def new_case_dir(root: str, name: str, shared: Dict[str, str]) -> str:
    run_dir = os.path.join(root, "cases", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(shared["killed"], run_dir)
    return run_dir


def command(case: Dict[str, Any], run_dir: str, shared: Dict[str, str]) -> List[str]:
    return [sys.executable, "-m", "hstu.trainer.cli", *case["argv"](run_dir, shared)]


# ------------------------------------------------------------------------------------------------ damage
def _newest(run_dir: str, name: str = "") -> str:
    return os.path.join(run_dir, "checkpoints", NEWEST, name)


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_bits(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def snapshot(root: str) -> Dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


# ------------------------------------------------------------------------------------------------ checks
def _losses(run_dir: str) -> Dict[int, float]:
    out = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            if r.get("kind") == "train":
                out[r["step"]] = r["loss"]
    return out


def _error_class(proc: subprocess.CompletedProcess) -> str:
    if "Traceback" in proc.stderr:
        return "traceback"
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hstu: error:")]
    return "clear-error" if proc.returncode != 0 and len(lines) == 1 else "unclear-error"


def check_resume(resumed_from: str, bad_file: str = "") -> Callable[..., str]:
    """exit 0, resumed from ``resumed_from``, every loss equal to the reference's; with ``bad_file`` a warning
    naming it (fallback) and the damaged directory kept as step_N.damaged."""
    def check(run_dir: str, proc: subprocess.CompletedProcess, shared: Dict[str, str]) -> str:
        if proc.returncode != 0:
            return _error_class(proc)
        log = open(os.path.join(run_dir, "train.log"), encoding="utf-8").read()
        if f"resumed from {os.path.join(run_dir, 'checkpoints', resumed_from)}:" not in log:
            return "wrong-source"
        if _losses(run_dir) != _losses(shared["ref"]):
            return "diverged"
        if bad_file:
            warned = any(bad_file in ln and "falling back to" in ln for ln in log.splitlines())
            kept = os.path.isdir(_newest(run_dir).rstrip("/") + ".damaged")
            return "fallback" if warned and kept else "lost-work" if not kept else "silently-accepted"
        return "resume-bit-identical"
    return check


def check_error(*must_name: str, unchanged: bool = True) -> Callable[..., str]:
    """exit != 0 with one ``hstu: error:`` line naming ``must_name``, no traceback, and (``unchanged``) not one
    byte of the run directory changed (compared with the snapshot setup stored in shared['_before'])."""
    def check(run_dir: str, proc: subprocess.CompletedProcess, shared: Dict[str, str]) -> str:
        cls = _error_class(proc)
        if cls != "clear-error":
            return cls if proc.returncode != 0 else "silently-accepted"
        line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("hstu: error:"))
        if not all(s.replace("{run}", run_dir) in line for s in must_name):
            return "unclear-error"
        if unchanged and snapshot(run_dir) != shared.get("_before", {}).get(run_dir):
            return "lost-work"
        return "clear-error"
    return check


def check_loaded(source: str, warn_file: str = "") -> Callable[..., str]:
    """exit 0 and the JSON/manifest names ``source`` (relative to run_dir) as the checkpoint used."""
    def check(run_dir: str, proc: subprocess.CompletedProcess, shared: Dict[str, str]) -> str:
        if proc.returncode != 0:
            return _error_class(proc)
        want = os.path.join(run_dir, source)
        got = json.loads(proc.stdout)["checkpoint"] if '"checkpoint"' in proc.stdout else None
        if got is None:  # hstu export: the artifact manifest records its source
            with open(os.path.join(run_dir, "art", "manifest.json"), encoding="utf-8") as f:
                got = json.load(f)["source"]["checkpoint"]
        if os.path.abspath(got) != os.path.abspath(want):
            return "wrong-source"
        if warn_file:
            return "fallback" if warn_file in proc.stderr and "falling back to" in proc.stderr else "silently-accepted"
        return "accepted"
    return check


def _snap_setup(damage: Callable[[str], None]) -> Callable[[str, Dict[str, Any]], None]:
    """setup = damage, then remember the run directory's bytes (for check_error's unchanged test)."""
    def setup(run_dir: str, shared: Dict[str, Any]) -> None:
        damage(run_dir)
        shared.setdefault("_before", {})[run_dir] = snapshot(run_dir)
    return setup


def _stale_tmp(run_dir: str, shared: Dict[str, Any]) -> None:
    folder = os.path.join(shared["cache"], "sequences")
    path = os.path.join(folder, "synthetic-0000000000000000.npz.killed.tmp")
    _write(path, b"partial npz of a killed writer")
    old = time.time() - 3600
    os.utime(path, (old, old))
    shared["_tmp"] = path


def _check_tmp_removed(run_dir: str, proc: subprocess.CompletedProcess, shared: Dict[str, Any]) -> str:
    if proc.returncode != 0:
        return _error_class(proc)
    return "accepted" if not os.path.exists(shared["_tmp"]) else "silently-accepted"


def _killed_fresh_run(run_dir: str, shared: Dict[str, Any]) -> None:
    """What `hstu train train.resume=false` killed -9 before its first checkpoint leaves: the previous run
    stashed in .previous-run/, the new run's config.yaml and train.log beside it."""
    from hstu.trainer import run_dir as rd

    rd.stash_previous(run_dir, os.path.join(run_dir, "checkpoints"))
    shutil.copy(os.path.join(run_dir, rd.PREVIOUS, "config.yaml"), os.path.join(run_dir, "config.yaml"))
    _write(os.path.join(run_dir, "train.log"), b"the killed fresh run's log\n")


def _check_replaced(run_dir: str, proc: subprocess.CompletedProcess, shared: Dict[str, Any]) -> str:
    """A fresh run over the previous one that succeeded: its own checkpoints only, the stash gone."""
    if proc.returncode != 0:
        return _error_class(proc)
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    if os.path.exists(os.path.join(run_dir, ".previous-run")) or names != ["latest", "step_00000002",
                                                                          "step_00000004"]:
        return "silently-accepted"
    return "accepted" if sorted(_losses(run_dir)) == [1, 2, 3, 4] else "diverged"


def _resume(run_dir: str, shared: Dict[str, str]) -> List[str]:
    return train_argv(run_dir, shared["cache"])


def _damage(name: str, damage: Callable[[str], None], resumed_from: str, bad_file: str, expected: str,
            where: str) -> Dict[str, Any]:
    return {"name": name, "setup": lambda run_dir, shared: damage(run_dir), "argv": _resume,
            "expected": expected, "check": check_resume(resumed_from, bad_file), "damage": where}


CASES: List[Dict[str, Any]] = [
    _damage("ckpt-truncate-distcp", lambda r: truncate(_newest(r, "__0_0.distcp")), OLDER, "__0_0.distcp",
            "fallback", f"checkpoints/{NEWEST}/__0_0.distcp truncated to half"),
    _damage("ckpt-truncate-metadata", lambda r: truncate(_newest(r, ".metadata")), OLDER, ".metadata",
            "fallback", f"checkpoints/{NEWEST}/.metadata truncated to half"),
    _damage("ckpt-truncate-rng", lambda r: truncate(_newest(r, "rng_rank0.pt")), OLDER, "rng_rank0.pt",
            "fallback", f"checkpoints/{NEWEST}/rng_rank0.pt truncated to half"),
    _damage("ckpt-delete-metadata", lambda r: os.remove(_newest(r, ".metadata")), OLDER, ".metadata",
            "fallback", f"checkpoints/{NEWEST}/.metadata deleted"),
    _damage("ckpt-delete-rng", lambda r: os.remove(_newest(r, "rng_rank0.pt")), OLDER, "rng_rank0.pt",
            "fallback", f"checkpoints/{NEWEST}/rng_rank0.pt deleted"),
    _damage("ckpt-flip-bits-distcp", lambda r: flip_bits(_newest(r, "__0_0.distcp")), OLDER, "__0_0.distcp",
            "fallback", f"checkpoints/{NEWEST}/__0_0.distcp: one byte XOR 0xFF in the middle"),
    _damage("ckpt-delete-manifest", lambda r: os.remove(_newest(r, "manifest.json")), OLDER, "manifest.json",
            "fallback", f"checkpoints/{NEWEST}/manifest.json deleted"),
    _damage("latest-garbage", lambda r: _write(os.path.join(r, "checkpoints", "latest"), b"\x00garbage\xff\n"),
            NEWEST, "", "resume-bit-identical", "checkpoints/latest holds binary garbage"),
    _damage("latest-missing-step", lambda r: _write(os.path.join(r, "checkpoints", "latest"), b"step_00000999\n"),
            NEWEST, "", "resume-bit-identical", "checkpoints/latest names step_00000999 (absent)"),
    _damage("latest-deleted", lambda r: os.remove(os.path.join(r, "checkpoints", "latest")), NEWEST, "",
            "resume-bit-identical", "checkpoints/latest deleted"),
    {"name": "ckpt-none-verifies", "damage": f"{NEWEST}/__0_0.distcp truncated and {OLDER}/.metadata deleted",
     "setup": _snap_setup(lambda r: (truncate(_newest(r, "__0_0.distcp")),
                                     os.remove(os.path.join(r, "checkpoints", OLDER, ".metadata")))),
     "argv": _resume, "expected": "clear-error",
     "check": check_error("{run}/checkpoints verifies", "__0_0.distcp", ".metadata")},
    {"name": "eval-truncated-best", "damage": "best.pt truncated to half (its sidecar says the full size)",
     "setup": _snap_setup(lambda r: truncate(os.path.join(r, "best.pt"))),
     "argv": lambda r, s: ["eval", "--run-dir", r, "--output", os.path.join(s["root"], "eval-out.json")],
     "expected": "clear-error", "check": check_error("{run}/best.pt", "truncated")},
    {"name": "eval-truncated-best-no-sidecar", "damage": "best.pt truncated, best.pt.manifest.json deleted",
     "setup": _snap_setup(lambda r: (truncate(os.path.join(r, "best.pt")),
                                     os.remove(os.path.join(r, "best.pt.manifest.json")))),
     "argv": lambda r, s: ["eval", "--run-dir", r, "--output", os.path.join(s["root"], "eval-out.json")],
     "expected": "clear-error", "check": check_error("{run}/best.pt", "cannot read")},
    {"name": "eval-checkpoint-is-config", "damage": "none; --checkpoint RUN/config.yaml",
     "setup": _snap_setup(lambda r: None),
     "argv": lambda r, s: ["eval", "--run-dir", r, "--checkpoint", os.path.join(r, "config.yaml"), "--output",
                           os.path.join(s["root"], "eval-out.json")],
     "expected": "clear-error", "check": check_error("config.yaml", "as a checkpoint")},
    {"name": "eval-model-mismatch", "damage": "none; model.num_layers=3 on the 2-layer checkpoint",
     "setup": _snap_setup(lambda r: None),
     "argv": lambda r, s: ["eval", "--run-dir", r, "model.num_layers=3", "--output",
                           os.path.join(s["root"], "eval-out.json")],
     "expected": "clear-error", "check": check_error("does not fit this model", "missing encoder.layers.2.")},
    {"name": "eval-dcp-dir", "damage": f"none; --checkpoint RUN/checkpoints/{OLDER}",
     "setup": lambda r, s: None,
     "argv": lambda r, s: ["eval", "--run-dir", r, "--checkpoint", os.path.join(r, "checkpoints", OLDER)],
     "expected": "accepted", "check": check_loaded(os.path.join("checkpoints", OLDER))},
    {"name": "eval-latest-damaged", "damage": f"checkpoints/{NEWEST}/__0_0.distcp truncated; --checkpoint latest",
     "setup": lambda r, s: truncate(_newest(r, "__0_0.distcp")),
     "argv": lambda r, s: ["eval", "--run-dir", r, "--checkpoint", "latest"],
     "expected": "fallback", "check": check_loaded(os.path.join("checkpoints", OLDER), "__0_0.distcp")},
    {"name": "export-latest-damaged", "damage": f"checkpoints/{NEWEST}/__0_0.distcp bit flip; --checkpoint latest",
     "setup": lambda r, s: flip_bits(_newest(r, "__0_0.distcp")),
     "argv": lambda r, s: ["export", "--run-dir", r, "--out", os.path.join(r, "art"), "--checkpoint", "latest"],
     "expected": "fallback", "check": check_loaded(os.path.join("checkpoints", OLDER), "__0_0.distcp")},
    {"name": "init-from-truncated-best", "damage": "best.pt truncated; train.init_from=RUN/best.pt, new run dir",
     "setup": _snap_setup(lambda r: truncate(os.path.join(r, "best.pt"))),
     "argv": lambda r, s: train_argv(os.path.join(r, "new"), s["cache"], f"train.init_from={r}/best.pt"),
     "expected": "clear-error", "check": check_error("train.init_from", "best.pt")},
    {"name": "fresh-run-nan-over-previous", "damage": "none; train.resume=false optim.lr=1e30 (NaN at step 2, "
     "after the previous run was moved aside, before the new run's first checkpoint)",
     "setup": _snap_setup(lambda r: None),
     "argv": lambda r, s: train_argv(r, s["cache"], "train.resume=false", "optim.lr=1e30", "optim.warmup_steps=0"),
     "expected": "clear-error", "check": check_error("non-finite loss")},
    {"name": "fresh-run-replaces-previous", "damage": "none; train.resume=false train.max_steps=4",
     "setup": lambda r, s: None,
     "argv": lambda r, s: train_argv(r, s["cache"], "train.resume=false", "train.max_steps=4"),
     "expected": "accepted", "check": _check_replaced},
    {"name": "killed-fresh-run-undone", "damage": "previous run stashed in .previous-run/ by a fresh run killed "
     "before its first checkpoint; then the resume command",
     "setup": _killed_fresh_run, "argv": _resume, "expected": "resume-bit-identical",
     "check": check_resume(NEWEST)},
    {"name": "cache-stale-tmp", "damage": "cache/sequences/*.npz.killed.tmp, 1 h old, unlocked (a killed writer)",
     "setup": _stale_tmp, "argv": lambda r, s: ["prepare", *CONFIG, f"data.cache_dir={s['cache']}"],
     "expected": "accepted", "check": _check_tmp_removed},
]


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="work directory (default: a new temp dir, removed afterwards)")
    p.add_argument("-k", default="", help="only cases whose name contains this")
    args = p.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="hstu-reliability-")
    try:
        shared = prepare(root)
        bad = 0
        for case in (c for c in CASES if args.k in c["name"]):
            run_dir = new_case_dir(root, case["name"], shared)
            case["setup"](run_dir, shared)
            proc = subprocess.run(command(case, run_dir, shared), capture_output=True, text=True, timeout=600)
            observed = case["check"](run_dir, proc, shared)
            bad += observed != case["expected"]
            print(f"{case['name']:<32} expected {case['expected']:<22} observed {observed}", flush=True)
            if observed != case["expected"]:
                print(proc.stderr[-1500:])
        return 1 if bad else 0
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
