"""`hstu` command line (trainer/cli.py): help texts, error exits, train then eval."""

import json
import os
import subprocess
import sys

import pytest

from hstu.trainer.cli import main

TINY = [
    "data.synthetic.num_users=200", "data.synthetic.num_items=100", "data.synthetic.max_seq_len=20",
    "data.max_seq_len=20", "data.batch_size=32", "model.embedding_dim=8", "model.attention_dim=4",
    "model.linear_dim=4", "model.num_heads=2", "loss.num_negatives=8", "train.progress=false",
    "train.tensorboard=false",
]


def run_main(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse --help / usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_for_every_subcommand(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for word in ("prepare", "train", "eval", "config sections", "data", "model", "loss", "optim", "eval",
                 "stochastic_length", "selection_metric"):
        assert word in out
    flags = {
        "prepare": ["--config", "--data-dir", "key=value"],
        "train": ["--config", "--data-dir", "--run-dir", "key=value", "runs/<config-name>-<timestamp>"],
        "eval": ["--run-dir", "--checkpoint", "--data-dir", "--device", "--output", "--baseline", "key=value"],
    }
    for sub, expected in flags.items():
        code, out, _ = run_main(capsys, sub, "--help")
        assert code == 0
        for flag in expected:
            assert "".join(flag.split()) in "".join(out.split()), (sub, flag)  # help text is line-wrapped


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "hstu")
    proc = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--run-dir" in proc.stdout


def test_bad_override_exits_2_naming_the_key(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--run-dir", str(tmp_path / "r"), "model.num_layerz=3")
    assert code == 2 and "model.num_layerz" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(capsys, "train", "--run-dir", str(tmp_path / "r"), "train.epochs=many")
    assert code == 2 and "train.epochs" in err
    code, _, err = run_main(capsys, "train", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err
    assert not os.path.exists(tmp_path / "r")


def test_data_error_exits_2(capsys, tmp_path):
    code, _, err = run_main(capsys, "prepare", "--data-dir", str(tmp_path / "nope"), "data.name=ml-1m",
                            f"data.cache_dir={tmp_path}")
    assert code == 2 and "nope" in err and "Traceback" not in err


def test_train_then_eval(capsys, tmp_path):
    run = str(tmp_path / "run")
    common = [f"data.cache_dir={tmp_path / 'cache'}"] + TINY
    code, out, err = run_main(capsys, "train", "--json", "--run-dir", run, "train.epochs=2", "train.eval_every_epochs=1", *common)
    assert code == 0, err
    trained = json.loads(out)
    assert trained["run_dir"] == run and trained["epochs_run"] == 2
    code, out, err = run_main(capsys, "eval", "--run-dir", run, "--baseline")
    assert code == 0, err
    evaluated = json.loads(out)
    # same checkpoint, same data, deterministic full ranking -> the best epoch's metrics again
    for k, v in trained["best_metrics"].items():
        assert evaluated["metrics"][k] == pytest.approx(v, abs=1e-9), k
    assert evaluated["baseline"]["hr@10"] == pytest.approx(trained["baseline_metrics"]["hr@10"])
    assert json.load(open(os.path.join(run, "eval.json")))["metrics"] == evaluated["metrics"]
    # an override on top of the saved config: keeping history items changes the ranking
    code, out, _ = run_main(capsys, "eval", "--run-dir", run, "--output", str(tmp_path / "e.json"),
                            "eval.remove_history=false")
    assert code == 0 and json.loads(out)["metrics"]["mrr"] <= evaluated["metrics"]["mrr"]
    code, _, err = run_main(capsys, "eval", "--run-dir", str(tmp_path / "not_a_run"))
    assert code == 2 and "not a run directory" in err


def test_default_run_dir_from_config_name(capsys, tmp_path, monkeypatch):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("train: {epochs: 1, max_steps: 1}\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, "train", "--json", "--config", str(cfg), f"data.cache_dir={tmp_path / 'cache'}", *TINY)
    assert code == 0, err
    run_dir = json.loads(out)["run_dir"]
    assert os.path.dirname(run_dir) == "runs" and os.path.basename(run_dir).startswith("tiny-")
    assert os.path.exists(os.path.join(tmp_path, run_dir, "best.pt"))


def test_prepare_synthetic_summary(capsys, tmp_path):
    code, out, err = run_main(capsys, "prepare", "data.synthetic.num_users=50", "data.synthetic.num_items=40",
                              f"data.cache_dir={tmp_path}", "train.progress=false")
    assert code == 0, err
    assert "users: 50" in out and "cache_path:" in out


def test_nan_loss_exits_1_with_message(capsys, tmp_path, monkeypatch):
    from hstu.trainer import tasks

    class NanLossRetrieval(tasks.RetrievalTask):  # the retrieval task spec with a NaN loss
        def compute_loss(self, model, batch, ctx):
            return model.embed_items(batch.item_ids).sum() * float("nan")

    monkeypatch.setitem(tasks.TASK_REGISTRY, "retrieval", NanLossRetrieval)
    code, _, err = run_main(capsys, "train", "--run-dir", str(tmp_path / "r"), f"data.cache_dir={tmp_path / 'c'}",
                            *TINY)
    assert code == 1 and "non-finite loss" in err and "step 1, epoch 1" in err and "Traceback" not in err


def test_train_prints_metrics_table(capsys, tmp_path):
    code, out, err = run_main(capsys, "train", "--run-dir", str(tmp_path / "run"), "train.epochs=1",
                              f"data.cache_dir={tmp_path / 'cache'}", *TINY)
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    assert "baseline" in header and any(r.startswith("hr@10") for r in rows)
    assert header.split() == ["metric", "valid", "@1", "test", "@1", "test", "final", "@1", "baseline"]
    hr10 = next(r for r in rows if r.startswith("hr@10")).split()
    assert len(hr10) == 5 and all(0 <= float(x) <= 1 for x in hr10[1:])
    assert hr10[2] == hr10[3]  # one epoch: the selected epoch is the final one
    assert "selected on validation ndcg@10" in rows[-2]
    assert "tokens/s" in rows[-1] and str(tmp_path / "run") in rows[-1]
