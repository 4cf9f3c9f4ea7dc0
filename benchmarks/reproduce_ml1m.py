"""Reproduce the ML-1M retrieval table (hstu-spec.md) under a reviewable protocol (docs/model.md "Evaluation
protocol"): leave-one-out, full ranking over all items with history items removed, the epoch selected on the
VALIDATION target (second-to-last item), test metrics (last item) reported at the selected and at the final
epoch, same-second events in ``data.tie_order``, several seeds, mean ± std per (config, tie order).

    python benchmarks/reproduce_ml1m.py --data-dir ../shared/data/ml-1m \\
        [--configs sasrec,hstu,hstu-large] [--seeds 1,2,3] [--tie-order random] \\
        [--compare-configs hstu --compare-tie-order item_id] [--skip-existing] [--smoke] [--out DIR] \\
        [key=value ...]

Every config trains with its shipped file (configs/ml-1m/<config>.yaml) once per (tie order, seed); seed s sets
``train.seed`` and ``data.seed`` (which also seeds the random tie shuffle). ``--compare-configs`` (default: hstu)
are run again under ``--compare-tie-order`` (default: item_id, the old order) to measure what the tie order is
worth. Extra dotted overrides apply to every run and are recorded. The results file is rewritten after every
run; ``--skip-existing`` continues an interrupted sweep (and ``train.resume=true`` an interrupted run: run dirs
are ``<run-root>/<config>-<tie order>-seed<seed>``).

Results: ``<out>/ml-1m.json`` = {"protocol", "runs": one row per run (merged by config/tie order/seed/select_on),
"summary": mean ± std per (config, tie order, select_on), "historical": the single-seed rows measured before
this protocol (item-id tie order, epoch selected on the test target), kept and labelled}. With the default
``--out`` RESULTS.md is regenerated. ``--smoke``: a tiny model, 2 epochs, 2 seeds — checks the plumbing in
seconds (tests/test_benchmarks_smoke.py), its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, _json_safe, provenance, refresh_results_md  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {  # GR README, full ranking: HR@10 / NDCG@10 / HR@50 / HR@200
    "sasrec": {"hr@10": 0.2853, "ndcg@10": 0.1603, "hr@50": 0.5474, "hr@200": 0.7528},
    "hstu": {"hr@10": 0.3097, "ndcg@10": 0.1720, "hr@50": 0.5754, "hr@200": 0.7716},
    "hstu-large": {"hr@10": 0.3294, "ndcg@10": 0.1893, "hr@50": 0.5935, "hr@200": 0.7839},
}
EXTRA = ("hstu-production",)  # shipped configs without a published figure (compared with the table, not a target)
REPORTED = ["hr@10", "ndcg@10", "hr@50", "hr@200", "mrr"]  # the issue-13 table
METRICS = REPORTED + ["ndcg@200"]
RESULT_FILE = "ml-1m.json"
HISTORICAL_PROTOCOL = ("old protocol: tie order item_id (same-second events by ascending item id), epoch "
                       "selected on the TEST target (the reported one), 1 seed, training on everything before the "
                       "test item; inflated by an unknown amount — superseded by the multi-seed table")
PROTOCOL = ("leave-one-out per user (events sorted by timestamp, same-second events in data.tie_order); test target "
            "= last item (history: every earlier event, the validation item included), validation target = "
            "second-to-last item, training sequences end before the validation item; full ranking over all items "
            "with the user's history items removed; epoch selected on validation {metric} (eval.select_on), "
            "test metrics reported at the selected and at the final epoch; mean ± sample std over seeds "
            "(train.seed = data.seed = seed)")
SMOKE = ["train.epochs=2", "train.eval_every_epochs=1", "data.max_seq_len=20", "data.batch_size=64",
         "data.eval_batch_size=64", "model.embedding_dim=8", "model.num_layers=1", "model.num_heads=1",
         "model.attention_dim=8", "model.linear_dim=8", "model.ffn_dim=8", "loss.num_negatives=8",
         "train.tensorboard=false", "train.progress=false"]


def _metrics(m: Dict[str, float]) -> Dict[str, Optional[float]]:
    return {k: m.get(k) for k in METRICS}


def run_one(config: str, seed: int, tie_order: str, data_dir: str, run_root: str, overrides: Sequence[str]) -> dict:
    """Train one (config, tie order, seed) -> its result row."""
    from hstu.trainer.config import load_config
    from hstu.trainer.train import train

    run_dir = os.path.join(run_root, f"{config}-{tie_order}-seed{seed}")
    cfg = load_config(os.path.join(REPO, "configs", "ml-1m", f"{config}.yaml"),
                      [f"data.data_dir={data_dir}", f"run_dir={run_dir}", f"train.seed={seed}", f"data.seed={seed}",
                       f"data.tie_order={tie_order}"] + list(overrides))
    started = provenance()  # the code that trains is the code at start (HEAD may move during a long run)
    t0 = time.perf_counter()
    result = train(cfg)
    row = {
        "config": config, "tie_order": tie_order, "seed": seed, "select_on": result.select_on,
        "selection_metric": result.selection_metric,
        "selected_epoch": result.selected["epoch"], "final_epoch": result.final["epoch"],
        "selected": {"test": _metrics(result.selected["test"]), "validation": _metrics(result.selected["validation"])},
        "final": {"test": _metrics(result.final["test"]), "validation": _metrics(result.final["validation"])},
        "most_popular": _metrics(result.baseline_metrics),
        "epochs": result.epochs_run, "configured_epochs": cfg.train.epochs,
        "complete": result.epochs_run == cfg.train.epochs,  # False: stopped by train.max_train_minutes / max_steps
        "train_minutes": round(result.train_seconds / 60.0, 4), "train_seconds": round(result.train_seconds, 3),
        "wall_minutes": round((time.perf_counter() - t0) / 60.0, 2),  # incl. evaluation and data loading
        "tokens_per_second": round(result.tokens_per_second, 1),
        "data": result.data, "overrides": list(overrides), "run_dir": cfg.run_dir,
    }
    row.update(provenance())
    row["commit"], row["started"] = started["commit"], started["date"]
    return row


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": mean, "std": std}


def summarize_runs(runs: List[dict]) -> List[dict]:
    """Mean ± sample std (n-1; None for one seed) of the test metrics at the selected and at the final epoch,
    per (config, tie order, select_on, smoke)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        groups.setdefault((r["config"], r["tie_order"], r["select_on"], bool(r.get("smoke"))), []).append(r)
    order = list(PAPER) + list(EXTRA)
    out = []
    ties = ("random", "file", "item_id")  # the default first

    def rank(key: tuple) -> tuple:
        config, tie = key[0], key[1]
        return (order.index(config) if config in order else len(order), ties.index(tie) if tie in ties else 3,
                key[2:])

    for (config, tie, select_on, smoke), rows in sorted(groups.items(), key=lambda kv: rank(kv[0])):
        entry = {"config": config, "tie_order": tie, "select_on": select_on, "smoke": smoke,
                 "seeds": sorted(r["seed"] for r in rows), "n": len(rows)}
        for which in ("selected", "final"):
            entry[which] = {m: _mean_std([r[which]["test"].get(m) for r in rows]) for m in METRICS}
        entry["selected_epoch"] = _mean_std([r["selected_epoch"] for r in rows])
        entry["train_minutes"] = _mean_std([r["train_minutes"] for r in rows])
        entry["complete"] = all(r.get("complete", True) for r in rows)
        entry["paper"] = PAPER.get(config, {})
        out.append(entry)
    return out


def _run_key(r: dict) -> tuple:
    return (r["config"], r["tie_order"], r["seed"], r["select_on"], bool(r.get("smoke")))


def merge_results(new_runs: List[dict], path: str, metric: str) -> dict:
    """Merge ``new_runs`` into the results file at ``path`` (same key replaced), keep the historical rows: a file
    that is still the old list of single-seed rows becomes the "historical" section, each row labelled."""
    payload: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            payload = json.load(f)
    if isinstance(payload, list):  # the pre-protocol format: one row per model, test-selected, one seed
        payload = {"historical": {"protocol": HISTORICAL_PROTOCOL,
                                  "rows": [{**r, "tie_order": "item_id", "select_on": "test", "seeds": 1}
                                           for r in payload]}}
    new_keys = {_run_key(r) for r in new_runs}
    runs = [r for r in payload.get("runs", []) if _run_key(r) not in new_keys] + list(new_runs)
    out = {"protocol": PROTOCOL.format(metric=metric), "summary": summarize_runs(runs), "runs": runs}
    if "historical" in payload:
        out["historical"] = payload["historical"]
    return out


def write_results(payload: dict, path: str) -> str:
    """Atomic strict-JSON write (tmp + rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_json_safe(payload), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def plan_runs(configs: List[str], seeds: List[int], tie_orders: List[str], compare_configs: List[str],
              compare_tie_order: str) -> List[tuple]:
    """(config, tie order, seed) of every run, in order, without duplicates."""
    plan = [(c, t, s) for c in configs for t in tie_orders for s in seeds]
    plan += [(c, compare_tie_order, s) for c in compare_configs for s in seeds]
    seen, out = set(), []
    for p in plan:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _csv(text: str) -> List[str]:
    return [x for x in (t.strip() for t in text.split(",")) if x]


def main(argv: Optional[List[str]] = None) -> dict:
    from hstu.trainer.config import TIE_ORDERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="directory holding ratings.dat (required unless --convert-only)")
    ap.add_argument("--configs", "--models", dest="configs", default="sasrec,hstu,hstu-large",
                    help="comma-separated subset of " + ",".join(list(PAPER) + list(EXTRA)))
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (train.seed = data.seed)")
    ap.add_argument("--tie-order", default="random", help=f"comma-separated subset of {','.join(TIE_ORDERS)}")
    ap.add_argument("--compare-configs", default="hstu",
                    help="configs also run under --compare-tie-order ('' = none)")
    ap.add_argument("--compare-tie-order", default="item_id", choices=TIE_ORDERS)
    ap.add_argument("--convert-only", action="store_true",
                    help="train nothing: rewrite ml-1m.json in the current format (old rows -> 'historical')")
    ap.add_argument("--skip-existing", action="store_true",
                    help="skip (config, tie order, seed) runs the results file already holds with the same overrides "
                         "(continue an interrupted sweep)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 epochs: checks the plumbing only")
    ap.add_argument("--out", default=None, help="folder of ml-1m.json (default benchmarks/results, --smoke: "
                                                 "<run-root>/smoke; RESULTS.md is regenerated only for the default)")
    ap.add_argument("--run-root", default=os.path.join(REPO, "runs", "reproduce-ml1m"), help="where run dirs go")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every run")
    args = ap.parse_args(argv)
    if not args.data_dir and not args.convert_only:
        ap.error("--data-dir is required (the folder holding ratings.dat)")
    known = list(PAPER) + list(EXTRA)
    configs, compare = _csv(args.configs), _csv(args.compare_configs)
    for c in configs + compare:
        if c not in known:
            ap.error(f"unknown config {c!r}; choose from {', '.join(known)}")
    ties = _csv(args.tie_order)
    for t in ties:
        if t not in TIE_ORDERS:
            ap.error(f"--tie-order {t!r} is not one of {', '.join(TIE_ORDERS)}")
    try:
        seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    overrides = (SMOKE + [f"data.cache_dir={os.path.join(args.run_root, 'cache')}"] if args.smoke else []) \
        + list(args.overrides)
    out_dir = args.out or (os.path.join(args.run_root, "smoke") if args.smoke else RESULTS_DIR)
    path = os.path.join(out_dir, RESULT_FILE)
    payload = merge_results([], path, "ndcg@10") if args.convert_only else None
    if payload is not None:
        write_results(payload, path)
    plan = [] if args.convert_only else plan_runs(configs, seeds, ties, compare, args.compare_tie_order)
    if args.skip_existing and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        done = {(r["config"], r["tie_order"], r["seed"]) for r in (old.get("runs", []) if isinstance(old, dict) else [])
                if bool(r.get("smoke")) == bool(args.smoke) and r.get("overrides") == overrides}
        plan = [p for p in plan if p not in done]
        payload = old if isinstance(old, dict) and not plan else payload
    for config, tie, seed in plan:
        print(f"== {config} tie_order={tie} seed={seed}", flush=True)
        row = run_one(config, seed, tie, args.data_dir, args.run_root, overrides)
        row["smoke"] = bool(args.smoke)
        sel, fin = row["selected"]["test"], row["final"]["test"]
        print(f"   test HR@10 {sel['hr@10']:.4f} at the selected epoch {row['selected_epoch']}, {fin['hr@10']:.4f} at "
              f"the final epoch {row['final_epoch']}; {row['train_minutes']:.2f} training minutes", flush=True)
        metric = row["selection_metric"]
        payload = merge_results([row], path, metric)  # after every run: a long sweep never loses finished runs
        write_results(payload, path)
    print("wrote", path)
    refresh_results_md(out_dir)
    return payload


if __name__ == "__main__":
    main()
