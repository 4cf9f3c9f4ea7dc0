"""checkpoint.best_format=dcp on a REAL 2-process sharded run (gloo, row-wise item table): the best epoch's model
is saved as a per-rank DCP checkpoint RUN_DIR/best/step_N (keep-last 1) instead of the gathered best.pt, no rank
calls the full-table gather while saving it, `hstu eval --checkpoint best` reproduces the logged best metrics,
and `hstu export` of the run equals, bit for bit, the export of the same run saved with best_format=plain."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.timeout(400)

CONFIG = [
    "data.name=synthetic", "data.synthetic.num_users=48", "data.synthetic.num_items=70",
    "data.synthetic.max_seq_len=10", "data.max_seq_len=10", "data.batch_size=16", "data.eval_batch_size=24",
    "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2",
    "model.dropout=0.0", "loss.num_negatives=8", "optim.warmup_steps=1", "train.epochs=2",
    "train.log_every_steps=1", "train.progress=false", "train.tensorboard=false", "eval.ks=[10]",
    "eval.ndcg_ks=[10]", "eval.popularity_baseline=false", "sharding.enabled=true",
    "sharding.sharding_type=row_wise",
]


def _cfg(run_dir: str, cache: str, *extra: str):
    from hstu.trainer.config import load_config

    return load_config(None, CONFIG + [f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra])


def _train_both(rank: int, world: int, dcp_run: str, plain_run: str, cache: str) -> Dict[str, Any]:
    """The same 2-rank run twice: best_format=plain (gathers into best.pt), then best_format=dcp with the
    full-table gather made to raise on every rank (counting its calls)."""
    import hstu.trainer.parallel.item_embeddings as item_embeddings
    from hstu.trainer.train import train

    train(_cfg(plain_run, cache, "checkpoint.best_format=plain"))
    calls: List[int] = []
    original = item_embeddings.full_table

    def no_gather(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        raise AssertionError("full_table called while best_format=dcp")

    item_embeddings.full_table = no_gather
    try:
        train(_cfg(dcp_run, cache, "checkpoint.best_format=dcp"))
    finally:
        item_embeddings.full_table = original
    return {"gathers": len(calls)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("best_dcp")
    dcp_run, plain_run, cache = str(tmp / "dcp"), str(tmp / "plain"), str(tmp / "cache")
    parts = run_distributed(_train_both, 2, (dcp_run, plain_run, cache), timeout_s=360)
    return {"dcp": dcp_run, "plain": plain_run, "tmp": tmp, "parts": parts}


def test_dcp_best_is_per_rank_and_never_gathered(runs):
    import torch.distributed.checkpoint as dcp

    from hstu.trainer.metrics_log import read_metrics

    assert [p["gathers"] for p in runs["parts"]] == [0, 0]
    run = runs["dcp"]
    assert not os.path.exists(os.path.join(run, "best.pt"))
    assert os.path.isfile(os.path.join(runs["plain"], "best.pt"))
    assert not os.path.exists(os.path.join(runs["plain"], "best"))
    steps = sorted(n for n in os.listdir(os.path.join(run, "best")) if n.startswith("step_"))
    selected = [r for r in read_metrics(os.path.join(run, "metrics.jsonl"), kind="valid") if r["is_best"]]
    assert steps == [f"step_{selected[-1]['step']:08d}"]  # keep-last 1: the latest improving evaluation
    step_dir = os.path.join(run, "best", steps[0])
    meta = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    table = [k for k in meta if k.startswith("model.") and "item_id" in k]
    assert table and len(meta[table[0]].chunks) == 2  # one row block per rank, nothing gathered
    assert not any(k.startswith(("dense_optim", "sparse_optim")) for k in meta)  # the model only
    results = json.load(open(os.path.join(run, "results.json")))
    assert results["best_checkpoint"] == os.path.join(run, "best")
    assert json.load(open(os.path.join(runs["plain"], "results.json")))["best_checkpoint"].endswith("best.pt")


def test_dcp_best_equals_plain_best_and_eval_reproduces_logged_metrics(runs):
    from hstu.trainer.cli import evaluate_run
    from hstu.trainer.metrics_log import read_metrics
    from hstu.trainer.plain_weights import read_plain_state

    run = runs["dcp"]
    _, from_dcp = read_plain_state(os.path.join(run, "best"))
    plain = torch.load(os.path.join(runs["plain"], "best.pt"), weights_only=True)
    assert from_dcp.keys() == plain.keys()
    for k in plain:
        assert torch.equal(from_dcp[k], plain[k]), k
    logged = read_metrics(os.path.join(run, "metrics.jsonl"), kind="best")[-1]
    out = evaluate_run(run, [], "best", None, None, False)
    assert os.path.dirname(out["checkpoint"]) == os.path.join(run, "best")
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert math.isclose(out["metrics"][key], logged[key], rel_tol=1e-6, abs_tol=1e-9), key
    assert evaluate_run(run, [], None, None, None, False)["checkpoint"] == out["checkpoint"]  # the default


def test_export_of_dcp_best_equals_export_of_plain_best(runs):
    import numpy as np

    from hstu.trainer.cli import main

    tmp = runs["tmp"]
    for name, extra in (("dcp", []), ("dcp-best", ["--checkpoint", "best"]), ("plain", [])):
        run = runs["dcp" if name.startswith("dcp") else "plain"]
        assert main(["export", "--run-dir", run, "--out", str(tmp / f"art-{name}"), *extra]) == 0
    manifest = json.load(open(tmp / "art-dcp" / "manifest.json"))
    assert os.path.dirname(manifest["source"]["checkpoint"]) == os.path.join(runs["dcp"], "best")
    plain_table = np.fromfile(tmp / "art-plain" / "item_table.bin", dtype=np.uint8)
    assert plain_table.size > 0
    for name in ("dcp", "dcp-best"):
        assert np.array_equal(np.fromfile(tmp / f"art-{name}" / "item_table.bin", dtype=np.uint8), plain_table)


def test_single_process_dcp_best_is_replaced_by_a_fresh_run_and_counts_as_its_result(tmp_path):
    """Unsharded, best_format=dcp also works (no best.pt); a fresh run in the same directory stashes the previous
    run's best/ and drops it once it has its own; a kill after the new best/ was written commits the swap."""
    import hstu.trainer.run_dir as rd
    from hstu.trainer.cli import evaluate_run, main
    from reliability_utils import train_argv

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(train_argv(run, cache, "train.max_steps=2", "checkpoint.best_format=dcp")) == 0
    assert not (run / "best.pt").exists() and sorted(os.listdir(run / "best")) == ["latest", "step_00000002"]
    assert main(train_argv(run, cache, "train.max_steps=3", "checkpoint.best_format=dcp")) == 0
    assert sorted(os.listdir(run / "best")) == ["latest", "step_00000003"]
    assert not (run / rd.PREVIOUS).exists()
    assert evaluate_run(str(run), [], "best", None, None, False)["checkpoint"] == str(run / "best" / "step_00000003")
    started = tmp_path / "started"  # train.init_from a run's best/ directory: its newest step that verifies
    assert main(train_argv(started, cache, "train.max_steps=1", f"train.init_from={run / 'best'}")) == 0
    assert f"from {run / 'best' / 'step_00000003'}" in (started / "train.log").read_text()

    os.remove(run / "results.json")  # only best/ is the new run's result when the kill comes
    rd.stash_previous(str(run), str(run / "checkpoints"))
    os.replace(run / rd.PREVIOUS / "best", run / "best")  # the new run's best/ (a kill before commit_run)
    assert rd.recover(str(run), str(run / "checkpoints")) == "committed"
    assert sorted(os.listdir(run / "best")) == ["latest", "step_00000003"]
