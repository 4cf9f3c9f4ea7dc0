"""Sweeps (launch/sweep.py, `hstu sweep`): trial expansion, and real tiny sweeps on submitit's local and debug
executors with a deliberately failing trial (~20 s). The SLURM executor is tested in test_launch_slurm.py."""

import csv
import json
import os

import pytest
import yaml

from hstu.launch import sweep
from hstu.trainer.cli import main

TINY = ["data.synthetic.num_users=300", "data.synthetic.num_items=200", "data.max_seq_len=30",
        "data.synthetic.max_seq_len=30", "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8",
        "train.tensorboard=false", "eval.ks=[1,10]", "eval.ndcg_ks=[10]", "eval.popularity_baseline=false",
        "train.epochs=1", "train.max_steps=4", "data.batch_size=32"]


def test_expand_grid_random_and_cap():
    grid = {"grid": {"a.x": [1, 2], "a.y": ["p", "q"]}}
    assert sweep.expand_trials(grid) == [{"a.x": 1, "a.y": "p"}, {"a.x": 1, "a.y": "q"}, {"a.x": 2, "a.y": "p"},
                                         {"a.x": 2, "a.y": "q"}]
    assert len(sweep.expand_trials({**grid, "num_trials": 3})) == 3
    rnd = {"random": {"num_trials": 5, "seed": 3, "params": {
        "optim.lr": {"log_uniform": [1e-4, 1e-2]}, "model.dropout": {"uniform": [0.0, 0.3]},
        "model.num_heads": [1, 2], "data.batch_size": {"int_uniform": [32, 64]}}}}
    trials = sweep.expand_trials(rnd)
    assert trials == sweep.expand_trials(rnd) and len(trials) == 5  # seeded: reproducible
    for t in trials:
        assert 1e-4 <= t["optim.lr"] <= 1e-2 and 0 <= t["model.dropout"] <= 0.3
        assert t["model.num_heads"] in (1, 2) and isinstance(t["data.batch_size"], int)
    both = sweep.expand_trials({"grid": {"model.num_layers": [1, 2]}, **rnd})
    assert [t["model.num_layers"] for t in both] == [1, 2, 1, 2, 1]  # sample i uses grid point i mod G
    with pytest.raises(sweep.SweepError, match="unknown spec keys"):
        sweep.expand_trials({"gird": {}})
    with pytest.raises(sweep.SweepError, match="unknown distribution"):
        sweep.expand_trials({"random": {"num_trials": 1, "params": {"a": {"normal": [0, 1]}}}})
    # override text round-trips through the config parser (YAML)
    assert sweep.trial_overrides({}, {"optim.lr": 0.001, "eval.ks": [1, 10]}, "/r", 1)[:2] == [
        "optim.lr=0.001", "eval.ks=[1, 10]"]


def test_resolve_executor(monkeypatch):
    monkeypatch.setattr(sweep, "slurm_available", lambda timeout_s=10.0: False)
    assert sweep.resolve_executor("auto") == "local"
    monkeypatch.setattr(sweep, "slurm_available", lambda timeout_s=10.0: True)
    assert sweep.resolve_executor("auto") == "slurm" and sweep.resolve_executor("debug") == "debug"
    with pytest.raises(sweep.SweepError):
        sweep.resolve_executor("kubernetes")


def test_hstu_sweep_local_executor_tolerates_a_failed_trial(tmp_path, capsys):
    spec = {"name": "tiny", "overrides": TINY + [f"data.cache_dir={tmp_path}/cache"],
            "grid": {"model.num_layers": [1, 2], "model.num_heads": [1, 0]},  # num_heads=0: invalid config
            "num_trials": 3, "executor": "local", "metric": "hr@10",
            "resources": {"num_threads": 1, "max_parallel": 2, "timeout_min": 5}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "model.num_layers=1 model.num_heads=0" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "model.num_heads" in rows[1]["error"] and rows[1]["model.num_heads"] == "0"
    for r in (rows[0], rows[2]):  # from each trial's results.json / metrics.jsonl
        assert 0 <= float(r["final_hr@10"]) <= 1 and r["steps"] == "4" and float(r["final_train_loss"]) > 0
        assert os.path.exists(os.path.join(r["run_dir"], "results.json"))
    md = (out / "sweep.md").read_text()
    assert "3 trials on the local executor: 2 ok, 1 failed" in md and "Failed trials" in md
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.load(open(out / "sweep.json"))
    assert summary["num_ok"] == 2 and summary["best"]["trial"] in (0, 2)


def test_debug_executor_runs_in_process(tmp_path):
    spec = {"name": "dbg", "overrides": TINY + [f"data.cache_dir={tmp_path}/cache"],
            "grid": {"model.num_layers": [1, 0]}, "executor": "debug", "resources": {"num_threads": 1}}
    summary = sweep.run_sweep(spec, output_dir=str(tmp_path / "out"), log=lambda *_: None)
    assert summary["executor"] == "debug" and summary["num_ok"] == 1 and summary["num_failed"] == 1


def test_all_failed_sweep_exits_1_and_bad_spec_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grid": {"a": []}}))
    assert main(["sweep", str(bad)]) == 2
    spec = tmp_path / "fail.yaml"
    spec.write_text(yaml.safe_dump({"grid": {"model.num_layers": [0]}, "executor": "debug",
                                    "overrides": TINY + [f"data.cache_dir={tmp_path}/cache"]}))
    assert main(["sweep", str(spec), "--output-dir", str(tmp_path / "o")]) == 1
