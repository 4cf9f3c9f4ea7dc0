"""Quality parity of the fast training step (issue 15): does the speed work change what the model learns?

    python benchmarks/quality_parity.py --data-dir ../shared/data/ml-1m [--arms fast,reference] [--seed 1] \\
        [--tie-order random] [--epochs-at 10,50,101] [--tolerance 0.005] [--smoke] [key=value ...]

Two arms train configs/ml-1m/hstu.yaml under the evaluation protocol of docs/model.md (reproduce_ml1m.py), same
seed, same tie order, same data:

* ``fast``: the shipped config — C++ CPU kernels (``ops.backend: cpu``: fused attention, seeded Philox dropout,
  fused norm gating and sampled softmax), the sampled loss route and the compiled table gradient;
* ``reference``: the same config with the code paths of the baseline commit (c95601a, before issue 15):
  ``ops.backend=pytorch loss.route=all_items loss.compile=false``.

The baseline commit itself predates the protocol (no validation split, the file tie order only, training on the
validation item), so its figures are not on the same split; the reference arm runs its code paths on the split
every figure of ml-1m.json uses. The two arms draw the same negatives; they differ in float summation order and in
which elements dropout drops (same rate), so a difference here is what the fast path does to quality, seed noise
of one mask draw included. Test HR@10 / NDCG@10 (and the validation figures) are read from each run's
metrics.jsonl at ``--epochs-at`` (the run evaluates every 5 epochs and at the last one); the JSON says for each
epoch whether |fast − reference| <= ``--tolerance``.

Arms can run in separate invocations (e.g. one per core side by side, ``train.num_threads=1`` each): results
are merged per (arm, seed, tie order) into ``<out>/quality_parity.json``. The fast arm is a plain reproduction
run, so unless ``--no-reproduction-row`` (or overrides other than threads / progress / TensorBoard) it is also merged into
ml-1m.json with its training minutes. ``--smoke``: tiny model, 2 epochs (tests/test_benchmarks_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, provenance, refresh_results_md, write_json  # noqa: E402

RESULT_FILE = "quality_parity.json"
CONFIG = "hstu"
ARMS = {
    "fast": [],
    "reference": ["ops.backend=pytorch", "loss.route=all_items", "loss.compile=false"],
}
COMPARED = ("hr@10", "ndcg@10")
KEPT = ("hr@10", "ndcg@10", "hr@50", "hr@200", "mrr")
PRESENTATION_KEYS = ("train.num_threads", "train.progress", "train.tensorboard")  # don't change what is learned
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def metrics_at(run_dir: str, epochs: Sequence[int]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{str(epoch): {"test": {...}, "validation": {...}}} from run_dir/metrics.jsonl (kinds "eval" / "valid");
    an epoch the run did not evaluate is absent."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    wanted = {int(e) for e in epochs}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            split = {"eval": "test", "valid": "validation"}.get(rec.get("kind"))
            if split is None or rec.get("epoch") not in wanted:
                continue
            out.setdefault(str(rec["epoch"]), {})[split] = {k: rec[k] for k in KEPT if k in rec}
    return out


def compare(arms: Dict[str, dict], tolerance: float) -> List[dict]:
    """Per epoch both arms evaluated: test metric of each arm, fast − reference, within tolerance or not."""
    fast, ref = arms.get("fast"), arms.get("reference")
    if not fast or not ref:
        return []
    rows = []
    for epoch in sorted(set(fast["at_epochs"]) & set(ref["at_epochs"]), key=int):
        f, r = fast["at_epochs"][epoch]["test"], ref["at_epochs"][epoch]["test"]
        row = {"epoch": int(epoch)}
        for m in COMPARED:
            row[m] = {"fast": f[m], "reference": r[m], "delta": f[m] - r[m]}
        row["within_tolerance"] = all(abs(row[m]["delta"]) <= tolerance for m in COMPARED)
        rows.append(row)
    return rows


def merge(path: str, key: str, arm_row: dict, tolerance: float, meta: dict) -> dict:
    """Add arm_row under runs[key][arm] of the results file, recompute the comparison, return the payload."""
    payload: dict = {"runs": {}}
    if os.path.exists(path):
        with open(path) as f:
            payload = json.load(f)
    payload.update(meta)
    run = payload.setdefault("runs", {}).setdefault(key, {"arms": {}})
    run["arms"][arm_row["arm"]] = arm_row
    run["comparison"] = compare(run["arms"], tolerance)
    run["all_within_tolerance"] = bool(run["comparison"]) and all(r["within_tolerance"] for r in run["comparison"])
    return payload


def main(argv: Optional[List[str]] = None) -> dict:
    import reproduce_ml1m as repro

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="directory holding ratings.dat")
    ap.add_argument("--arms", default="fast,reference", help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--seed", type=int, default=1, help="train.seed = data.seed")
    ap.add_argument("--tie-order", default="random")
    ap.add_argument("--epochs-at", default="10,50,101", help="epochs whose test metrics are compared")
    ap.add_argument("--tolerance", type=float, default=0.005, help="allowed |fast - reference| of HR@10 / NDCG@10")
    ap.add_argument("--no-reproduction-row", action="store_true",
                    help="do not merge the fast arm into ml-1m.json")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 epochs: checks the plumbing only")
    ap.add_argument("--out", default=None, help="folder of quality_parity.json (default benchmarks/results; --smoke: "
                                                 "<run-root>/smoke)")
    ap.add_argument("--run-root", default=os.path.join(repro.REPO, "runs", "quality-parity"))
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to both arms")
    args = ap.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    for a in arms:
        if a not in ARMS:
            ap.error(f"unknown arm {a!r}; choose from {', '.join(ARMS)}")
    try:
        epochs_at = [int(e) for e in args.epochs_at.split(",") if e]
    except ValueError:
        ap.error(f"--epochs-at must be comma-separated integers, got {args.epochs_at!r}")
    extra = (repro.SMOKE + [f"data.cache_dir={os.path.join(args.run_root, 'cache')}"] if args.smoke else []) \
        + list(args.overrides)
    out_dir = args.out or (os.path.join(args.run_root, "smoke") if args.smoke else RESULTS_DIR)
    path = os.path.join(out_dir, RESULT_FILE)
    key = f"{CONFIG}-{args.tie_order}-seed{args.seed}"
    meta = {"config": f"configs/ml-1m/{CONFIG}.yaml", "arm_overrides": ARMS, "tolerance": args.tolerance,
            "compared": list(COMPARED), "epochs_at": epochs_at, "smoke": bool(args.smoke),
            "protocol": repro.PROTOCOL.format(metric="ndcg@10")}
    payload: dict = {}
    for arm in arms:
        print(f"== {CONFIG} arm={arm} tie_order={args.tie_order} seed={args.seed}", flush=True)
        row = repro.run_one(CONFIG, args.seed, args.tie_order, args.data_dir, os.path.join(args.run_root, arm),
                            ARMS[arm] + extra)
        row.update(arm=arm, smoke=bool(args.smoke), at_epochs=metrics_at(row["run_dir"], epochs_at),
                   malloc_env={k: os.environ[k] for k in MALLOC_VARS if k in os.environ})
        missing = [e for e in epochs_at if str(e) not in row["at_epochs"]]
        if missing:
            print(f"   note: epochs {missing} were not evaluated (train.eval_every_epochs / train.epochs)", flush=True)
        print(f"   {row['train_minutes']:.2f} training minutes; test at epochs: " + ", ".join(
            f"{e}: HR@10 {v['test']['hr@10']:.4f} NDCG@10 {v['test']['ndcg@10']:.4f}"
            for e, v in row["at_epochs"].items()), flush=True)
        payload = merge(path, key, row, args.tolerance, meta)
        payload.update({k: v for k, v in provenance().items() if k in ("date", "machine")})
        write_json(RESULT_FILE, payload, out_dir)
        plain = all(o.split("=")[0] in PRESENTATION_KEYS for o in args.overrides)
        if arm == "fast" and not args.smoke and not args.no_reproduction_row and plain:
            row_ml1m = {k: v for k, v in row.items() if k not in ("arm", "at_epochs", "malloc_env")}
            repro.write_results(repro.merge_results([row_ml1m], os.path.join(out_dir, repro.RESULT_FILE),
                                                    row["selection_metric"]), os.path.join(out_dir, repro.RESULT_FILE))
    for r in payload.get("runs", {}).get(key, {}).get("comparison", []):
        print(f"   epoch {r['epoch']}: " + ", ".join(
            f"{m} fast {r[m]['fast']:.4f} reference {r[m]['reference']:.4f} (Δ {r[m]['delta']:+.4f})" for m in COMPARED)
            + ("" if r["within_tolerance"] else f"  OUTSIDE ±{args.tolerance}"), flush=True)
    print("wrote", path)
    refresh_results_md(out_dir)
    return payload


if __name__ == "__main__":
    main()
