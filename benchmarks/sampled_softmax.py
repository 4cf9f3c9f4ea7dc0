"""The fused sampled-softmax op on CPU (``ops.backend=cpu``): forward and backward time, 1 and 2 threads, this
tree's item-table gradient paths and a baseline commit's kernel built side by side.

Shapes of one ML-1M batch (defaults): V = 14,000 labelled positions, K = 1 + 128 table rows each (the positive
and the negatives), D = 50, a table of U = 3,953 rows (all items), and a large table (U = 1M) where the 4 copies
of the small-table path would not fit. Implementations, each the op's forward and its backward (dq and dtable):

- ``split_copies``: this tree, small tables (ops/cpu/sampled_softmax.py ``SPLIT_BYTES``): 4 fixed query ranges
  each add into their own copy of the table gradient, summed in a fixed tree;
- ``row_blocks``: this tree with ``SPLIT_BYTES = 0``: threads own blocks of 16 table rows (the large-table path);
- ``baseline``: the kernel of ``--baseline`` (default b60ded2, before this change), compiled from
  ``git show <commit>:ops/cpu/csrc/...`` into a temporary folder: threads own single rows (u mod P).

Wall time (``perf_counter``: what a thread count buys) and CPU time (``process_time``) per call, median of
``--repeats`` after ``--warmup``; the load average is recorded next to every case. Inputs are unit vectors
(the model's L2-normalised outputs), temperature 0.05. Writes benchmarks/results/sampled_softmax.json.

    python benchmarks/sampled_softmax.py [--threads 1,2] [--repeats 9] [--baseline b60ded2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, ensure_hstu_importable, provenance, software_versions, write_json  # noqa: E402

ensure_hstu_importable()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hstu.ops.cpu.sampled_softmax as ss  # noqa: E402
from hstu.ops.cpu.build import load_kernel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SRC = "ops/cpu/csrc/sampled_softmax_cpu.cpp"


def build_baseline(commit: str, workdir: str):
    """The sampled-softmax extension of ``commit`` (its .cpp and the csrc headers it includes), or None."""
    from torch.utils import cpp_extension

    src_dir = os.path.join(workdir, "csrc")
    os.makedirs(src_dir, exist_ok=True)
    listing = subprocess.run(["git", "ls-tree", "--name-only", commit, "ops/cpu/csrc/"], cwd=ROOT,
                             capture_output=True, text=True)
    if listing.returncode != 0:
        print(f"baseline {commit}: {listing.stderr.strip()}", flush=True)
        return None
    for path in listing.stdout.split():
        if path.endswith(".h") or path == KERNEL_SRC:
            blob = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, check=True)
            with open(os.path.join(src_dir, os.path.basename(path)), "wb") as f:
                f.write(blob.stdout)
    return cpp_extension.load(name=f"hstu_ss_baseline_{commit}", sources=[os.path.join(src_dir, os.path.basename(
        KERNEL_SRC))], extra_include_paths=[src_dir], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
        build_directory=workdir, verbose=False)


def timed(fn: Callable[[], Any], repeats: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"wall_ms": statistics.median(wall), "wall_min_ms": min(wall), "cpu_ms": statistics.median(cpu)}


def make_inputs(V: int, K: int, D: int, U: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(V, D, generator=g), dim=1)
    table = F.normalize(torch.randn(U, D, generator=g), dim=1)
    idx = torch.randint(0, U, (V, K), generator=g)
    return q, table, idx


def bench_case(label: str, V: int, K: int, D: int, U: int, threads: int, baseline, args) -> List[Dict[str, Any]]:
    """One row per implementation: forward and backward wall / CPU ms, and the backward's agreement with
    ``split_copies`` (max |diff| of dq and dtable)."""
    torch.set_num_threads(threads)
    q, table, idx = make_inputs(V, K, D, U)
    temp = 0.05
    ext = load_kernel(ss.KERNEL)
    loss, logits, lse = ext.forward(q, table, idx, temp)
    grad = torch.full((V,), 1.0 / V)
    impls: Dict[str, Callable[[], Any]] = {
        "split_copies": lambda: ext.backward(grad, q, table, idx, logits, lse, temp, True, True, ss.SPLIT_BYTES),
        "row_blocks": lambda: ext.backward(grad, q, table, idx, logits, lse, temp, True, True, 0),
    }
    if baseline is not None:
        impls["baseline"] = lambda: baseline.backward(grad, q, table, idx, logits, lse, temp, True, True)
    fwd = timed(lambda: ext.forward(q, table, idx, temp), args.repeats, args.warmup)
    ref = impls["split_copies"]()
    load = list(os.getloadavg())
    rows = []
    for name, fn in impls.items():
        if name == "split_copies" and U * D * 4 * 4 > ss.SPLIT_BYTES:
            continue  # this table takes the row-block path in the tree: the same as "row_blocks"
        t = timed(fn, args.repeats, args.warmup)
        dq, dtable = fn()
        rows.append({"case": label, "V": V, "K": K, "D": D, "U": U, "threads": threads, "impl": name,
                     "backward_wall_ms": t["wall_ms"], "backward_wall_min_ms": t["wall_min_ms"],
                     "backward_cpu_ms": t["cpu_ms"], "forward_wall_ms": fwd["wall_ms"], "forward_cpu_ms": fwd["cpu_ms"],
                     "max_abs_diff_dq": float((dq - ref[0]).abs().max()),
                     "max_abs_diff_dtable": float((dtable - ref[1]).abs().max()), "loadavg": load})
    base = {r["impl"]: r["backward_wall_ms"] for r in rows}
    for r in rows:
        r["backward_vs_baseline"] = base["baseline"] / r["backward_wall_ms"] if "baseline" in base else None
    print(f"{label} threads={threads}: forward {fwd['wall_ms']:.1f} ms; backward " + ", ".join(
        f"{r['impl']} {r['backward_wall_ms']:.1f} ms" for r in rows), flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--baseline", default="b60ded2", help="commit whose kernel is built side by side ('' skips)")
    ap.add_argument("--large-rows", type=int, default=1_000_000, help="U of the large-table case (0 skips it)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (a smoke test of the script)")
    ap.add_argument("--out", default=RESULTS_DIR)
    args = ap.parse_args(argv)
    cases = [("ml-1m", 14000, 129, 50, 3953)]
    if args.large_rows > 0:
        cases.append(("large-table", 14000, 129, 50, args.large_rows))
    if args.quick:
        args.repeats, args.warmup = 1, 0
        cases = [("tiny", 300, 9, 50, 97)] + ([("tiny-large", 300, 9, 50, 400_000)] if args.large_rows > 0 else [])
    workdir = tempfile.mkdtemp(prefix="hstu-ss-bench-")
    try:
        baseline = build_baseline(args.baseline, workdir) if args.baseline else None
        rows: List[Dict[str, Any]] = []
        for threads in [int(t) for t in args.threads.split(",")]:
            for case in cases:
                rows += bench_case(*case, threads, baseline, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {**provenance(), "software": software_versions(), "baseline_commit": args.baseline or None,
               "split_bytes": ss.SPLIT_BYTES, "repeats": args.repeats, "warmup": args.warmup,
               "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, "rows": rows}
    path = write_json("sampled_softmax.json", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
