"""Distributed training figures (docs/distributed.md) -> benchmarks/results/distributed.json.

    python benchmarks/distributed.py [--steps 150] [--ml1m-steps 30] [--data-dir ../shared/data/ml-1m]
    python benchmarks/distributed.py --full --data-dir ../shared/data/ml-1m     # hours: HR@10 1 vs 2 processes
    python benchmarks/distributed.py --full --suites none --full-baseline-run runs/reproduce-ml1m/hstu \
        --run-root runs/distributed      # reuse the reproduction's 1-process run; only the 2-process one trains

Short mode (minutes): the real trainer (`hstu train`, torchrun for 2 processes) for a few hundred steps at most,
1 intra-op thread per process, on (a) a synthetic catalog of 20k items (negatives through the unique-id lookup)
and (b) ML-1M (3.7k items: the loss scores all items):
  plain-1 (nn.Embedding + dense AdamW), dmp-1 (sharded path, world 1), dmp-2 (2 processes), dmp-2-prefetch
  (2 processes, sharding.pipeline=prefetch). Reported: wall ms/step and rank 0's process CPU ms/step (medians
  over logging windows after the first) and global tokens/s. On a shared machine the CPU time per step is the
  load-independent figure: with W processes each doing 1/W of the batch, ideal scaling halves it at W = 2. Plus the full-ranking eval item table on 2 ranks: KJT lookup of all ids vs gathering
  the table shards (all_reduce), for ML-1M's and a 1M-row table.
Full mode: ML-1M HSTU trained to completion with 1 process (plain) and 2 processes (sharded); |ΔHR@10| is the
acceptance figure (±0.005).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import provenance, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
SYNTHETIC = ["data.name=synthetic", "data.synthetic.num_users=6000", "data.synthetic.num_items=20000",
             "data.synthetic.num_interests=50", "data.synthetic.min_seq_len=20", "data.synthetic.max_seq_len=100",
             "data.max_seq_len=100", "data.batch_size=64", "model.embedding_dim=32", "model.attention_dim=16",
             "model.linear_dim=16", "model.num_heads=2", "loss.num_negatives=64"]
VARIANTS = {  # name -> (processes, overrides)
    "plain-1": (1, []),
    "dmp-1": (1, ["sharding.enabled=true"]),
    "dmp-2": (2, ["sharding.enabled=true"]),
    "dmp-2-prefetch": (2, ["sharding.enabled=true", "sharding.pipeline=prefetch"]),
}


def _env() -> Dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if os.path.exists(JEMALLOC):
        env.update(LD_PRELOAD=JEMALLOC, MALLOC_CONF="oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1")
    return env


def train_run(run_dir: str, nproc: int, overrides: List[str], config: str = "") -> Dict[str, Any]:
    """`hstu train` (through --nproc-per-node when nproc > 1); returns results.json + step timing."""
    cmd = [sys.executable, "-m", "hstu.trainer.cli", "train", "--run-dir", run_dir, "--json"]
    cmd += ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd += ["--config", config] if config else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + overrides, env=_env(), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd + overrides)} failed:\n{proc.stderr[-4000:]}")
    return summarize_run(run_dir, nproc, time.perf_counter() - t0)


def summarize_run(run_dir: str, nproc: int, wall_seconds: Optional[float] = None) -> Dict[str, Any]:
    """A finished run's results.json + step timing from its metrics.jsonl (medians over logging windows)."""
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r for r in recs if r["kind"] == "train"]
    pairs = [(a, b) for a, b in zip(train[1:], train[2:]) if b["step"] > a["step"]]
    windows = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in pairs]
    cpu = [(b["process_cpu_seconds"] - a["process_cpu_seconds"]) / (b["step"] - a["step"]) for a, b in pairs
           if "process_cpu_seconds" in a and "process_cpu_seconds" in b]  # not logged by older runs
    tps = [r["tokens_per_second"] for r in train[2:]]
    return {"processes": nproc, "run_dir": run_dir, "steps": res["steps"], "wall_seconds": round(wall_seconds, 1) if wall_seconds is not None else None,
            "train_seconds": round(res["train_seconds"], 2),
            "ms_per_step_median": round(1000 * statistics.median(windows), 1) if windows else None,
            "rank0_cpu_ms_per_step_median": round(1000 * statistics.median(cpu), 1) if cpu else None,
            "tokens_per_second_median": round(statistics.median(tps)) if tps else None,
            "tokens_per_second_overall": round(res["tokens_per_second"]),
            "best_epoch": res.get("best_epoch"), "best_metrics": res.get("best_metrics"),
            "final_metrics": res["final_metrics"],
            "select_on": res.get("select_on"), "data": res.get("data")}  # how the epoch was selected / data cut


def short_suite(name: str, steps: int, base: List[str], config: str, root: str) -> Dict[str, Any]:
    common = base + [f"train.max_steps={steps}", "train.epochs=1000", "train.eval_every_epochs=1000",
                     f"train.log_every_steps={max(1, steps // 12)}", "train.num_threads=1", "train.progress=false",
                     "train.tensorboard=false", "eval.popularity_baseline=false"]
    out = {}
    for variant, (nproc, extra) in VARIANTS.items():
        print(f"[{name}] {variant} ...", flush=True)
        out[variant] = train_run(os.path.join(root, f"{name}-{variant}"), nproc, common + extra, config)
        print(f"[{name}] {variant}: {out[variant]['ms_per_step_median']} ms/step, "
              f"{out[variant]['rank0_cpu_ms_per_step_median']} CPU ms/step (rank 0), "
              f"{out[variant]['tokens_per_second_median']} tokens/s", flush=True)
    return out


# ---------------------------------------------------------------------------- eval item table: lookup vs gather
def _eval_table_worker(out_path: str) -> None:
    """torchrun worker: time all-item vectors by KJT lookup vs gathering the sharded table."""
    import torch
    import torch.distributed as dist

    from hstu.modules.embeddings import ItemEmbeddings
    from hstu.trainer.parallel.config import ShardingConfig
    from hstu.trainer.parallel.item_embeddings import CollectionItemEmbeddings, full_table
    from hstu.trainer.parallel.sharding import shard_embedding_collection

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for rows, dim in ((3706, 50), (1_000_000, 64)):
        module = torch.nn.Module()
        module.item_embeddings = CollectionItemEmbeddings(ItemEmbeddings(rows, dim))
        dmp = shard_embedding_collection(module, ShardingConfig(sharding_type="row_wise"))
        emb = dmp.module.item_embeddings
        key = "item_embeddings.collection.embeddings.item_id_table.weight"
        timings: Dict[str, List[float]] = {"kjt_lookup": [], "gather_all_reduce": []}
        with torch.no_grad():
            for _ in range(3):
                dist.barrier()
                t0 = time.perf_counter()
                a = torch.cat([emb(torch.arange(lo, min(rows + 1, lo + 65536))) for lo in range(0, rows + 1, 65536)])
                timings["kjt_lookup"].append(time.perf_counter() - t0)
                dist.barrier()
                t0 = time.perf_counter()
                b = full_table(dmp.state_dict()[key])
                timings["gather_all_reduce"].append(time.perf_counter() - t0)
        assert torch.equal(a, b)
        results[f"{rows + 1}x{dim}"] = {k: round(1000 * min(v), 1) for k, v in timings.items()}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"ms_min_of_3_per_method": results, "world_size": dist.get_world_size()}, f)
    dist.destroy_process_group()


def eval_table_suite() -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "eval_table.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), "--eval-table-worker", out]
        proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-4000:])
        return json.load(open(out))


# Keys that may differ between the 1- and 2-process runs without changing what is trained.
_RUN_ONLY_KEYS = ("run_dir", "data.data_dir", "train.num_threads", "train.progress", "train.max_train_minutes",
                  "train.resume", "train.tensorboard", "checkpoint", "sharding")


def _trained_config(path: str = "", overrides: List[str] = ()) -> Dict[str, Any]:
    """A config file (a run's config.yaml, or a config + overrides), resolved and flattened to dotted keys, minus
    the keys that only say how/where it ran."""
    from hstu.trainer.config import load_config, to_dict

    def flat(d: Any, prefix: str = "") -> Dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}

    cfg = flat(to_dict(load_config(path, list(overrides))))  # resolved: keys added since the run get defaults
    return {k: v for k, v in cfg.items() if not any(k == p or k.startswith(p + ".") for p in _RUN_ONLY_KEYS)}


def full_suite(data_dir: str, root: str, baseline_run: str = "") -> Dict[str, Any]:
    """ML-1M HSTU to completion, 1 process (plain) vs 2 processes (sharded).

    baseline_run: an already finished 1-process run of configs/ml-1m/hstu.yaml (e.g. the reproduction's
    runs/reproduce-ml1m/hstu) used instead of training it again; its trained config must equal the 2-process one.
    The 2-process run checkpoints every 5 epochs and resumes from its latest checkpoint when rerun."""
    config = os.path.join(REPO, "configs", "ml-1m", "hstu.yaml")
    common = [f"data.data_dir={data_dir}", "train.num_threads=1", "train.progress=false"]
    if baseline_run:
        one = summarize_run(os.path.abspath(baseline_run), 1)
        one["reused"] = True
    else:
        one = train_run(os.path.join(root, "full-1"), 1, common, config)
    two_dir = os.path.join(root, "full-2")
    two_overrides = common + ["sharding.enabled=true", "checkpoint.every_steps=240", "checkpoint.keep_last=1",
                              "train.resume=true"]
    a = _trained_config(os.path.join(one["run_dir"], "config.yaml"))
    b = _trained_config(config, two_overrides)
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    if diff:  # checked before training: the comparison is only meaningful for the same trained config
        raise RuntimeError(f"1- and 2-process runs train different configs (1-process, 2-process): {diff}")
    two = train_run(two_dir, 2, two_overrides, config)
    out: Dict[str, Any] = {"plain-1": one, "dmp-2": two}
    for which in ("final_metrics", "best_metrics"):
        delta = two[which]["hr@10"] - one[which]["hr@10"]
        out[f"delta_{which.split('_')[0]}_hr@10"] = round(delta, 4)
        out[f"{which.split('_')[0]}_within_0.005"] = abs(delta) <= 0.005
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="steps per synthetic run")
    p.add_argument("--ml1m-steps", type=int, default=40, help="steps per ML-1M run (0: skip)")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "ml-1m"))
    p.add_argument("--full", action="store_true", help="also train ML-1M to completion with 1 and 2 processes")
    p.add_argument("--full-baseline-run", default="", metavar="RUN_DIR",
                   help="--full: reuse this finished 1-process run of configs/ml-1m/hstu.yaml instead of training it")
    p.add_argument("--run-root", default=None, help="where run directories go (default: a temp dir)")
    p.add_argument("--suites", default="synthetic,ml1m,eval_table",
                   help="comma list of synthetic | ml1m | eval_table; results are merged into the existing JSON")
    p.add_argument("--eval-table-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.eval_table_worker:
        return _eval_table_worker(args.eval_table_worker)
    root = os.path.abspath(args.run_root or tempfile.mkdtemp(prefix="hstu_dist_bench_"))
    suites = set(args.suites.split(","))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distributed.json")
    payload: Dict[str, Any] = json.load(open(path)) if os.path.exists(path) else {}
    payload.update({"threads_per_process": 1, "note": "shared 2-core CPU machine, other jobs running: compare "
                    "CPU ms/step; wall times include waiting for a core"})

    def record(key: str, fn: Any) -> None:
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        payload[key] = {**provenance(), "load_average_before": load, "results": fn()}
        write_json("distributed.json", payload)

    if "synthetic" in suites:
        record("synthetic_20k_items", lambda: short_suite("synthetic", args.steps, SYNTHETIC, "", root))
    if "ml1m" in suites and args.ml1m_steps > 0 and os.path.isdir(args.data_dir):
        record("ml1m", lambda: short_suite("ml1m", args.ml1m_steps, [f"data.data_dir={os.path.abspath(args.data_dir)}"],
                                           os.path.join(REPO, "configs", "ml-1m", "hstu.yaml"), root))
    if "eval_table" in suites:
        record("eval_item_table_2_ranks", eval_table_suite)
    if args.full:
        record("ml1m_full", lambda: full_suite(os.path.abspath(args.data_dir), root, args.full_baseline_run))
    print("wrote", path)


if __name__ == "__main__":
    main()
