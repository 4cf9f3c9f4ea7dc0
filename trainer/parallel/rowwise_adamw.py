"""Rowwise AdamW for TorchRec sequence embeddings (EmbeddingCollection), fused into backward; works on CPU.

Math and conventions: docs/rowwise_adamw.md. Pieces:

- :func:`rowwise_adamw_reference_step` — plain-PyTorch reference (dense masks, no autograd), for tests and docs.
- :class:`RowwiseAdamWTableBatch` — the storage + update engine (stand-in for fbgemm's TBE): the local shards
  of a group's tables stacked as ``weights [R, C]`` plus fp32 state ``momentum1 [R, C]``, ``momentum2 [R]``
  and a global ``step`` counter; the update runs in the backward of :class:`_RowwiseAdamWLookup`.
- :class:`RowwiseAdamWFusedOptimizer` — TorchRec's ``EmbeddingFusedOptimizer`` over that engine: the state shows
  up in ``dmp.fused_optimizer`` as ShardedTensors (``<table>.momentum1``, ``<table>.exp_avg_sq``) plus a replicated
  ``<table>.step`` tensor, so DCP saves/reshards it. Its ``param_groups[0]`` is read live at every backward.
- :class:`RowwiseAdamWEmbedding` — the lookup kernel (a ``BaseBatchedEmbedding``) that ``sharding.py``'s sharder
  swaps in where TorchRec would build its fbgemm ``BatchedFusedEmbedding`` (plan keeps compute_kernel="fused").
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbedding, EmbeddingFusedOptimizer
from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizer, FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# fused_params key (set by the sharder) choosing where momentum1/momentum2 live: "host" | "device".
STATE_PLACEMENT_KEY = "rowwise_adamw_state_placement"
HYPER_PARAM_KEYS = ("lr", "beta1", "beta2", "eps", "weight_decay")


def rowwise_adamw_reference_step(
    weight: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    ids: torch.Tensor,
    grads: torch.Tensor,
    step: int,
    lr: float,
    betas: Tuple[float, float],
    eps: float,
    weight_decay: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rowwise AdamW step; returns new ``(weight, m, v)`` (inputs untouched).

    weight [R, D] (fp32 or bf16), m [R, D] fp32, v [R] fp32, ids [N] int64 (duplicates allowed), grads [N, D]
    (already scaled, e.g. divided by world size), step = t, the global step of this update (1 for the first).
    Rows not in ``ids`` keep weight, m and v unchanged.
    """
    b1, b2 = betas
    rows = weight.shape[0]
    g = torch.zeros(rows, weight.shape[1], dtype=torch.float32)
    g.index_add_(0, ids.cpu(), grads.detach().float().cpu())  # duplicates summed
    touched = torch.zeros(rows, dtype=torch.bool)
    touched[ids.cpu()] = True
    w32 = weight.detach().float().cpu()
    m_new = torch.where(touched[:, None], b1 * m.cpu() + (1 - b1) * g, m.cpu())
    v_new = torch.where(touched, b2 * v.cpu() + (1 - b2) * (g * g).mean(dim=1), v.cpu())
    m_hat = m_new / (1 - b1**step)
    v_hat = v_new / (1 - b2**step)
    update = m_hat / (v_hat.sqrt() + eps)[:, None] + weight_decay * w32
    w_new = torch.where(touched[:, None], w32 - lr * update, w32)
    return w_new.to(weight.dtype), m_new, v_new


class _RowwiseAdamWLookup(torch.autograd.Function):
    """out [N, C] = weights[rows]; backward sums duplicate rows and applies the update (returns no grads)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, rows: torch.Tensor, engine: "RowwiseAdamWTableBatch") -> torch.Tensor:
        ctx.engine = engine
        ctx.save_for_backward(rows)
        return engine.weights.index_select(0, rows)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[None, None, None]:
        (rows,) = ctx.saved_tensors
        ctx.engine.apply_gradients(rows, grad_out)
        return None, None, None


class RowwiseAdamWTableBatch(nn.Module):
    """Tables (rows_i, C) stacked in ``weights [sum rows_i, C]``; fp32 state ``momentum1 [R, C]``, ``momentum2 [R]``.

    ``state_placement``: "device" (beside the weights) | "host" (host DRAM; on CUDA pinned + mapped into the GPU
    address space via fbgemm's host-mapped unified tensors, read/written over PCIe). ``step``: int64 []
    on CPU, the global step t (incremented once per backward through this engine, even with no local ids).
    Hyper-parameters are read from ``self.hparams`` (a dict; the fused optimizer's param group once attached).
    """

    def __init__(
        self,
        rows: Sequence[int],
        dim: int,
        *,
        weight_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        state_placement: str = "device",
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        device = torch.device(device or "cpu")
        if state_placement not in ("host", "device"):
            raise ValueError(f"state_placement must be 'host' or 'device', got {state_placement!r}")
        self.state_placement = state_placement
        total = int(sum(rows))
        self.rows = list(rows)
        self.dim = dim
        self.row_offsets = [0]
        for r in self.rows:
            self.row_offsets.append(self.row_offsets[-1] + r)
        # plain attributes (not buffers): TorchRec exposes them via split_embedding_weights / get_optimizer_state
        self.weights = torch.zeros(total, dim, dtype=weight_dtype, device=device)
        self.momentum1 = _state_tensor([total, dim], device, state_placement)
        self.momentum2 = _state_tensor([total], device, state_placement)
        self.step = torch.zeros((), dtype=torch.int64)
        self.hparams: Dict[str, Any] = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps,
                                        "weight_decay": weight_decay}
        self._anchor = torch.empty(0, requires_grad=True)  # makes autograd call our backward

    # ---- fbgemm-TBE-like interface used by TorchRec's EmbeddingFusedOptimizer -------------------------------
    def split_embedding_weights(self) -> List[torch.Tensor]:
        return [self.weights[a:b] for a, b in zip(self.row_offsets[:-1], self.row_offsets[1:])]

    def get_optimizer_state(self) -> List[Dict[str, torch.Tensor]]:
        """Per table ``{"exp_avg": m [rows, C], "exp_avg_sq": v [rows]}`` (fbgemm PARTIAL_ROWWISE_ADAM names)."""
        o = self.row_offsets
        return [{"exp_avg": self.momentum1[a:b], "exp_avg_sq": self.momentum2[a:b]} for a, b in zip(o[:-1], o[1:])]

    def get_learning_rate(self) -> float:
        return float(self.hparams["lr"])

    def set_learning_rate(self, lr: float) -> None:
        self.hparams["lr"] = lr

    def set_optimizer_step(self, step: int) -> None:
        self.step.fill_(step)

    def update_hyper_parameters(self, params_dict: Dict[str, Any]) -> None:
        for k, val in params_dict.items():
            key = "lr" if k == "learning_rate" else k
            if key not in HYPER_PARAM_KEYS:
                raise ValueError(f"unknown rowwise AdamW hyper-parameter {k!r} (valid: {HYPER_PARAM_KEYS})")
            self.hparams[key] = val

    # ---- compute --------------------------------------------------------------------------------------------
    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N] int64 (stacked-row index) -> [N, C] in the weight dtype; differentiable (fused update)."""
        if torch.is_grad_enabled():
            return _RowwiseAdamWLookup.apply(self._anchor, rows, self)
        return self.weights.index_select(0, rows)

    @torch.no_grad()
    def apply_gradients(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """One AdamW step for the rows seen: rows [N] (duplicates allowed), grad [N, C]. Increments ``step``."""
        self.step.add_(1)
        if rows.numel() == 0:
            return
        h = self.hparams
        t = int(self.step.item())
        b1, b2 = float(h["beta1"]), float(h["beta2"])
        lr, eps, wd = float(h["lr"]), float(h["eps"]), float(h["weight_decay"])
        uniq, inverse = torch.unique(rows, return_inverse=True)
        g = torch.zeros(uniq.numel(), grad.shape[1], dtype=torch.float32, device=grad.device)
        g.index_add_(0, inverse, grad.float())
        m = self.momentum1.index_select(0, uniq)  # host-mapped state on CUDA: gathered over PCIe
        v = self.momentum2.index_select(0, uniq)
        m.lerp_(g, 1 - b1)  # b1*m + (1-b1)*g
        v.mul_(b2).add_(g.square_().mean(dim=1), alpha=1 - b2)
        # w - lr*(m_hat/(sqrt(v_hat)+eps) + wd*w) = w*(1 - lr*wd) - [lr/(1-b1^t) / (sqrt(v/(1-b2^t))+eps)] * m
        scale = (v / (1 - b2**t)).sqrt_().add_(eps).reciprocal_().mul_(lr / (1 - b1**t))
        w = self.weights.index_select(0, uniq).float()
        w.mul_(1 - lr * wd).addcmul_(m, scale[:, None], value=-1)
        self.weights.index_copy_(0, uniq, w.to(self.weights.dtype))
        self.momentum1.index_copy_(0, uniq, m)
        self.momentum2.index_copy_(0, uniq, v)


def _state_tensor(sizes: List[int], device: torch.device, placement: str) -> torch.Tensor:
    """Zeroed fp32 state. host + CUDA: pinned host memory mapped into the GPU (a CUDA tensor, so TorchRec's
    ShardedTensor placement checks and DCP treat it like device state); otherwise a tensor on ``device``
    (on a CPU run host and device are the same DRAM)."""
    if placement == "host" and device.type == "cuda":
        like = torch.zeros(1, dtype=torch.float32, device=device)
        return torch.ops.fbgemm.new_unified_tensor(like, sizes, is_host_mapped=True).zero_()
    return torch.zeros(sizes, dtype=torch.float32, device=device)


class RowwiseAdamWFusedOptimizer(EmbeddingFusedOptimizer):
    """TorchRec ``EmbeddingFusedOptimizer`` over a :class:`RowwiseAdamWTableBatch`.

    State per table: ``momentum1`` [rows, C] and ``exp_avg_sq`` [rows] as ShardedTensors mirroring the weight
    shards (fbgemm PARTIAL_ROWWISE_ADAM layout), plus ``step`` (int64 [], replicated: identical on every rank).
    ``param_groups[0]`` holds lr, beta1, beta2, eps, weight_decay and is the engine's live hyper-parameter
    dict: a change (e.g. by an LR scheduler) applies to the next backward, no ``step()`` call needed.
    A per-table instance (``create_for_table``, TorchRec composability) shares state but not hyper-parameters.
    """

    def __init__(self, config: GroupedEmbeddingConfig, engine: RowwiseAdamWTableBatch,
                 pg: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> None:
        super().__init__(config, engine, pg, **kwargs)  # type: ignore[arg-type]
        self._engine = engine
        self._per_table = kwargs.get("create_for_table") is not None
        for key, weight in self.params.items():
            name = key[: -len(".weight")] if key else kwargs["create_for_table"]
            self.state[weight][f"{name}.step"] = engine.step
        if not self._per_table:
            group = self.param_groups[0]
            group.update({k: val for k, val in engine.hparams.items()})
            engine.hparams = group  # live: the engine reads the param group at every backward

    def step(self, closure: Any = None) -> None:
        """No-op: the update runs inside backward (param_groups are read there)."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        """No-op: fused optimizers keep no gradients."""


class RowwiseAdamWEmbedding(BaseBatchedEmbedding[torch.Tensor], FusedOptimizerModule):
    """Lookup kernel for one group of sequence-embedding shards (same local dim C) with fused rowwise AdamW.

    forward(features: KJT of this group's features, ids local to each shard) -> [sum lengths, C].
    Weight dtype = ``config.data_type`` (FP32 | BF16); hyper-parameters from ``config.fused_params``
    (fbgemm names: learning_rate, beta1, beta2, eps, weight_decay) and ``STATE_PLACEMENT_KEY``.
    """

    def __init__(self, config: GroupedEmbeddingConfig, pg: Optional[dist.ProcessGroup] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(config, pg, device)
        dims = set(self._local_cols)
        if len(dims) != 1:
            raise ValueError(f"rowwise AdamW kernel needs one local dim per group, got {sorted(dims)}")
        fp = dict(config.fused_params or {})
        device = torch.device(device or "cpu")
        placement = fp.get(STATE_PLACEMENT_KEY, "device")
        self._engine = RowwiseAdamWTableBatch(
            self._local_rows, dims.pop(), weight_dtype=data_type_to_dtype(config.data_type), device=device,
            state_placement=placement,
            lr=fp.get("learning_rate", 1e-3), betas=(fp.get("beta1", 0.9), fp.get("beta2", 0.999)),
            eps=fp.get("eps", 1e-8), weight_decay=fp.get("weight_decay", 0.0))
        self._feature_rows_offset = torch.tensor(
            [self._engine.row_offsets[t] for t in self._feature_table_map], dtype=torch.int64, device=device)
        self._optim = RowwiseAdamWFusedOptimizer(config, self._engine, pg)
        self.__dict__["_param_per_table"] = dict(self._gen_param_per_table())
        self.init_parameters()

    def _gen_param_per_table(self) -> Iterator[Tuple[str, TableBatchedEmbeddingSlice]]:
        """One TableBatchedEmbeddingSlice per table (CW shards of a table on this rank are contiguous)."""
        flat = self._engine.weights.view(-1)
        counts = dict(self.table_name_to_count)
        dim = self._engine.dim
        for t_idx, table in enumerate(self._config.embedding_tables):
            if table.name not in counts:
                continue
            count = counts.pop(table.name)
            start = self._engine.row_offsets[t_idx] * dim
            rows = self._engine.rows[t_idx]
            weight = TableBatchedEmbeddingSlice(flat, start, start + count * rows * dim, count * rows, dim)
            weight._in_backward_optimizers = [  # type: ignore[attr-defined]
                RowwiseAdamWFusedOptimizer(self._config, self._engine, self._pg, create_for_table=table.name,
                                           param_weight_for_table=weight)]
            yield table.name, weight

    @property
    def emb_module(self) -> RowwiseAdamWTableBatch:  # type: ignore[override]
        return self._engine

    @property
    def fused_optimizer(self) -> FusedOptimizer:
        return self._optim

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        ids = features.values().to(torch.int64)
        per_feature = torch.tensor(features.length_per_key(), dtype=torch.int64, device=ids.device)
        base = torch.repeat_interleave(self._feature_rows_offset.to(ids.device), per_feature,
                                       output_size=ids.numel())
        return self._engine.lookup(ids + base)

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        yield from ()  # fused parameters are exposed as parameters with in-backward optimizers

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Parameter]]:
        for table, tensor in zip(self._config.embedding_tables, self.split_embedding_weights()):
            param = nn.Parameter(tensor, requires_grad=False)
            param._in_backward_optimizers = [EmptyFusedOptimizer()]  # type: ignore[attr-defined]
            yield append_prefix(prefix, f"{table.name}.weight"), param
