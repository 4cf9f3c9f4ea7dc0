"""Reproduce the ML-1M retrieval table (hstu-spec.md): train SASRec, HSTU and HSTU-large to completion on this
machine and write benchmarks/results/ml-1m.json (one object per model, merged by model name), then RESULTS.md.

    python benchmarks/reproduce_ml1m.py --data-dir ../shared/data/ml-1m [--models hstu,sasrec] [key=value ...]

Each model trains with its shipped config (configs/ml-1m/<model>.yaml); extra dotted overrides apply to all and
are recorded in the result. The best epoch (by eval.selection_metric) is reported, as GR does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, provenance, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {  # GR README, full ranking: HR@10 / NDCG@10 / HR@50 / HR@200
    "sasrec": {"hr@10": 0.2853, "ndcg@10": 0.1603, "hr@50": 0.5474, "hr@200": 0.7528},
    "hstu": {"hr@10": 0.3097, "ndcg@10": 0.1720, "hr@50": 0.5754, "hr@200": 0.7716},
    "hstu-large": {"hr@10": 0.3294, "ndcg@10": 0.1893, "hr@50": 0.5935, "hr@200": 0.7839},
}
EXTRA = ("hstu-production",)  # shipped configs without a published figure (compared with the table, not a target)
METRICS = ["hr@10", "ndcg@10", "hr@50", "hr@200", "ndcg@200", "mrr"]
RESULT_FILE = "ml-1m.json"


def run_one(model: str, data_dir: str, run_root: str, overrides: list) -> dict:
    from hstu.trainer.config import load_config
    from hstu.trainer.train import train

    cfg = load_config(os.path.join(REPO, "configs", "ml-1m", f"{model}.yaml"),
                      [f"data.data_dir={data_dir}", f"run_dir={os.path.join(run_root, model)}"] + list(overrides))
    started = provenance()  # the code that trains is the code at start (HEAD may move during a long run)
    result = train(cfg)
    best = result.best_metrics
    entry = {"model": model}
    entry.update({m: best.get(m) for m in METRICS})
    entry.update({
        "complete": result.epochs_run == cfg.train.epochs,  # False: stopped by train.max_train_minutes
        "configured_epochs": cfg.train.epochs,
        "final": {m: result.final_metrics.get(m) for m in METRICS},
        "most_popular": {m: result.baseline_metrics.get(m) for m in METRICS},
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.train_seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "paper": PAPER.get(model, {}),
        "overrides": list(overrides),
        "run_dir": cfg.run_dir,
    })
    entry.update(provenance())
    entry["commit"] = started["commit"]
    entry["started"] = started["date"]
    return entry


def merge_results(entry: dict) -> str:
    path = os.path.join(RESULTS_DIR, RESULT_FILE)
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in json.load(f) if r.get("model") != entry["model"]]
    rows.append(entry)
    order = list(PAPER) + list(EXTRA)
    rows.sort(key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    return write_json(RESULT_FILE, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="directory holding ratings.dat")
    ap.add_argument("--models", default="sasrec,hstu,hstu-large",
                    help="comma-separated subset of " + ",".join(list(PAPER) + list(EXTRA)))
    ap.add_argument("--run-root", default=os.path.join(REPO, "runs", "reproduce-ml1m"), help="where run dirs go")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every model")
    args = ap.parse_args()
    for model in args.models.split(","):
        if model not in PAPER and model not in EXTRA:
            ap.error(f"unknown model {model!r}; choose from {', '.join(list(PAPER) + list(EXTRA))}")
        entry = run_one(model, args.data_dir, args.run_root, args.overrides)
        print(json.dumps(entry, indent=2))
        print("wrote", merge_results(entry))
    from summarize import write_results_md

    print("wrote", write_results_md())


if __name__ == "__main__":
    main()
