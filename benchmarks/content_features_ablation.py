"""Which content feature carries (or blocks) never-seen items: inference-time ablations of a trained run with item
features (docs/model.md "Item tower"). No training: the run's best weights are evaluated on its test split as
trained, then once per feature f with f removed from the held-out items only (their f slots set to padding, so
their vector is built from the other features) and once with f removed from every item (f's table zeroed).
Also: the share of the held-out items' f values that a training item uses too (a hashed title word shares
its bucket with other titles' words; such a value's embedding was trained as part of other items).

    python benchmarks/content_features_ablation.py RUN_DIR [RUN_DIR ...] [--data-dir ../shared/data/ml-1m]

RUN_DIR: a run of benchmarks/content_features.py (``--run-root``, variants ``features`` or ``ids+features``) or any
retrieval run with ``model.item_features.enabled`` and ``data.holdout_items_frac`` > 0. Writes
benchmarks/results/content_features_ablation.json (``--out``): per run and ablation HR@10 / NDCG@10 overall, on
cold and on never-seen targets, with provenance.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, ensure_hstu_importable, provenance, write_json  # noqa: E402

ensure_hstu_importable()
import torch  # noqa: E402

KEYS = ("hr@10", "ndcg@10", "cold/hr@10", "cold/ndcg@10", "unseen/hr@10", "unseen/ndcg@10", "unseen/num_users")


def load_run(run_dir: str, data_dir: Optional[str], threads: int):
    """(cfg, task with data built, model with the run's best weights): ``hstu eval``'s loading
    (trainer/cli.py ``load_trained_run``), with the cold / never-seen target groups on."""
    from hstu.trainer.cli import load_trained_run

    overrides = ["train.progress=false", "eval.item_groups=true", f"train.num_threads={threads}"]
    cfg, task, model, _ = load_trained_run(run_dir, overrides, data_dir=data_dir, device="cpu",
                                           purpose="content_features_ablation")
    if not cfg.model.item_features.enabled or cfg.data.holdout_items_frac <= 0:
        raise SystemExit(f"{run_dir}: needs model.item_features.enabled and data.holdout_items_frac > 0")
    return cfg, task, model


def ablate(run_dir: str, data_dir: Optional[str], threads: int = 1) -> List[Dict[str, Any]]:
    from hstu.trainer.data.holdout import holdout_items

    cfg, task, model = load_run(run_dir, data_dir, threads)
    tower = model.item_tower
    values = tower.feature_values
    held = torch.as_tensor(holdout_items(task.data.source, cfg.data.holdout_items_frac, cfg.data.seed))
    is_held = torch.zeros(values.shape[0], dtype=torch.bool)
    is_held[held] = True
    is_held[0] = False
    base = {"run_dir": os.path.abspath(run_dir), "use_ids": bool(cfg.model.item_features.use_ids),
            "held_out_items": int(held.numel()), "seed": cfg.train.seed}

    def evaluate(ablation: str, feature: Optional[str], shared: Optional[float] = None) -> Dict[str, Any]:
        m = task.evaluate(model, torch.device("cpu"))
        row = {**base, "ablation": ablation, "feature": feature, "shared_with_training_items": shared,
               **{k: m.get(k) for k in KEYS}}
        print(f"{os.path.basename(run_dir)} {ablation} {feature or ''}: hr@10 {row['hr@10']:.4f}, never-seen "
              f"{row['unseen/hr@10']:.4f}, cold {row['cold/hr@10']:.4f}", flush=True)
        return row

    rows = [evaluate("as_trained", None)]
    for f, name in enumerate(tower.names):
        o, w = tower.offsets[f], tower.widths[f]
        block = values[:, o:o + w]
        train_vals = set(block[~is_held & (torch.arange(values.shape[0]) > 0)].reshape(-1).tolist()) - {0}
        held_vals = block[held].reshape(-1)
        held_vals = held_vals[held_vals > 0].tolist()
        shared = sum(v in train_vals for v in held_vals) / max(len(held_vals), 1)
        saved = block.clone()
        with torch.no_grad():
            values[held, o:o + w] = 0
        rows.append(evaluate("held_out_without", name, shared))
        with torch.no_grad():
            values[:, o:o + w] = saved
            table = tower.tables[name].weight
            keep = table.clone()
            table.zero_()
        rows.append(evaluate("all_without", name, shared))
        with torch.no_grad():
            table.copy_(keep)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--data-dir", default=None, help="raw data folder, if it moved since training")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=RESULTS_DIR)
    args = ap.parse_args(argv)
    rows: List[Dict[str, Any]] = []
    for run in args.runs:
        rows += ablate(run, args.data_dir, args.threads)
    payload = {**provenance(), "threads": args.threads, "rows": rows}
    path = write_json("content_features_ablation.json", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
