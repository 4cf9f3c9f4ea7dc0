"""norm_gating forward + backward on CPU: the PyTorch reference vs the fused C++ kernel (``ops.backend=cpu``).

Shapes of the ML-1M layers (defaults): research, ~14,300 rows (one batch's tokens) x D = 50, dropout 0.2, no LN
affine; production, the same rows with concat (output 3D) and the LN affine. Implementations timed, each a
forward + backward of the op's output against a fixed upstream gradient (the inputs' gradients accumulate):

- ``reference_dropout_in_op``: ``pytorch_norm_gating`` with its dropout (Philox written in torch ops): what
  ``norm_gating(..., backend="pytorch"|"cpu", dropout_p=p)`` ran before the kernel;
- ``reference_then_cpu_dropout``: the reference without dropout, then the C++ seeded dropout
  (ops/cpu/dropout.py): what an ``ops.backend=cpu`` HSTU layer (modules/hstu.py ``gate_and_dropout``) ran before
  the kernel — the same dropped elements;
- ``kernel_then_cpu_dropout``: the kernel without dropout, then the C++ seeded dropout (that layer's path now);
- ``kernel_fused``: the kernel with its fused dropout (mask regenerated in backward, nothing stored).

CPU time (``time.process_time``: the machine may be shared, wall time is not reliable), ``--threads`` threads
(default 1), median of ``--repeats`` after ``--warmup`` untimed calls. Writes benchmarks/results/norm_gating.json.

    python benchmarks/norm_gating.py [--rows 14300] [--dim 50] [--dropout 0.2] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, ensure_hstu_importable, provenance, software_versions, write_json  # noqa: E402

ensure_hstu_importable()
import torch  # noqa: E402

from hstu.ops.cpu.dropout import cpu_seeded_dropout  # noqa: E402
from hstu.ops.cpu.norm_gating import cpu_norm_gating  # noqa: E402
from hstu.ops.pytorch.norm_gating import pytorch_norm_gating  # noqa: E402

IMPLS = ("reference_dropout_in_op", "reference_then_cpu_dropout", "kernel_then_cpu_dropout", "kernel_fused")
SEED = 1234


def make_impl(name: str, p: float, concat: bool) -> Callable:
    """fn(a, u, w, b) -> y for one implementation (all draw the same dropout mask, seed SEED)."""
    kw = dict(eps=1e-6, concat=concat)
    if name == "reference_dropout_in_op":
        return lambda a, u, w, b: pytorch_norm_gating(a, u, w, b, dropout_p=p, seed=SEED, **kw)
    if name == "reference_then_cpu_dropout":
        return lambda a, u, w, b: cpu_seeded_dropout(pytorch_norm_gating(a, u, w, b, **kw), p, seed=SEED)
    if name == "kernel_then_cpu_dropout":
        return lambda a, u, w, b: cpu_seeded_dropout(cpu_norm_gating(a, u, w, b, **kw), p, seed=SEED)
    if name == "kernel_fused":
        return lambda a, u, w, b: cpu_norm_gating(a, u, w, b, dropout_p=p, seed=SEED, **kw)
    raise ValueError(f"unknown implementation {name!r}; expected one of {IMPLS}")


def cpu_ms(fn: Callable[[], object], repeats: int, warmup: int) -> Dict[str, float]:
    """Median / min CPU milliseconds (process_time) of fn over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def bench_case(label: str, rows: int, dim: int, p: float, concat: bool, affine: bool, args) -> List[dict]:
    """One row per implementation: CPU ms of forward + backward (median, min) and forward only, the ratio to the
    fused kernel, and agreement with the reference (same dropped elements, max |diff|)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, dim, generator=g).requires_grad_()
    u = torch.randn(rows, dim, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(dim, generator=g)).requires_grad_() if affine else None
    b = (0.1 * torch.randn(dim, generator=g)).requires_grad_() if affine else None
    dy = torch.randn(rows, 3 * dim if concat else dim, generator=g)
    out: Dict[str, Dict[str, float]] = {}
    outputs = {}
    for name in IMPLS:
        op = make_impl(name, p, concat)

        def fwd_bwd() -> None:
            op(a, u, w, b).backward(dy)

        out[name] = cpu_ms(fwd_bwd, args.repeats, args.warmup)
        out[name]["forward"] = cpu_ms(lambda: op(a, u, w, b), args.repeats, args.warmup)["median_ms"]
        y = op(a, u, w, b)
        outputs[name] = y.detach()
    ref = outputs["reference_dropout_in_op"]
    fused = out["kernel_fused"]["median_ms"]
    rows_out = [{"case": label, "rows": rows, "dim": dim, "dropout": p, "concat": concat, "ln_affine": affine,
                 "impl": n, "fwd_bwd_median_ms": out[n]["median_ms"], "fwd_bwd_min_ms": out[n]["min_ms"],
                 "forward_median_ms": out[n]["forward"], "time_vs_fused": out[n]["median_ms"] / fused,
                 "same_dropped_elements": bool(torch.equal(outputs[n] == 0, ref == 0)),
                 "max_abs_diff_vs_reference": float((outputs[n] - ref).abs().max())} for n in IMPLS]
    print(f"{label}: " + ", ".join(f"{r['impl']} {r['fwd_bwd_median_ms']:.1f} ms ({r['time_vs_fused']:.2f}x fused)"
                                   for r in rows_out), flush=True)
    return rows_out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=14300, help="rows (tokens of one ML-1M batch)")
    ap.add_argument("--dim", type=int, default=50, help="D (= num_heads x linear_dim)")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (shared machine: default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny run for a smoke test (300 rows, 1 repeat)")
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for norm_gating.json")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rows, args.repeats, args.warmup = 300, 1, 1
    torch.set_num_threads(args.threads)
    rows = bench_case("research", args.rows, args.dim, args.dropout, False, False, args) \
        + bench_case("production_concat", args.rows, args.dim, args.dropout, True, True, args)
    payload = {**provenance(), "software": software_versions(), "threads": args.threads, "clock": "process_time",
               "repeats": args.repeats, "warmup": args.warmup, "rows": rows}
    path = write_json("norm_gating.json", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
