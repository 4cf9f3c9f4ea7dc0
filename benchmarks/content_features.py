"""Item content features on ML-1M (issue 20, docs/model.md "Item tower"): ids only vs ids + features vs features
only — same config, data, epochs and seed — with a share of items held out of every training sequence
(never-seen items). Writes benchmarks/results/content_features.json (HR@10 / NDCG@10 overall, on cold targets
(<= 5 training events) and on never-seen targets, at the epoch selected on validation; training seconds per
epoch; provenance), then RESULTS.md.

    python benchmarks/content_features.py [--data-dir ../shared/data/ml-1m] [--epochs 101] [--seed 1]
                                          [--holdout 0.05] [--variants ids,ids+features,features] [key=value ...]
    python benchmarks/content_features.py --smoke --out DIR      # tiny synthetic data, seconds (the test suite)

Every variant trains configs/ml-1m/hstu.yaml (``--config``) with ``data.holdout_items_frac``, ``eval.item_groups``
and ``model.item_features.*`` set as below; ``key=value`` overrides apply to all of them. Items with no training
event use their content part only (``content_only_max_events=0``); with ids only they keep their untrained id
embedding (the baseline for never-seen items). Run directories go to ``--run-root`` (default: a temp folder).
The JSON is updated after every variant (under a lock): rows of variants measured with the same settings are
kept, so ``--variants ids`` and ``--variants ids+features,features`` may run as two processes (one per core)
and fill one table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, ensure_hstu_importable, provenance, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FILE = "content_features.json"
VARIANTS: Dict[str, List[str]] = {
    "ids": ["model.item_features.enabled=false"],
    "ids+features": ["model.item_features.enabled=true", "model.item_features.use_ids=true"],
    "features": ["model.item_features.enabled=true", "model.item_features.use_ids=false"],
}
GROUPS = ("", "cold/", "unseen/")  # overall, cold targets, never-seen targets
METRICS = ("hr@10", "ndcg@10")
SMOKE = ["data.name=synthetic", "data.synthetic.num_users=150", "data.synthetic.num_items=80",
         "data.synthetic.num_interests=4", "data.max_seq_len=16", "data.batch_size=32", "data.eval_batch_size=64",
         "model.embedding_dim=8", "model.num_layers=1", "model.attention_dim=8", "model.linear_dim=8",
         "loss.num_negatives=8", "loss.compile=false", "ops.backend=pytorch", "train.eval_every_epochs=1",
         "eval.popularity_baseline=false"]


def group_metrics(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Test metrics -> {"hr@10", "ndcg@10", "cold_hr@10", ..., "unseen_num_users"} (None when absent)."""
    out: Dict[str, Optional[float]] = {}
    for g in GROUPS:
        name = g.replace("/", "_")
        for m in METRICS:
            v = metrics.get(g + m)
            out[name + m] = None if v is None else round(float(v), 4)
        out[name + "num_users"] = metrics.get(g + "num_users")
    return out


def run_variant(name: str, cfg_path: str, run_root: str, common: Sequence[str]) -> dict:
    """Train one variant -> its result row."""
    from hstu.trainer.config import load_config
    from hstu.trainer.train import train

    cfg = load_config(cfg_path, list(common) + VARIANTS[name] + [f"run_dir={os.path.join(run_root, name)}"])
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    row = {"variant": name, **group_metrics(result.best_metrics)}
    final = group_metrics(result.final_metrics)
    row.update({
        "final_hr@10": final["hr@10"], "final_unseen_hr@10": final["unseen_hr@10"],
        "epochs": result.epochs_run, "best_epoch": result.best_epoch,
        "train_seconds_per_epoch": round(result.train_seconds / max(result.epochs_run, 1), 2),
        "train_seconds": round(result.train_seconds, 1), "wall_seconds": round(wall, 1),
        "held_out_items": result.data.get("held_out_items"),
        "never_seen_items": result.data.get("never_seen_items"),  # held out + those only in validation / test
        "features": cfg.model.item_features.features or "all of the dataset's",
        "combine": cfg.model.item_features.combine if cfg.model.item_features.enabled else "",
    })
    return row


PROTOCOL = ("leave-one-out (validation: second-to-last item, test: last item); a random share of the items "
            "(holdout_items_frac, seeded) is removed from every training sequence and stays a candidate and target "
            "(never a training negative); test metrics at the epoch selected on validation ndcg@10; cold = targets "
            "with <= cold_max_events training events, unseen = targets with none")


def save_row(out_dir: str, settings: dict, row: dict) -> dict:
    """Merge ``row`` into RESULT_FILE under an exclusive lock: rows of other variants are kept when they were
    measured with the same ``settings`` (so variants may run in separate processes, one after another or at
    once); rows of other settings are dropped. Returns the payload written."""
    import fcntl
    import json

    directory = out_dir or RESULTS_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RESULT_FILE)
    import hashlib

    lock_path = os.path.join(tempfile.gettempdir(),
                             f"content-features-{hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]}.lock")
    with open(lock_path, "w") as lock:  # beside nothing in the repository: results/ holds results only
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        old: dict = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        same = all(old.get(k) == v for k, v in settings.items())
        kept = [r for r in old.get("variants", []) if same and r["variant"] != row["variant"]]
        if old and not same:
            print(f"{path}: earlier rows had other settings and are replaced", flush=True)
        prov = provenance()
        row = dict(row, commit=prov["commit"], date=prov["date"])
        rows = sorted(kept + [row], key=lambda r: list(VARIANTS).index(r["variant"]))
        payload = {**prov, **settings, "protocol": PROTOCOL, "variants": rows}
        write_json(RESULT_FILE, payload, directory)
    return payload


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "ml-1m"))
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "ml-1m", "hstu.yaml"))
    ap.add_argument("--epochs", type=int, default=0, help="train.epochs of every variant (0: the config's)")
    ap.add_argument("--seed", type=int, default=1, help="train.seed = data.seed (holdout draw, shuffling)")
    ap.add_argument("--holdout", type=float, default=0.05, help="data.holdout_items_frac")
    ap.add_argument("--cold-max-events", type=int, default=5, help="eval.cold_max_events")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1, help="train.num_threads")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic data, 2 epochs: checks the plumbing")
    ap.add_argument("--out", default="", help="results folder (default benchmarks/results; --smoke: a temp dir)")
    ap.add_argument("--run-root", default="", help="run directories (default: a temp folder)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    ensure_hstu_importable()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad} (known: {', '.join(VARIANTS)})")
    common = [f"train.seed={args.seed}", f"data.seed={args.seed}", f"data.holdout_items_frac={args.holdout}",
              "eval.item_groups=true", f"eval.cold_max_events={args.cold_max_events}",
              "model.item_features.content_only_max_events=0", f"train.num_threads={args.threads}",
              "train.progress=false", "train.tensorboard=false"]
    if args.smoke:
        common += SMOKE + [f"train.epochs={args.epochs or 2}"]
    else:
        common += [f"data.data_dir={os.path.abspath(args.data_dir)}"]
        if args.epochs:
            common.append(f"train.epochs={args.epochs}")
    common += list(args.overrides)
    out_dir = args.out or (tempfile.mkdtemp(prefix="content-features-") if args.smoke else "")
    run_root = args.run_root or tempfile.mkdtemp(prefix="content-features-runs-")
    settings = {"smoke": bool(args.smoke), "dataset": "synthetic (smoke)" if args.smoke else "ml-1m",
                "config": os.path.relpath(args.config, REPO), "seed": args.seed, "epochs_requested": args.epochs,
                "holdout_items_frac": args.holdout, "cold_max_events": args.cold_max_events,
                "overrides": " ".join(args.overrides)}
    payload: dict = {}
    for name in variants:
        row = run_variant(name, args.config, run_root, common)
        print(f"{name}: HR@10 {row['hr@10']}, cold {row['cold_hr@10']}, never-seen {row['unseen_hr@10']}; "
              f"{row['train_seconds_per_epoch']} s/epoch", flush=True)
        payload = save_row(out_dir, settings, row)  # after every variant: a long run keeps what it finished
    print(f"wrote {os.path.join(out_dir or RESULTS_DIR, RESULT_FILE)}")
    if not args.smoke and not args.out:
        from summarize import write_results_md

        print(write_results_md())
    return payload


if __name__ == "__main__":
    main()
