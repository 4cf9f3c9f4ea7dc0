"""Shared by tests/test_reliability_*.py: a tiny synthetic config that checkpoints every 2 steps, the CLI in
process, and ways to damage files."""

from __future__ import annotations

import importlib.util
import os

from hstu.trainer.cli import main
from hstu.trainer.metrics_log import read_metrics

# The config and the damage helpers are the reliability benchmark's own (benchmarks/reliability_checkpoint_cases.py):
# the tests and the replayed corpus damage checkpoints the same way.
_spec = importlib.util.spec_from_file_location(
    "reliability_checkpoint_cases", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                                 "reliability_checkpoint_cases.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
CONFIG, train_argv, snapshot, truncate, flip_bits = (_cases.CONFIG, _cases.train_argv, _cases.snapshot,
                                                      _cases.truncate, _cases.flip_bits)


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind="train")}
