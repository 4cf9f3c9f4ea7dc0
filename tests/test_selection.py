"""Epoch selection (eval.select_on): the best epoch is chosen on the validation split only; results.json reports
the test metrics at that epoch and at the final one; best.pt holds the selected epoch's weights."""

import json
import os

import pytest
import torch

import hstu.trainer.tasks as tasks_mod
from hstu.trainer.config import ConfigError, load_config
from hstu.trainer.metrics_log import read_metrics
from hstu.trainer.train import is_improvement, selection_split, train

TINY = [
    "data.name=synthetic", "data.synthetic.num_users=120", "data.synthetic.num_items=80",
    "data.synthetic.num_interests=4", "data.synthetic.max_seq_len=20", "data.max_seq_len=20",
    "data.batch_size=32", "data.eval_batch_size=64", "model.arch=hstu", "model.embedding_dim=8",
    "model.attention_dim=4", "model.linear_dim=4", "model.num_heads=2", "loss.num_negatives=8",
    "train.progress=false", "train.tensorboard=false", "train.epochs=3", "train.eval_every_epochs=1",
    "eval.ks=[1,10]", "eval.ndcg_ks=[10]", "eval.selection_metric=ndcg@10", "eval.popularity_baseline=false",
]
# scripted metric per evaluation (epochs 1, 2, 3): validation peaks at epoch 2, test at epoch 1
VALID = [0.10, 0.30, 0.20]
TEST = [0.50, 0.10, 0.40]


@pytest.fixture
def scripted(monkeypatch):
    """RetrievalTask.evaluate returns the scripted ndcg@10 of each split (the real evaluation runs too, so its
    other metrics are real) and snapshots the model's weights at every evaluation."""
    real = tasks_mod.RetrievalTask.evaluate
    calls = {"validation": 0, "test": 0}
    snapshots = []

    def evaluate(self, model, ctx, split="test"):
        metrics = dict(real(self, model, ctx, split=split))
        k = calls[split]
        calls[split] += 1
        metrics["ndcg@10"] = (VALID if split == "validation" else TEST)[k]
        if split == "test":
            snapshots.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        return metrics

    monkeypatch.setattr(tasks_mod.RetrievalTask, "evaluate", evaluate)
    return snapshots


def _run(tmp_path, *extra):
    run = str(tmp_path / "run")
    cfg = load_config(None, TINY + [f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={run}", *extra])
    return run, train(cfg)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_selects_on_validation_even_when_test_disagrees(tmp_path, scripted):
    run, result = _run(tmp_path)
    assert result.select_on == "validation" and result.best_epoch == 2  # validation's best, not test's (epoch 1)
    assert result.selected["validation"]["ndcg@10"] == 0.30 and result.selected["test"]["ndcg@10"] == 0.10
    assert result.final["epoch"] == 3 and result.final["test"]["ndcg@10"] == 0.40
    assert result.final["validation"]["ndcg@10"] == 0.20
    saved = json.load(open(os.path.join(run, "results.json")))
    assert saved["selected"]["epoch"] == 2 and saved["selected"]["test"]["ndcg@10"] == 0.10
    assert saved["final"]["epoch"] == 3 and saved["final"]["test"]["ndcg@10"] == 0.40
    assert saved["best_metrics"]["ndcg@10"] == 0.10 and saved["final_metrics"]["ndcg@10"] == 0.40
    assert {"hr@10", "mrr", "num_users"} <= set(saved["selected"]["test"]) <= set(saved["selected"]["validation"])
    # best.pt = the weights evaluated at epoch 2 (and not those of epoch 1 or 3)
    best = torch.load(os.path.join(run, "best.pt"), weights_only=True)
    assert _same(best, scripted[1]) and not _same(best, scripted[0]) and not _same(best, scripted[2])
    # metrics.jsonl: both splits per evaluation under distinct kinds; is_best follows validation
    valid = read_metrics(os.path.join(run, "metrics.jsonl"), kind="valid")
    test = read_metrics(os.path.join(run, "metrics.jsonl"), kind="eval")
    assert [r["ndcg@10"] for r in valid] == VALID and [r["ndcg@10"] for r in test] == TEST
    assert [r["is_best"] for r in valid] == [True, True, False] == [r["is_best"] for r in test]
    best_rec = read_metrics(os.path.join(run, "metrics.jsonl"), kind="best")[-1]
    assert best_rec["epoch"] == 2 and best_rec["select_on"] == "validation"


def test_select_on_test_is_the_old_rule(tmp_path, scripted):
    run, result = _run(tmp_path, "eval.select_on=test")
    assert result.select_on == "test" and result.best_epoch == 1 and result.best_metrics["ndcg@10"] == 0.50
    assert result.selected["validation"]["ndcg@10"] == 0.10  # still reported
    assert _same(torch.load(os.path.join(run, "best.pt"), weights_only=True), scripted[0])


def test_selection_rule_helpers():
    assert is_improvement(0.3, 0.2) and not is_improvement(0.2, 0.2)  # ties keep the earlier epoch
    cfg = load_config(None, TINY)
    assert selection_split(cfg, ("validation", "test")) == "validation"
    assert selection_split(cfg, ("test",)) == "test"  # ranking: no validation split yet
    with pytest.raises(ConfigError, match="eval.select_on"):
        load_config(None, TINY + ["eval.select_on=train"])
    with pytest.raises(ConfigError, match="data.min_seq_len"):
        load_config(None, TINY + ["data.min_seq_len=3"])  # retrieval needs train + validation + test targets
    with pytest.raises(ConfigError, match="data.tie_order"):
        load_config(None, TINY + ["data.tie_order=stable"])
