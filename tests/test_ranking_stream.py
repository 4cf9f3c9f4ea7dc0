"""Streaming synthetic ranking data (``ranking.synthetic.stream``; trainer/data/ranking_stream.py). The
materialised path (generate_ranking -> chronological_split -> build_ranking_loaders) is the reference:

- train batches equal the materialised RankingLoader's, field by field, for world sizes 1, 2 and 3 (every
  rank), 2 epochs, with and without the background prefetch thread; users in any order generate alone;
- resume mid-epoch: a state_dict after k batches continues with exactly the remaining batches (also from a
  materialised loader's state, and after a prefetching loop stopped early); mismatched state names the key;
- end to end through train(): streaming with eval_users = num_users gives the same losses, evaluations and
  item-rate baseline as the materialised run; eval_users < num_users evaluates exactly those users;
- 2 processes (sharded tables) train the same losses as 1 process, and a 2-process crash + resume is
  bit-identical;
- config errors name the key and value.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from hstu.trainer.config import ConfigError, load_config
from hstu.trainer.data.errors import DataError
from hstu.trainer.metrics_log import read_metrics

pytestmark = pytest.mark.timeout(300)

BASE = [
    "task=ranking", "data.name=synthetic", "data.max_seq_len=12", "data.batch_size=8", "data.eval_batch_size=16",
    "ranking.num_eval_targets=3", "ranking.max_side_tokens=6", "ranking.synthetic.num_users=41",
    "ranking.synthetic.num_items=60", "ranking.synthetic.num_clusters=3", "ranking.synthetic.creators_per_cluster=2",
    "ranking.synthetic.min_seq_len=2", "ranking.synthetic.max_seq_len=18", "ranking.synthetic.follow_prob=0.2",
]  # 41 users / 8 = 6 global batches, the last of 1 user (merged into the one before with 2 or 3 ranks)
TRAIN = [
    "model.arch=hstu", "model.variant=production", "model.embedding_dim=16", "model.num_layers=1",
    "model.num_heads=2", "model.attention_dim=8", "model.linear_dim=8", "model.dropout=0.0",
    "ranking.head_hidden_dim=16", "optim.lr=0.01", "optim.warmup_steps=2", "train.epochs=2",
    "train.eval_every_epochs=1", "train.log_every_steps=1", "train.progress=false", "train.tensorboard=false",
    "train.num_threads=1", "eval.selection_metric=ne_mean", "eval.popularity_baseline=true",
]
STREAM = ["ranking.synthetic.stream=true", "ranking.synthetic.eval_users=41"]
SHARDED = ["sharding.enabled=true"]


def _cfg(*extra: str):
    return load_config(None, BASE + list(extra))


def _materialised(cfg, rank: int = 0, world: int = 1):
    from hstu.trainer.data.ranking import build_ranking_loaders, chronological_split, load_ranking_data

    data = load_ranking_data(cfg, progress=False)
    split = chronological_split(data, cfg.data.max_seq_len, cfg.ranking.num_eval_targets)
    assert split.rows.size == data.num_users == cfg.ranking.synthetic.num_users  # min_seq_len 2: all eligible
    return build_ranking_loaders(data, split, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.seed,
                                 cfg.ranking.max_side_tokens, rank, world)


def _streaming(cfg, rank: int = 0, world: int = 1):
    from hstu.trainer.data.ranking_stream import build_streaming_ranking_data

    return build_streaming_ranking_data(cfg, rank, world)


def _assert_batches_equal(got: List[Any], want: List[Any]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        for f in dataclasses.fields(b):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if isinstance(y, torch.Tensor):
                assert isinstance(x, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), (i, f.name)
            else:
                assert x == y, (i, f.name)


# ------------------------------------------------------------------------------------------------ loader


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_streaming_batches_equal_the_materialised_loader(world, prefetch):
    cfg = _cfg(*STREAM, f"ranking.synthetic.prefetch_batches={prefetch}")
    for rank in range(world):
        ref, _ = _materialised(cfg, rank, world)
        stream = _streaming(cfg, rank, world)[0]
        assert len(stream) == len(ref) == (6 if world == 1 else 5) and stream.num_sequences == ref.num_sequences
        for epoch in (0, 1):
            ref.set_epoch(epoch)
            stream.set_epoch(epoch)
            want = list(ref)
            _assert_batches_equal(list(stream), want)
            assert stream.state_dict() == ref.state_dict()


def test_generate_users_in_any_order_equal_the_same_rows_of_generate_ranking():
    from hstu.trainer.data.synthetic_ranking import generate_ranking, generate_users

    s = _cfg().ranking.synthetic
    whole = generate_ranking(s)
    users = np.array([17, 3, 40, 3])
    part = generate_users(s, users)
    assert part.user_ids.tolist() == [18, 4, 41, 4]
    for b, u in enumerate(users):
        lo, hi, plo, phi = whole.offsets[u], whole.offsets[u + 1], part.offsets[b], part.offsets[b + 1]
        for name in ("item_ids", "timestamps", "actions", "labels"):
            assert np.array_equal(getattr(part, name)[plo:phi], getattr(whole, name)[lo:hi]), name
        assert np.array_equal(part.context[b], whole.context[u])
        ws, ps = slice(whole.side.offsets[u], whole.side.offsets[u + 1]), slice(part.side.offsets[b],
                                                                                  part.side.offsets[b + 1])
        for name in ("feature", "values", "timestamps", "insert_at"):
            assert np.array_equal(getattr(part.side, name)[ps], getattr(whole.side, name)[ws]), name
    with pytest.raises(DataError, match="empty"):
        generate_users(s, np.zeros(0, np.int64))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_mid_epoch_continues_with_the_remaining_batches(prefetch):
    cfg = _cfg(*STREAM, f"ranking.synthetic.prefetch_batches={prefetch}")
    for rank, world in ((0, 1), (1, 2)):
        full = _streaming(cfg, rank, world)[0]
        full.set_epoch(1)
        want = list(full)
        first = _streaming(cfg, rank, world)[0]
        first.set_epoch(1)
        taken = []
        for batch in first:  # stop after 2 batches; a prefetching loop has generated more than it handed out
            taken.append(batch)
            if len(taken) == 2:
                break
        state = first.state_dict()
        assert state["epoch"] == 1 and state["batches_consumed"] == 2
        again = _streaming(cfg, rank, world)[0]
        again.load_state_dict(state)
        _assert_batches_equal(taken + list(again), want)
        assert again.state_dict()["epoch"] == 2 and again.state_dict()["batches_consumed"] == 0
        # a materialised loader's position resumes the streaming loader too (same plan)
        ref, _ = _materialised(cfg, rank, world)
        ref.set_epoch(1)
        it = iter(ref)
        next(it)
        from_ref = _streaming(cfg, rank, world)[0]
        from_ref.load_state_dict(ref.state_dict())
        _assert_batches_equal(list(from_ref), want[1:])


@pytest.mark.parametrize("override,key", [("ranking.synthetic.num_users=40", "num_sequences"),
                                          ("data.batch_size=9", "batch_size"), ("data.seed=5", "seed")])
def test_resume_with_other_data_names_the_key(override, key):
    state = _streaming(_cfg(*STREAM))[0].state_dict()
    other = _streaming(_cfg(*STREAM, override, "ranking.synthetic.eval_users=40"))[0]
    with pytest.raises(DataError, match=f"loader state has {key}="):
        other.load_state_dict(state)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_users_without_two_events_are_refused(prefetch):
    """(with prefetch: the error raised in the background thread reaches the training loop)"""
    from hstu.trainer.data.ranking_stream import StreamingRankingLoader, SyntheticUsers

    s = dataclasses.replace(_cfg().ranking.synthetic, min_seq_len=1, max_seq_len=1)
    loader = StreamingRankingLoader(SyntheticUsers(s), 5, 2, max_seq_len=4, num_eval_targets=1,
                                    prefetch_batches=prefetch)
    with pytest.raises(DataError, match=">= 2 events"):
        next(iter(loader))


@pytest.mark.parametrize("overrides,match", [
    (["ranking.synthetic.stream=true"], "'ranking.synthetic.eval_users' = 0 must be in 1..41"),
    (["ranking.synthetic.stream=true", "ranking.synthetic.eval_users=42"], "'ranking.synthetic.eval_users' = 42"),
    (["ranking.synthetic.eval_users=5"], "'ranking.synthetic.eval_users' = 5 needs ranking.synthetic.stream=true"),
    (["ranking.synthetic.eval_users=-1"], "'ranking.synthetic.eval_users' = -1 must be >= 0"),
    (["ranking.synthetic.prefetch_batches=2"], "'ranking.synthetic.prefetch_batches' = 2 needs"),
    (STREAM + ["ranking.synthetic.prefetch_batches=-1"], "'ranking.synthetic.prefetch_batches' = -1 must be >= 0"),
    (STREAM + ["ranking.synthetic.min_seq_len=1"], "'ranking.synthetic.min_seq_len' = 1 must be >= 2"),
    (STREAM + ["task=retrieval"], "'ranking.synthetic.stream' = True needs task=ranking and data.name=synthetic"),
    (STREAM + ["data.name=ml-1m"], "got task='ranking', data.name='ml-1m'"),
])
def test_config_errors_name_key_and_value(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*overrides)


def test_check_config_refuses_a_mutated_config():
    from hstu.trainer.tasks import get_task

    cfg = _cfg(*STREAM, *TRAIN)
    get_task(cfg).check_config()
    cfg.ranking.synthetic.eval_users = 0
    with pytest.raises(ConfigError, match="eval_users"):
        get_task(cfg).check_config()


# ------------------------------------------------------------------------------------------------ train()


def _log(run_dir: str, kind: str) -> List[Dict[str, Any]]:
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind=kind)


def _losses(run_dir: str) -> Dict[int, float]:
    return {r["step"]: r["loss"] for r in _log(run_dir, "train")}


def _strip(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in records]


def test_train_streaming_equals_materialised_and_evaluates_eval_users(tmp_path):
    from hstu.trainer.tasks import get_task
    from hstu.trainer.train import train

    dirs = {k: str(tmp_path / k) for k in ("mat", "stream", "part")}
    train(_cfg(*TRAIN, f"run_dir={dirs['mat']}"))
    res = train(_cfg(*TRAIN, *STREAM, "ranking.synthetic.prefetch_batches=1", f"run_dir={dirs['stream']}"))
    assert res.steps == 12
    assert _losses(dirs["stream"]) == _losses(dirs["mat"])  # same init, same batches: bit-identical
    for kind in ("eval", "valid", "baseline"):
        got, want = _strip(_log(dirs["stream"], kind)), _strip(_log(dirs["mat"], kind))
        assert got == want and want, kind
    from hstu.trainer.data.synthetic_ranking import generate_ranking

    k = np.minimum(3, generate_ranking(_cfg().ranking.synthetic).lengths() - 1)  # candidates per user
    assert _log(dirs["stream"], "eval")[0]["num_impressions"] == k.sum()
    # eval_users < num_users: the same training, evaluation on exactly the first 10 users
    train(_cfg(*TRAIN, *STREAM, "ranking.synthetic.eval_users=10", f"run_dir={dirs['part']}"))
    assert _losses(dirs["part"]) == _losses(dirs["mat"])
    ev = _log(dirs["part"], "eval")
    assert [e["num_impressions"] for e in ev] == [k[:10].sum()] * 2 and [e["num_users"] for e in ev] == [10, 10]
    task = get_task(_cfg(*TRAIN, *STREAM, "ranking.synthetic.eval_users=10"))
    task.build_data()
    model = task.build_model(torch.device("cpu"))
    model.load_state_dict(torch.load(os.path.join(dirs["part"], "best.pt"), weights_only=True))
    p = task.predict(model, torch.device("cpu"))
    assert sorted(set(p["users"].tolist())) == list(range(1, 11))
    # best.pt = the epoch with the best VALIDATION NE (first minimum); `hstu eval` scores the test candidates
    selected = min(_log(dirs["part"], "valid"), key=lambda e: e["ne_mean"])["epoch"]
    best = next(e for e in ev if e["epoch"] == selected)
    from hstu.trainer.cli import evaluate_run

    again = evaluate_run(dirs["part"])["metrics"]  # `hstu eval` of a streaming run: the same eval users
    assert again["num_users"] == 10 and again["ne_mean"] == pytest.approx(best["ne_mean"], abs=1e-6)


# ------------------------------------------------------------------------------------------------ 2 processes


class Crash(RuntimeError):
    pass


def _train(run_dir: str, extra: List[str], crash_before_step: Optional[int] = None) -> None:
    import hstu.trainer.train as train_mod

    original = train_mod.train_step
    if crash_before_step is not None:
        def step(state, ctx, batch):
            if state.step + 1 == crash_before_step:
                raise Crash(f"injected before step {crash_before_step}")
            return original(state, ctx, batch)
        train_mod.train_step = step
    try:
        train_mod.train(_cfg(*TRAIN, *STREAM, *SHARDED, f"run_dir={run_dir}", *extra))
    except Crash:
        pass
    finally:
        train_mod.train_step = original


def _worker(rank: int, world: int, runs: List[Dict[str, Any]]) -> None:
    for run in runs:
        _train(run["dir"], run.get("extra", []), run.get("crash"))


def test_two_process_streaming_run_equals_one_process_and_resumes_exactly(tmp_path):
    d = {k: str(tmp_path / k) for k in ("w1", "w2", "crash2")}
    even = ["ranking.synthetic.num_users=40", "ranking.synthetic.eval_users=40"]  # 5 global batches of 8
    ckpt = even + ["checkpoint.every_steps=3", "ranking.synthetic.prefetch_batches=2"]
    run_distributed(_worker, 2, ([{"dir": d["w2"], "extra": ckpt},
                                  {"dir": d["crash2"], "extra": ckpt, "crash": 9},  # resumes from step 6
                                  {"dir": d["crash2"], "extra": ckpt}],), timeout_s=240)
    _train(d["w1"], even)  # the sharded path in this process (a private group of 1)
    l1, l2 = _losses(d["w1"]), _losses(d["w2"])
    assert sorted(l1) == sorted(l2) == list(range(1, 11))
    torch.testing.assert_close(torch.tensor([l2[s] for s in l1]), torch.tensor(list(l1.values())),
                               rtol=1e-5, atol=1e-6)
    e1, e2 = _log(d["w1"], "eval"), _log(d["w2"], "eval")
    assert [e["num_impressions"] for e in e2] == [e["num_impressions"] for e in e1] and len(e1) == 2
    for a, b in zip(e1, e2):
        for k in ("ne_mean", "auc_mean", "gauc_mean"):
            assert b[k] == pytest.approx(a[k], abs=2e-5), k
    assert _log(d["w1"], "baseline")[0]["ne_mean"] == _log(d["w2"], "baseline")[0]["ne_mean"]
    # crash before step 9, resumed from the checkpoint of step 6 (one batch into epoch 2): bit-identical
    assert "resumed from" in open(os.path.join(d["crash2"], "train.log")).read()
    assert _losses(d["crash2"]) == l2
    assert _strip(_log(d["crash2"], "eval")) == _strip(e2)
