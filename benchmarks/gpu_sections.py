"""The sections of benchmarks/gpu_check.py (sizes, tolerances and what each one proves: see its docstring).

Each ``section_<name>(ctx)`` returns a JSON-able dict; a list under ``"failed_checks"`` (a check that ran and
missed its stated tolerance) makes the section's status "error". ``ctx``: device, smoke (tiny CPU sizes under
the Triton interpreter), work (a scratch folder: run directories, caches, raw files), ml1m_dir. Everything runs
on ``ctx.device``.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Sequence

import torch
from attention import median_ms

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# max |triton - reference| / max |reference| allowed, by the dtype the kernel ran in (the reference is fp32 on the
# same inputs). fp32: the kernels use ieee fp32 dots (KernelConfig.fp32_precision); bf16: 8 mantissa bits.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)


# ------------------------------------------------------------------------------------------------ kernels

ATTENTION_CASES = {  # name -> options of one jagged call (every mask and bias option of ops/README.md)
    "causal": {},
    "causal_rab_position": {"pos": True},
    "causal_rab_time": {"time": True},
    "causal_rab_position_time_query_times": {"pos": True, "time": True, "qts": True},
    "causal_targets": {"targets": True},
    "causal_contextual": {"ctx": 5},
    "causal_all": {"pos": True, "time": True, "qts": True, "targets": True, "ctx": 5},
    "noncausal": {"causal": False},
    "noncausal_all": {"causal": False, "pos": True, "time": True, "targets": True, "ctx": 3},
}


def attention_case(opts: dict, lengths: Sequence[int], heads: int, dqk: int, dv: int, device, dtype, seed: int = 0):
    """(q, k, v leaves in dtype, AttentionArgs with fp32 rab tables as leaves) for one case."""
    from hstu.ops.attention_args import AttentionArgs

    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + list(lengths)).cumsum(0)
    T, B, N = int(offsets[-1]), len(lengths), max(max(lengths), 1)
    q, k, v = ((torch.randn(T, heads, d, generator=g) * s).to(device, dtype).requires_grad_()
               for d, s in ((dqk, 0.5), (dqk, 0.5), (dv, 1.0)))
    kw = {}
    if opts.get("pos"):
        kw["pos_weights"] = (0.3 * torch.randn(2 * N - 1, generator=g)).to(device).requires_grad_()
    if opts.get("time"):
        gaps = torch.randint(0, 10 ** 6, (T,), generator=g) * (torch.rand(T, generator=g) < 0.8)
        kw["time_weights"] = (0.3 * torch.randn(41, generator=g)).to(device).requires_grad_()
        kw["timestamps"] = (1_600_000_000 + gaps.cumsum(0)).to(device)
        if opts.get("qts"):
            kw["query_timestamps"] = (1_700_000_000 + torch.randint(0, 10 ** 7, (B,), generator=g)).to(device)
    if opts.get("targets"):
        kw["num_targets"] = torch.randint(0, 6, (B,), generator=g).to(device)
    args = AttentionArgs(offsets.to(device), N, alpha=0.7, norm=float(N), causal=opts.get("causal", True),
                         contextual_len=opts.get("ctx", 0), **kw)
    return q, k, v, args


def check_attention(opts: dict, dtype, ctx) -> dict:
    """Triton forward + backward vs the PyTorch reference (fp32 on the same inputs): max relative errors."""
    import dataclasses

    from hstu.ops.hstu_attention import jagged_hstu_attention

    lengths = [0, 1, 2, 17, 33, 40, 0, 5] if ctx.smoke else [0, 1, 2, 17, 64, 65, 130, 257, 0, 1000, 3]
    dqk, dv = (8, 12) if ctx.smoke else (32, 48)
    q, k, v, args = attention_case(opts, lengths, 2, dqk, dv, ctx.device, dtype)
    tables = [n for n in ("pos_weights", "time_weights") if getattr(args, n) is not None]
    leaves = [q, k, v] + [getattr(args, n) for n in tables]
    out = jagged_hstu_attention(q, k, v, args, backend="triton")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    ref_args = dataclasses.replace(args, **dict(zip(tables, ref_leaves[3:])))
    ref = jagged_hstu_attention(*ref_leaves[:3], ref_args, backend="pytorch")
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    names = ["out", "dq", "dk", "dv"] + ["d" + n for n in tables]
    errs = [_rel_err(out, ref)] + [_rel_err(a, b) for a, b in zip(grads, ref_grads)]
    return {n: round(e, 7) for n, e in zip(names, errs)}


def check_norm_gating(concat: bool, dropout_p: float, dtype, ctx) -> dict:
    """Fused norm-gating (Triton) vs the PyTorch op in fp32 on the same inputs and dropout seed."""
    from hstu.ops.norm_gating import norm_gating

    g = torch.Generator().manual_seed(3)
    N, D = (37, 24) if ctx.smoke else (4099, 256)
    a, u = ((torch.randn(N, D, generator=g)).to(ctx.device, dtype).requires_grad_() for _ in range(2))
    affine = [(1 + 0.1 * torch.randn(D, generator=g)).to(ctx.device).requires_grad_(),
              (0.1 * torch.randn(D, generator=g)).to(ctx.device).requires_grad_()] if concat else []
    leaves = [a, u] + affine
    kw = dict(dropout_p=dropout_p, seed=1234, concat=concat, training=True)
    y = norm_gating(a, u, *affine, backend="triton", **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(ctx.device)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    ref = norm_gating(*ref_leaves, backend="pytorch", **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
    names = ["out", "da", "du", "dweight", "dbias"][:len(leaves) + 1]
    errs = [_rel_err(y, ref)] + [_rel_err(x, r) for x, r in zip(grads, ref_grads)]
    return {n: round(e, 7) for n, e in zip(names, errs)}


NORM_GATING_CASES = {f"{'production_concat_affine' if c else 'research'}_dropout{p}": (c, p)
                     for c in (False, True) for p in (0.0, 0.1)}


def kernel_checks(ctx) -> List[tuple]:
    """(op, case, dtype name) of every kernel check (the interpreter has no bf16 dots: attention uses fp16 there)."""
    low = "bfloat16" if ctx.device.type == "cuda" else "float16"
    return ([("hstu_attention", c, d) for d in ("float32", low) for c in ATTENTION_CASES]
            + [("norm_gating", c, d) for d in ("float32", "bfloat16") for c in NORM_GATING_CASES])


def run_kernel_check(spec: tuple, smoke: bool) -> dict:
    """One check (in a worker process): {"errors": {output/gradient: max rel err}} or {"error": "..."}."""
    op, case, dname = spec
    ctx = SimpleNamespace(device=torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu"),
                          smoke=smoke)
    try:
        if op == "hstu_attention":
            return {"errors": check_attention(ATTENTION_CASES[case], getattr(torch, dname), ctx)}
        return {"errors": check_norm_gating(*NORM_GATING_CASES[case], getattr(torch, dname), ctx)}
    except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or run for one option only
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def _kernel_worker_init() -> None:
    from common import ensure_hstu_importable

    ensure_hstu_importable()
    torch.set_num_threads(1)


def _run_kernel_checks(specs: List[tuple], ctx) -> Dict[tuple, dict]:
    """Every check, in ``ctx.kernel_workers`` spawned processes (Triton compiles one specialisation per option
    and dtype: tens of compilations, in parallel on the machine's cores) or in this process (0); checks not
    finished by ``ctx.deadline`` are reported as such (the section still writes its result)."""
    deadline = getattr(ctx, "deadline", math.inf)
    workers = getattr(ctx, "kernel_workers", 0)
    if workers <= 0:
        return {spec: run_kernel_check(spec, ctx.smoke) if time.time() < deadline else {} for spec in specs}
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_kernel_worker_init)
    results: Dict[tuple, dict] = {}
    try:
        pending = {spec: pool.apply_async(run_kernel_check, (spec, ctx.smoke)) for spec in specs}
        while pending and time.time() < deadline:
            for spec in [k for k, r in pending.items() if r.ready()]:
                results[spec] = pending.pop(spec).get()
            time.sleep(0.05)
    finally:
        pool.terminate()
    return results


def section_kernels(ctx) -> dict:
    """Both Triton kernels, forward and backward, vs their PyTorch references, every option, two dtypes."""
    specs = kernel_checks(ctx)
    results = _run_kernel_checks(specs, ctx)
    rows, failed = [], []
    for op, case, dname in specs:
        tol = TOLERANCE[dname]
        res = results.get((op, case, dname)) or {"error": "not finished before the section's deadline"}
        if "error" in res:
            rows.append({"op": op, "case": case, "dtype": dname, "tolerance": tol, "max_rel_err": None, "ok": False,
                         "errors": {}, "error": res["error"]})
            failed.append(f"{op} {case} {dname}: {res['error']}")
            continue
        worst = max(res["errors"].values())
        rows.append({"op": op, "case": case, "dtype": dname, "tolerance": tol, "max_rel_err": worst,
                     "ok": worst <= tol, "errors": res["errors"]})
        if worst > tol:
            failed.append(f"{op} {case} {dname}: max rel err {worst:.3g} > {tol}")
    return {"tolerance": {"rule": "max |triton - reference| / max |reference| per output and gradient; the "
                                  "reference is the PyTorch op in fp32 on the same (rounded) inputs", **TOLERANCE},
            "rows": rows, "failed_checks": failed,
            "summary": {"checks": len(rows), "passed": len(rows) - len(failed)}}


# ------------------------------------------------------------------------------------------------ train

TRAIN_REFERENCE = ("pytorch", "float32")


def train_variants(ctx) -> List[tuple]:
    if ctx.device.type == "cuda":
        return [TRAIN_REFERENCE, ("triton", "float32"), ("pytorch", "bfloat16"), ("triton", "bfloat16")]
    return [TRAIN_REFERENCE, ("triton", "float32"), ("pytorch", "bfloat16")]  # interpreter: no bf16 dots


def train_overrides(ctx, steps: int) -> tuple:
    """(config path, overrides) of the training section: dropout 0 so every backend sees the same model."""
    over = ["model.dropout=0.0", f"train.device={ctx.device.type}", f"train.max_steps={steps}", "train.epochs=1000",
            "train.eval_every_epochs=1000", "train.log_every_steps=1", "train.progress=false",
            "train.tensorboard=false", "train.resume=false", "eval.popularity_baseline=false"]
    if ctx.ml1m_dir:
        return os.path.join(ROOT, "configs/ml-1m/hstu.yaml"), over + [
            f"data.data_dir={ctx.ml1m_dir}", f"data.cache_dir={os.path.join(ctx.work, 'cache')}"]
    if ctx.smoke:
        from train_throughput import SMOKE_OVERRIDES

        return os.path.join(ROOT, "configs/synthetic/hstu-small.yaml"), over + SMOKE_OVERRIDES + [
            "train.num_threads=1", f"data.cache_dir={os.path.join(ctx.work, 'cache')}"]
    return os.path.join(ROOT, "configs/synthetic/hstu-small.yaml"), over + [
        f"data.cache_dir={os.path.join(ctx.work, 'cache')}"]


def read_train_log(run_dir: str) -> dict:
    import json

    losses, tps = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == "train":
                losses.append(rec["loss"])
                tps.append(rec.get("tokens_per_second"))
    return {"losses": losses, "tokens_per_second": tps}


def section_train(ctx) -> dict:
    """The retrieval trainer (train()) for a few hundred steps per (ops.backend, train.dtype): loss
    trajectories against the PyTorch fp32 run, steady-state tokens/s, the final test metrics."""
    from hstu.trainer.config import load_config
    from hstu.trainer.train import train

    steps = 3 if ctx.smoke else 300
    config, over = train_overrides(ctx, steps)
    runs: Dict[str, dict] = {}
    last_wall = 0.0
    for backend, dtype in train_variants(ctx):
        name = f"{backend}_{dtype}"
        if time.time() + last_wall > getattr(ctx, "deadline", math.inf):
            runs[name] = {"backend": backend, "dtype": dtype, "error": "not run: the section's deadline is closer "
                                                                        f"than the last variant's {last_wall:.0f} s"}
            continue
        cfg = load_config(config, over + [f"ops.backend={backend}", f"train.dtype={dtype}",
                                          f"run_dir={os.path.join(ctx.work, 'train_runs', name)}"])
        t0 = time.perf_counter()
        try:
            result = train(cfg)
        except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others' trajectories
            runs[name] = {"backend": backend, "dtype": dtype, "error": f"{type(e).__name__}: {e}"[:1000]}
            continue
        finally:
            last_wall = time.perf_counter() - t0
        log = read_train_log(cfg.run_dir)
        steady = [x for x in log["tokens_per_second"][len(log["tokens_per_second"]) // 5:] if x]
        runs[name] = {"backend": backend, "dtype": dtype, "steps": len(log["losses"]),
                      "wall_s": round(time.perf_counter() - t0, 1),
                      "tokens_per_s_median": round(statistics.median(steady)) if steady else None,
                      "final_test": {k: round(v, 4) for k, v in result.final_metrics.items()
                                     if k in ("hr@10", "ndcg@10")},
                      "losses": [round(x, 5) for x in log["losses"]]}
    failed = [f"{k}: {r['error']}" for k, r in runs.items() if "error" in r]
    ref = runs["_".join(TRAIN_REFERENCE)].get("losses", [])
    rows = [{"run": k, "error": r["error"]} for k, r in runs.items() if "error" in r]
    window = max(1, len(ref) // 10)
    for name, r in runs.items():
        if "error" in r or not ref:
            continue
        ls = r["losses"]
        finite = bool(ls) and all(math.isfinite(x) for x in ls)
        n = min(len(ls), len(ref))
        first = max((abs(a - b) / abs(b) for a, b in zip(ls[:10], ref[:10])), default=0.0)
        last = abs(statistics.mean(ls[n - window:n]) - statistics.mean(ref[n - window:n])) / abs(
            statistics.mean(ref[n - window:n])) if n else float("nan")
        # fp32: same model, same data and masks -> the trajectories agree closely; bf16: within a few percent
        tol = (1e-4, 1e-2) if r["dtype"] == "float32" else (3e-2, 5e-2)
        ok = finite and n == len(ref) and first <= tol[0] and last <= tol[1]
        rows.append({"run": name, "steps": r["steps"], "finite": finite, "first10_max_rel_diff": round(first, 6),
                     "last10pct_mean_rel_diff": round(last, 6), "tolerance": list(tol), "ok": ok,
                     "tokens_per_s_median": r["tokens_per_s_median"], "wall_s": r["wall_s"], **r["final_test"]})
        if not ok:
            failed.append(f"{name}: finite={finite}, steps {r['steps']}/{len(ref)}, first-10 rel diff {first:.3g}, "
                          f"last-10% mean rel diff {last:.3g} (tolerance {tol})")
    return {"config": os.path.relpath(config, ROOT), "overrides": over, "reference": "_".join(TRAIN_REFERENCE),
            "rows": rows, "trajectories": {k: v["losses"] for k, v in runs.items() if "losses" in v},
            "failed_checks": failed}


# ------------------------------------------------------------------------------------------------ attention speed

def matmul_peak_tflops(device: torch.device, smoke: bool) -> dict:
    """Measured dense matmul peak (bf16 on CUDA, fp32 on CPU): the roofline the attention rows are set against."""
    n, dtype = (256, torch.float32) if smoke else (8192, torch.bfloat16)
    if device.type != "cuda":
        dtype = torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, repeats=3 if smoke else 20, warmup=2)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": round(ms, 4),
            "tflops": round(2 * n ** 3 / ms / 1e9, 2)}


def section_attention(ctx) -> dict:
    """benchmarks/attention.py (Triton vs SDPA flash vs the references, 256..8192) + useful TFLOP/s vs the
    measured matmul peak. FLOPs = the causal work the batch needs: forward 2·H·(dqk+dv)·Σ n(n+1)/2, backward
    2.5× forward (FlashAttention convention: 5 matmuls, recompute included), whatever an implementation runs."""
    import attention as bench

    seed, tokens, min_len, alpha = 0, (512 if ctx.smoke else 131072), 16, 1.0
    argv = ["--out", os.path.join(ctx.work, "raw"), "--tokens", str(tokens), "--seed", str(seed),
            "--min-len", str(min_len), "--alpha", str(alpha)]
    argv += ["--quick"] if ctx.smoke else ["--max-lens", "256,512,1024,2048,4096,8192", "--repeats", "5"]
    peak = matmul_peak_tflops(ctx.device, ctx.smoke)
    payload = bench.main(argv)
    H, d = payload["setup"]["heads"], payload["setup"]["dim"]
    rows, pairs = [], {}
    for r in payload["rows"]:
        L = r["max_len"]
        if L not in pairs:
            lengths = bench.sample_lengths(L, tokens, alpha, min_len, seed + L)
            pairs[L] = sum(n * (n + 1) / 2 for n in lengths)
        fwd_flops = 2.0 * H * (d + d) * pairs[L]
        row = {k: r.get(k) for k in ("impl", "max_len", "tokens", "fwd_ms", "fwd_bwd_ms", "speedup_vs_sdpa",
                                     "fwd_speedup_vs_sdpa", "extrapolated", "status")}
        row["fwd_tflops"] = round(fwd_flops / r["fwd_ms"] / 1e9, 3) if r["fwd_ms"] else None
        row["fwd_bwd_tflops"] = round(3.5 * fwd_flops / r["fwd_bwd_ms"] / 1e9, 3) if r["fwd_bwd_ms"] else None
        row["fwd_bwd_of_peak"] = (round(row["fwd_bwd_tflops"] / peak["tflops"], 3)
                                  if row["fwd_bwd_tflops"] else None)
        rows.append(row)
    tri = {r["max_len"]: r for r in rows if r["impl"] == "hstu_jagged_triton" and r["fwd_bwd_ms"]}
    top = tri.get(max(tri)) if tri else None
    return {"dtype": payload["dtype"], "matmul_peak": peak, "setup": payload["setup"], "rows": rows,
            "summary": {"triton_max_len": top and top["max_len"],
                        "triton_speedup_vs_sdpa": top and top["speedup_vs_sdpa"],
                        "goal_ge_5x_at_8192": (top["speedup_vs_sdpa"] >= 5) if top and top["max_len"] == 8192
                        else None,
                        "triton_best_fwd_bwd_of_peak": max((r["fwd_bwd_of_peak"] for r in tri.values()),
                                                           default=None),
                        "triton_rows": len(tri)}}


# ------------------------------------------------------------------------------------------------ activations

def section_activation_memory(ctx) -> dict:
    """Bytes saved for backward per token per layer (benchmarks/activation_memory.py's counter) with the fused
    Triton kernels on this device (bf16 autocast on CUDA) next to the PyTorch reference op; paper: 14d bytes."""
    import activation_memory as am
    from attention import sample_lengths
    from hstu.ops.pytorch.hstu_attention import length_groups

    cuda = ctx.device.type == "cuda"
    D, H, max_len, tokens = (32, 2, 32, 256) if ctx.smoke else (512, 8, 1024, 32768)
    lengths = [n + 1 if n == D // H else n for n in sample_lengths(max_len, tokens, 1.0, 16, 0)]
    T = sum(lengths)
    score_entries = H * sum(len(m) * L * L for L, m in length_groups(lengths))
    amp = torch.bfloat16 if cuda else None  # the interpreter has no bf16 dots: fp32 there
    elt = 2 if cuda else 4
    rows = []
    for dropout in (0.0, 0.1):
        for variant in ("research", "production"):
            for backend in ("triton", "pytorch"):
                c = am.measure_hstu(variant, lengths, D, H, dropout, 0, max(lengths), "reference", str(ctx.device),
                                    backend, amp)
                row = am.summarize(f"hstu_{variant}", c, T, D, dropout, score_entries, attention=backend, elt=elt)
                row["bytes_per_d"] = round(c.total_bytes / (T * D), 3)  # measured bytes / (tokens · d)
                rows.append({k: row[k] for k in ("layer", "attention", "dropout", "bytes_per_token", "bytes_per_d",
                                                 "linear_bytes_per_token", "score_bytes_per_token",
                                                 "paper_bf16_bytes_per_d", "bytes_per_token_by_dtype",
                                                 "bytes_per_token_by_category")})
                del c
    fused = [r for r in rows if r["attention"] == "triton"]
    return {"setup": {"d": D, "heads": H, "max_len": max(lengths), "tokens": T, "num_seqs": len(lengths),
                      "autocast": "bfloat16" if amp else "none (float32)"},
            "notes": ["bytes_per_d = bytes saved for backward / (tokens * d) in the dtype the layer ran in; the "
                      "paper's 14d counts bf16 bytes with fused kernels (see benchmarks/activation_memory.py)",
                      "under autocast the bf16 copies of the layer's weights are saved too: a per-batch constant "
                      "(weights / tokens bytes per token, about 1% here)"],
            "rows": rows,
            "summary": {"fused_bytes_per_d_min": min(r["bytes_per_d"] for r in fused),
                        "fused_bytes_per_d_max": max(r["bytes_per_d"] for r in fused),
                        "fused_score_bytes": sum(r["score_bytes_per_token"] for r in fused)}}


# ------------------------------------------------------------------------------------------------ M-FALCON

def _on(device: torch.device, fn: Callable) -> Callable:
    """fn with every tensor argument moved to device (the engine builds its small index tensors on the CPU)."""
    def wrapped(*args):
        return fn(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
    return wrapped


def _batch_to(batch, device) -> SimpleNamespace:
    return SimpleNamespace(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})


def section_mfalcon(ctx) -> dict:
    """M-FALCON (serving/mfalcon.py) on this device: encode a 200-event history once, score m candidates;
    against the training model's encode of the history alone (benchmarks/serving.py's ML-1M-sized model)."""
    import serving as serving_bench
    from hstu.serving.export import _batch, reference_rank_scores
    from hstu.serving.mfalcon import MFalcon

    dev = ctx.device
    num_items, n = 3952, 200
    model, _ = serving_bench._model(num_items, n)
    cpu_model = copy.deepcopy(model)
    model = model.to(dev)
    eng = MFalcon.from_model(model)
    eng.extend, eng.score = _on(dev, eng.extend), _on(dev, eng.score)
    eng.embed, eng.item_vectors = _on(dev, model.embed_items), _on(dev, model.item_vectors)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, num_items + 1, (n,), generator=g)
    ts = 1_600_000_000 + torch.randint(0, 86_400, (n,), generator=g).cumsum(0)
    qt = int(ts[-1]) + 3600
    sizes = [16, 64] if ctx.smoke else [1024, 4096]
    cands = torch.randint(1, num_items + 1, (max(sizes),), generator=g)
    reps = 3 if ctx.smoke else 20
    hist = _batch_to(_batch([(ids, ts)], [qt]), dev)
    state = eng.encode(ids, ts, qt)
    check = cands[:16 if ctx.smoke else 64]
    err = float((eng.rank(state, check).cpu() - reference_rank_scores(cpu_model, ids, ts, qt, check)).abs().max())
    with torch.inference_mode():
        hist_ms = median_ms(lambda: model.encode(hist), dev, reps)
        enc_ms = median_ms(lambda: eng.encode(ids, ts, qt), dev, reps)
        rows = []
        for m in sizes:
            rank_ms = median_ms(lambda: eng.rank(state, cands[:m]), dev, reps)
            rows.append({"m": m, "history_encode_ms": round(hist_ms, 3), "mfalcon_encode_ms": round(enc_ms, 3),
                         "mfalcon_rank_ms": round(rank_ms, 3), "mfalcon_total_ms": round(enc_ms + rank_ms, 3),
                         "total_over_history_encode": round((enc_ms + rank_ms) / hist_ms, 2),
                         "candidates_per_s": round(m / (rank_ms / 1e3))})
    tol = 1e-3
    return {"setup": {"model": "benchmarks/serving.py _model (research, D 50, 2 layers x 1 head, max_seq_len 200)",
                      "history": n, "num_items": num_items, "micro_batch": eng.micro_batch, "repeats": reps,
                      "dtype": "float32"},
            "max_abs_error_vs_cpu_alone": err, "tolerance": tol, "rows": rows,
            "failed_checks": [] if err <= tol else [f"M-FALCON scores differ from the CPU full-model reference by "
                                                    f"{err:.3g} > {tol}"]}


SECTIONS = {  # name -> (function, time cap in s on an H100, cap in --cpu-smoke); kernels: ~40 Triton compilations
    "kernels": (section_kernels, 150, 120),
    "train": (section_train, 120, 120),
    "attention": (section_attention, 120, 60),
    "activation_memory": (section_activation_memory, 35, 60),
    "mfalcon": (section_mfalcon, 30, 60),
}
