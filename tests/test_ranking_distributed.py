"""task=ranking on the sharded path (trainer/parallel/ranking_embeddings.py) in 1 and 2 gloo ranks:

(a) a sharded 1-process run = the plain model trained with the same math (dense AdamW for the dense tower, the
    rowwise AdamW reference for the looked-up rows of every table): same losses step by step; its first loss
    equals the plain trainer's (same initialisation, nothing updated yet);
(b) 2 processes (row_wise and table_wise) train the same model as 1 process: losses, evaluations, best.pt;
(c) a 2-process run that crashes after a checkpoint and resumes continues bit-identically;
(d) evaluation on 2 ranks (predictions gathered on rank 0) equals 1 rank's on the same model;
(e) best.pt of a 2-process sharded run (the CLI's --nproc-per-node 2) is the plain model's state_dict and
    `hstu eval` on it reproduces the logged metrics.
Dropout is 0 so that rank-local dropout masks cannot make world sizes differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest
import torch

from dist_utils import run_distributed
from hstu.trainer.metrics_log import read_metrics

pytestmark = pytest.mark.timeout(300)

CONFIG = [
    "task=ranking", "data.name=synthetic", "data.max_seq_len=12", "data.batch_size=8", "data.eval_batch_size=16",
    "ranking.num_eval_targets=3", "ranking.max_side_tokens=6", "ranking.synthetic.num_users=40",
    "ranking.synthetic.num_items=60", "ranking.synthetic.num_clusters=3", "ranking.synthetic.creators_per_cluster=2",
    "ranking.synthetic.min_seq_len=6", "ranking.synthetic.max_seq_len=14", "ranking.synthetic.follow_prob=0.2",
    "model.arch=hstu", "model.variant=production", "model.embedding_dim=16", "model.num_layers=1",
    "model.num_heads=2", "model.attention_dim=8", "model.linear_dim=8", "model.dropout=0.0",
    "ranking.head_hidden_dim=16", "optim.lr=0.01", "optim.warmup_steps=2", "optim.weight_decay=0.01",
    "train.epochs=2", "train.eval_every_epochs=1", "train.log_every_steps=1", "train.progress=false",
    "train.tensorboard=false", "train.num_threads=1", "eval.selection_metric=ne_mean",
    "eval.popularity_baseline=true",
]  # 40 users / 8 = 5 steps per epoch, 10 steps
SHARDED = ["sharding.enabled=true"]


class Crash(RuntimeError):
    pass


def _cfg(run_dir: str, *extra: str):
    from hstu.trainer.config import load_config

    return load_config(None, CONFIG + [f"run_dir={run_dir}", *extra])


def _train_crashing(cfg: Any, crash_before_step: Optional[int]) -> None:
    """train(cfg); with crash_before_step, every rank raises Crash when that step is about to run."""
    import hstu.trainer.train as train_mod

    original = train_mod.train_step
    if crash_before_step is not None:
        def step(state, ctx, batch):
            if state.step + 1 == crash_before_step:
                raise Crash(f"injected before step {crash_before_step}")
            return original(state, ctx, batch)
        train_mod.train_step = step
    try:
        train_mod.train(cfg)
    except Crash:
        pass
    finally:
        train_mod.train_step = original


def _evaluate_plain(rank: int, world: int, run_dir: str) -> Dict[str, Any]:
    """best.pt of ``run_dir`` in the plain model, evaluated by this rank's eval slice (gathered on rank 0)."""
    from hstu.trainer.distributed import DistEnv
    from hstu.trainer.tasks import get_task

    cfg = _cfg(run_dir + "-eval")
    env = DistEnv(rank, world, rank, torch.device("cpu"), sharded=False)
    task = get_task(cfg)
    task.build_data(env)
    model = task.build_model(torch.device("cpu"))
    model.load_state_dict(torch.load(os.path.join(run_dir, "best.pt"), weights_only=True))
    ctx = SimpleNamespace(env=env, device=torch.device("cpu"))
    return {"metrics": task.evaluate(model, ctx), "predictions": task.predict(model, ctx.device, env)}


def _worker(rank: int, world: int, runs: List[Dict[str, Any]], evaluate: str = "") -> Dict[str, Any]:
    for run in runs:
        _train_crashing(_cfg(run["dir"], *run.get("extra", [])), run.get("crash"))
    return _evaluate_plain(rank, world, evaluate) if evaluate else {}


def _log(run_dir: str, kind: str) -> List[Dict[str, Any]]:
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"), kind=kind)


def _losses(run_dir: str) -> Dict[int, float]:
    return {r["step"]: r["loss"] for r in _log(run_dir, "train")}


def _best(run_dir: str) -> Dict[str, torch.Tensor]:
    return torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rk")
    d = {k: str(root / k) for k in ("w1", "w2_row", "w2_table", "w1_dlrm", "w2_dlrm", "ref2", "crash2")}
    ckpt, dlrm = ["checkpoint.every_steps=3"], ["model.arch=dlrm", "ranking.dlrm_mlp=[32]"]
    run_distributed(_worker, 1, ([{"dir": d["w1"], "extra": SHARDED},
                                  {"dir": d["w1_dlrm"], "extra": SHARDED + dlrm}],), timeout_s=240)
    w2 = run_distributed(_worker, 2, ([
        {"dir": d["w2_row"], "extra": SHARDED},
        {"dir": d["w2_table"], "extra": SHARDED + ["sharding.sharding_type=table_wise"]},
        {"dir": d["w2_dlrm"], "extra": SHARDED + dlrm + ["sharding.sharding_type=table_wise"]},
        {"dir": d["ref2"], "extra": SHARDED + ckpt},
        {"dir": d["crash2"], "extra": SHARDED + ckpt, "crash": 8},  # checkpoint of step 6 is the latest
        {"dir": d["crash2"], "extra": SHARDED + ckpt},  # resumes from step 6
    ], d["w2_row"]), timeout_s=280)
    return {"dirs": d, "eval2": w2}


def test_sharded_world_1_equals_plain_model_with_rowwise_adamw_reference(tmp_path):
    """(a) The sharded loop in one process (train()) against a hand-written plain loop with the same math."""
    from hstu.trainer.parallel.rowwise_adamw import rowwise_adamw_reference_step
    from hstu.trainer.train import seed_everything, train
    from hstu.trainer.tasks import get_task

    cfg = _cfg(str(tmp_path / "sharded"), *SHARDED, "train.epochs=1", "train.max_steps=5", "optim.warmup_steps=0")
    train(cfg)
    got = _losses(cfg.run_dir)
    plain_cfg = _cfg(str(tmp_path / "plain"), "train.epochs=1", "train.max_steps=1")
    train(plain_cfg)
    assert _losses(plain_cfg.run_dir)[1] == got[1]  # same init and batch: bit-identical first loss

    seed_everything(cfg.train.seed)
    task = get_task(cfg)
    data = task.build_data()
    model = task.build_model(torch.device("cpu"))
    tables = model.tables
    dense = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
    o = cfg.optim
    opt = torch.optim.AdamW(dense, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    state = {k: (torch.zeros_like(tables.table(k).weight), torch.zeros(tables.table(k).weight.shape[0]))
             for k in tables.table_keys()}
    seen: Dict[str, List[torch.Tensor]] = {}
    lookup = tables.lookup
    tables.lookup = lambda req: (seen.update({k: seen.get(k, []) + [v] for k, v in req.items()}), lookup(req))[1]
    want = {}
    for step, batch in enumerate(data.train_loader, 1):
        if step > 5:
            break
        seen.clear()
        model.zero_grad(set_to_none=True)
        loss = task.compute_loss(model, batch)
        loss.backward()
        want[step] = float(loss.detach())
        opt.step()
        assert set(seen) == set(tables.table_keys())  # every table is in the one lookup of every step
        with torch.no_grad():
            for k, parts in seen.items():
                w = tables.table(k).weight
                ids = torch.unique(torch.cat(parts))
                grads = w.grad[ids] if w.grad is not None else torch.zeros(ids.numel(), w.shape[1])
                new_w, m, v = rowwise_adamw_reference_step(w, *state[k], ids, grads, step, o.lr, tuple(o.betas),
                                                           o.eps, o.weight_decay)
                w.copy_(new_w)
                state[k] = (m, v)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor([got[s] for s in want]), torch.tensor(list(want.values())),
                               rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("one,name", [("w1", "w2_row"), ("w1", "w2_table"), ("w1_dlrm", "w2_dlrm")])
def test_two_processes_train_the_same_model_as_one(runs, one, name):
    """(b) losses, evaluations and best.pt of 2 ranks = 1 rank (global batches, global-mean loss)."""
    d = runs["dirs"]
    l1, l2 = _losses(d[one]), _losses(d[name])
    assert sorted(l1) == sorted(l2) == list(range(1, 11))
    torch.testing.assert_close(torch.tensor([l2[s] for s in l1]), torch.tensor(list(l1.values())),
                               rtol=1e-5, atol=1e-6)
    e1, e2 = _log(d[one], "eval"), _log(d[name], "eval")
    assert [e["epoch"] for e in e1] == [e["epoch"] for e in e2] == [1, 2]
    for a, b in zip(e1, e2):
        assert a["num_impressions"] == b["num_impressions"] == 120  # 40 users x 3 candidates, all ranks
        for k in ("ne_mean", "auc_mean", "gauc_mean", "ne_click", "auc_share"):
            assert b[k] == pytest.approx(a[k], abs=2e-5), k
    b1, b2 = _best(d[one]), _best(d[name])
    assert b1.keys() == b2.keys() and "tables.items.table.weight" in b1 and "tables.contextual.0.weight" in b1
    for k in b1:
        torch.testing.assert_close(b2[k], b1[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    base1, base2 = _log(d[one], "baseline"), _log(d[name], "baseline")
    assert base1[0]["name"] == "item_rate" and base1[0]["ne_mean"] == base2[0]["ne_mean"]


def test_two_process_crash_and_resume_is_bit_identical(runs):
    """(c) rank-sharded tables + rowwise AdamW state, dense AdamW, LR schedule, loader position from DCP."""
    d = runs["dirs"]
    ref, resumed = _losses(d["ref2"]), _losses(d["crash2"])
    assert sorted(resumed) == list(range(1, 11))
    assert resumed == ref
    assert "resumed from" in open(os.path.join(d["crash2"], "train.log")).read()
    e_ref, e_res = _log(d["ref2"], "eval"), _log(d["crash2"], "eval")
    assert [{k: v for k, v in e.items() if k not in ("time", "seconds")} for e in e_res] == \
           [{k: v for k, v in e.items() if k not in ("time", "seconds")} for e in e_ref]
    ref_best, res_best = _best(d["ref2"]), _best(d["crash2"])
    assert all(torch.equal(ref_best[k], res_best[k]) for k in ref_best)


def test_eval_on_two_ranks_gathers_exactly_what_one_rank_predicts(runs):
    """(d) the same (plain) model evaluated by 2 ranks, predictions gathered on rank 0, vs 1 rank."""
    from hstu.trainer.tasks import get_task

    run_dir = runs["dirs"]["w2_row"]
    two = runs["eval2"]
    assert two[0]["predictions"] is not None and two[1]["predictions"] is None  # gathered on rank 0 only
    assert two[0]["metrics"] == two[1]["metrics"]  # broadcast
    task = get_task(_cfg(run_dir + "-eval1"))
    task.build_data()
    model = task.build_model(torch.device("cpu"))
    model.load_state_dict(_best(run_dir))
    one = task.predict(model, torch.device("cpu"))
    p2 = two[0]["predictions"]
    assert p2.keys() == one.keys()
    assert (p2["users"] == one["users"]).all() and (p2["labels"] == one["labels"]).all()  # 1-process order
    torch.testing.assert_close(torch.from_numpy(p2["logits"]), torch.from_numpy(one["logits"]), rtol=0, atol=2e-6)
    m1 = task.evaluate(model, torch.device("cpu"))
    assert m1.keys() == two[0]["metrics"].keys()
    for k, v in m1.items():
        assert two[0]["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_cli_two_process_sharded_run_best_pt_reproduces_with_hstu_eval(tmp_path):
    """(e) `hstu train --nproc-per-node 2 ... sharding.enabled=true` then `hstu eval` of its best.pt."""
    from hstu.trainer.cli import evaluate_run

    run_dir = str(tmp_path / "cli2")
    cmd = [sys.executable, "-m", "hstu.trainer.cli", "train", "--nproc-per-node", "2", "--run-dir", run_dir,
           "--json", *CONFIG, *SHARDED, "checkpoint.every_steps=5", "checkpoint.keep_last=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(open(os.path.join(run_dir, "results.json")).read())
    assert result["steps"] == 10 and result["config"]["sharding"]["enabled"]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000010"))
    state = _best(run_dir)
    assert not any("collection" in k for k in state)  # the plain model's names
    best = result["best_metrics"]
    again = evaluate_run(run_dir)["metrics"]
    assert again["num_impressions"] == best["num_impressions"] == 120
    for k in ("ne_mean", "auc_mean", "gauc_mean", "ne_like", "gauc_complete"):
        assert again[k] == pytest.approx(best[k], abs=1e-6), k

    # the sharded DCP checkpoint of the best epoch reads back (one process, no group) as exactly best.pt, and
    # `hstu export --checkpoint <it>` / `--checkpoint latest` build artifacts from the sharded checkpoints
    import hstu.serving
    from hstu.serving.export import resolve_checkpoint
    from hstu.trainer.cli import main
    from hstu.trainer.plain_weights import iter_plain_tensors

    best_ckpt = os.path.join(run_dir, "checkpoints", f"step_{5 * result['best_epoch']:08d}")
    from_dcp = dict(iter_plain_tensors(best_ckpt))
    assert from_dcp.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(from_dcp[k].float(), v.float(), rtol=0, atol=0, msg=k)
    for which, ckpt in (("best", best_ckpt), ("latest", "latest")):
        out = str(tmp_path / f"art-{which}")
        assert main(["export", "--run-dir", run_dir, "--out", out, "--checkpoint", ckpt]) == 0
        art = hstu.serving.load(out, task="ranking")
        assert art.manifest["source"]["checkpoint"] == os.path.abspath(resolve_checkpoint(run_dir, ckpt))


def test_ranking_loader_slices_partition_every_global_batch():
    """Rank slices of every global batch concatenate to the 1-process batch; equal batch counts per rank."""
    import numpy as np

    from hstu.trainer.data.ranking import build_ranking_loaders, chronological_split, load_ranking_data

    cfg = _cfg("unused", "ranking.synthetic.num_users=23")
    data = load_ranking_data(cfg, progress=False)
    split = chronological_split(data, 12, 3)
    single = build_ranking_loaders(data, split, 5, 5, 3, 6)
    for world in (2, 3):
        parts = [build_ranking_loaders(data, split, 5, 5, 3, 6, r, world) for r in range(world)]
        for which in (0, 1):  # train (shuffled, epoch 2), eval
            plans = [p[which].plan(2) for p in parts]
            ref = single[which].plan(2)
            assert len({len(p) for p in plans} | {len(p[which]) for p in parts}) == 1
            for step, slices in enumerate(zip(*plans)):
                assert all(s.size > 0 for s in slices)
                if step < len(plans[0]) - 1:
                    assert np.array_equal(np.concatenate(slices), ref[step])
            assert np.array_equal(np.sort(np.concatenate([np.concatenate(p) for p in plans])), np.arange(23))


def test_ranking_refuses_the_prefetch_pipeline():
    from hstu.trainer.config import ConfigError
    from hstu.trainer.train import check_train_config

    check_train_config(_cfg("unused", *SHARDED))  # sharded ranking is accepted
    with pytest.raises(ConfigError, match="sharding.pipeline"):
        check_train_config(_cfg("unused", *SHARDED, "sharding.pipeline=prefetch"))


def test_collection_tables_copy_the_plain_tables_and_names_map_back():
    """Unsharded CollectionRankingTables: same lookups as the plain tables (one KJT, id 0 = zero row), and
    plain_name maps every collection weight onto the plain model's state_dict entry it was copied from."""
    from hstu.trainer.parallel.ranking_embeddings import CollectionRankingTables, plain_name
    from hstu.trainer.tasks import get_task

    task = get_task(_cfg("unused"))
    task.build_data()
    model = task.build_model(torch.device("cpu"))
    plain_sd = model.state_dict()
    coll = CollectionRankingTables(model.tables)
    batch = next(iter(task.eval_loader))
    torch.testing.assert_close(coll.token_embeddings(batch, True), model.tables.token_embeddings(batch, True),
                               rtol=0, atol=0)
    got = coll.lookup({"item": torch.tensor([0, 3]), "side_1": torch.tensor([0])})
    assert got.keys() == {"item", "side_1"} and not got["item"][0].any() and not got["side_1"].any()
    model.tables = coll
    for key, value in model.state_dict().items():
        assert plain_name(key) in plain_sd, key
        assert torch.equal(value, plain_sd[plain_name(key)]), key
    assert {plain_name(k) for k in model.state_dict()} == set(plain_sd)
