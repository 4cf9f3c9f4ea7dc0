"""Scale run of the STREAMING synthetic ranking data (docs/ranking.md "Streaming synthetic data / scale runs"):
configs/synthetic/ranking-scale.yaml (1M users, 1M items, HSTU ranker, production variant) trained by the real
CLI in N processes with sharded tables, train batches generated per batch, one evaluation on the first
``--eval-users`` users; writes benchmarks/results/ranking-synthetic-scale.json, then RESULTS.md.

    python benchmarks/ranking_synthetic_scale.py [--steps 600] [--eval-users 20000] [--nproc 2]
                                                  [--ab-steps 80 --ab-repeats 2] [key=value ...]
    python benchmarks/ranking_synthetic_scale.py --smoke [--out DIR]   # tiny, seconds; never the real JSON

Measured (each figure by this script):
- ``generator``: users/s and events/s of ``iter_ranking_users`` on ``--gen-users`` users (one core, in this
  process), and of the streaming loader's whole path (generate + split + build_ranking_batch) for batches of
  ``batch_size / nproc`` users; ``materialised_bytes_per_user``: the arrays a materialised dataset holds per
  user (RankingData + split), measured on that sample, times num_users = what every rank of the materialised
  path would hold (per rank; generate_ranking briefly needs about twice that while concatenating);
- ``tables``: bytes of the item table and its rowwise AdamW state (momentum1 [R, D] + exp_avg_sq [R], fp32),
  all tables, and per rank (row_wise: 1/N of each);
- ``run``: the training run (`hstu train --nproc-per-node N ... sharding.enabled=true`, 1 torch thread per
  process, jemalloc when present): ms/step, rank-0 CPU ms/step and tokens/s (medians over logging windows after
  the first two, as benchmarks/distributed.py), peak RSS per rank (VmHWM of each rank process, polled every
  0.5 s) and its resident set (VmRSS) at the first and the last logged train step (streaming: flat), the
  evaluation's seconds, NE / AUC / GAUC per task vs the item-rate baseline of the eval users;
- ``prefetch_ab``: wall ms/step of short runs with ``ranking.synthetic.prefetch_batches`` 0 vs 2 (the background
  generation thread), interleaved ``--ab-repeats`` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, provenance, refresh_results_md, write_json  # noqa: E402
from distributed import _env, summarize_run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "ranking-scale.yaml")
RESULT_FILE = "ranking-synthetic-scale.json"
TASKS = ("click", "like", "share", "complete")
METRICS = [f"{m}_{t}" for t in TASKS for m in ("ne", "auc", "gauc")] + ["ne_mean", "auc_mean", "gauc_mean"]
SMOKE = ["ranking.synthetic.num_users=400", "ranking.synthetic.num_items=2000", "ranking.synthetic.num_clusters=10",
         "ranking.synthetic.creators_per_cluster=5", "data.batch_size=16", "data.eval_batch_size=64",
         "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "ranking.head_hidden_dim=16"]


# ------------------------------------------------------------------------------------------------ peak RSS


class RssPoller(threading.Thread):
    """Polls VmHWM (peak resident set, kB) of ``root`` and its descendants every ``interval`` s; a descendant
    with RANK in its environment is that rank (a 1-process run: the root is rank 0)."""

    def __init__(self, root: int, nproc: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.nproc, self.interval = root, nproc, interval
        self.peak_kb: Dict[str, int] = {}
        self.series: Dict[str, List[Tuple[float, int]]] = {}  # role -> [(time.time(), VmRSS kB)]
        self._stop_event = threading.Event()

    @staticmethod
    def _read(path: str) -> Optional[bytes]:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def _descendants(self) -> List[int]:
        children: Dict[int, List[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                stat = self._read(f"/proc/{d}/stat")
                if stat:
                    children.setdefault(int(stat.rsplit(b")", 1)[1].split()[1]), []).append(int(d))
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def _role(self, pid: int) -> Optional[str]:
        if pid == self.root:
            return "rank0" if self.nproc == 1 else "launcher"
        env = self._read(f"/proc/{pid}/environ") or b""
        for item in env.split(b"\0"):
            if item.startswith(b"RANK="):
                return f"rank{item[5:].decode()}"
        return None

    def sample(self) -> None:
        now = time.time()
        for pid in self._descendants():
            role = self._role(pid)
            if not role:
                continue
            for line in (self._read(f"/proc/{pid}/status") or b"").splitlines():
                if line.startswith(b"VmHWM:"):
                    self.peak_kb[role] = max(self.peak_kb.get(role, 0), int(line.split()[1]))
                elif line.startswith(b"VmRSS:"):
                    self.series.setdefault(role, []).append((now, int(line.split()[1])))

    def rss_at(self, role: str, t: float) -> Optional[float]:
        """VmRSS (MiB) of ``role`` at the last sample taken at or before time ``t`` (time.time())."""
        before = [kb for ts, kb in self.series.get(role, []) if ts <= t]
        return round(before[-1] / 1024, 1) if before else None

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_polled(cmd: List[str], nproc: int, log_path: str, env: Dict[str, str]) -> RssPoller:
    """Run ``cmd`` in the repository (output to ``log_path``) while an RssPoller watches it and its ranks; raise
    RuntimeError with the log's tail when it fails. Returns the stopped poller (peak_kb, series)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        poller = RssPoller(proc.pid, nproc)
        poller.start()
        rc = proc.wait()
        poller.stop()
    if rc != 0:
        with open(log_path) as f:
            raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{f.read()[-4000:]}")
    return poller


def train_cli(run_dir: str, nproc: int, overrides: List[str]) -> Dict[str, Any]:
    """The real `hstu train` (--nproc-per-node when nproc > 1); timing from metrics.jsonl, peak RSS per rank."""
    cmd = [sys.executable, "-m", "hstu.trainer.cli", "train", "--config", CONFIG, "--run-dir", run_dir, "--json"]
    cmd += ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".out")
    t0 = time.perf_counter()
    poller = run_polled(cmd + overrides, nproc, log_path, _env())
    out = summarize_run(run_dir, nproc, time.perf_counter() - t0)
    out["peak_rss_mib"] = {k: round(v / 1024, 1) for k, v in sorted(poller.peak_kb.items())}
    from hstu.trainer.metrics_log import read_metrics

    train = read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind="train")
    if len(train) >= 2:  # resident memory while streaming: flat from the first logged step to the last
        ranks = [role for role in sorted(poller.series) if role.startswith("rank")]
        for which, rec in (("first", train[0]), ("last", train[-1])):
            out[f"rss_mib_at_{which}_train_log"] = {role: poller.rss_at(role, rec["time"]) for role in ranks}
    return out


# ------------------------------------------------------------------------------------------------ generator


def _nbytes(data) -> int:
    arrays = [getattr(data, f.name) for f in dataclasses.fields(data)]
    if data.side is not None:
        arrays += [getattr(data.side, k) for k in ("offsets", "feature", "values", "timestamps", "insert_at")]
    return int(sum(a.nbytes for a in arrays if hasattr(a, "nbytes")))


def generator_figures(cfg, users: int, per_rank_batch: int, batches: int) -> Dict[str, Any]:
    """Generator throughput on ``users`` users; streaming-loader path on ``batches`` batches; bytes per user."""
    from hstu.trainer.data.ranking_stream import StreamingRankingLoader, SyntheticUsers
    from hstu.trainer.data.synthetic_ranking import build_world, iter_ranking_users

    s = cfg.ranking.synthetic
    world = build_world(s)
    t0 = time.perf_counter()
    events = side = nbytes = 0
    for chunk in iter_ranking_users(s, 0, users, chunk_size=4096, world=world):
        events += chunk.num_events
        side += chunk.side.num_tokens
        nbytes += _nbytes(chunk)
    gen_s = time.perf_counter() - t0
    split_bytes = 7 * 8  # RankingSplit: rows, hist_start/end, num_candidates, train_start/end, valid_candidates
    per_user = (nbytes + split_bytes * users) / users
    loader = StreamingRankingLoader(SyntheticUsers(s, cfg.ranking.tasks or None, cfg.ranking.contextual,
                                                   cfg.ranking.side_series),
                                    s.num_users, per_rank_batch, max_seq_len=cfg.data.max_seq_len,
                                    num_eval_targets=cfg.ranking.num_eval_targets, seed=cfg.data.seed,
                                    max_side_tokens=cfg.ranking.max_side_tokens)
    it, tokens = iter(loader), 0
    t0 = time.perf_counter()
    for _ in range(batches):
        tokens += next(it).num_events
    it.close()
    loader_s = time.perf_counter() - t0
    return {
        "users": users, "seconds": round(gen_s, 2), "users_per_s": round(users / gen_s),
        "events_per_s": round(events / gen_s), "events_per_user": round(events / users, 1),
        "side_tokens_per_user": round(side / users, 1),
        "loader_batch_users": per_rank_batch, "loader_batches": batches,
        "loader_ms_per_batch": round(1000 * loader_s / batches, 1),
        "loader_users_per_s": round(batches * per_rank_batch / loader_s),
        "loader_tokens_per_batch": round(tokens / batches),
        "materialised_bytes_per_user": round(per_user, 1),
        "materialised_gib_per_rank": round(per_user * s.num_users / 2**30, 2),
    }


def table_figures(cfg, nproc: int) -> Dict[str, Any]:
    """Bytes of the item table + rowwise AdamW state (fp32: weights [R, D], momentum1 [R, D], exp_avg_sq [R])."""
    s, D = cfg.ranking.synthetic, cfg.model.embedding_dim
    rows = {"item": s.num_items + 1, "action": 16 + 1, "context_country": s.num_countries + 1,
            "context_age_group": 5 + 1, "side_creator": s.num_clusters * s.creators_per_cluster + 1,
            "side_region": 32 + 1}
    per = {k: {"weights": r * D * 4, "rowwise_adamw_state": r * D * 4 + r * 4} for k, r in rows.items()}
    item = per["item"]["weights"] + per["item"]["rowwise_adamw_state"]
    total = sum(v["weights"] + v["rowwise_adamw_state"] for v in per.values())
    return {"rows": rows, "dim": D, "item_table_bytes": per["item"]["weights"],
            "item_optimizer_state_bytes": per["item"]["rowwise_adamw_state"],
            "item_table_and_state_gib": round(item / 2**30, 3), "all_tables_and_state_gib": round(total / 2**30, 3),
            "per_rank_gib_row_wise": round(total / nproc / 2**30, 3)}


# ------------------------------------------------------------------------------------------------ runs


def scale_run(root: str, nproc: int, steps: int, common: List[str]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """The scale run: (timing / memory row, [HSTU metrics row, item-rate baseline row])."""
    import json

    from hstu.trainer.metrics_log import read_metrics

    run = train_cli(os.path.join(root, "scale"), nproc,
                    common + [f"train.max_steps={steps}", f"train.log_every_steps={max(1, steps // 25)}"])
    run["children_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    evals = read_metrics(os.path.join(run["run_dir"], "metrics.jsonl"), kind="eval")
    run["eval_seconds"] = round(evals[-1]["seconds"], 1) if evals else None
    with open(os.path.join(run["run_dir"], "results.json")) as f:
        res = json.load(f)
    for key in ("best_metrics", "final_metrics", "best_epoch"):
        run.pop(key, None)
    metrics = [{"model": f"hstu after {steps} steps", **_metrics(res["final_metrics"])},
               {"model": "item_rate baseline", **_metrics(res["baseline_metrics"])}]
    return run, metrics


def prefetch_ab(root: str, nproc: int, steps: int, repeats: int, common: List[str]) -> List[Dict[str, Any]]:
    """Short runs with ranking.synthetic.prefetch_batches 0 and 2, interleaved ``repeats`` times (256 eval users,
    no baseline): one row per run."""
    rows = []
    base = [o for o in common if not o.startswith("ranking.synthetic.eval_users=")]
    for rep in range(repeats):
        for pf in (0, 2):
            print(f"[scale] A/B prefetch_batches={pf} #{rep + 1} ...", flush=True)
            r = train_cli(os.path.join(root, f"ab-prefetch{pf}-{rep}"), nproc, base + [
                f"ranking.synthetic.prefetch_batches={pf}", f"train.max_steps={steps}",
                f"train.log_every_steps={max(1, steps // 10)}", "ranking.synthetic.eval_users=256",
                "eval.popularity_baseline=false"])
            rows.append({"prefetch_batches": pf, "repeat": rep + 1, "steps": steps,
                         **{k: r[k] for k in ("ms_per_step_median", "rank0_cpu_ms_per_step_median",
                                              "tokens_per_second_median", "train_seconds")}})
    return rows


# ------------------------------------------------------------------------------------------------ main


def _metrics(m: Dict[str, Any]) -> Dict[str, Any]:
    return {k: round(m[k], 4) for k in METRICS if m.get(k) is not None} | {
        k: m[k] for k in ("num_impressions", "num_users") if k in m}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="train steps (global batches) of the scale run")
    ap.add_argument("--eval-users", type=int, default=20000, help="ranking.synthetic.eval_users")
    ap.add_argument("--nproc", type=int, default=2, help="processes (--nproc-per-node)")
    ap.add_argument("--gen-users", type=int, default=20000, help="users for the generator throughput")
    ap.add_argument("--ab-steps", type=int, default=80, help="steps of each prefetch A/B run (0: skip)")
    ap.add_argument("--ab-repeats", type=int, default=2)
    ap.add_argument("--run-root", default=None, help="run directories (default: a temp dir)")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results; --smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (tests); never the real JSON")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the scale config")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    extra = list(args.overrides)
    if args.smoke:
        extra = SMOKE + extra
        args.steps, args.eval_users, args.gen_users = min(args.steps, 6), min(args.eval_users, 64), 200
        args.ab_steps, args.ab_repeats = min(args.ab_steps, 3), 1
        args.out = args.out or tempfile.mkdtemp(prefix="hstu_scale_smoke_")
    out_dir = os.path.abspath(args.out or RESULTS_DIR)
    root = os.path.abspath(args.run_root or tempfile.mkdtemp(prefix="hstu_scale_runs_"))
    from hstu.trainer.config import load_config

    cfg = load_config(CONFIG, extra + [f"ranking.synthetic.eval_users={args.eval_users}"])
    s = cfg.ranking.synthetic
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    common = [f"ranking.synthetic.eval_users={args.eval_users}", "train.progress=false", "train.tensorboard=false",
              "train.num_threads=1", "train.epochs=1", "train.eval_every_epochs=1"] + extra

    print(f"[scale] {s.num_users:,} users, {s.num_items:,} items; {args.steps} steps in {args.nproc} processes ...",
          flush=True)
    run, metrics = scale_run(root, args.nproc, args.steps, common)
    run["users_trained"] = args.steps * cfg.data.batch_size
    print(f"[scale] {run['ms_per_step_median']} ms/step, {run['tokens_per_second_median']} tokens/s, peak RSS "
          f"{run['peak_rss_mib']} MiB; ne_mean {metrics[0]['ne_mean']} vs baseline {metrics[1]['ne_mean']}",
          flush=True)
    print("[scale] generator ...", flush=True)
    gen = generator_figures(cfg, args.gen_users, max(1, cfg.data.batch_size // args.nproc), 10 if args.smoke else 40)
    ab = prefetch_ab(root, args.nproc, args.ab_steps, args.ab_repeats, common) if args.ab_steps > 0 else []
    summary = {f"model_minus_baseline_{k}": round(metrics[0][k] - metrics[1][k], 4)
               for k in ("ne_mean", "auc_mean", "gauc_mean")}
    if ab:
        med = {pf: [r["ms_per_step_median"] for r in ab if r["prefetch_batches"] == pf
                    and r["ms_per_step_median"] is not None] for pf in (0, 2)}  # None: too few steps logged
        summary["prefetch_2_vs_0_wall_ms_per_step_ratio"] = (
            round(statistics.median(med[2]) / statistics.median(med[0]), 3) if med[0] and med[2] else None)
    payload = {
        "benchmark": "ranking_synthetic_scale", **provenance(), "load_average_before": load,
        "config": os.path.relpath(CONFIG, REPO), "overrides": extra, "smoke": args.smoke,
        "setup": (f"{s.num_users:,} users, {s.num_items:,} items, {s.num_clusters} clusters x "
                  f"{s.creators_per_cluster} creators; HSTU production, D={cfg.model.embedding_dim}, "
                  f"{cfg.model.num_layers} layers; global batch {cfg.data.batch_size} users, history <= "
                  f"{cfg.data.max_seq_len}, {cfg.ranking.num_eval_targets} eval candidates per user; "
                  f"{args.nproc} processes, sharding.enabled (row_wise, rowwise AdamW), 1 torch thread each; "
                  f"train batches generated per batch (ranking.synthetic.stream), one evaluation (and the item-rate "
                  f"baseline) on the first {args.eval_users:,} users"),
        "num_users": s.num_users, "num_items": s.num_items, "steps": args.steps, "processes": args.nproc,
        "notes": ["shared 2-core CPU machine, other jobs may run: wall figures include waiting for a core; rank-0 "
                  "CPU ms/step is the load-independent figure",
                  "peak_rss_mib: VmHWM of each process polled every 0.5 s (launcher = the CLI running torchrun, it "
                  "holds no data); rss_mib_at_first/last_train_log: VmRSS at the first and last logged train step; "
                  "jemalloc with dirty_decay_ms:-1 keeps freed pages, so RSS never shrinks",
                  "materialised_gib_per_rank: what EVERY rank of the materialised path would hold (measured bytes "
                  "per user x users); the streaming path holds one batch + 8 bytes/user of epoch permutation",
                  "item_rate baseline: fitted on the eval users' training windows only (streaming mode)",
                  "tables: computed from the shapes (fp32 weights [R, D]; rowwise AdamW momentum1 [R, D] + "
                  "exp_avg_sq [R]); per_rank_gib_row_wise = all tables and state / processes"],
        "summary": summary,
        "results": {"metrics": metrics, "run": run, "generator": gen, "tables": table_figures(cfg, args.nproc),
                    "prefetch_ab": ab},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    os.makedirs(out_dir, exist_ok=True)
    import common as common_mod

    saved = common_mod.RESULTS_DIR
    common_mod.RESULTS_DIR = out_dir
    try:
        path = write_json(RESULT_FILE, payload)
    finally:
        common_mod.RESULTS_DIR = saved
    print("wrote", path)
    if not args.smoke:
        refresh_results_md(out_dir)
    payload["path"] = path
    return payload


if __name__ == "__main__":
    main()
