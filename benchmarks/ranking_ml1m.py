"""ML-1M generative ranking: HSTU vs the DLRM baseline (docs/ranking.md), same data / split / labels / loop, each
under a wall-clock training budget (train.max_train_minutes) sized for a loaded 2-core CPU machine; writes
benchmarks/results/ml-1m-ranking.json (NE / AUC / GAUC per task, epochs, seconds, provenance), then RESULTS.md.

    python benchmarks/ranking_ml1m.py [--data-dir ../shared/data/ml-1m] [--hstu-minutes 4.5] [--dlrm-minutes 3]
                                      [key=value ...]

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
    })
    try:
        import torch

        state = torch.load(os.path.join(cfg.run_dir, "best.pt"), weights_only=True)
        row["parameters"] = int(sum(v.numel() for v in state.values()))
    except (OSError, RuntimeError):
        pass
    baseline = {m: round(result.baseline_metrics[m], 4) for m in METRICS if m in result.baseline_metrics}
    return {"row": row, "baseline": baseline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "ml-1m"),
                    help="directory holding ratings.dat and users.dat (default ../shared/data/ml-1m)")
    ap.add_argument("--hstu-minutes", type=float, default=4.5, help="train.max_train_minutes of HSTU")
    ap.add_argument("--dlrm-minutes", type=float, default=3.0, help="train.max_train_minutes of DLRM")
    ap.add_argument("--models", default="hstu,dlrm")
    ap.add_argument("--run-root", default=os.path.join(tempfile.gettempdir(), "hstu-ranking-ml1m"))
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to both models")
    args = ap.parse_args()
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
        "time_budget": (f"train.max_train_minutes: hstu {args.hstu_minutes}, dlrm {args.dlrm_minutes} (training time "
                        f"only; evaluation extra); whole script {round((time.perf_counter() - t0) / 60, 1)} min "
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
    print("wrote", write_json(RESULT_FILE, payload))
    from summarize import write_results_md

    print("wrote", write_results_md())


if __name__ == "__main__":
    main()
