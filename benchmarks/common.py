"""Shared helpers for benchmark scripts: provenance (date, machine, commit, command) and atomic JSON writes."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from typing import Any, Dict, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_description() -> str:
    """e.g. 'cpu: x86_64 2 cores, 23 GiB, Linux' or 'cuda: NVIDIA H100 80GB HBM3'."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb // (1024 * 1024)} GiB"
    except (OSError, ValueError, IndexError):
        pass
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = " " + line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{model} ({platform.machine()}, {os.cpu_count()} cores{mem}, {platform.system()})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> Dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None, so results files stay strict JSON (json.dump would write bare NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(name: str, payload: Any, directory: str = "") -> str:
    """Write <directory or benchmarks/results>/<name> atomically (tmp + rename) as strict JSON; returns the path."""
    directory = directory or RESULTS_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_json_safe(payload), f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def ensure_hstu_importable() -> None:
    """Import ``hstu`` from THIS checkout, also a bare copy of it (no ``pip install -e .`` and no git-ignored
    ``hstu/<folder>`` links, e.g. the tree a GPU machine receives): ``hstu``'s package path then also holds the
    checkout root, so ``hstu.ops`` is ``<root>/ops`` as setup.py maps it."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if root not in sys.path:  # after benchmarks/ (whose serving.py must win over the root's serving/ folder)
        sys.path.insert(sys.path.index(here) + 1 if here in sys.path else 0, root)
    import hstu

    if not os.path.isdir(os.path.join(root, "hstu", "ops")) and root not in hstu.__path__:
        hstu.__path__.append(root)


def software_versions() -> Dict[str, Any]:
    """torch / triton / CUDA versions and the accelerator (name, compute capability) of this process."""
    import torch

    out: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "device": "cpu"}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024 ** 3, 1)
    out["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    return out


def refresh_results_md(out_dir: str) -> Optional[str]:
    """Regenerate benchmarks/RESULTS.md (summarize.py) when a script wrote its results to the default folder
    (RESULTS_DIR); results written elsewhere (--out, smoke runs) leave it alone. Returns its path, or None."""
    if os.path.abspath(out_dir) != os.path.abspath(RESULTS_DIR):
        return None
    from summarize import write_results_md

    path = write_results_md()
    print("wrote", path)
    return path

