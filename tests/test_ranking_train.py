"""End to end: `hstu train` with task=ranking on the small synthetic config, HSTU vs the DLRM baseline (same data,
labels and loop); metrics.jsonl holds NE / AUC / GAUC per task at every evaluation."""

import json
import os

import torch

from hstu.trainer.cli import evaluate_run, main
from hstu.trainer.metrics_log import read_metrics

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic",
                      "ranking-small.yaml")


def _train(tmp_path, arch):
    run = str(tmp_path / arch)
    rc = main(["train", "--config", CONFIG, "--run-dir", run, f"model.arch={arch}", f"data.cache_dir={tmp_path}",
               "train.progress=false", "train.tensorboard=false", "train.num_threads=1"])
    assert rc == 0
    with open(os.path.join(run, "results.json")) as f:
        return run, json.load(f)


def test_hstu_ranker_beats_dlrm_on_synthetic(tmp_path):
    threads = torch.get_num_threads()
    try:
        run_h, hstu = _train(tmp_path, "hstu")
        run_d, dlrm = _train(tmp_path, "dlrm")
    finally:
        torch.set_num_threads(threads)
    h, d = hstu["best_metrics"], dlrm["best_metrics"]
    assert h["ne_mean"] < d["ne_mean"] - 0.02, (h, d)
    assert h["auc_mean"] > d["auc_mean"] + 0.01 and h["gauc_mean"] > d["gauc_mean"]
    for t in ("click", "like", "share", "complete"):
        assert h[f"ne_{t}"] < 1.0 and 0.5 < h[f"auc_{t}"] <= 1.0
    evals = read_metrics(os.path.join(run_h, "metrics.jsonl"), kind="eval")
    assert [e["epoch"] for e in evals] == [2, 4, 6, 8, 10, 12]
    assert {"ne_like", "auc_like", "gauc_like", "ne_mean", "num_impressions", "is_best"} <= set(evals[-1])
    assert evals[-1]["num_impressions"] == 10_000  # 1000 users x 10 eval candidates
    base = read_metrics(os.path.join(run_h, "metrics.jsonl"), kind="baseline")
    assert base[0]["name"] == "item_rate" and h["ne_mean"] < base[0]["ne_mean"] < 1.0
    assert hstu["best_epoch"] in (2, 4, 6, 8, 10, 12) and hstu["select_on"] == "validation" and hstu["config"]["task"] == "ranking"
    state = torch.load(os.path.join(run_d, "best.pt"), weights_only=True)
    assert any(k.startswith("tables.actions") for k in state)
    # `hstu eval --baseline` of the DLRM run reproduces its best evaluation from best.pt, and the task's
    # baseline (item rate) the run logged
    out = evaluate_run(run_d, baseline=True)
    again = out["metrics"]
    assert abs(again["ne_mean"] - d["ne_mean"]) < 1e-6 and again["num_impressions"] == 10_000
    base_d = read_metrics(os.path.join(run_d, "metrics.jsonl"), kind="baseline")[0]
    assert all(out["baseline"][k] == base_d[k] for k in ("ne_mean", "auc_mean", "gauc_mean", "num_impressions"))
