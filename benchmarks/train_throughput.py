"""Training-step throughput on ML-1M, side by side with the baseline commit and the paper's research code.

    python benchmarks/train_throughput.py            # full: 4 ML-1M configs + baseline + paper code (~25 min)
    python benchmarks/train_throughput.py --quick    # HSTU research only, fewer steps, paper code 90 s
    python benchmarks/train_throughput.py --smoke --out DIR   # tiny synthetic run of this tree only (tests)

Every figure comes from one run on one machine, same threads, same allocator (whatever LD_PRELOAD / MALLOC_*
the script was started with, recorded in the JSON):

- **this tree** and the **baseline commit** (default c95601a, checked out into a temporary ``git worktree`` with
  its own ``hstu/<folder>`` symlinks) run the same worker (this file, ``--worker``) in separate processes, the
  baseline through PYTHONPATH. Workers alternate (A, B, A, B ...) and the medians are reported: the machine is
  shared, so only ratios inside one run mean anything; ``os.getloadavg()`` is recorded with every figure.
- Each worker trains ``steps`` steady-state steps (after ``warmup``) on the same first batches of the train
  loader and reports real (unpadded) tokens/s incl. batch preparation, and a per-phase split of separate,
  synchronously timed steps: batch prep (loader + prepare_batch: labels and negatives in this tree), embedding
  lookup, attention (the attention op / MultiheadAttention forward), rest of the layers, loss (logits, CE; plus
  labels and negatives in a baseline tree that drew them in the loss), backward, optimizer. Phase timing adds a
  little overhead; tokens/s comes from the un-instrumented steps.
- **needed** GFLOP/s counts the work the model needs (2 FLOPs per multiply-add, backward = 2× forward):
  projections and output layers, the causal triangle of attention, 1 + R dot products per labelled position;
  not the padding or all-items scores an implementation may choose to run. The roofline is a plain fp32
  matmul (1024², same threads) measured in this run before and after the workers.
- **the paper's code** (../shared/peers/generative-recommenders): a temporary copy with the six CPU edits of
  its peers README, ``num_workers=0``, the ML-1M files of --data-dir, run for ``--peer-seconds``; s/batch is the
  median gap between its per-batch TensorBoard ``losses/ar_loss`` events (its own batch of 128 sequences of the
  same data: tokens/s = this run's mean real tokens per batch / s per batch). Needs gin-config, absl-py, pandas
  in the venv (benchmark-only; the project never imports them); versions are recorded.

Writes benchmarks/results/train_throughput.json (``--out`` elsewhere); benchmarks/summarize.py renders it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import provenance, write_json  # noqa: E402

CONFIGS = {"hstu": "configs/ml-1m/hstu.yaml", "hstu-production": "configs/ml-1m/hstu-production.yaml",
           "hstu-large": "configs/ml-1m/hstu-large.yaml", "sasrec": "configs/ml-1m/sasrec.yaml"}
SMOKE_OVERRIDES = ["data.name=synthetic", "data.synthetic.num_users=64", "data.synthetic.num_items=200",
                   "data.synthetic.max_seq_len=24", "data.max_seq_len=24", "data.batch_size=16",
                   "loss.num_negatives=8", "model.embedding_dim=16", "model.attention_dim=16",
                   "model.linear_dim=16"]
BASELINE_COMMIT = "c95601a"
PEER_DIR = os.path.join(ROOT, "..", "shared", "peers", "generative-recommenders")
# what each change bought: this tree with one switch turned back (HSTU research config only)
ABLATIONS = {"ops.backend=pytorch (PyTorch reference ops, no C++ kernels)": ["ops.backend=pytorch"],
             "ops.backend=pytorch loss.route=all_items (and the old ML-1M loss route)":
                 ["ops.backend=pytorch", "loss.route=all_items"]}
PHASES = ("batch_prep", "embedding_lookup", "attention", "rest_of_layers", "loss", "backward", "optimizer")


# ------------------------------------------------------------------------------------------- needed FLOPs

def needed_flops(model_cfg, lengths: List[int], num_negatives: int) -> Dict[str, float]:
    """Forward + backward FLOPs one batch needs (×3 of forward): {"layers", "attention", "loss", "total"}."""
    D, layers = model_cfg.embedding_dim, model_cfg.num_layers
    lengths = [int(n) for n in lengths if int(n) > 0]
    tokens, labelled = sum(lengths), sum(n - 1 for n in lengths)
    pairs = sum(n * (n + 1) / 2 for n in lengths)  # causal: query i sees keys 0..i
    if model_cfg.arch == "hstu":
        H, dqk, dv = model_cfg.num_heads, model_cfg.attention_dim, model_cfg.linear_dim
        out = 3 if model_cfg.variant == "production" else 1
        per_token = 2.0 * D * (2 * dv + 2 * dqk) * H + 2.0 * out * H * dv * D
        attn = 2.0 * pairs * H * (dqk + dv)
    else:  # SASRec: q, k, v, out projections + 2-layer FFN; attention QKᵀ and A·V over D
        per_token = 2.0 * 4 * D * D + 2.0 * 2 * D * model_cfg.ffn_dim
        attn = 2.0 * pairs * 2 * D
    lay, att = 3.0 * layers * per_token * tokens, 3.0 * layers * attn
    loss = 3.0 * 2.0 * D * (1 + num_negatives) * labelled
    return {"layers": lay, "attention": att, "loss": loss, "total": lay + att + loss}


def matmul_gflops(threads: int, n: int = 1024, reps: int = 20) -> float:
    """Median fp32 GFLOP/s of an n×n matmul with ``threads`` intra-op threads (the roofline)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(ts) / 1e9


# ------------------------------------------------------------------------------------------------ worker

def _timed_attention(timer: Dict[str, float]):
    """Wrap the attention op of modules/hstu.py and every nn.MultiheadAttention forward to add their time."""
    import torch.nn as nn

    import hstu.modules.hstu as mh

    orig = mh.jagged_hstu_attention

    def wrapped(*a, **k):
        t0 = time.perf_counter()
        out = orig(*a, **k)
        timer["attention"] += time.perf_counter() - t0
        return out

    mh.jagged_hstu_attention = wrapped
    orig_mha = nn.MultiheadAttention.forward

    def mha(self, *a, **k):
        t0 = time.perf_counter()
        out = orig_mha(self, *a, **k)
        timer["attention"] += time.perf_counter() - t0
        return out

    nn.MultiheadAttention.forward = mha


def worker(args) -> Dict[str, Any]:
    """Runs inside the tree on PYTHONPATH (this one or the baseline's): steady-state steps + a phase split."""
    import inspect

    import torch

    import hstu.trainer.distributed as hd
    from hstu.modules.losses import next_item_labels, sampled_softmax_loss
    from hstu.trainer import train as T
    from hstu.trainer.config import load_config
    from hstu.trainer.pipeline import prepare_batch
    from hstu.trainer.tasks import make_task

    torch.set_num_threads(args.threads)
    overrides = ["train.progress=false", "train.tensorboard=false"] + list(args.override)
    if not args.smoke:
        overrides.append(f"data.data_dir={args.data_dir}")
    cfg = load_config(os.path.abspath(args.config), overrides)  # relative to the worker's tree (its cwd)
    torch.manual_seed(cfg.train.seed)
    env = hd.DistEnv()
    task = make_task(cfg)
    data = task.build_data(env)
    model = task.build_model(torch.device("cpu"))
    opt, sch = T.build_optimizer(model, cfg.optim)
    ctx = T.TrainContext(cfg, torch.device("cpu"), data.num_items, data.train_loader, data.eval_loader, None,
                         torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), env, task=task)
    state = T.TrainState(model, opt, sch, None, None)
    model.train()
    n_total = args.warmup + args.steps + args.phase_steps
    it = iter(data.train_loader)
    lengths: List[List[int]] = []

    def next_batch():
        b = next(it, None)
        if b is None:
            raise SystemExit(f"the train loader has fewer than {n_total} batches")
        return b

    step_s, tokens = [], []
    for i in range(args.warmup + args.steps):  # steady state: loader + train_step, un-instrumented
        t0 = time.perf_counter()
        raw = next_batch()
        T.train_step(state, ctx, raw)
        if i >= args.warmup:
            step_s.append(time.perf_counter() - t0)
            tokens.append(int(raw.item_ids.numel()))
            lengths.append((raw.offsets[1:] - raw.offsets[:-1]).tolist())
    # phase split on further batches (same model, optimizer and generators as train_step uses)
    timer = {p: 0.0 for p in PHASES}
    _timed_attention(timer)
    lc = cfg.loss
    extra = {}
    params = inspect.signature(sampled_softmax_loss).parameters  # what this tree's loss takes (baseline: less)
    if "route" in params:
        extra = {"route": lc.route, "item_lookup": lc.item_lookup, "compile": lc.compile}
    if "backend" in params:
        extra["backend"] = cfg.ops.backend
    for _ in range(args.phase_steps):
        t0 = time.perf_counter()
        prepared = prepare_batch(next_batch(), ctx)
        batch = prepared.batch
        t1 = time.perf_counter()
        emb = model.embed_items(batch.item_ids)
        t2 = time.perf_counter()
        att0 = timer["attention"]
        seq = model.encode_embeddings(emb, batch)
        t3 = time.perf_counter()
        timer["rest_of_layers"] += (t3 - t2) - (timer["attention"] - att0)
        if prepared.negatives is not None:  # drawn by prepare_batch (this tree: the one place they are drawn)
            labels, valid, drawn = prepared.labels, prepared.valid, {"negatives": prepared.negatives}
        else:  # a baseline tree whose plain prepare_batch leaves the batch as is: the loss draws them
            (labels, valid), drawn = next_item_labels(batch.item_ids, batch.offsets), {"generator": ctx.neg_generator}
        loss = sampled_softmax_loss(seq, labels, valid, model.item_vectors, ctx.num_items, lc.num_negatives,
                                    lc.temperature, **drawn, **extra)
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t5 = time.perf_counter()
        opt.step()
        sch.step()
        t6 = time.perf_counter()
        for p, dt in zip(("batch_prep", "embedding_lookup", "loss", "backward", "optimizer"),
                         (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5)):
            timer[p] += dt
    phases_ms = {p: 1000.0 * v / max(args.phase_steps, 1) for p, v in timer.items()}
    flops = [needed_flops(cfg.model, ls, lc.num_negatives) for ls in lengths]
    secs = sum(step_s)
    return {"tokens_per_s": sum(tokens) / secs, "ms_per_step_median": 1000.0 * statistics.median(step_s),
            "tokens_per_batch": sum(tokens) / len(tokens), "steps": len(step_s), "phases_ms": phases_ms,
            "phase_total_ms": sum(phases_ms.values()),
            "needed_gflop_per_step": {k: sum(f[k] for f in flops) / len(flops) / 1e9 for k in flops[0]},
            "needed_gflops_per_s": sum(f["total"] for f in flops) / secs / 1e9,
            "loadavg": list(os.getloadavg()), "torch": torch.__version__}


def run_worker(tree: str, cfg_path: str, args, extra: List[str] = ()) -> Dict[str, Any]:
    """This file's worker in a fresh process with PYTHONPATH=tree; returns its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", cfg_path, "--threads",
           str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps), "--phase-steps",
           str(args.phase_steps), "--data-dir", args.data_dir] + (["--smoke"] if args.smoke else [])
    for o in list(args.override) + list(extra):
        cmd += ["--override", o]
    env = dict(os.environ, PYTHONPATH=tree)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        return {"status": f"failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["status"], out["wall_s"] = "ok", round(time.time() - t0, 1)
    return out


# --------------------------------------------------------------------------------------- baseline commit

def make_baseline_tree(commit: str, workdir: str) -> str:
    """``git worktree add --detach`` of commit + its hstu/<folder> symlinks (as the project's own checkout)."""
    path = os.path.join(workdir, f"baseline-{commit}")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", path, commit], check=True,
                   capture_output=True)
    os.makedirs(os.path.join(path, "hstu"), exist_ok=True)
    for folder in ("launch", "modules", "ops", "serving", "trainer"):
        link = os.path.join(path, "hstu", folder)
        if os.path.isdir(os.path.join(path, folder)) and not os.path.exists(link):
            os.symlink(os.path.join("..", folder), link)
    if not os.path.exists(os.path.join(path, "hstu", "__init__.py")):
        shutil.copy(os.path.join(ROOT, "hstu", "__init__.py"), os.path.join(path, "hstu", "__init__.py"))
    return path


def remove_baseline_tree(path: str) -> None:
    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path], capture_output=True)


# ------------------------------------------------------------------------------------- the paper's code

PEER_EDITS = [  # (file, old, new): the six CPU edits of ../shared/peers/README.md, nothing in model/loss/eval
    ("main.py", "world_size = torch.cuda.device_count()", "world_size = 1"),
    ("main.py", "    if gin_config_file is not None:\n",
     "    logging.getLogger().setLevel(logging.INFO)\n    if gin_config_file is not None:\n"),
    ("generative_recommenders/research/trainer/train.py", 'dist.init_process_group("nccl"',
     'dist.init_process_group("gloo"'),
    ("generative_recommenders/research/trainer/train.py", "    device = rank\n",
     '    device = torch.device("cpu")\n'),
    ("generative_recommenders/research/trainer/train.py", "DDP(model, device_ids=[rank], ",
     "DDP(model, "),
    ("generative_recommenders/research/trainer/train.py", "torch.autograd.set_detect_anomaly(True)",
     "torch.autograd.set_detect_anomaly(False)"),
]
PEER_GIN = {"hstu": "hstu-sampled-softmax-n128-final.gin", "hstu-large": "hstu-sampled-softmax-n128-large-final.gin",
            "sasrec": "sasrec-sampled-softmax-n128-final.gin"}


def setup_peer(workdir: str, data_dir: str) -> str:
    """Temporary copy of the paper's code with the six CPU edits and its ML-1M data preprocessed."""
    dst = os.path.join(workdir, "generative-recommenders")
    shutil.copytree(PEER_DIR, dst)
    for rel, old, new in PEER_EDITS:
        p = os.path.join(dst, rel)
        with open(p) as f:
            text = f.read()
        if text.count(old) != 1:
            raise RuntimeError(f"peer edit: {old!r} found {text.count(old)} times in {rel}")
        with open(p, "w") as f:
            f.write(text.replace(old, new))
    os.makedirs(os.path.join(dst, "tmp"), exist_ok=True)
    with zipfile.ZipFile(os.path.join(dst, "tmp", "movielens1m.zip"), "w") as z:
        for name in ("ratings.dat", "movies.dat", "users.dat", "README"):
            src = os.path.join(data_dir, name)
            if os.path.exists(src):
                z.write(src, f"ml-1m/{name}")
    code = ("from generative_recommenders.research.data.preprocessor import get_common_preprocessors as g; "
            "g()['ml-1m'].preprocess_rating()")
    subprocess.run([sys.executable, "-c", code], cwd=dst, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=dst))
    return dst


def run_peer(peer: str, name: str, threads: int, seconds: float) -> Dict[str, Any]:
    """Train the peer for ``seconds``; s/batch = median gap of its per-batch TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gin = os.path.join(peer, f"bench-{name}.gin")
    with open(gin, "w") as f:
        f.write(f'include "configs/ml-1m/{PEER_GIN[name]}"\n'
                "create_data_loader.num_workers = 0\ncreate_data_loader.prefetch_factor = None\n")
    shutil.rmtree(os.path.join(peer, "exps"), ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=peer, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    load0 = list(os.getloadavg())
    proc = subprocess.Popen([sys.executable, "main.py", f"--gin_config_file={gin}", "--master_port=12399"],
                            cwd=peer, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    events = glob.glob(os.path.join(peer, "exps", "**", "events.out.tfevents.*"), recursive=True)
    if not events:
        return {"status": "no TensorBoard events (did not reach a training batch)", "loadavg": load0}
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    walls = [e.wall_time for e in acc.Scalars("losses/ar_loss")]
    gaps = [b - a for a, b in zip(walls[1:], walls[2:])]  # skip batch 0 (its sampled eval) and start-up
    if len(gaps) < 3:
        return {"status": f"only {len(walls)} batches in {seconds} s", "loadavg": load0}
    return {"status": "ok", "s_per_batch_median": statistics.median(gaps), "batches": len(walls),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "loadavg_start": load0}


def _versions(names) -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


# -------------------------------------------------------------------------------------------------- main

def _median_of(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    vals = [r[key] for r in runs if r.get("status") == "ok"]
    return statistics.median(vals) if vals else None


def _median_phases(runs: List[Dict[str, Any]]) -> Dict[str, float]:
    ok = [r for r in runs if r.get("status") == "ok"]
    return {p: statistics.median(r["phases_ms"][p] for r in ok) for p in PHASES} if ok else {}


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="HSTU research only, fewer steps, paper code 90 s")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic run of this tree only (tests)")
    ap.add_argument("--configs", nargs="*", default=None, help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--phase-steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="A/B alternations per config (default 2; quick 2)")
    ap.add_argument("--baseline", default=BASELINE_COMMIT, help="baseline commit ('' to skip)")
    ap.add_argument("--peer-seconds", type=float, default=None, help="paper-code run time (0 skips it)")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "ml-1m"))
    ap.add_argument("--override", action="append", default=[], help="config override for every worker")
    ap.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    ap.add_argument("--name", default="train_throughput.json", help="output file name")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    quick, smoke = args.quick, args.smoke
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.steps = args.steps if args.steps is not None else (2 if smoke else 8 if quick else 12)
    args.phase_steps = args.phase_steps if args.phase_steps is not None else (1 if smoke else 3 if quick else 4)
    repeats = args.repeats if args.repeats is not None else (1 if smoke else 2)
    peer_s = args.peer_seconds if args.peer_seconds is not None else (0 if smoke else 90 if quick else 150)
    names = args.configs or (["hstu"] if quick or smoke else list(CONFIGS))
    if smoke:
        args.override = SMOKE_OVERRIDES + list(args.override)
        args.baseline = ""
    payload: Dict[str, Any] = {**provenance(), "threads": args.threads,
                               "allocator": {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF")
                                             if os.environ.get(k)} or "glibc malloc (default)",
                               "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                               "baseline_commit": args.baseline or None, "steps": args.steps,
                               "warmup": args.warmup, "phase_steps": args.phase_steps, "repeats": repeats,
                               "loadavg_start": list(os.getloadavg())}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still removes its worktree
    peak = [matmul_gflops(args.threads)]
    workdir = tempfile.mkdtemp(prefix="hstu-throughput-")
    base_tree = make_baseline_tree(args.baseline, workdir) if args.baseline else None
    rows = []
    try:
        for name in names:
            cfg_path = CONFIGS[name]
            new_runs, base_runs = [], []
            ablations = ABLATIONS if name == "hstu" and not smoke else {}
            abl_runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in ablations}
            for _ in range(repeats):  # interleaved A/B (/C ...)
                new_runs.append(run_worker(ROOT, cfg_path, args))
                if base_tree:
                    base_runs.append(run_worker(base_tree, cfg_path, args))
                for label, extra in ablations.items():
                    abl_runs[label].append(run_worker(ROOT, cfg_path, args, extra))
            row = {"config": name, "tokens_per_s": _median_of(new_runs, "tokens_per_s"),
                   "ms_per_step": _median_of(new_runs, "ms_per_step_median"),
                   "needed_gflops_per_s": _median_of(new_runs, "needed_gflops_per_s"),
                   "phases_ms": _median_phases(new_runs), "runs": new_runs}
            if base_tree:
                row["baseline"] = {"tokens_per_s": _median_of(base_runs, "tokens_per_s"),
                                   "ms_per_step": _median_of(base_runs, "ms_per_step_median"),
                                   "needed_gflops_per_s": _median_of(base_runs, "needed_gflops_per_s"),
                                   "phases_ms": _median_phases(base_runs), "runs": base_runs}
                if row["tokens_per_s"] and row["baseline"]["tokens_per_s"]:
                    row["speedup_vs_baseline"] = row["tokens_per_s"] / row["baseline"]["tokens_per_s"]
            if abl_runs:
                row["ablations"] = [{"variant": label, "tokens_per_s": _median_of(runs, "tokens_per_s"),
                                     "ms_per_step": _median_of(runs, "ms_per_step_median"),
                                     "phases_ms": _median_phases(runs), "runs": runs}
                                    for label, runs in abl_runs.items()]
            rows.append(row)
            print(f"{name}: {row.get('tokens_per_s')} tokens/s (baseline "
                  f"{row.get('baseline', {}).get('tokens_per_s')}) load {os.getloadavg()}", flush=True)
        if peer_s > 0 and "hstu" in names:
            try:
                peer = setup_peer(workdir, args.data_dir)
                res = run_peer(peer, "hstu", args.threads, peer_s)
            except (OSError, subprocess.CalledProcessError, RuntimeError, ImportError) as e:
                res = {"status": f"failed: {type(e).__name__}: {str(e)[:300]}"}
            res["versions"] = _versions(["gin-config", "absl-py", "pandas", "torch", "fbgemm-gpu-cpu"])
            hstu_row = next(r for r in rows if r["config"] == "hstu")
            if res.get("status") == "ok" and hstu_row.get("tokens_per_s"):
                tpb = statistics.median(r["tokens_per_batch"] for r in hstu_row["runs"] if r.get("status") == "ok")
                res["tokens_per_s"] = tpb / res["s_per_batch_median"]
                hstu_row["speedup_vs_paper_code"] = hstu_row["tokens_per_s"] / res["tokens_per_s"]
            payload["paper_code"] = res
    finally:
        if base_tree:
            remove_baseline_tree(base_tree)
        shutil.rmtree(workdir, ignore_errors=True)
    peak.append(matmul_gflops(args.threads))
    payload["matmul_peak_gflops"] = max(peak)
    payload["matmul_peak_runs"] = peak
    for r in rows:
        if r.get("needed_gflops_per_s"):
            r["fraction_of_peak"] = r["needed_gflops_per_s"] / payload["matmul_peak_gflops"]
        b = r.get("baseline")
        if b and b.get("needed_gflops_per_s"):
            b["fraction_of_peak"] = b["needed_gflops_per_s"] / payload["matmul_peak_gflops"]
    payload["rows"] = rows
    payload["loadavg_end"] = list(os.getloadavg())
    out_dir = args.out
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, args.name), "w") as f:
            json.dump(payload, f, indent=2)
    else:
        write_json(args.name, payload)
    return payload


if __name__ == "__main__":
    main()
