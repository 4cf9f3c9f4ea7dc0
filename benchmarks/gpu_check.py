"""GPU readiness check: one command that proves the CUDA path in minutes, and its CPU twin for `make test`.

    python benchmarks/gpu_check.py --out DIR                # on a CUDA machine: <= 8 minutes on one H100
    python benchmarks/gpu_check.py --out DIR --cpu-smoke    # tiny sizes, Triton interpreter, no CUDA (tests)
    python benchmarks/gpu_check.py --out DIR --ml1m-dir runs/data/ml-1m   # train on ML-1M instead of synthetic

Sections (benchmarks/gpu_sections.py), each in its own process with its own time cap, so one that fails, hangs or
breaks the CUDA context records its error (DIR/<section>.json: status "error", the error text, the log tail) and
the others still run. DIR receives only those 5 JSONs and summary.json (the device tool brings back at most 8
files); logs, run directories, caches and attention.py's raw JSON go to --work-dir.
Caps (H100; sum 455 s, process start-ups included; total budget --budget-s 480):
  kernels           150 s  Triton jagged HSTU attention (every mask/bias option: causal / non-causal, rab
                           position, time (+ query times), candidates/targets, contextual prefix, all at once) and
                           the fused norm-gating (research; production concat + LN affine; dropout 0 / 0.1 with a
                           shared seed), forward + backward vs the PyTorch op in fp32 on the same inputs, in fp32
                           and bf16 (attention in fp16 under --cpu-smoke: the interpreter has no bf16 dots).
                           Tolerance: max |triton − reference| / max |reference| ≤ 1e-4 (fp32), 2e-2 (bf16),
                           1e-2 (fp16), per output and gradient. Most of its time is Triton compilation (in up to 8
                           worker processes).
  train             120 s  the retrieval trainer (hstu.trainer.train.train, configs/synthetic/hstu-small.yaml or
                           ML-1M with --ml1m-dir), 300 steps, dropout 0, per (ops.backend, train.dtype) in
                           {pytorch, triton} × {float32, bfloat16}: loss trajectory vs pytorch/float32 (fp32: first
                           10 steps ≤ 1e-4 relative, mean of the last 10% ≤ 1e-2; bf16: 3e-2 / 5e-2), tokens/s
                           (median after the first 20%), final test HR@10 / NDCG@10.
  attention         120 s  benchmarks/attention.py at max_len 256…8192 (131072 tokens, bf16; Triton vs SDPA flash
                           vs the references) + useful TFLOP/s of every row against the
                           measured bf16 8192² matmul peak (the ≥ 5× at 8192 and ≥ 50 % of roofline claims).
  activation_memory  35 s  bytes saved for backward per token per layer (research / production, dropout 0 / 0.1),
                           Triton kernels under bf16 autocast vs the PyTorch reference op (the 14d claim).
  mfalcon            30 s  M-FALCON on CUDA: encode a 200-event history once, score 1024 / 4096 candidates, vs the
                           history-only encode; scores checked against the CPU full model (≤ 1e-3).
Every JSON carries date, machine, commit (``--commit`` when the copy has no .git), command and the software
versions (device, torch, triton, CUDA); DIR/summary.json lists every section's status, seconds, error and
headline figures. On a CUDA machine write to
benchmarks/results/gpu (benchmarks/summarize.py renders it into RESULTS.md). docs/install.md "GPU" has the
exact commands, including the session device tool.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import ensure_hstu_importable, provenance, software_versions, write_json  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "gpu")
DEFAULT_WORK = os.path.join(os.path.dirname(HERE), "runs", "gpu_check")  # runs/ is git-ignored
BUDGET_S = 480
LOG_TAIL = 4000
HEADLINES = {  # section -> keys of its result copied into summary.json
    "kernels": ("summary",), "train": ("rows",), "attention": ("summary", "matmul_peak"),
    "activation_memory": ("summary",), "mfalcon": ("rows", "max_abs_error_vs_cpu_alone"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (one JSON per section + summary.json)")
    ap.add_argument("--work-dir", default=DEFAULT_WORK, help="scratch folder (logs, run dirs, caches, raw files)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, Triton interpreter")
    ap.add_argument("--sections", default="", help="comma-separated subset of the sections (default: all)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"total time budget (default {BUDGET_S} s; --cpu-smoke 300 s); a section gets "
                         "min(its cap, what is left)")
    ap.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS",
                    help="override one section's time cap (repeatable), e.g. --cap train=300 with --ml1m-dir")
    ap.add_argument("--ml1m-dir", default="", help="ML-1M raw files (inside the checkout, an ignored folder such "
                                                    "as runs/data/ml-1m) for the train section; default synthetic")
    ap.add_argument("--commit", default="", help="the commit to record when this copy has no .git (the device "
                                                  "tool sends files only): `git rev-parse --short HEAD` where it "
                                                  "was sent from")
    ap.add_argument("--section", default="", help=argparse.SUPPRESS)  # internal: run one section in this process
    ap.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)  # internal: epoch seconds
    return ap


def section_names(spec: str) -> List[str]:
    from gpu_sections import SECTIONS

    names = [s for s in spec.split(",") if s] or list(SECTIONS)
    bad = [s for s in names if s not in SECTIONS]
    if bad:
        raise SystemExit(f"--sections: unknown section(s) {bad}; choose from {list(SECTIONS)}")
    return names


def section_caps(args) -> dict:
    """{section: cap in s}: the defaults of gpu_sections.SECTIONS (GPU or --cpu-smoke) with --cap overrides."""
    from gpu_sections import SECTIONS

    caps = {name: spec[2 if args.cpu_smoke else 1] for name, spec in SECTIONS.items()}
    for item in args.cap:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in caps or seconds <= 0:
            raise SystemExit(f"--cap {item!r}: expected SECTION=SECONDS with SECTION in {list(caps)} and "
                             "SECONDS > 0")
        caps[name] = seconds
    return caps


def header(args, versions: bool = True) -> dict:
    """Provenance + mode (+ software versions: recorded by the section processes, which run the code)."""
    out = dict(provenance())
    if args.commit:
        out["commit"] = args.commit + ("" if out["commit"] in ("unknown", args.commit) else f" (git: {out['commit']})")
    out.update({"benchmark": "gpu_check", "mode": "cpu-smoke" if args.cpu_smoke else "gpu"})
    if versions:
        out["versions"] = software_versions()
    return out


def run_one(args) -> int:
    """Child process: run one section, write DIR/<section>.json (status ok | error)."""
    import torch

    ensure_hstu_importable()
    from gpu_sections import SECTIONS

    name = args.section
    if args.cpu_smoke:
        torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    ctx = SimpleNamespace(device=device, smoke=args.cpu_smoke, work=os.path.abspath(args.work_dir),
                          deadline=args.deadline, kernel_workers=2 if args.cpu_smoke else min(8, os.cpu_count() or 1),
                          ml1m_dir=os.path.abspath(args.ml1m_dir) if args.ml1m_dir else "")
    import hstu.ops

    payload = {"section": name, **header(args), "device": str(device), "hstu_ops": os.path.dirname(hstu.ops.__file__)}
    t0 = time.perf_counter()
    try:
        result = SECTIONS[name][0](ctx)
        failed = result.get("failed_checks") or []
        payload.update({"status": "error" if failed else "ok",
                        "error": f"{len(failed)} check(s) failed: " + "; ".join(failed) if failed else "",
                        "seconds": round(time.perf_counter() - t0, 1), "result": result})
    except Exception as e:  # noqa: BLE001 - the section's error is its result; the other sections still run
        payload.update({"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                        "traceback": traceback.format_exc()[-LOG_TAIL:], "seconds": round(time.perf_counter() - t0, 1)})
    write_json(f"{name}.json", payload, args.out)
    print(f"{name}: {payload['status']} ({payload['seconds']} s) {payload['error'][:500]}", flush=True)
    return 0


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-LOG_TAIL:]
    except OSError:
        return ""


def run_all(args) -> dict:
    """Parent: each section in a child process under min(cap, budget left); then summary.json."""
    names = section_names(args.sections)
    caps = section_caps(args)
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.cpu_smoke else float(BUDGET_S))
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    env = dict(os.environ)
    if args.cpu_smoke:  # no CUDA, kernels in the interpreter (must be set before triton is imported)
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    sections = {}
    for name in names:
        cap = caps[name]
        left = budget - (time.perf_counter() - start)
        timeout = min(cap, left)
        path, log = os.path.join(args.out, f"{name}.json"), os.path.join(args.work_dir, f"{name}.log")
        if os.path.exists(path):
            os.remove(path)  # never report a previous run's file as this run's
        cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--out", args.out, "--work-dir",
               args.work_dir]
        cmd += (["--cpu-smoke"] if args.cpu_smoke else []) + (["--ml1m-dir", args.ml1m_dir] if args.ml1m_dir else [])
        cmd += ["--commit", args.commit] if args.commit else []
        # the section stops starting work at its deadline and still writes its result before the hard kill
        cmd += ["--deadline", str(time.time() + timeout - min(10.0, 0.2 * timeout))]
        t0 = time.perf_counter()
        why = ""
        if timeout < 5:
            why = f"not run: the total budget of {budget:.0f} s was used up by the sections before it"
        else:
            with open(log, "w") as f:
                try:
                    rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
                    why = "" if rc == 0 else f"section process exited with code {rc}"
                except subprocess.TimeoutExpired:
                    why = f"timed out after {timeout:.0f} s (cap {cap} s, budget left {left:.0f} s)"
        secs = round(time.perf_counter() - t0, 1)
        if not os.path.exists(path):  # a section that wrote its result and was killed on exit keeps it
            write_json(f"{name}.json", {"section": name, **header(args, False), "status": "error",
                                        "error": why or "section process wrote no result",
                                        "log_tail": _tail(log), "seconds": secs}, args.out)
        with open(path) as f:
            rec = json.load(f)
        sections[name] = {"status": rec["status"], "seconds": secs, "cap_s": cap, "error": rec.get("error", ""),
                          **{k: rec.get("result", {}).get(k) for k in HEADLINES.get(name, ())}}
        print(f"[{name}] {rec['status']} in {secs} s {rec.get('error', '')[:300]}", flush=True)
    summary = {**header(args, False), "versions": _child_versions(args.out, names), "budget_s": budget,
               "total_s": round(time.perf_counter() - start, 1), "ok": sum(s["status"] == "ok" for s in sections.values()), "sections": sections}
    path = write_json("summary.json", summary, args.out)
    print(f"{summary['ok']}/{len(names)} sections ok in {summary['total_s']} s; wrote {path}", flush=True)
    return summary


def _child_versions(out: str, names: Sequence[str]) -> Optional[dict]:
    """The versions a section process saw (the parent never touches CUDA or Triton)."""
    for name in names:
        try:
            with open(os.path.join(out, f"{name}.json")) as f:
                v = json.load(f).get("versions")
            if v:
                return v
        except (OSError, ValueError):
            continue
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.section:
        return run_one(args)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible; run it on a CUDA machine (docs/install.md \"GPU\") "
                         "or use --cpu-smoke for the CPU twin")
    summary = run_all(args)
    return 0 if summary["ok"] == len(summary["sections"]) else 1


if __name__ == "__main__":
    sys.exit(main())
