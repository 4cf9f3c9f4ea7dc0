"""Hyper-parameter sweeps with submitit: ``hstu sweep SPEC.yaml`` (or :func:`run_sweep`).

A SPEC (YAML)::

    name: lr-depth                      # optional (default: the file stem)
    base_config: configs/synthetic/hstu-small.yaml   # optional; relative to the current directory
    overrides: [train.epochs=2]         # fixed overrides of every trial
    grid:                               # every combination (cartesian product)
      model.num_layers: [1, 2]
    random:                             # random search: num_trials samples
      num_trials: 4
      seed: 0
      params:
        optim.lr: {log_uniform: [1.0e-4, 1.0e-2]}
        model.dropout: {uniform: [0.0, 0.3]}
        model.num_heads: {choice: [1, 2]}    # a plain list means choice too
        data.batch_size: {int_uniform: [32, 128]}
    num_trials: 8                       # optional cap on the number of trials
    metric: ndcg@10                     # what sweep.md ranks by and the plot shows (final metrics)
    executor: auto                      # auto (slurm when `sinfo` works, else local) | local | slurm | debug
    output_dir: runs/sweeps/lr-depth    # default runs/sweeps/<name>-<timestamp>
    resources: {cpus_per_task: 1, mem_gb: 4, gpus_per_node: 0, timeout_min: 60, partition: null,
                num_threads: 1, max_parallel: 2}

Trials: the grid alone gives its G combinations; random alone gives ``num_trials`` samples; both give
``random.num_trials`` samples, sample i combined with grid point ``i mod G``. ``num_trials`` caps the total.

Each trial is one submitit job running ``hstu.trainer.train.train`` in its own run directory
``OUTPUT_DIR/trials/NNN``. Failed trials (a config error, NaN loss, a crash, a timeout) are recorded with their
error and do not stop the sweep. Outputs in OUTPUT_DIR: ``sweep.csv`` (one row per trial: status, swept
values, final/best metrics from results.json, final train loss, seconds, error), ``sweep.md`` (ranked table),
``sweep.png`` (metric vs each swept key), ``sweep.json`` (spec + trials) and ``submitit/`` (job logs).
Trials are single-process; for multi-process/multi-node training use the torchx component (launch/components.py).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

import yaml

EXECUTORS = ("auto", "local", "slurm", "debug")
RESOURCE_KEYS = {"cpus_per_task", "mem_gb", "gpus_per_node", "timeout_min", "partition", "num_threads",
                 "max_parallel"}
SPEC_KEYS = {"name", "base_config", "overrides", "grid", "random", "num_trials", "metric", "executor",
             "output_dir", "resources"}


class SweepError(ValueError):
    """An invalid sweep spec (the message names the key)."""


# ------------------------------------------------------------------------------------------------ the spec


def load_spec(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: top level must be a mapping")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return spec


def _fmt(v: Any) -> str:
    """Override value text the config parser (YAML) reads back as the same value."""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple, dict, bool)) or v is None:
        return json.dumps(v)
    return str(v)


def _sample(dist: Any, rng: random.Random, key: str) -> Any:
    if isinstance(dist, list):
        return rng.choice(dist)
    if not isinstance(dist, dict) or len(dist) != 1:
        raise SweepError(f"random.params.{key}: expected a list or one of {{choice|uniform|log_uniform|"
                         f"int_uniform: ...}}, got {dist!r}")
    (kind, arg), = dist.items()
    if kind == "choice":
        return rng.choice(list(arg))
    lo, hi = arg
    if kind == "uniform":
        return rng.uniform(float(lo), float(hi))
    if kind == "log_uniform":
        return math.exp(rng.uniform(math.log(float(lo)), math.log(float(hi))))
    if kind == "int_uniform":
        return rng.randint(int(lo), int(hi))
    raise SweepError(f"random.params.{key}: unknown distribution {kind!r}")


def expand_trials(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The trials' swept values: a list of {dotted.key: value} (see the module docstring)."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SweepError(f"unknown spec keys {sorted(unknown)} (valid: {sorted(SPEC_KEYS)})")
    grid = spec.get("grid") or {}
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise SweepError(f"grid.{k}: expected a non-empty list, got {vals!r}")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    rnd = spec.get("random") or {}
    if rnd:
        params = rnd.get("params") or {}
        n = int(rnd.get("num_trials", spec.get("num_trials", 1)))
        rng = random.Random(int(rnd.get("seed", 0)))
        trials = []
        for i in range(n):
            t = dict(points[i % len(points)])
            t.update({k: _sample(d, rng, k) for k, d in params.items()})
            trials.append(t)
    else:
        trials = points
    cap = spec.get("num_trials")
    return trials[: int(cap)] if cap else trials


def trial_overrides(spec: Dict[str, Any], values: Dict[str, Any], run_dir: str, num_threads: int) -> List[str]:
    out = list(spec.get("overrides") or []) + [f"{k}={_fmt(v)}" for k, v in values.items()]
    out += ["train.progress=false", f"run_dir={run_dir}"]
    if num_threads > 0:
        out.append(f"train.num_threads={num_threads}")
    return out


# ------------------------------------------------------------------------------------------------ one trial


def run_trial(config: Optional[str], overrides: List[str]) -> Dict[str, Any]:
    """Body of one submitit job: train in this process; never raises (a failure is returned as a record)."""
    t0 = time.time()
    try:
        from hstu.trainer.config import load_config
        from hstu.trainer.train import train

        result = train(load_config(config, overrides)).to_dict()
        return {"status": "ok", "seconds": time.time() - t0, "result": result}
    except Exception as e:  # noqa: BLE001 - a sweep records failures instead of stopping
        return {"status": "failed", "seconds": time.time() - t0, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8)}


def _final_train_loss(run_dir: str) -> Optional[float]:
    path = os.path.join(run_dir, "metrics.jsonl")
    loss = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("kind") == "epoch" and isinstance(rec.get("loss"), (int, float)):
                    loss = float(rec["loss"])
    return loss


def collect_trial(index: int, values: Dict[str, Any], run_dir: str, outcome: Dict[str, Any]) -> Dict[str, Any]:
    """A sweep row: swept values + final/best metrics read back from run_dir/results.json."""
    row: Dict[str, Any] = {"trial": index, "status": outcome.get("status", "failed"),
                           "seconds": round(float(outcome.get("seconds", 0.0)), 2), "run_dir": run_dir}
    row.update(values)
    results_path = os.path.join(run_dir, "results.json")
    if row["status"] == "ok" and os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            res = json.load(f)
        row.update({f"final_{k}": v for k, v in res.get("final_metrics", {}).items()})
        row.update({f"best_{k}": v for k, v in res.get("best_metrics", {}).items()})
        row.update(best_epoch=res.get("best_epoch"), steps=res.get("steps"),
                   tokens_per_second=round(float(res.get("tokens_per_second", 0.0)), 1))
        row["final_train_loss"] = _final_train_loss(run_dir)
    elif row["status"] == "ok":
        row.update(status="failed", error=f"no results.json in {run_dir}")
    else:
        row["error"] = outcome.get("error", "unknown error")
    return row


# ---------------------------------------------------------------------------------------------- executors


def slurm_available(timeout_s: float = 10.0) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=timeout_s).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def resolve_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise SweepError(f"executor {name!r} is not one of {list(EXECUTORS)}")
    if name == "auto":
        return "slurm" if slurm_available() else "local"
    return name


def make_executor(kind: str, folder: str, resources: Dict[str, Any], name: str):
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster=kind)
    params: Dict[str, Any] = {"timeout_min": int(resources.get("timeout_min", 60)), "name": name,
                              "cpus_per_task": int(resources.get("cpus_per_task", 1)),
                              "gpus_per_node": int(resources.get("gpus_per_node", 0)), "nodes": 1,
                              "tasks_per_node": 1}
    if resources.get("mem_gb"):
        params["mem_gb"] = int(resources["mem_gb"])
    if kind == "slurm" and resources.get("partition"):
        params["slurm_partition"] = str(resources["partition"])
    ex.update_parameters(**params)
    return ex


def _job_outcome(job) -> Dict[str, Any]:
    try:
        return job.result()
    except Exception as e:  # noqa: BLE001 - crash, kill, timeout: submitit raises with the job's stderr
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        return {"status": "failed", "error": f"job {job.job_id} failed: {lines[-1] if lines else type(e).__name__}"}


# ------------------------------------------------------------------------------------------------- the sweep


def run_sweep(spec: Dict[str, Any], executor: Optional[str] = None, output_dir: Optional[str] = None,
              poll_s: float = 1.0, log=print) -> Dict[str, Any]:
    """Run every trial of ``spec`` and write sweep.csv / sweep.md / sweep.png / sweep.json; returns a summary."""
    trials = expand_trials(spec)
    if not trials:
        raise SweepError("the spec gives no trials (empty grid and no random search)")
    resources = dict(spec.get("resources") or {})
    bad = set(resources) - RESOURCE_KEYS
    if bad:
        raise SweepError(f"unknown resources {sorted(bad)} (valid: {sorted(RESOURCE_KEYS)})")
    kind = resolve_executor(executor or spec.get("executor", "auto"))
    out = os.path.abspath(output_dir or spec.get("output_dir") or os.path.join(
        "runs", "sweeps", f"{spec['name']}-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.makedirs(os.path.join(out, "trials"), exist_ok=True)
    base = spec.get("base_config")
    base = os.path.abspath(base) if base else None
    threads = int(resources.get("num_threads", 1))
    default_parallel = len(trials) if kind == "slurm" else max(1, (os.cpu_count() or 1) // max(threads, 1))
    max_parallel = max(1, int(resources.get("max_parallel", default_parallel)))
    ex = make_executor(kind, os.path.join(out, "submitit"), resources, f"sweep-{spec['name']}")
    log(f"sweep {spec['name']}: {len(trials)} trials on the {kind} executor (at most {max_parallel} at once) "
        f"-> {out}")

    run_dirs = [os.path.join(out, "trials", f"{i:03d}") for i in range(len(trials))]
    pending = list(range(len(trials)))
    running: Dict[int, Any] = {}
    rows: Dict[int, Dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < max_parallel:
            i = pending.pop(0)
            ovr = trial_overrides(spec, trials[i], run_dirs[i], threads)
            try:
                running[i] = ex.submit(run_trial, base, ovr)
            except Exception as e:  # noqa: BLE001 - e.g. sbatch refused the job
                rows[i] = collect_trial(i, trials[i], run_dirs[i], {"status": "failed", "error": f"submit: {e}"})
            if kind == "debug" and i in running:  # the debug executor runs a job when asked for its result
                rows[i] = collect_trial(i, trials[i], run_dirs[i], _job_outcome(running.pop(i)))
        for i, job in list(running.items()):
            if job.done():
                rows[i] = collect_trial(i, trials[i], run_dirs[i], _job_outcome(job))
                del running[i]
                r = rows[i]
                log(f"  trial {i:03d} {r['status']}: {trials[i]} "
                    + (f"{spec.get('metric', 'ndcg@10')}={r.get('final_' + spec.get('metric', 'ndcg@10'))}"
                       if r["status"] == "ok" else r.get("error", "")))
        if running:
            time.sleep(poll_s)
    ordered = [rows[i] for i in range(len(trials))]
    return write_reports(spec, ordered, out, kind)


# --------------------------------------------------------------------------------------------------- reports


def write_reports(spec: Dict[str, Any], rows: List[Dict[str, Any]], out: str, executor: str) -> Dict[str, Any]:
    swept = list(dict.fromkeys(k for k in list((spec.get("grid") or {}).keys())
                               + list(((spec.get("random") or {}).get("params") or {}).keys())))
    metric = spec.get("metric", "ndcg@10")
    fixed = ["trial", "status", "seconds"] + swept
    extra = sorted({k for r in rows for k in r} - set(fixed) - {"error", "run_dir"})
    columns = fixed + extra + ["error", "run_dir"]
    with open(os.path.join(out, "sweep.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    ok = [r for r in rows if r["status"] == "ok" and r.get(f"final_{metric}") is not None]
    ranked = sorted(ok, key=lambda r: -float(r[f"final_{metric}"]))
    md = [f"# Sweep `{spec['name']}`", "",
          f"{len(rows)} trials on the {executor} executor: {len(ok)} ok, {len(rows) - len(ok)} failed. "
          f"Ranked by final {metric} (results.json of each trial).", ""]
    head = ["rank", "trial"] + swept + [f"final {metric}", f"best {metric}", "final train loss", "seconds"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in enumerate(ranked, 1):
        cells = [n, r["trial"]] + [_short(r.get(k)) for k in swept] + [
            _short(r.get(f"final_{metric}")), _short(r.get(f"best_{metric}")), _short(r.get("final_train_loss")),
            r["seconds"]]
        md.append("| " + " | ".join(str(c) for c in cells) + " |")
    failed = [r for r in rows if r not in ok]
    if failed:
        md += ["", "Failed trials:", ""] + [f"- trial {r['trial']} {({k: r.get(k) for k in swept})}: "
                                            f"{r.get('error', '')}" for r in failed]
    with open(os.path.join(out, "sweep.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    plot = plot_sweep(rows, swept, metric, os.path.join(out, "sweep.png"))
    summary = {"name": spec["name"], "executor": executor, "output_dir": out, "num_trials": len(rows),
               "num_ok": len(ok), "num_failed": len(rows) - len(ok), "metric": metric,
               "best": ranked[0] if ranked else None, "plot": plot, "spec": spec, "trials": rows}
    with open(os.path.join(out, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
    return summary


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def plot_sweep(rows: List[Dict[str, Any]], swept: Sequence[str], metric: str, path: str) -> str:
    """One panel per swept key: final metric of each successful trial vs that key's value (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(swept) or ["trial"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    ok = [r for r in rows if r["status"] == "ok" and r.get(f"final_{metric}") is not None]
    for ax, key in zip(axes[0], keys):
        xs = [r.get(key) for r in ok]
        ys = [float(r[f"final_{metric}"]) for r in ok]
        if xs and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys)
            pos = [x for x in xs if x > 0]
            if len(pos) == len(xs) and max(pos) / min(pos) >= 20:
                ax.set_xscale("log")
        else:
            cats = sorted({str(x) for x in xs})
            ax.scatter([cats.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(ok)}/{len(rows)} trials ok")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------- CLI


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC.yaml", help="sweep spec (see launch/sweep.py)")
    p.add_argument("--executor", choices=EXECUTORS, help="override the spec's executor")
    p.add_argument("--output-dir", metavar="DIR", help="override the spec's output_dir")
    p.add_argument("--dry-run", action="store_true", help="print the trials' overrides and exit")


def cmd_sweep(args: argparse.Namespace) -> int:
    """``hstu sweep``: exit 0 when at least one trial succeeded, 1 when all failed, 2 on a bad spec."""
    try:
        spec = load_spec(args.spec)
        if args.dry_run:
            for i, t in enumerate(expand_trials(spec)):
                print(f"{i:03d} " + " ".join(f"{k}={_fmt(v)}" for k, v in t.items()))
            return 0
        summary = run_sweep(spec, args.executor, args.output_dir)
    except (SweepError, OSError, yaml.YAMLError) as e:
        print(f"hstu: error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['num_ok']}/{summary['num_trials']} trials ok; results in {summary['output_dir']}/sweep.md, "
          "sweep.csv, sweep.png")
    return 0 if summary["num_ok"] else 1
