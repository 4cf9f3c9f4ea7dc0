"""Run directories: default names, creation, atomic checkpoint/JSON writes.

A run directory holds: config.yaml (resolved config, written at start), metrics.jsonl, train.log,
tensorboard/, best.pt (state_dict of the best-epoch model), results.json (final summary), eval.json (`hstu eval`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import torch

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "best.pt"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


def config_name(config_path: Optional[str]) -> str:
    """Run-name stem of a config file: the path below a ``configs/`` folder joined by '-'
    (``configs/ml-1m/hstu.yaml`` -> ``ml-1m-hstu``), else the file stem (``/tmp/tiny.yaml`` -> ``tiny``);
    None -> ``default``."""
    if not config_path:
        return "default"
    parts = os.path.normpath(os.path.abspath(config_path)).split(os.sep)
    parts[-1] = os.path.splitext(parts[-1])[0]
    if "configs" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("configs")
        return "-".join(parts[last + 1:])
    return parts[-1]


def default_run_dir(name: str, root: str = "runs") -> str:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (a numeric suffix is added if that directory already exists)."""
    base = os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, i = base, 1
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    return path


RUN_FILES = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE, CHECKPOINT_FILE, "train.log", "eval.json")


def prepare_run_dir(path: str, keep: bool = False) -> List[str]:
    """Create the run directory. A previous run's files there (config.yaml, metrics.jsonl, results.json,
    best.pt, train.log, eval.json, tensorboard/) are deleted so runs never mix; returns what was removed.
    ``keep`` (a resumed run): nothing is deleted."""
    os.makedirs(path, exist_ok=True)
    removed: List[str] = []
    if keep:
        return removed
    for name in RUN_FILES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            os.remove(f)
            removed.append(name)
    tb = os.path.join(path, "tensorboard")
    if os.path.isdir(tb):
        shutil.rmtree(tb)
        removed.append("tensorboard/")
    return removed


def save_state_dict(module: torch.nn.Module, path: str) -> None:
    """torch.save(module.state_dict()) to ``path.tmp`` then rename: a crash never leaves a half-written file."""
    save_tensors(module.state_dict(), path)


def save_tensors(state: Dict[str, Any], path: str) -> None:
    """torch.save(state) to ``path.tmp`` then rename."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_json(obj: Dict[str, Any], path: str) -> None:
    """Write JSON atomically (tmp + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
