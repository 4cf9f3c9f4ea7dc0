"""Per-shard table initialisation (sharding.table_init=per_shard, trainer/parallel/table_init.py).

(a) the seeded values are a function of (seed, table, row) only: any row/column window of a table equals that
    window of the whole table, drawn from an independently seeded block generator; row 0 is zero;
(b) tables built on the meta device (retrieval item table, ranking tables, item-tower feature tables) and sharded
    by DMP on 1, 2 and 4 gloo ranks, table-, row- and column-wise, gather to the same tables, and each rank holds
    only its shards;
(c) the trainer's per_shard run (with item features) at world size 1 and 2 starts from the same item and feature
    tables (and the config rules).
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.timeout(300)

ROWS, DIM, SEED = 5000, 16, 7  # 5000 rows: crosses the 4096-row block boundary
FEATURE_ROWS = 24  # the item-tower feature table of (b)


def test_windows_equal_the_whole_table_and_blocks_are_independently_seeded():
    from hstu.trainer.parallel.table_init import BLOCK_ROWS, block_seed, fill_rows

    full = fill_rows(torch.empty(ROWS, DIM), SEED, "t")
    # independent reference of block 1: its own generator, full width, GR's truncated normal
    ref = torch.empty(BLOCK_ROWS, DIM)
    torch.nn.init.trunc_normal_(ref, std=0.02, a=-0.04, b=0.04,
                                generator=torch.Generator().manual_seed(block_seed(SEED, "t", 1)))
    assert torch.equal(full[BLOCK_ROWS:], ref[:ROWS - BLOCK_ROWS])
    assert torch.count_nonzero(full[0]) == 0 and torch.count_nonzero(full[1:]) == (ROWS - 1) * DIM
    assert full.abs().max() <= 0.04 and 0.015 < full[1:].std() < 0.02  # trunc at 2 std: std ~0.88 * 0.02
    window = fill_rows(torch.empty(300, 3), SEED, "t", row_offset=4000, col_offset=13, dim=DIM)
    assert torch.equal(window, full[4000:4300, 13:16])  # a row- and column-wise shard across the block boundary
    bf16 = fill_rows(torch.empty(ROWS, DIM, dtype=torch.bfloat16), SEED, "t")
    assert torch.equal(bf16, full.bfloat16())
    assert not torch.equal(fill_rows(torch.empty(ROWS, DIM), SEED, "u"), full)  # table name matters
    assert not torch.equal(fill_rows(torch.empty(ROWS, DIM), SEED + 1, "t"), full)  # seed matters
    with pytest.raises(ValueError, match="outside a table of width 16"):
        fill_rows(torch.empty(4, 4), SEED, "t", col_offset=14, dim=DIM)


def _ranking_spec():
    from hstu.modules.ranking import RankingSpec

    return RankingSpec(num_items=ROWS - 1, num_actions=3, contextual_vocab=[40], side_vocab=[],
                       task_names=["click"], max_tokens=16)


def _kernel_storage(dmp: Any) -> Dict[str, float]:
    """What this rank's rowwise AdamW kernels hold: element count and float64 sum of their weights."""
    from hstu.trainer.parallel.sharding import rowwise_kernels

    kernels = [k.emb_module.weights for k in rowwise_kernels(dmp)]
    return {"local": sum(w.numel() for w in kernels), "sum": float(sum(w.double().sum() for w in kernels))}


def _worker(rank: int, world: int) -> Dict[str, Any]:
    """Per sharding type: meta tables -> DMP -> gathered tables (rank 0) and this rank's local element count."""
    from hstu.modules.embeddings import ItemEmbeddings, tables_on
    from hstu.modules.item_tower import ItemTower
    from hstu.modules.ranking import RankingTables
    from hstu.trainer.parallel.config import ShardingConfig
    from hstu.trainer.parallel.item_embeddings import CollectionItemEmbeddings, full_table
    from hstu.trainer.parallel.item_features import CollectionFeatureTables
    from hstu.trainer.parallel.ranking_embeddings import CollectionRankingTables
    from hstu.trainer.parallel.sharding import shard_embedding_collection

    out: Dict[str, Any] = {}
    for st in ("table_wise", "row_wise", "column_wise"):
        with tables_on("meta"):
            item = ItemEmbeddings(ROWS - 1, DIM)
            ranking = RankingTables(_ranking_spec(), DIM)
            tower = ItemTower(["genre"], [2], [FEATURE_ROWS], torch.zeros(ROWS, 2, dtype=torch.int64), DIM)
        assert item.table.weight.is_meta and all(ranking.table(k).weight.is_meta for k in ranking.table_keys())
        assert tower.tables["genre"].weight.is_meta and not tower.feature_values.is_meta  # tables only
        module = torch.nn.ModuleDict({"item": CollectionItemEmbeddings(item, init_seed=SEED),
                                      "ranking": CollectionRankingTables(ranking, init_seed=SEED),
                                      "features": CollectionFeatureTables(tower.tables, init_seed=SEED)})
        dmp = shard_embedding_collection(module, ShardingConfig(sharding_type=st))
        sd = dmp.state_dict()
        tables = {k.split(".")[-2]: full_table(v) for k, v in sd.items() if k.endswith("_table.weight")}
        out[st] = {"tables": tables if rank == 0 else None, **_kernel_storage(dmp)}
    return out


@pytest.fixture(scope="module")
def gathered():
    return {w: run_distributed(_worker, world_size=w, timeout_s=240) for w in (1, 2, 4)}


def test_meta_tables_gather_to_the_same_tables_at_any_world_size_and_sharding(gathered):
    from hstu.trainer.parallel.table_init import fill_rows

    want = gathered[1][0]["row_wise"]["tables"]
    assert set(want) == {"item_id_table", "item_table", "action_table", "context_0_table", "item_feature_genre_table"}
    assert torch.equal(want["item_id_table"], fill_rows(torch.empty(ROWS, DIM), SEED, "item_id_table"))
    assert torch.equal(want["item_feature_genre_table"],
                       fill_rows(torch.empty(FEATURE_ROWS, DIM), SEED, "item_feature_genre_table"))
    assert not torch.equal(want["item_id_table"], want["item_table"])  # per-table streams
    for world, ranks in gathered.items():
        for st, res in ranks[0].items():
            for name, table in res["tables"].items():
                assert torch.equal(table, want[name]), (world, st, name)
            # the values live in the kernels' own storage (what lookups and the optimizer use)
            kernel_sum = sum(r[st]["sum"] for r in ranks)
            assert kernel_sum == pytest.approx(sum(float(t.double().sum()) for t in want.values()), abs=1e-9)


def test_each_rank_materialises_only_its_shards(gathered):
    total = ROWS * DIM * 2 + 4 * DIM + 40 * DIM + FEATURE_ROWS * DIM  # item_id, item, action, context_0, genre
    for world, ranks in gathered.items():
        for st in ("row_wise", "column_wise", "table_wise"):
            local = [r[st]["local"] for r in ranks]
            assert sum(local) == total, (world, st, local)
            if st != "table_wise" and world > 1:  # row/column-wise: every rank holds ~1/world of each table
                assert max(local) <= total / world + 4 * DIM * 2, (world, st, local)


def test_trainer_per_shard_runs_at_world_1_and_2_train_the_same_model(tmp_path):
    """(c) train() with sharding.table_init=per_shard (meta tables, DMP per-shard init, DCP checkpoint) at world
    size 1 and 2: the same losses and the same final model (best.pt), as for the copied init."""
    from test_distributed_world_size import _best, _losses, _worker as train_worker

    cache, w1, w2 = str(tmp_path / "cache"), str(tmp_path / "w1"), str(tmp_path / "w2")
    features = ["model.item_features.enabled=true", "model.item_features.combine=mlp"]  # per-shard feature tables
    extra = ["sharding.table_init=per_shard", "sharding.sharding_type=row_wise", *features]
    run_distributed(train_worker, 1, ([[w1, *extra]], cache), timeout_s=240)
    run_distributed(train_worker, 2, ([[w2, *extra]], cache), timeout_s=240)
    copied = str(tmp_path / "copied")
    run_distributed(train_worker, 1, ([[copied, *features]], cache), timeout_s=240)
    l1, l2 = _losses(w1), _losses(w2)
    assert l1[0] != _losses(copied)[0]  # per_shard really replaced the plain model's init
    assert len(l1) == 4
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    b1, b2 = _best(w1), _best(w2)
    assert b1.keys() == b2.keys()
    for k in b1:
        torch.testing.assert_close(b2[k], b1[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    assert b1["item_embeddings.table.weight"][0].abs().max() == 0  # padding row of the seeded init
    assert "item_tower.tables.cluster.weight" in b1 and b1["item_tower.tables.cluster.weight"][0].abs().max() == 0


def test_per_shard_config_rules():
    from hstu.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="sharding.table_init.*needs sharding.enabled=true"):
        load_config(None, ["sharding.table_init=per_shard"])
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(None, ["sharding.enabled=true", "sharding.table_init=per_shard", "train.init_from=/x"])
    with pytest.raises(ConfigError, match="table_init"):
        load_config(None, ["sharding.enabled=true", "sharding.table_init=lazy"])
    # item features compose with per_shard (their tables are initialised per shard too)
    load_config(None, ["sharding.enabled=true", "sharding.table_init=per_shard", "data.name=synthetic",
                       "model.item_features.enabled=true"])
