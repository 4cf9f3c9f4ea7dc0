"""The train loop (trainer/train.py) end to end on tiny synthetic data."""

import json
import os

import pytest
import torch

import hstu.trainer.train as train_mod
from hstu.trainer import tasks
from hstu.trainer.config import load_config
from hstu.trainer.metrics_log import read_metrics
from hstu.trainer.tasks.retrieval import build_data
from hstu.trainer.train import NonFiniteLossError, train

TINY = [
    "data.name=synthetic", "data.synthetic.num_users=400", "data.synthetic.num_items=300",
    "data.synthetic.num_interests=10", "data.synthetic.max_seq_len=40", "data.max_seq_len=40",
    "data.batch_size=32", "data.eval_batch_size=128",
    "model.arch=hstu", "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2",
    "model.dropout=0.1", "loss.num_negatives=32", "optim.lr=0.005", "train.progress=false",
    "eval.ks=[1,10,50]", "eval.ndcg_ks=[10]", "eval.selection_metric=ndcg@10",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hstu_cache"))


def tiny_cfg(run_dir, cache_dir, *extra):
    return load_config(None, TINY + [f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", *extra])


def test_end_to_end_beats_most_popular(tmp_path, cache_dir):
    run = str(tmp_path / "run")
    result = train(tiny_cfg(run, cache_dir, "train.epochs=5", "train.eval_every_epochs=2", "train.log_every_steps=5"))
    assert result.epochs_run == 5 and result.steps == 5 * 13 and result.run_dir == run
    assert result.final_metrics["hr@10"] > result.baseline_metrics["hr@10"] + 0.05, (result.final_metrics,
                                                                                   result.baseline_metrics)
    assert result.best_epoch in (2, 4, 5) and result.tokens_per_second > 0 and result.train_seconds > 0
    # the epoch is selected on VALIDATION (eval.select_on default): the test metric may be lower there
    assert result.select_on == "validation" and result.selected["epoch"] == result.best_epoch
    assert result.selected["validation"]["ndcg@10"] >= result.final["validation"]["ndcg@10"]
    assert result.selected["test"] == result.best_metrics and result.final["test"] == result.final_metrics
    assert result.final["epoch"] == 5 and result.data["tie_order"] == "random"
    # run directory contents
    saved = load_config(os.path.join(run, "config.yaml"))
    assert saved.run_dir == run and saved.model.embedding_dim == 16
    evals = read_metrics(os.path.join(run, "metrics.jsonl"), kind="eval")
    assert [e["epoch"] for e in evals] == [2, 4, 5]
    assert sum(e["is_best"] for e in evals) >= 1
    assert {"hr@10", "ndcg@10", "mrr", "num_users", "step"} <= set(evals[-1]) and evals[-1]["split"] == "test"
    valids = read_metrics(os.path.join(run, "metrics.jsonl"), kind="valid")  # TensorBoard: valid/<metric>
    assert [e["epoch"] for e in valids] == [2, 4, 5] and valids[-1]["split"] == "validation"
    assert [e["is_best"] for e in valids] == [e["is_best"] for e in evals]
    best_valid = max(valids, key=lambda e: e["ndcg@10"])  # first maximum: ties keep the earlier epoch
    assert best_valid["epoch"] == result.best_epoch
    kinds = {r["kind"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))}
    assert {"baseline", "train", "epoch", "eval", "best"} <= kinds
    results = json.load(open(os.path.join(run, "results.json")))
    assert results["best_epoch"] == result.best_epoch and results["config"]["run_dir"] == run
    assert results["selected"]["test"] == result.best_metrics and results["final"]["test"] == result.final_metrics
    assert results["selected"]["validation"]["ndcg@10"] == best_valid["ndcg@10"]
    assert results["select_on"] == "validation" and results["data"]["tie_order"] == "random"
    state = torch.load(os.path.join(run, "best.pt"), weights_only=True)
    assert any(k.startswith("item_embeddings") for k in state)
    assert "eval epoch 5" in open(os.path.join(run, "train.log")).read()
    assert os.listdir(os.path.join(run, "tensorboard"))
    # training again into the same run_dir replaces the previous run (files never mix)
    again = train(tiny_cfg(run, cache_dir, "train.epochs=1", "train.max_steps=2", "train.tensorboard=false"))
    assert again.steps == 2
    assert [e["epoch"] for e in read_metrics(os.path.join(run, "metrics.jsonl"), kind="eval")] == [1]
    assert not os.path.exists(os.path.join(run, "tensorboard"))
    assert "held a previous run" in open(os.path.join(run, "train.log")).read()
    assert not os.path.exists(os.path.join(run, ".previous-run"))  # dropped once this run had its best.pt


def test_max_steps_and_stochastic_length(tmp_path, cache_dir):
    cfg = tiny_cfg(str(tmp_path / "run"), cache_dir, "train.epochs=50", "train.max_steps=4",
                   "train.stochastic_length.enabled=true", "train.stochastic_length.alpha=1.2",
                   "train.tensorboard=false", "eval.popularity_baseline=false")
    result = train(cfg)
    assert result.steps == 4 and result.epochs_run == 1
    assert result.final_metrics["num_users"] == 400 and result.baseline_metrics == {}
    # SL (threshold floor(40**0.6) = 9) cut some sequences: fewer tokens than the raw batches hold
    _, loader, _ = build_data(cfg)
    loader.set_epoch(0)
    raw_tokens = sum(b.item_ids.numel() for _, b in zip(range(4), loader))
    assert 4 * 32 * 2 <= result.train_tokens < raw_tokens


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, cache_dir, monkeypatch):
    run = str(tmp_path / "run")
    calls = {"n": 0}

    class FlakyRetrieval(tasks.RetrievalTask):  # the retrieval task spec, NaN at one step
        def compute_loss(self, model, batch, ctx):
            calls["n"] += 1
            loss = super().compute_loss(model, batch, ctx)
            return loss * float("nan") if calls["n"] == 13 + 3 else loss  # 3rd step of epoch 2

    monkeypatch.setitem(tasks.TASK_REGISTRY, "retrieval", FlakyRetrieval)
    saved = []
    real_save = train_mod.rd.save_state_dict

    def recording_save(module, path):
        real_save(module, path)
        saved.append(open(path, "rb").read())

    monkeypatch.setattr(train_mod.rd, "save_state_dict", recording_save)
    cfg = tiny_cfg(run, cache_dir, "train.epochs=3", "train.eval_every_epochs=1", "train.tensorboard=false")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    msg = str(err.value)
    assert "non-finite loss (nan)" in msg and "step 16" in msg and "epoch 2" in msg and "best.pt" in msg
    best = os.path.join(run, "best.pt")
    assert len(saved) == 1 and open(best, "rb").read() == saved[0]  # the epoch-1 checkpoint, untouched
    state = torch.load(best, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    errors = read_metrics(os.path.join(run, "metrics.jsonl"), kind="error")
    assert len(errors) == 1 and errors[0]["step"] == 16 and errors[0]["loss"] == "nan"
    assert not os.path.exists(os.path.join(run, "results.json"))


def test_same_seed_same_model(tmp_path, cache_dir):
    extra = ["train.epochs=1", "train.max_steps=3", "train.tensorboard=false", "eval.popularity_baseline=false"]
    a = train(tiny_cfg(str(tmp_path / "a"), cache_dir, *extra))
    b = train(tiny_cfg(str(tmp_path / "b"), cache_dir, *extra))
    sa = torch.load(str(tmp_path / "a" / "best.pt"), weights_only=True)
    sb = torch.load(str(tmp_path / "b" / "best.pt"), weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.final_metrics == b.final_metrics


def test_warmup_schedule():
    model = torch.nn.Linear(2, 2)
    cfg = load_config(None, ["optim.lr=0.01", "optim.warmup_steps=4"]).optim
    opt, sched = train_mod.build_optimizer(model, cfg)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)


def test_time_budget_stops_after_the_epoch_that_crosses_it(tmp_path):
    from hstu.trainer.config import load_config
    from hstu.trainer.train import train

    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "data.name=synthetic", "data.synthetic.num_users=200",
        "data.synthetic.num_items=100", "data.max_seq_len=20", "data.synthetic.max_seq_len=20",
        f"data.cache_dir={tmp_path / 'cache'}", "model.embedding_dim=8", "model.attention_dim=8",
        "model.linear_dim=8", "loss.num_negatives=8", "train.epochs=50", "train.eval_every_epochs=50",
        "train.progress=false", "train.tensorboard=false", "train.max_train_minutes=0.000001",
        "eval.popularity_baseline=false"])
    result = train(cfg)
    assert result.epochs_run == 1 and result.final_metrics  # stopped after epoch 1 and still evaluated


def test_bad_data_fails_before_the_run_dir_is_touched(tmp_path, cache_dir):
    """A data error is raised (naming file and line) before the run directory is created — and a previous run's
    files in an existing run directory survive a failing rerun (they are only replaced once data and model are
    built)."""
    from hstu.trainer.data.errors import DataError

    data = tmp_path / "ml-1m"
    data.mkdir()
    (data / "ratings.dat").write_text("1::10::5::978300760\n1::11::oops::978300761\n")
    bad = ["data.name=ml-1m", f"data.data_dir={data}", f"data.cache_dir={tmp_path / 'c'}"]
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError, match=r"ratings\.dat.*line 2"):
        train(tiny_cfg(str(fresh), cache_dir, *bad))
    assert not fresh.exists()
    previous = tmp_path / "previous"
    train(tiny_cfg(str(previous), cache_dir, "train.max_steps=2", "train.epochs=1", "train.tensorboard=false"))
    before = {n: open(previous / n, "rb").read() for n in ("config.yaml", "results.json", "best.pt", "train.log")}
    with pytest.raises(DataError):
        train(tiny_cfg(str(previous), cache_dir, *bad, "train.resume=false"))
    assert {n: open(previous / n, "rb").read() for n in before} == before


def test_what_data_loading_logs_reaches_train_log(tmp_path):
    """Records logged while data and model are built (before the run directory exists) are replayed into
    train.log."""
    run = tmp_path / "rank"
    train(load_config(None, [
        "task=ranking", "data.name=synthetic", "data.max_seq_len=12", "data.batch_size=8", "data.eval_batch_size=16",
        "ranking.num_eval_targets=3", "ranking.synthetic.num_users=24", "ranking.synthetic.num_items=40",
        "ranking.synthetic.num_clusters=3", "ranking.synthetic.creators_per_cluster=2",
        "ranking.synthetic.min_seq_len=6", "ranking.synthetic.max_seq_len=14", "model.embedding_dim=8",
        "model.num_layers=1", "model.num_heads=2", "model.attention_dim=4", "model.linear_dim=4",
        "ranking.head_hidden_dim=8", "eval.selection_metric=ne_mean", "train.max_steps=1", "train.epochs=1",
        "train.progress=false", "train.tensorboard=false", f"data.cache_dir={tmp_path / 'c'}", f"run_dir={run}"]))
    lines = open(run / "train.log").read().splitlines()
    data_line = next(i for i, line in enumerate(lines) if "ranking data synthetic: 24 users" in line)
    assert data_line < next(i for i, line in enumerate(lines) if f"run_dir {run}" in line)
