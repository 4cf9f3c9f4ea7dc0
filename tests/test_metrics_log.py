"""metrics.jsonl / TensorBoard / train.log writers (trainer/metrics_log.py)."""

import json
import logging
import os

from hstu.trainer.metrics_log import MetricsLogger, read_metrics, setup_logging


def test_jsonl_lines_are_valid_json(tmp_path):
    run = str(tmp_path / "run")
    with MetricsLogger(run, tensorboard=True) as ml:
        ml.log_train(step=10, epoch=0, loss=1.25, tokens_per_second=1000.0)
        ml.log_eval(step=20, epoch=1, metrics={"hr@10": 0.3, "ndcg@10": 0.17, "mrr": 0.1, "num_users": 7}, is_best=True)
        ml.log("error", step=21, epoch=1, loss=float("nan"), message="boom")
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    recs = [json.loads(line) for line in lines]  # every line parses on its own
    assert [r["kind"] for r in recs] == ["train", "eval", "error"]
    assert recs[1]["hr@10"] == 0.3 and recs[1]["step"] == 20 and recs[1]["epoch"] == 1 and recs[1]["is_best"] is True
    assert recs[2]["loss"] == "nan"  # strict JSON: no NaN literal
    assert "NaN" not in open(os.path.join(run, "metrics.jsonl")).read()
    assert read_metrics(os.path.join(run, "metrics.jsonl"), kind="eval")[0]["ndcg@10"] == 0.17
    tb = os.listdir(os.path.join(run, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in tb)


def test_train_log_file(tmp_path):
    logger = setup_logging(str(tmp_path), console=False)
    logger.info("hello %d", 42)
    for h in logger.handlers:
        h.flush()
    assert "hello 42" in open(tmp_path / "train.log").read()
    setup_logging(None, console=False)  # detaches the file handler again
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("hstu").handlers)
