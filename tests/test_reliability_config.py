"""Config validation before anything is touched (issue 14 §2): every value is range-checked in one pass
(trainer/config_checks.py) with a one-line error naming the key, the value and the allowed range; a bad value
leaves a previous run's files in the run directory untouched; CLI argument errors are one line, exit 2."""

from __future__ import annotations

import hashlib
import os

import pytest

from hstu.trainer.cli import main
from hstu.trainer.config import ConfigError, load_config

BAD_VALUES = [  # override, the key the error must name, a fragment of the allowed range
    ("optim.lr=nan", "optim.lr", "finite"),
    ("optim.lr=-0.001", "optim.lr", ">= 0"),
    ("optim.lr=.inf", "optim.lr", "finite"),
    ("optim.weight_decay=-1", "optim.weight_decay", ">= 0"),
    ("optim.betas=[2.0,0.9]", "optim.betas[0]", "[0.0, 1.0)"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1]", "[0.0, 1.0)"),
    ("optim.eps=0", "optim.eps", "> 0"),
    ("optim.warmup_steps=-10", "optim.warmup_steps", ">= 0"),
    ("optim.grad_clip_norm=-1", "optim.grad_clip_norm", ">= 0"),
    ("model.attention_dim=0", "model.attention_dim", "> 0"),
    ("model.linear_dim=-4", "model.linear_dim", "> 0"),
    ("model.embedding_dim=0", "model.embedding_dim", "> 0"),
    ("model.num_heads=0", "model.num_heads", "> 0"),
    ("model.dropout=1.0", "model.dropout", "[0.0, 1.0)"),
    ("model.dropout=nan", "model.dropout", "finite"),
    ("model.attn_dropout=0.1", "model.attn_dropout", "model.arch=hstu"),
    ("eval.ks=[0]", "eval.ks[0]", ">= 1"),
    ("eval.ks=[10,-1]", "eval.ks[1]", ">= 1"),
    ("eval.ks=[]", "eval.ks", "non-empty"),
    ("eval.ndcg_ks=[0]", "eval.ndcg_ks[0]", ">= 1"),
    ("data.max_seq_len=1", "data.max_seq_len", ">= 2"),
    ("data.min_seq_len=3", "data.min_seq_len", ">= 4"),  # retrieval: train + validation + test targets
    ("data.batch_size=0", "data.batch_size", "> 0"),
    ("data.eval_batch_size=-1", "data.eval_batch_size", "> 0"),
    ("train.max_steps=-5", "train.max_steps", ">= 0"),
    ("train.epochs=0", "train.epochs", "> 0"),
    ("train.max_train_minutes=-1", "train.max_train_minutes", ">= 0"),
    ("train.stochastic_length.alpha=0", "train.stochastic_length.alpha", "(0, 2]"),
    ("loss.num_negatives=0", "loss.num_negatives", "> 0"),
    ("loss.temperature=0", "loss.temperature", "> 0"),
    ("loss.temperature=nan", "loss.temperature", "finite"),
    ("data.synthetic.drift=1.5", "data.synthetic.drift", "[0.0, 1.0]"),
    ("sharding.lr=nan", "sharding.lr", "finite"),
    ("sharding.sharding_type=diagonal", "sharding.sharding_type", "row_wise"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last", ">= 1"),
    ("checkpoint.best_format=gathered", "checkpoint.best_format", "plain, dcp"),
    ("ranking.num_eval_targets=0", "ranking.num_eval_targets", "> 0"),
    ("ranking.task_weights=[1.0,-1.0]", "ranking.task_weights[1]", ">= 0"),
    ("ranking.synthetic.follow_prob=2", "ranking.synthetic.follow_prob", "[0.0, 1.0]"),
    ("ranking.dlrm_mlp=[64,0]", "ranking.dlrm_mlp[1]", "> 0"),
    ("model.arch=transformer", "model.arch", "sasrec"),
]


@pytest.mark.parametrize("override,key,rule", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_every_bad_value_names_key_value_and_range(override, key, rule):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and rule in msg and "\n" not in msg, msg


def test_sasrec_heads_must_divide_the_width_and_ranking_rules_are_in_the_same_pass():
    with pytest.raises(ConfigError, match="model.num_heads"):
        load_config(None, ["model.arch=sasrec", "model.embedding_dim=50", "model.num_heads=3"])
    with pytest.raises(ConfigError, match="'model.arch' = 'dlrm' needs task=ranking"):
        load_config(None, ["model.arch=dlrm"])
    with pytest.raises(ConfigError, match="'ranking.tasks'"):
        load_config(None, ["task=ranking", "ranking.tasks=[nope]"])
    from hstu.trainer.tasks import get_task

    with pytest.raises(ConfigError, match="'ranking.regression_weight'"):  # synthetic has no regression target
        get_task(load_config(None, ["task=ranking", "ranking.regression_weight=1.0"])).check_config()
    load_config(None, ["task=ranking", "data.max_seq_len=1"])  # a ranking history event is itself a target


def test_num_negatives_that_cannot_fit_is_refused_with_its_size():
    from hstu.trainer.config_checks import check_resources, logits_bytes

    cfg = load_config(None, ["loss.num_negatives=100000000"])
    need = logits_bytes(cfg)
    assert need == cfg.data.batch_size * cfg.data.max_seq_len * 100_000_000 * 16
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, memory_bytes=128 * 10 ** 9)
    assert "loss.num_negatives" in str(e.value) and f"{need / 1e9:.1f} GB" in str(e.value)
    check_resources(load_config(None, []), memory_bytes=128 * 10 ** 9)  # the default fits
    check_resources(load_config(None, ["task=ranking", "loss.num_negatives=100000000"]), memory_bytes=10 ** 9)


def _digest(run_dir) -> dict:
    return {name: hashlib.sha256(open(os.path.join(run_dir, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(run_dir)) if os.path.isfile(os.path.join(run_dir, name))}


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=-0.001", "optim.weight_decay=-1",
                                      "optim.betas=[2.0,0.9]", "loss.num_negatives=100000000000"])
def test_bad_value_on_the_cli_is_one_line_and_leaves_the_previous_run_alone(capsys, tmp_path, override):
    run = tmp_path / "run"
    run.mkdir()
    for name, text in (("best.pt", "weights"), ("results.json", "{}"), ("metrics.jsonl", "{}\n"),
                       ("config.yaml", "task: retrieval\n")):
        (run / name).write_text(text)
    before = _digest(run)
    code = main(["train", "--run-dir", str(run), f"data.cache_dir={tmp_path / 'cache'}", override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert override.split("=")[0] in err
    assert _digest(run) == before and not (tmp_path / "cache").exists()


def test_cli_argument_errors_are_one_line(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["train", "--nproc-per-node", "-1", "--run-dir", str(tmp_path / "r")], "--nproc-per-node = -1"),
        (["train", "--nproc-per-node", "0", "--run-dir", str(tmp_path / "r")], "--nproc-per-node = 0"),
        (["train", "--run-dir", str(afile)], "is an existing file"),
        (["train", "--run-dir", str(afile / "sub")], "is a file"),
        (["train", "--config", str(tmp_path)], "is a directory"),
        (["train", "--config", str(tmp_path / "missing.yaml")], "not found"),
        (["prepare", "--config", str(tmp_path)], "is a directory"),
    ]
    for argv, fragment in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert afile.read_text() == "x"
