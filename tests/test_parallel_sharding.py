"""Sharded rowwise AdamW (TorchRec DMP, gloo, spawned ranks) vs the plain-PyTorch reference, and DCP resharding.

Each rank feeds its own batch; the reference sees all ranks' ids with gradients divided by the world size
(TorchRec's default gradient division). Table 24 x 8; ids only in rows 0..15 (rows 16..23 never touched);
step 1 uses only rows 0..11, so under row_wise the second shard gets no ids in that step.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from dist_utils import run_distributed

R, D = 24, 8
HP = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
LRS = [0.01, 0.03, 0.0, 0.02, 0.01, 0.02]  # lr changes between steps (step 2 at lr 0: weights frozen, m/v move)
WKEY = "embeddings.item_id_table.weight"

pytestmark = pytest.mark.timeout(240)


def batch(step: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [11] (with duplicates), lengths [2], upstream grad [11, D] for (step, rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 12 if step == 1 else 16, (9,), generator=g)
    ids = torch.cat([ids, ids[:2]])
    return ids, torch.tensor([4, 7]), torch.randn(len(ids), D, generator=g)


# ---------------------------------------------------------------------------------------------------- rank side
def _build(sharding_type: str, weight_dtype: str = "float32", placement: str = "device", seed: int = 0):
    from hstu.trainer.parallel.config import ShardingConfig
    from hstu.trainer.parallel.sharding import make_item_embedding_collection, shard_embedding_collection

    cfg = ShardingConfig(sharding_type=sharding_type, weight_dtype=weight_dtype, state_placement=placement,
                         lr=LRS[0], **HP)
    return shard_embedding_collection(make_item_embedding_collection(R, D, weight_dtype, seed=seed), cfg)


def _train(dmp: Any, rank: int, steps: Sequence[int], scheduler: bool = False) -> None:
    """LRS[s] for step s: set in param_groups directly, or (scheduler=True) by a torch LambdaLR."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    opt = dmp.fused_optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: LRS[k] / LRS[0]) if scheduler else None
    for s in steps:
        if sched is None:
            for group in opt.param_groups:  # no step() call needed: read by the next backward
                group["lr"] = LRS[s]
        ids, lengths, grad = batch(s, rank)
        out = dmp(KeyedJaggedTensor.from_lengths_sync(keys=["item_id"], values=ids, lengths=lengths))
        (out["item_id"].values().float() * grad).sum().backward()
        opt.step()  # no-op for the fused update; what a training loop calls
        if sched is not None:
            sched.step()


def _parts(t: Any) -> List[Tuple[List[int], torch.Tensor]]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(t, ShardedTensor):
        return [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in t.local_shards()]
    return [([0] * t.dim(), t.detach().clone())]


def _snapshot(dmp: Any) -> Dict[str, Any]:
    """This rank's pieces: weight / momentum1 / exp_avg_sq shards with offsets, step, #weight shards."""
    w = dmp.state_dict()[WKEY]
    st = dmp.fused_optimizer.state_dict()["state"].get(WKEY, {})
    out = {"w": _parts(w), "n_shards": len(w.metadata().shards_metadata), "dtype": str(w.dtype)}
    for k in ("momentum1", "exp_avg_sq", "step"):
        out[k] = _parts(st[f"item_id_table.{k}"]) if st else []
    return out


def _worker_train(rank: int, world: int, sharding_type: str, steps: int, weight_dtype: str, placement: str,
                  scheduler: bool = False):
    from hstu.trainer.parallel.sharding import element_bytes

    dmp = _build(sharding_type, weight_dtype, placement)
    _train(dmp, rank, range(steps), scheduler)
    return {**_snapshot(dmp), "bytes": element_bytes(dmp)}


def _worker_save(rank: int, world: int, sharding_type: str, steps: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp = _build(sharding_type)
    _train(dmp, rank, range(steps))
    dcp.save({"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}, checkpoint_id=path)
    return _snapshot(dmp)


def _worker_load(rank: int, world: int, sharding_type: str, steps_done: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp = _build(sharding_type, seed=123)  # different init: loading must overwrite everything
    state = {"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["optim"])
    loaded = _snapshot(dmp)
    _train(dmp, rank, [steps_done])
    return {"loaded": loaded, "after": _snapshot(dmp)}


# ---------------------------------------------------------------------------------------------------- test side
def _assemble(snaps: Sequence[Dict[str, Any]], key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    full = torch.full(tuple(shape), float("nan"), dtype=dtype) if dtype.is_floating_point else \
        torch.zeros(tuple(shape), dtype=dtype)
    for snap in snaps:
        for offs, t in snap[key]:
            full[tuple(slice(o, o + n) for o, n in zip(offs, t.shape))] = t
    return full


def _full_state(snaps: Sequence[Dict[str, Any]], dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    n_v = R * snaps[0]["n_shards"] if "column" in snaps[0].get("kind", "") else R
    step = [t for s in snaps for _, t in s["step"]]
    assert step and all(int(x) == int(step[0]) for x in step), f"step differs across ranks: {step}"
    return {"w": _assemble(snaps, "w", (R, D), dtype), "m": _assemble(snaps, "momentum1", (R, D), torch.float32),
            "v": _assemble(snaps, "exp_avg_sq", (n_v,), torch.float32), "step": step[0]}


def _reference(world: int, steps: Sequence[int], state: Optional[Dict[str, torch.Tensor]] = None,
               dtype: torch.dtype = torch.float32, col_blocks: int = 1,
               lrs: Sequence[float] = LRS) -> Dict[str, torch.Tensor]:
    """Reference run over the union of all ranks' batches (grad / world). col_blocks > 1: column_wise (per-block v)."""
    from hstu.trainer.parallel.rowwise_adamw import rowwise_adamw_reference_step
    from hstu.trainer.parallel.sharding import make_item_embedding_collection

    if state is None:
        w0 = make_item_embedding_collection(R, D, "float32", seed=0).embeddings["item_id_table"].weight
        state = {"w": w0.detach().to(dtype), "m": torch.zeros(R, D), "v": torch.zeros(R * col_blocks),
                 "step": torch.tensor(0)}
    w, m, v = state["w"].clone(), state["m"].clone(), state["v"].clone()
    t = int(state["step"])
    bw = D // col_blocks
    for s in steps:
        t += 1
        ids = torch.cat([batch(s, r)[0] for r in range(world)])
        grads = torch.cat([batch(s, r)[2] for r in range(world)]).to(dtype).float() / world
        for b in range(col_blocks):
            cs, rs = slice(b * bw, (b + 1) * bw), slice(b * R, (b + 1) * R)
            w[:, cs], m[:, cs], v[rs] = rowwise_adamw_reference_step(
                w[:, cs], m[:, cs], v[rs], ids, grads[:, cs], t, lrs[s], **HP)
    return {"w": w, "m": m, "v": v, "step": torch.tensor(t)}


def _check(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert int(got["step"]) == int(ref["step"])
    torch.testing.assert_close(got["w"].float(), ref["w"].float(), atol=atol, rtol=1e-5)
    torch.testing.assert_close(got["m"], ref["m"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["v"], ref["v"], atol=1e-8, rtol=1e-5)


def test_world1_matches_reference_with_lr_schedule_and_host_state():
    (snap,) = run_distributed(_worker_train, 1, ("table_wise", 4, "float32", "host", True))
    assert (snap["bytes"]["device"], snap["bytes"]["host"]) == (4.0, 4 * (D + 1) / D)  # placement reached the kernel
    got = _full_state([snap])
    ref = _reference(1, range(4))
    _check(got, ref)
    init = _reference(1, [])
    assert torch.equal(got["w"][16:], init["w"][16:]) and torch.all(got["m"][16:] == 0)  # untouched rows
    assert not torch.allclose(got["w"][:16], init["w"][:16])
    # the lr changes matter: a constant-lr reference is far from what the kernel produced
    assert not torch.allclose(_reference(1, range(4), lrs=[0.01] * 6)["w"], got["w"], atol=1e-4)


def test_world1_bf16_weights():
    (snap,) = run_distributed(_worker_train, 1, ("row_wise", 3, "bfloat16", "device"))
    assert snap["dtype"] == "torch.bfloat16"
    assert (snap["bytes"]["device"], snap["bytes"]["host"]) == (2.0 + 4 * (D + 1) / D, 0.0)
    got = _full_state([snap], torch.bfloat16)
    ref = _reference(1, range(3), dtype=torch.bfloat16)
    assert got["w"].dtype == torch.bfloat16 and ref["w"].dtype == torch.bfloat16
    # same fp32 math, rounded to bf16 each step: a rounding tie can differ by an ulp and carry over (~1e-4);
    # a wrong update (lr 0.01-0.03 per step) would be off by ~1e-2
    torch.testing.assert_close(got["w"].float(), ref["w"].float(), atol=1e-4, rtol=2 ** -7)
    assert not torch.equal(got["w"], _reference(1, [], dtype=torch.bfloat16)["w"])
    torch.testing.assert_close(got["m"], ref["m"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["v"], ref["v"], atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "column_wise"])
def test_world2_matches_reference(sharding_type):
    snaps = run_distributed(_worker_train, 2, (sharding_type, 4, "float32", "device"))
    blocks = 2 if sharding_type == "column_wise" else 1
    assert snaps[0]["n_shards"] == {"table_wise": 1, "row_wise": 2, "column_wise": 2}[sharding_type]
    for s in snaps:
        s["kind"] = sharding_type
    got = _full_state(snaps)
    assert not torch.isnan(got["w"]).any() and not torch.isnan(got["v"]).any()
    _check(got, _reference(2, range(4), col_blocks=blocks))
    if sharding_type != "table_wise":
        assert all(s["step"] for s in snaps), "every rank must hold its shard's state"


def _ckpt_full(path: str, tmp_path: Any) -> Dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(str(tmp_path), "full.pt")
    dcp_to_torch_save(path, out)
    sd = torch.load(out, weights_only=False)
    st = sd["optim"]["state"][WKEY]
    return {"w": sd["model"][WKEY], "m": st["item_id_table.momentum1"], "v": st["item_id_table.exp_avg_sq"],
            "step": st["item_id_table.step"]}


@pytest.mark.parametrize("save_world,save_type,load_world,load_type",
                         [(2, "row_wise", 1, "table_wise"), (1, "table_wise", 2, "row_wise")])
def test_dcp_reshard_restores_weights_and_optimizer_state(tmp_path, save_world, save_type, load_world, load_type):
    path = os.path.join(str(tmp_path), "ckpt")
    saved = _full_state(run_distributed(_worker_save, save_world, (save_type, 3, path)))
    ckpt = _ckpt_full(path, tmp_path)
    for k in ("w", "m", "v"):
        assert torch.equal(ckpt[k], saved[k]), k
    assert int(ckpt["step"]) == 3 == saved["step"]

    res = run_distributed(_worker_load, load_world, (load_type, 3, path))
    loaded = _full_state([r["loaded"] for r in res])
    for k in ("w", "m", "v"):
        assert torch.equal(loaded[k], ckpt[k]), f"{k} not restored exactly"
    assert int(loaded["step"]) == 3
    # training continues from the restored state (bias correction uses step 4)
    _check(_full_state([r["after"] for r in res]), _reference(load_world, [3], state=loaded))
