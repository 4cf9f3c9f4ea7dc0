"""ML-1M generative ranking: HSTU vs the DLRM baseline (docs/ranking.md), same data / split / labels / loop, each
under a wall-clock training budget (train.max_train_minutes) sized for a loaded 2-core CPU machine; writes
benchmarks/results/ml-1m-ranking.json (NE / AUC / GAUC per task, epochs, seconds, provenance), then RESULTS.md.

    python benchmarks/ranking_ml1m.py [--data-dir ../shared/data/ml-1m] [--hstu-minutes 4.5] [--dlrm-minutes 3]
                                      [key=value ...]
    python benchmarks/ranking_ml1m.py --compare-processes [--steps 300] [--variants plain-1,dmp-2]

``--compare-processes``: the ranking HSTU (configs/ml-1m/ranking-hstu.yaml) trained for ``--steps`` steps by the
real ``hstu train`` in 1 process (plain-1: nn.Embedding tables + dense AdamW; dmp-1: sharded path, world 1) and
2 processes (dmp-2: ``--nproc-per-node 2 sharding.enabled=true``, tables sharded, rowwise AdamW), 1 intra-op
thread per process, then one evaluation each; step timing as benchmarks/distributed.py (wall and rank-0 CPU
ms/step medians, global tokens/s) + NE/AUC/GAUC after the same global batches. Written under the key
``processes_1_vs_2`` of the same JSON (other keys kept). The variants do not train bit-identical models
(dropout masks are rank-local, plain-1 updates the tables with dense AdamW): compare metrics as "close".

The budget counts training time only (evaluation runs after the epoch that crosses it, plus every
train.eval_every_epochs epochs); the reported figures are those of the best evaluation by ne_mean (as GR reports
the best epoch), the final evaluation is recorded too. Run directories go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import provenance, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FILE = "ml-1m-ranking.json"
TASKS = ("like", "love")
METRICS = [f"{m}_{t}" for t in TASKS for m in ("ne", "auc", "gauc")] + ["ne_mean", "auc_mean", "gauc_mean"]


def run_one(model: str, data_dir: str, run_root: str, minutes: float, overrides: list) -> dict:
    from hstu.trainer.config import load_config
    from hstu.trainer.train import train

    cfg = load_config(os.path.join(REPO, "configs", "ml-1m", f"ranking-{model}.yaml"),
                      [f"data.data_dir={data_dir}", f"run_dir={os.path.join(run_root, model)}",
                       f"train.max_train_minutes={minutes}", "train.num_threads=1", "train.progress=false",
                       "train.tensorboard=false"] + list(overrides))
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    best, final = result.best_metrics, result.final_metrics
    row = {"model": model, **{m: round(best[m], 4) for m in METRICS}}
    row.update({
        "epochs": result.epochs_run, "best_epoch": result.best_epoch, "configured_epochs": cfg.train.epochs,
        "time_capped": result.epochs_run < cfg.train.epochs, "max_train_minutes": minutes,
        "train_seconds": round(result.train_seconds, 1), "wall_seconds": round(wall, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "parameters": None,
        "final_ne_mean": round(final["ne_mean"], 4), "final_auc_mean": round(final["auc_mean"], 4),
        "num_impressions": best.get("num_impressions"), "run_dir": cfg.run_dir,
        "overrides": " ".join(overrides),
        "select_on": result.select_on, "tie_order": result.data.get("tie_order"),  # ranking: no validation split
    })
    try:
        import torch

        state = torch.load(os.path.join(cfg.run_dir, "best.pt"), weights_only=True)
        row["parameters"] = int(sum(v.numel() for v in state.values()))
    except (OSError, RuntimeError):
        pass
    baseline = {m: round(result.baseline_metrics[m], 4) for m in METRICS if m in result.baseline_metrics}
    return {"row": row, "baseline": baseline}


COMPARE_KEY = "processes_1_vs_2"
PROCESS_VARIANTS = {"plain-1": (1, []), "dmp-1": (1, ["sharding.enabled=true"]),
                    "dmp-2": (2, ["sharding.enabled=true"])}  # name -> (processes, overrides)


def compare_processes(data_dir: str, run_root: str, steps: int, variants: list, overrides: list) -> dict:
    """ML-1M ranking HSTU: ``steps`` steps per variant of PROCESS_VARIANTS + one evaluation; see the docstring."""
    from distributed import train_run  # the real `hstu train` (torchrun for 2 processes), timing from metrics

    config = os.path.join(REPO, "configs", "ml-1m", "ranking-hstu.yaml")
    common = [f"data.data_dir={data_dir}", f"train.max_steps={steps}", "train.epochs=1000",
              "train.eval_every_epochs=1000", f"train.log_every_steps={max(1, steps // 12)}", "train.num_threads=1",
              "train.progress=false", "train.tensorboard=false", "eval.popularity_baseline=false"] + list(overrides)
    out = {}
    for name in variants:
        nproc, extra = PROCESS_VARIANTS[name]
        print(f"[ranking ml-1m] {name} ...", flush=True)
        run = train_run(os.path.join(run_root, f"compare-{name}"), nproc, common + extra, config)
        run["final_metrics"] = {m: round(run["final_metrics"][m], 4) for m in METRICS + ["num_impressions"]}
        run.pop("best_metrics", None)
        out[name] = run
        print(f"[ranking ml-1m] {name}: {run['ms_per_step_median']} ms/step, {run['rank0_cpu_ms_per_step_median']} "
              f"CPU ms/step (rank 0), {run['tokens_per_second_median']} tokens/s, ne_mean "
              f"{run['final_metrics']['ne_mean']}", flush=True)
    ref = out.get("plain-1") or out.get("dmp-1")
    if ref is not None and "dmp-2" in out:
        two = out["dmp-2"]
        ratio = lambda k: round(two[k] / ref[k], 3) if two.get(k) and ref.get(k) else None  # noqa: E731
        out["dmp-2_vs_1"] = {"reference": "plain-1" if "plain-1" in out else "dmp-1",
                             "rank0_cpu_per_step_ratio": ratio("rank0_cpu_ms_per_step_median"),
                             "wall_per_step_ratio": ratio("ms_per_step_median"),
                             **{f"{m}_delta": round(two["final_metrics"][m] - ref["final_metrics"][m], 4)
                                for m in ("ne_mean", "auc_mean", "gauc_mean")}}
    return out


def main_compare(args: argparse.Namespace) -> None:
    """--compare-processes: run, then merge the key COMPARE_KEY into the result JSON (other keys kept)."""
    bad = [v for v in args.variants.split(",") if v not in PROCESS_VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad} (known: {list(PROCESS_VARIANTS)})")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.result_file)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    results = compare_processes(os.path.abspath(args.data_dir), os.path.abspath(args.run_root), args.steps,
                                args.variants.split(","), args.overrides)
    payload = json.load(open(path)) if os.path.exists(path) else {}
    payload[COMPARE_KEY] = {
        **provenance(), "load_average_before": load, "steps": args.steps,
        "setup": ("configs/ml-1m/ranking-hstu.yaml, train.max_steps steps (global batches of data.batch_size=64 "
                  "users), then one evaluation (60,400 impressions); 1 torch thread per process, jemalloc when "
                  "present; a shared 2-core CPU: compare rank-0 CPU ms/step (wall includes waiting for a core)"),
        "results": results}
    print("wrote", write_json(path, payload))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "ml-1m"),
                    help="directory holding ratings.dat and users.dat (default ../shared/data/ml-1m)")
    ap.add_argument("--hstu-minutes", type=float, default=4.5, help="train.max_train_minutes of HSTU")
    ap.add_argument("--dlrm-minutes", type=float, default=3.0, help="train.max_train_minutes of DLRM")
    ap.add_argument("--models", default="hstu,dlrm")
    ap.add_argument("--run-root", default=os.path.join(tempfile.gettempdir(), "hstu-ranking-ml1m"))
    ap.add_argument("--compare-processes", action="store_true",
                    help="instead: HSTU ranking, 1 process vs 2 processes (sharded) for --steps steps")
    ap.add_argument("--steps", type=int, default=300, help="--compare-processes: train steps per variant")
    ap.add_argument("--variants", default="plain-1,dmp-2", help=f"--compare-processes: of {list(PROCESS_VARIANTS)}")
    ap.add_argument("--result-file", default=RESULT_FILE, help="--compare-processes: JSON in benchmarks/results/ "
                    "(or an absolute path) to merge the results into")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to both models")
    args = ap.parse_args()
    if args.compare_processes:
        return main_compare(args)
    data_dir = os.path.abspath(args.data_dir)
    t0 = time.perf_counter()
    rows, baseline = [], {}
    for model in args.models.split(","):
        minutes = args.hstu_minutes if model == "hstu" else args.dlrm_minutes
        out = run_one(model, data_dir, args.run_root, minutes, args.overrides)
        rows.append(out["row"])
        baseline = baseline or out["baseline"]
        print(json.dumps(out["row"], indent=2), flush=True)
    if baseline:
        rows.append({"model": "item_rate (baseline)", **baseline})
    by = {r["model"]: r for r in rows}
    payload = {
        "benchmark": "ranking_ml1m",
        **provenance(),
        "setup": ("ML-1M ranking: per user the last 10 ratings are eval candidates (60,400 impressions), history "
                  "= up to 100 ratings before them; tasks like (rating >= 4), love (rating = 5); contextual tokens "
                  "gender, age, occupation, zip[:2]; configs/ml-1m/ranking-{hstu,dlrm}.yaml"),
        "time_budget": (f"train.max_train_minutes: hstu {args.hstu_minutes}, dlrm {args.dlrm_minutes} (0 = no cap: all "
                        f"configured epochs; training time only, evaluation extra); whole script {round((time.perf_counter() - t0) / 60, 1)} min "
                        f"wall on a shared 2-core CPU machine, 1 torch thread"),
        "selection": "best evaluation by ne_mean (lower is better); final_* = last evaluation",
        "rows": rows,
    }
    if "hstu" in by and "dlrm" in by:
        h, d = by["hstu"], by["dlrm"]
        payload["hstu_vs_dlrm"] = {
            "ne_mean_delta": round(h["ne_mean"] - d["ne_mean"], 4), "auc_mean_delta": round(h["auc_mean"] - d["auc_mean"], 4),
            "ne_like_delta": round(h["ne_like"] - d["ne_like"], 4), "ne_love_delta": round(h["ne_love"] - d["ne_love"], 4),
            "hstu_better": bool(h["ne_mean"] < d["ne_mean"] and h["auc_mean"] > d["auc_mean"]),
        }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", RESULT_FILE)
    if os.path.exists(path) and COMPARE_KEY in json.load(open(path)):  # keep the --compare-processes results
        payload[COMPARE_KEY] = json.load(open(path))[COMPARE_KEY]
    print("wrote", write_json(RESULT_FILE, payload))
    from summarize import write_results_md

    print("wrote", write_results_md())


if __name__ == "__main__":
    main()
