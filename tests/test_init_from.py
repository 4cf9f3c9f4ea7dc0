"""``train.init_from``: a run starts from another run's weights — plain best.pt -> sharded run and a sharded DCP
checkpoint -> plain run, for retrieval and ranking (trainer/plain_weights.py). With lr = 0 one training step
changes nothing, so the new run's best.pt must equal the source's weights exactly; bad sources -> ConfigError."""

from __future__ import annotations

import os
from typing import List

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.timeout(300)

COMMON = ["train.epochs=1", "train.log_every_steps=1", "train.progress=false", "train.tensorboard=false",
          "train.num_threads=1", "eval.popularity_baseline=false", "model.dropout=0.0", "optim.warmup_steps=1"]
TASKS = {
    "retrieval": ["data.name=synthetic", "data.synthetic.num_users=40", "data.synthetic.num_items=50",
                  "data.synthetic.max_seq_len=10", "data.max_seq_len=10", "data.batch_size=16",
                  "data.eval_batch_size=40", "model.embedding_dim=8", "model.attention_dim=4", "model.linear_dim=4",
                  "model.num_heads=2", "loss.num_negatives=8", "eval.ks=[10]", "eval.ndcg_ks=[10]"],
    "ranking": ["task=ranking", "data.name=synthetic", "data.max_seq_len=12", "data.batch_size=8",
                "data.eval_batch_size=16", "ranking.num_eval_targets=3", "ranking.max_side_tokens=6",
                "ranking.synthetic.num_users=24", "ranking.synthetic.num_items=40",
                "ranking.synthetic.num_clusters=3", "ranking.synthetic.creators_per_cluster=2",
                "ranking.synthetic.min_seq_len=6", "ranking.synthetic.max_seq_len=14", "model.arch=hstu",
                "model.variant=production", "model.embedding_dim=8", "model.num_layers=1", "model.num_heads=2",
                "model.attention_dim=4", "model.linear_dim=4", "ranking.head_hidden_dim=8",
                "eval.selection_metric=ne_mean"],
}


def _train(rank: int, world: int, overrides: List[str]) -> None:
    from hstu.trainer.config import load_config
    from hstu.trainer.train import train

    train(load_config(None, overrides))


def _best(run_dir: str):
    return torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)


@pytest.mark.parametrize("task", ["retrieval", "ranking"])
def test_weights_move_between_plain_and_sharded_runs(tmp_path, task):
    base = TASKS[task] + COMMON + [f"data.cache_dir={tmp_path / 'cache'}"]
    src, sharded, plain = (str(tmp_path / n) for n in ("src", "sharded", "plain"))
    run_distributed(_train, 1, (base + [f"run_dir={src}", "train.max_steps=3", "optim.lr=0.01"],), timeout_s=120)
    frozen = ["train.max_steps=1", "optim.lr=0.0"]
    # plain best.pt -> sharded run (world 1, rowwise AdamW), checkpoint at its only step
    run_distributed(_train, 1, (base + frozen + [f"run_dir={sharded}", "sharding.enabled=true",
                                                  "checkpoint.every_steps=1", f"train.init_from={src}/best.pt"],),
                    timeout_s=120)
    # the sharded run's DCP checkpoint -> plain run
    ckpt = os.path.join(sharded, "checkpoints", "step_00000001")
    run_distributed(_train, 1, (base + frozen + [f"run_dir={plain}", f"train.init_from={ckpt}"],), timeout_s=120)
    fresh = str(tmp_path / "fresh")  # the same frozen run without init_from: its own init, not the source's
    run_distributed(_train, 1, (base + frozen + [f"run_dir={fresh}"],), timeout_s=120)
    want = _best(src)
    assert any(not torch.equal(_best(fresh)[k], want[k]) for k in want)
    for run in (sharded, plain):
        got = _best(run)
        assert got.keys() == want.keys(), run
        for k in want:
            torch.testing.assert_close(got[k].float(), want[k].float(), rtol=0, atol=0, msg=f"{run}: {k}")


def test_bad_init_from_is_a_config_error(tmp_path):
    from hstu.trainer.config import ConfigError, load_config
    from hstu.trainer.train import train

    base = TASKS["retrieval"] + COMMON + [f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1"]
    with pytest.raises(ConfigError, match="train.init_from.*does not exist"):
        train(load_config(None, base + [f"run_dir={tmp_path / 'a'}", f"train.init_from={tmp_path / 'nope.pt'}"]))
    assert not (tmp_path / "a").exists()  # refused before the run directory is created
    other = tmp_path / "other.pt"
    torch.save({"item_embeddings.table.weight": torch.zeros(3, 8)}, other)
    with pytest.raises(ConfigError, match=r"does not fit this model.*missing.*shapes"):
        train(load_config(None, base + [f"run_dir={tmp_path / 'b'}", f"train.init_from={other}"]))
