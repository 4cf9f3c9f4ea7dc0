"""``hstu plan`` against the plan the trainer really builds (trainer/parallel/plan.py).

Two gloo ranks build the sharded model exactly as train() does (meta tables, ``hd.shard_model``) for retrieval
row- and column-wise and ranking table-wise; ``hstu plan --world-size 2 --compute-device cpu`` with the same
config must report the same sharding type and shards (rank, offsets, sizes) per table, and per rank exactly the
weight and optimizer-state bytes the ranks' kernels hold. Plus the CLI's errors and the JSON file.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.timeout(300)

RETRIEVAL = ["data.name=synthetic", "data.synthetic.num_users=64", "data.synthetic.num_items=300",
             "data.synthetic.max_seq_len=12", "data.max_seq_len=12", "model.embedding_dim=16",
             "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2", "model.num_layers=1"]
RANKING = ["task=ranking", "data.name=synthetic", "data.max_seq_len=12", "ranking.max_side_tokens=6",
           "ranking.synthetic.num_users=40", "ranking.synthetic.num_items=60", "ranking.synthetic.num_clusters=3",
           "ranking.synthetic.creators_per_cluster=2", "ranking.synthetic.min_seq_len=6",
           "ranking.synthetic.max_seq_len=14", "model.arch=hstu", "model.variant=production",
           "model.embedding_dim=16", "model.num_layers=1", "model.num_heads=2", "model.attention_dim=8",
           "model.linear_dim=8", "ranking.head_hidden_dim=16"]
CASES = {"retrieval_row": RETRIEVAL + ["sharding.sharding_type=row_wise"],
         "retrieval_column": RETRIEVAL + ["sharding.sharding_type=column_wise", "sharding.weight_dtype=bfloat16"],
         "ranking_table": RANKING + ["sharding.sharding_type=table_wise"]}


def _overrides(case: str, tmp: str) -> List[str]:
    return CASES[case] + [f"data.cache_dir={tmp}/cache", "sharding.table_init=per_shard"]


def _built_plans(rank: int, world: int, tmp: str) -> Dict[str, Any]:
    """Per case: the trainer's DMP plan {table: (type, [(rank, offsets, sizes)])} and this rank's kernel bytes."""
    from hstu.modules.embeddings import tables_on
    from hstu.trainer import distributed as hd
    from hstu.trainer.config import load_config
    from hstu.trainer.parallel.sharding import rowwise_kernels
    from hstu.trainer.tasks import get_task

    out = {}
    for case in CASES:
        cfg = load_config(None, _overrides(case, tmp) + ["sharding.enabled=true", f"run_dir={tmp}/run"])
        env = hd.setup(cfg)
        task = get_task(cfg)
        task.build_data(env)
        with tables_on("meta"):  # as train() does for table_init=per_shard
            model = task.build_model(env.device)
        dmp, _ = hd.shard_model(model, cfg, env, task)
        plan = {name: (ps.sharding_type, sorted((int(md.placement.rank()), list(md.shard_offsets),
                                                 list(md.shard_sizes)) for md in ps.sharding_spec.shards))
                for module_plan in dmp.plan.plan.values() for name, ps in module_plan.items()}
        engines = [k.emb_module for k in rowwise_kernels(dmp)]
        weights = sum(e.weights.numel() * e.weights.element_size() for e in engines)
        state = sum(t.numel() * t.element_size() for e in engines for t in (e.momentum1, e.momentum2))
        out[case] = {"plan": plan, "weights": weights, "state": state}
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("plan"))
    return tmp, run_distributed(_built_plans, world_size=2, args=(tmp,), timeout_s=240)


def _cli(*argv: str) -> int:
    from hstu.trainer.cli import main

    return main(["plan", *argv])


@pytest.mark.parametrize("case", list(CASES))
def test_plan_equals_what_the_trainer_builds(built, case, tmp_path, capsys):
    tmp, ranks = built
    out = str(tmp_path / "plan.json")
    assert _cli("--world-size", "2", "--compute-device", "cpu", "--output", out, *_overrides(case, tmp)) == 0
    report = json.load(open(out))
    want = ranks[0][case]["plan"]
    assert ranks[1][case]["plan"] == want  # one collective plan
    got = {name: (t["sharding_type"], sorted((s["rank"], [s["row_offset"], s["col_offset"]],
                                              [s["rows"], s["cols"]]) for s in t["shards"]))
           for name, t in report["tables"].items()}
    assert got == want
    for r in (0, 1):
        assert report["ranks"][r]["weights"] == ranks[r][case]["weights"], (case, r)
        assert report["ranks"][r]["state"] == ranks[r][case]["state"], (case, r)
        assert report["ranks"][r]["ddr"] == report["ranks"][r]["weights"] + report["ranks"][r]["state"]  # cpu
        # TorchRec's estimate covers the exact shard bytes (+ its I/O buffers) on the same memory
        assert report["ranks"][r].get("planner_ddr", 0) >= report["ranks"][r]["ddr"]
        assert report["ranks"][r].get("planner_hbm", 0) == 0
    if case == "ranking_table":
        assert set(report["tables"]) >= {"item_table", "action_table"}
    printed = capsys.readouterr().out
    assert "rank 1: weights" in printed and f"plan written to {out}" in printed


def test_plan_for_a_table_no_host_holds_and_its_errors(tmp_path, capsys):
    out = str(tmp_path / "big.json")
    rows, dim = 25_000_001, 64  # 25M items + padding
    assert _cli("--world-size", "8", "--nodes", "2", "--hbm-bytes", "80e9", "--ddr-bytes", "200e9",
                "--num-items", str(rows - 1), f"model.embedding_dim={dim}", "--output", out) == 0
    report = json.load(open(out))
    table = report["tables"]["item_id_table"]
    assert (table["rows"], table["dim"], table["sharding_type"]) == (rows, dim, "row_wise")
    assert sum(s["rows"] for s in table["shards"]) == rows and len(table["shards"]) == 8
    assert report["topology"]["local_world_size"] == 4
    total_w = sum(r["weights"] for r in report["ranks"])
    assert total_w == rows * dim * 4
    assert sum(r["state"] for r in report["ranks"]) == rows * (dim + 1) * 4
    r0 = report["ranks"][0]
    assert r0["hbm"] == r0["weights"] + r0["state"] and r0["ddr"] == 0  # cuda, state_placement=device
    assert r0["bf16_host_state_hbm"] * 2 == r0["weights"] and r0["bf16_host_state_ddr"] == r0["state"]
    assert r0["hbm"] <= r0["planner_hbm"] <= 80e9
    capsys.readouterr()
    assert _cli("--world-size", "3", "--nodes", "2", "--num-items", "10") == 2
    assert "--world-size 3 must be >= 1 and a multiple of --nodes 2" in capsys.readouterr().err
    assert _cli("--world-size", "2", "--hbm-bytes", "1e6", "--num-items", str(rows - 1),
                f"model.embedding_dim={dim}") == 2
    assert "no sharding plan fits 2 ranks with hbm_cap_bytes=1000000" in capsys.readouterr().err
    assert _cli("--world-size", "2", "--num-items", "10", "task=ranking") == 2
    assert "--num-items is for task=retrieval" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()
