"""Shared by tests/test_reliability_*.py: a tiny synthetic config that checkpoints every 2 steps, the CLI in
process, and ways to damage files."""

from __future__ import annotations

import os

from hstu.trainer.cli import main
from hstu.trainer.metrics_log import read_metrics

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=120", "data.synthetic.num_items=90",
    "data.synthetic.max_seq_len=16", "data.max_seq_len=16", "data.batch_size=16", "data.eval_batch_size=64",
    "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2",
    "model.num_layers=2", "model.dropout=0.2", "loss.num_negatives=8", "optim.warmup_steps=3",
    "train.stochastic_length.enabled=true", "train.stochastic_length.alpha=1.2", "train.epochs=3",
    "train.max_steps=12", "train.eval_every_epochs=1", "train.log_every_steps=1", "train.progress=false",
    "train.tensorboard=false", "eval.ks=[10]", "eval.ndcg_ks=[10]", "eval.popularity_baseline=false",
    "checkpoint.every_steps=2", "checkpoint.keep_last=2",
]


def train_argv(run_dir, cache, *extra):
    return ["train", "--run-dir", str(run_dir), *CONFIG, f"data.cache_dir={cache}", *extra]


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind="train")}


def snapshot(root):
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def flip_bits(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
