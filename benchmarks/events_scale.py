"""Own event logs at scale (issue 17): generate a synthetic Parquet log, `hstu prepare` it, train 2 processes on it.

    python benchmarks/events_scale.py [--events 100000000] [--small-events 10000000] [--steps 300] [--nproc 2]
    python benchmarks/events_scale.py --smoke [--out DIR]   # tiny, seconds; never the real JSON

For each of two scales (``--small-events`` and ``--events``): a log of N events (never committed; written under
``--work-dir``, deleted afterwards unless ``--keep``) with string item ids (``i<k>``), Zipfian item popularity
(exponent ``--zipf`` over ``--items`` items, popular ranks scattered over ids), N / ``--events-per-user`` users
(uniform) and times spread over 2024, as Parquet files of ``--chunk`` events. Then

- ``prepare``: the real ``hstu prepare`` (data.name=events, item_ids=vocab, leave-one-out): wall seconds,
  events/s, peak RSS (VmHWM polled every 0.5 s), disk bytes per event of the source Parquet and of the shards;
- ``train``: the real ``hstu train --nproc-per-node N`` (sharding.enabled, row-wise) with
  ``data.events.stream=true`` for ``--steps`` steps, evaluation capped at ``--eval-users`` users per rank: peak
  RSS per rank.

``per_rank_train_rss_ratio``: peak RSS of each rank at the large scale / at the small scale (goal <= 1.2: loader
memory independent of the dataset; the peak includes the evaluation); ``per_rank_rss_ratio_at_last_train_log``:
the same ratio of the resident set at the last logged train step. Results: benchmarks/results/events_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, provenance, write_json  # noqa: E402
from ranking_synthetic_scale import run_polled  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YEAR_2024 = 1704067200
MODEL = ["model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2",
         "model.num_layers=2", "loss.num_negatives=32", "data.batch_size=256",
         "data.eval_batch_size=256", "eval.popularity_baseline=false", "eval.ks=[10]", "eval.ndcg_ks=[10]",
         "eval.selection_metric=ndcg@10"]


def _env() -> Dict[str, str]:
    """glibc malloc, not benchmarks/distributed.py's jemalloc set to keep freed pages: RSS shows what is used."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def generate(folder: str, events: int, items: int, zipf: float, events_per_user: float, chunk: int,
             seed: int) -> Dict[str, Any]:
    """Write the synthetic log as Parquet files part-*.parquet in ``folder``; its sizes."""
    import duckdb
    from tqdm import tqdm

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    users = max(1, int(events / events_per_user))
    cdf = np.cumsum(1.0 / np.arange(1, items + 1) ** zipf)
    cdf /= cdf[-1]
    scatter = rng.permutation(items)  # popularity rank -> item number
    con = duckdb.connect()
    t0 = time.perf_counter()
    with tqdm(total=events, unit="ev", unit_scale=True, desc=f"generate {events:,}") as bar:
        for k, lo in enumerate(range(0, events, chunk)):
            n = min(chunk, events - lo)
            part = {"u": rng.integers(0, users, n), "i": scatter[np.searchsorted(cdf, rng.random(n))],  # noqa: F841
                    "t": YEAR_2024 + rng.integers(0, 366 * 86400, n)}
            con.execute("COPY (SELECT u AS user_id, 'i' || CAST(i AS VARCHAR) AS item_id, t AS ts FROM part) TO "
                        f"'{folder}/part-{k:05d}.parquet' (FORMAT parquet)")
            bar.update(n)
    con.close()
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return {"events": events, "users_drawn_from": users, "items": items, "zipf": zipf,
            "seconds": round(time.perf_counter() - t0, 1), "parquet_bytes": size,
            "parquet_bytes_per_event": round(size / events, 2)}


def _run(cmd: List[str], nproc: int, log_path: str, run_dir: Optional[str] = None) -> Dict[str, Any]:
    """Run ``cmd`` under the RSS poller: seconds, peak RSS per process; with ``run_dir`` (training) also each
    rank's RSS at the last logged train step (after the loader streamed its shards, before evaluation)."""
    t0 = time.perf_counter()
    poller = run_polled(cmd, nproc, log_path, _env())
    out = {"seconds": round(time.perf_counter() - t0, 2),
           "peak_rss_mib": {k: round(v / 1024, 1) for k, v in sorted(poller.peak_kb.items())}}
    if run_dir:
        from hstu.trainer.metrics_log import read_metrics

        train = read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind="train")
        if train:
            out["rss_mib_at_last_train_log"] = {r: poller.rss_at(r, train[-1]["time"]) for r in sorted(poller.series)
                                                if r.startswith("rank")}
    return out


def scale(root: str, name: str, events: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Generate, prepare and train at one scale."""
    logs = os.path.join(root, name, "logs")
    gen = generate(logs, events, args.items, args.zipf, args.events_per_user, args.chunk, args.seed)
    data = ["data.name=events", f"data.events.paths=[{logs}/part-*.parquet]", "data.events.time_column=ts",
            "data.events.time_unit=s", f"data.events.prepare_memory_mb={args.prepare_memory_mb}",
            f"data.events.num_shards={args.shards}", f"data.events.shard_events={args.shard_events}", f"data.cache_dir={os.path.join(root, name, 'cache')}",
            "data.min_seq_len=4", "data.max_seq_len=50"]  # every data.* key the prepared folder's cache key reads
    cli = [sys.executable, "-m", "hstu.trainer.cli"]
    print(f"[{name}] prepare {events:,} events ...", flush=True)
    prep = _run(cli + ["prepare", *data, "train.progress=true"], 1, os.path.join(root, name, "prepare.out"))
    folder = [d for d in os.listdir(os.path.join(root, name, "cache", "events")) if d.startswith("events-")][0]
    manifest = json.load(open(os.path.join(root, name, "cache", "events", folder, "manifest.json")))
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    prep.update(events_per_s=round(events / prep["seconds"]), peak_rss_mib=prep["peak_rss_mib"].get("rank0"),
                counts=manifest["counts"], num_shards=manifest["num_shards"], shard_bytes=shard_bytes,
                shard_bytes_per_event=round(shard_bytes / max(1, manifest["counts"]["events"]), 2))
    print(f"[{name}] prepared: {prep['events_per_s']:,} events/s, peak RSS {prep['peak_rss_mib']} MiB", flush=True)
    run_dir = os.path.join(root, name, "run")
    train = [*data, *MODEL, "data.events.stream=true", f"data.events.eval_users={args.eval_users}",
             f"train.max_steps={args.steps}", "train.epochs=1", "train.progress=false", "train.tensorboard=false",
             "train.num_threads=1", f"train.log_every_steps={max(1, min(10, args.steps // 2))}"]
    if args.nproc > 1:  # several processes train the sharded path (row-wise item table)
        train += ["sharding.enabled=true", "sharding.sharding_type=row_wise"]
    cmd = cli + ["train", "--run-dir", run_dir] + (["--nproc-per-node", str(args.nproc)] if args.nproc > 1 else [])
    print(f"[{name}] train {args.steps} steps in {args.nproc} processes ...", flush=True)
    run = _run(cmd + train, args.nproc, os.path.join(root, name, "train.out"), run_dir)
    run["num_items"] = manifest["num_items"]  # the item table (and its optimizer state) grows with it
    prepared = sorted(d for d in os.listdir(os.path.join(root, name, "cache", "events")) if d.startswith("events-"))
    if prepared != [folder]:  # training prepared its own copy: its RSS and time would measure prepare, not training
        raise RuntimeError(f"[{name}] training did not reuse the prepared dataset {folder} (cache now holds "
                           f"{prepared}): the data.* settings of prepare and train differ")
    print(f"[{name}] trained: peak RSS {run['peak_rss_mib']} MiB", flush=True)
    if not args.keep:
        shutil.rmtree(logs, ignore_errors=True)
    return {"events": events, "generate": gen, "prepare": prep, "train": run}


def _row(name: str, s: Dict[str, Any]) -> Dict[str, Any]:
    """The table row of one scale (benchmarks/summarize.py renders ``runs`` as a table)."""
    prep, train = s["prepare"], s["train"]
    row = {"scale": name, "events": s["events"], "users": prep["counts"]["users"], "num_items": train["num_items"],
           "prepare_s": prep["seconds"], "prepare_events_per_s": prep["events_per_s"],
           "prepare_peak_rss_mib": prep["peak_rss_mib"], "shards": prep["num_shards"],
           "shard_bytes_per_event": prep["shard_bytes_per_event"],
           "parquet_bytes_per_event": s["generate"]["parquet_bytes_per_event"], "train_s": train["seconds"]}
    for rank, mib in train["peak_rss_mib"].items():
        if rank.startswith("rank"):
            row[f"{rank}_peak_rss_mib"] = mib
    for rank, mib in train.get("rss_mib_at_last_train_log", {}).items():
        row[f"{rank}_rss_mib_last_step"] = mib
    return row


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000_000, help="events of the large scale")
    ap.add_argument("--small-events", type=int, default=10_000_000, help="events of the small scale")
    ap.add_argument("--items", type=int, default=100_000, help="item catalogue (small enough that both scales "
                    "see nearly all of it: the item table stays the same and the RSS ratio measures the data path)")
    ap.add_argument("--zipf", type=float, default=1.05, help="item popularity ~ rank^-zipf")
    ap.add_argument("--events-per-user", type=float, default=10.0, help="users = events / this")
    ap.add_argument("--chunk", type=int, default=5_000_000, help="events per generated Parquet file")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--eval-users", type=int, default=2000, help="data.events.eval_users (per rank)")
    ap.add_argument("--shards", type=int, default=8, help="data.events.num_shards (a minimum: the memory budget "
                    "may need more)")
    ap.add_argument("--shard-events", type=int, default=1_000_000, help="data.events.shard_events")
    ap.add_argument("--prepare-memory-mb", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=None, help="logs, prepared data, runs (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the generated logs and the work dir")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results; --smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (tests); never the real JSON")
    args = ap.parse_args(argv)
    if args.smoke:
        args.events, args.small_events, args.items, args.chunk = 20_000, 4_000, 300, 7_000
        args.steps, args.eval_users, args.shards = min(args.steps, 4), min(args.eval_users, 50), 2
        args.prepare_memory_mb = 256
        args.out = args.out or tempfile.mkdtemp(prefix="hstu_events_smoke_")
    root = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="hstu_events_scale_"))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    t0 = time.perf_counter()
    small = scale(root, "small", args.small_events, args)
    large = scale(root, "large", args.events, args)
    ratio = {r: round(large["train"]["peak_rss_mib"][r] / small["train"]["peak_rss_mib"][r], 3)
             for r in large["train"]["peak_rss_mib"] if r.startswith("rank") and r in small["train"]["peak_rss_mib"]}
    at = [s["train"].get("rss_mib_at_last_train_log", {}) for s in (small, large)]
    ratio_train = {r: round(at[1][r] / at[0][r], 3) for r in at[1] if at[1][r] and at[0].get(r)}
    payload = {
        "benchmark": "events_scale", **provenance(), "load_average_before": load, "smoke": args.smoke,
        "setup": (f"synthetic Parquet log, string item ids over {args.items:,} items (Zipf {args.zipf}), "
                  f"~{args.events_per_user:g} events per user, times over 2024; hstu prepare (DuckDB, "
                  f"prepare_memory_mb={args.prepare_memory_mb}); hstu train --nproc-per-node {args.nproc}, "
                  f"data.events.stream=true, {args.steps} steps, eval capped at {args.eval_users} users per rank"),
        "model": MODEL, "runs": [_row(name, s) for name, s in (("small", small), ("large", large))],
        "detail": [dict(scale="small", **small), dict(scale="large", **large)],  # a table with footnotes in RESULTS
        "prepare_events_per_s": large["prepare"]["events_per_s"],
        "prepare_peak_rss_mib": large["prepare"]["peak_rss_mib"],
        "per_rank_train_peak_rss_mib": {"small": small["train"]["peak_rss_mib"],
                                        "large": large["train"]["peak_rss_mib"]},
        "per_rank_train_rss_ratio": ratio,
        "per_rank_rss_ratio_at_last_train_log": ratio_train,
        "shard_bytes_per_event": large["prepare"]["shard_bytes_per_event"],
        "source_parquet_bytes_per_event": large["generate"]["parquet_bytes_per_event"],
        "children_max_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "notes": ["peak RSS: VmHWM polled every 0.5 s (prepare: the hstu prepare process incl. DuckDB threads; "
                  "train: each rank process)", "shared 2-core CPU machine: wall figures include waiting for a core"],
    }
    out_dir = os.path.abspath(args.out or RESULTS_DIR)
    if out_dir == os.path.abspath(RESULTS_DIR):
        path = write_json("events_scale.json", payload)
    else:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "events_scale.json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
    print(f"[events_scale] wrote {path}", flush=True)
    if not args.keep and not args.work_dir:
        shutil.rmtree(root, ignore_errors=True)
    payload["path"] = path
    return payload


if __name__ == "__main__":
    main()
