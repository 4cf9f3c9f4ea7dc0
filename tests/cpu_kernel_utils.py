"""Shared by the ops.backend=cpu tests: run the same snippet on the AVX2 and the portable (HSTU_CPU_SCALAR=1)
code paths of one build, in fresh processes (the path is chosen once per process)."""

import os
import subprocess
import sys

import torch


def vector_and_scalar_results(body: str, tmp_path):
    """Run ``body`` (Python; it must ``torch.save(<list of tensors>, OUT)``) with the tests folder importable, once
    per code path; returns (vector results, scalar results)."""
    out = {}
    for name, scalar in (("vec", "0"), ("scalar", "1")):
        path = str(tmp_path / f"{name}.pt")
        script = f"import sys, torch\nsys.path.insert(0, {os.path.dirname(__file__)!r})\nOUT = {path!r}\n" + body
        subprocess.run([sys.executable, "-c", script], check=True, timeout=600,
                       env=dict(os.environ, HSTU_CPU_SCALAR=scalar))
        out[name] = torch.load(path)
    return out["vec"], out["scalar"]
