"""Rowwise AdamW: the reference vs a hand-written per-row loop, the update engine vs the reference, the config,
and the planner's accounting of the optimizer state. Single process, no process group."""

from __future__ import annotations

import math

import pytest
import torch

from hstu.trainer.parallel.config import ShardingConfig
from hstu.trainer.parallel.rowwise_adamw import RowwiseAdamWTableBatch, rowwise_adamw_reference_step

HP = dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)


def _loop_reference(weight, m, v, ids, grads, step, lr, betas, eps, weight_decay):
    """The math of docs/rowwise_adamw.md written out row by row with Python floats."""
    b1, b2 = betas
    w, m, v = weight.double().clone(), m.double().clone(), v.double().clone()
    for r in sorted(set(ids.tolist())):
        g = sum(grads[i].double() for i in range(len(ids)) if int(ids[i]) == r)
        m[r] = b1 * m[r] + (1 - b1) * g
        v[r] = b2 * v[r] + (1 - b2) * float((g * g).mean())
        m_hat, v_hat = m[r] / (1 - b1**step), float(v[r]) / (1 - b2**step)
        w[r] = w[r] - lr * (m_hat / (math.sqrt(v_hat) + eps) + weight_decay * w[r])
    return w, m, v


def test_reference_matches_per_row_loop_with_duplicates_and_untouched_rows():
    g = torch.Generator().manual_seed(0)
    w, m, v = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g) * 0.1, torch.rand(10, generator=g)
    ids = torch.tensor([3, 1, 3, 7, 3, 1])
    grads = torch.randn(6, 6, generator=g)
    got = rowwise_adamw_reference_step(w, m, v, ids, grads, 3, 0.05, **HP)
    exp = _loop_reference(w, m, v, ids, grads, 3, 0.05, **HP)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-5)
    untouched = torch.tensor([0, 2, 4, 5, 6, 8, 9])
    for new, old in zip(got, (w, m, v)):
        assert torch.equal(new[untouched], old[untouched])
    assert not torch.allclose(got[0][3], w[3])


def _engine_run(weight_dtype, steps=4, lrs=(0.02, 0.05, 0.0, 0.01), state_placement="device"):
    """Two tables (5 + 7 rows, dim 4) in one engine; returns the engine and the reference state after ``steps``."""
    g = torch.Generator().manual_seed(1)
    eng = RowwiseAdamWTableBatch([5, 7], 4, weight_dtype=weight_dtype, state_placement=state_placement,
                                 lr=lrs[0], **HP)
    with torch.no_grad():
        eng.weights.copy_(torch.randn(12, 4, generator=g))
    w, m, v = eng.weights.clone(), torch.zeros(12, 4), torch.zeros(12)
    for s in range(steps):
        eng.hparams["lr"] = lrs[s]
        rows = torch.tensor([0, 6, 6, 2, 11, 0, 6])  # rows 1, 3, 4, 5, 7..10 untouched; duplicates summed
        upstream = torch.randn(len(rows), 4, generator=g)
        out = eng.lookup(rows)
        assert out.dtype == weight_dtype and out.shape == (7, 4)
        (out.float() * upstream).sum().backward()
        w, m, v = rowwise_adamw_reference_step(w, m, v, rows, upstream.to(weight_dtype), s + 1, lrs[s], **HP)
    return eng, (w, m, v)


def test_engine_matches_reference_fp32_with_lr_changes():
    eng, (w, m, v) = _engine_run(torch.float32)
    assert int(eng.step) == 4
    torch.testing.assert_close(eng.weights, w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(eng.momentum1, m, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(eng.momentum2, v, atol=1e-8, rtol=1e-5)
    _, (w_const, _, _) = _engine_run(torch.float32, lrs=(0.02,) * 4)
    assert not torch.allclose(eng.weights, w_const, atol=1e-3)  # the lr changes took effect


def test_engine_matches_reference_bf16_weights_host_state():
    eng, (w, m, v) = _engine_run(torch.bfloat16, state_placement="host")
    assert eng.weights.dtype == torch.bfloat16 and eng.momentum1.dtype == torch.float32
    torch.testing.assert_close(eng.weights.float(), w.float(), atol=1e-4, rtol=2**-7)
    torch.testing.assert_close(eng.momentum1, m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(eng.momentum2, v, atol=1e-8, rtol=1e-5)


def test_engine_no_grad_lookup_does_not_update_and_state_views_are_per_table():
    eng = RowwiseAdamWTableBatch([5, 7], 4, lr=0.1)
    before = eng.weights.clone()
    with torch.no_grad():
        eng.lookup(torch.tensor([1, 2]))
    assert torch.equal(eng.weights, before) and int(eng.step) == 0
    states = eng.get_optimizer_state()
    assert [s["exp_avg"].shape for s in states] == [(5, 4), (7, 4)]
    assert [s["exp_avg_sq"].shape for s in states] == [(5,), (7,)]
    assert [t.shape for t in eng.split_embedding_weights()] == [(5, 4), (7, 4)]
    eng.update_hyper_parameters({"learning_rate": 0.5, "eps": 1e-3})
    assert eng.get_learning_rate() == 0.5 and eng.hparams["eps"] == 1e-3
    with pytest.raises(ValueError):
        eng.update_hyper_parameters({"momentum": 0.9})
    with pytest.raises(ValueError):
        RowwiseAdamWTableBatch([5], 4, state_placement="ssd")


def test_sharding_config_validation():
    ShardingConfig().validate()
    for bad in (dict(sharding_type="data_parallel"), dict(state_placement="ssd"), dict(weight_dtype="float16"),
                dict(optimizer="adam"), dict(betas=(0.9, 1.0)), dict(eps=0.0)):
        with pytest.raises(ValueError):
            ShardingConfig(**bad).validate()


def _plan_storage(cfg, stock: bool):
    """Planner storage (ddr bytes per shard) of a 100k x 64 table on a 1-rank CPU topology."""
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator

    from hstu.trainer.parallel.sharding import (RowwiseAdamWEmbeddingCollectionSharder, RowwiseAdamWStorageEstimator,
                                                make_item_embedding_collection)
    from torchrec.distributed.planner import Topology

    topo = Topology(world_size=1, compute_device="cpu")
    est = (EmbeddingStorageEstimator if stock else RowwiseAdamWStorageEstimator)(topology=topo)
    enum = EmbeddingEnumerator(topology=topo, batch_size=128, estimator=[est])
    ec = make_item_embedding_collection(100_000, 64, cfg.weight_dtype, device=torch.device("meta"))
    options = enum.enumerate(ec, [RowwiseAdamWEmbeddingCollectionSharder(cfg)])
    return {o.sharding_type: [s.storage.ddr for s in o.shards] for o in options}


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_planner_storage_counts_exact_optimizer_state(weight_dtype):
    cfg = ShardingConfig(sharding_type="table_wise", weight_dtype=weight_dtype)
    ours, stock = _plan_storage(cfg, stock=False), _plan_storage(cfg, stock=True)
    assert "table_wise" in ours and ours.keys() == stock.keys()
    assert ours["table_wise"][0] - stock["table_wise"][0] == 4 * 100_000 * (64 + 1)


def test_planner_rejects_cap_that_fits_weights_but_not_state():
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
    from torchrec.distributed.planner.types import PlannerError

    from hstu.trainer.parallel.sharding import (RowwiseAdamWEmbeddingCollectionSharder, build_planner,
                                                make_item_embedding_collection)

    cap = 40 * 2**20  # weights 25.6 MB fit; weights + state (51.6 MB) do not
    cfg = ShardingConfig(sharding_type="table_wise", ddr_cap_bytes=cap)
    ec = make_item_embedding_collection(100_000, 64, device=torch.device("meta"))
    topo = Topology(world_size=1, compute_device="cpu", ddr_cap=cap)
    stock = EmbeddingShardingPlanner(topology=topo, enumerator=EmbeddingEnumerator(
        topology=topo, batch_size=128, estimator=[EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topo),
                                                  EmbeddingStorageEstimator(topology=topo)]), debug=False)
    stock.plan(ec, [RowwiseAdamWEmbeddingCollectionSharder(cfg)])  # fits without the optimizer state
    with pytest.raises(PlannerError):
        build_planner(cfg, 1, "cpu", {"item_id_table": 64}).plan(ec, [RowwiseAdamWEmbeddingCollectionSharder(cfg)])
    cfg.ddr_cap_bytes = 80 * 2**20
    plan = build_planner(cfg, 1, "cpu", {"item_id_table": 64}).plan(ec, [RowwiseAdamWEmbeddingCollectionSharder(cfg)])
    (ps,) = plan.plan[""].values()
    assert ps.sharding_type == "table_wise" and ps.compute_kernel == "fused"
