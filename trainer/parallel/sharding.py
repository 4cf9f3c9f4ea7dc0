"""Shard the item EmbeddingCollection with TorchRec (planner + DMP) using the rowwise AdamW kernel.

``shard_embedding_collection(ec, cfg)`` -> ``DistributedModelParallel`` whose ``fused_optimizer`` holds the
rowwise AdamW state. How it plugs into TorchRec (torchrec 1.8.0), see docs/rowwise_adamw.md:

- the plan keeps ``compute_kernel="fused"`` (so TorchRec treats the weights as fused/sharded and builds
  ShardedTensors for weights and optimizer state); the sharder's fused_params carry the marker
  ``optimizer=EmbOptimType.PARTIAL_ROWWISE_ADAM`` (same state layout) + hyper-parameters + state placement;
- :class:`RowwiseAdamWEmbeddingCollectionSharder.shard` builds :class:`RowwiseAdamWShardedEmbeddingCollection`,
  whose ``_create_lookups`` builds :class:`RowwiseAdamWGroupedEmbeddingsLookup`, whose
  ``_create_embedding_kernel`` returns our :class:`RowwiseAdamWEmbedding` instead of fbgemm's kernel;
- :class:`RowwiseAdamWStorageEstimator` adds the exact optimizer-state bytes to each shard's planner storage,
  on HBM or DDR according to ``state_placement``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embedding_lookup import GroupedEmbeddingsLookup
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, GroupedEmbeddingConfig
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ParameterConstraints, SharderDataMap, ShardingOption
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from hstu.trainer.parallel.config import ShardingConfig
from hstu.trainer.parallel.rowwise_adamw import STATE_PLACEMENT_KEY, RowwiseAdamWEmbedding
from hstu.trainer.parallel.table_init import SeededTableInit

TABLE_NAME = "item_id_table"  # not "items": that collides with ModuleDict.items
FEATURE_NAME = "item_id"
STATE_BYTES_PER_VALUE = 4  # momentum1 and momentum2 are fp32
_DTYPES = {"float32": (torch.float32, DataType.FP32), "bfloat16": (torch.bfloat16, DataType.BF16)}


def make_item_embedding_collection(num_embeddings: int, dim: int, weight_dtype: str = "float32",
                                   device: Optional[torch.device] = None, init_range: float = 0.05,
                                   seed: Optional[int] = None, init_fn: Any = None) -> EmbeddingCollection:
    """EmbeddingCollection with one table ``item_id_table`` [num_embeddings, dim] for feature ``item_id``.

    Weights uniform in [-init_range, init_range] (seeded when ``seed`` is given) so every rank starts equal.
    ``init_fn`` (e.g. ``table_init.seeded_init_fn``): TorchRec calls it on the weight, or on each rank's
    ShardedTensor after DMP materialised the shards of a ``device="meta"`` collection.
    """
    data_type = _DTYPES[weight_dtype][1]
    table = EmbeddingConfig(name=TABLE_NAME, embedding_dim=dim, num_embeddings=num_embeddings,
                            feature_names=[FEATURE_NAME], data_type=data_type,
                            weight_init_min=-init_range, weight_init_max=init_range, init_fn=init_fn)
    ec = EmbeddingCollection(tables=[table], device=device or torch.device("cpu"))
    if seed is not None and ec.device.type != "meta":
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = ec.embeddings[TABLE_NAME].weight
            w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * init_range)
    return ec


def rowwise_adamw_fused_params(cfg: ShardingConfig) -> Dict[str, Any]:
    """fused_params for the sharder: fbgemm names + the PARTIAL_ROWWISE_ADAM marker + our state placement.
    Hyper-parameters left None in ``cfg`` get ``DEFAULT_HPARAMS`` (see ShardingConfig.resolved)."""
    cfg = cfg.resolved()
    return {
        "optimizer": EmbOptimType.PARTIAL_ROWWISE_ADAM,  # marker: same state layout (m [rows, D], v [rows])
        "learning_rate": cfg.lr,
        "beta1": cfg.betas[0],
        "beta2": cfg.betas[1],
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
        "weight_decay_mode": WeightDecayMode.DECOUPLE,
        STATE_PLACEMENT_KEY: cfg.state_placement,
    }


class RowwiseAdamWGroupedEmbeddingsLookup(GroupedEmbeddingsLookup):
    """GroupedEmbeddingsLookup whose fused kernels are :class:`RowwiseAdamWEmbedding`."""

    def _create_embedding_kernel(self, config: GroupedEmbeddingConfig, pg: Optional[dist.ProcessGroup],
                                 device: Optional[torch.device], env: Optional[ShardingEnv] = None) -> nn.Module:
        if config.compute_kernel != EmbeddingComputeKernel.FUSED:
            raise ValueError(f"rowwise_adamw needs compute_kernel 'fused', plan has {config.compute_kernel.value} "
                             f"for tables {config.table_names()}")
        return RowwiseAdamWEmbedding(config=config, pg=pg, device=device)


class RowwiseAdamWShardedEmbeddingCollection(ShardedEmbeddingCollection):
    """ShardedEmbeddingCollection whose lookups use the rowwise AdamW kernel (everything else is TorchRec's)."""

    def _create_lookups(self) -> None:
        for sharding in self._sharding_type_to_sharding.values():
            lookup = RowwiseAdamWGroupedEmbeddingsLookup(
                grouped_configs=sharding._grouped_embedding_configs,  # type: ignore[attr-defined]
                pg=sharding._pg,  # type: ignore[attr-defined]
                device=sharding._device,  # type: ignore[attr-defined]
                env=sharding._env,  # type: ignore[attr-defined]
            )
            if self.enable_embedding_update and sharding.enable_embedding_update:
                raise ValueError("rowwise_adamw does not support enable_embedding_update tables")
            self._lookups.append(lookup)

    def reset_parameters(self) -> None:
        """TorchRec's reset, except that a :class:`SeededTableInit` init_fn gets this rank's shards with their
        global offsets (TorchRec would hand it the local slice only), so per-shard init is world-size free."""
        if self._device and self._device.type == "meta":
            return
        for table in self._embedding_configs:
            init_fn = table.init_fn
            if isinstance(init_fn, SeededTableInit):
                init_fn.init_shards(self._model_parallel_name_to_local_shards.get(table.name, []),
                                    table.embedding_dim)
            elif init_fn is not None:
                init_fn(self.embeddings[table.name].weight)


class RowwiseAdamWEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """EmbeddingCollectionSharder that swaps in the rowwise AdamW kernel; fused_params from the config."""

    def __init__(self, cfg: ShardingConfig) -> None:
        cfg.validate()
        super().__init__(fused_params=rowwise_adamw_fused_params(cfg))
        self.cfg = cfg

    def shard(self, module: EmbeddingCollection, params: Dict[str, Any], env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None,
              ) -> ShardedEmbeddingCollection:
        return RowwiseAdamWShardedEmbeddingCollection(
            module, params, env, self.fused_params, device, qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=False, module_fqn=module_fqn)

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return ["table_wise", "row_wise", "column_wise"]  # data_parallel would bypass the fused kernel

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [EmbeddingComputeKernel.FUSED.value]


def optimizer_state_bytes(rows: int, cols: int) -> int:
    """Bytes of rowwise AdamW state for a [rows, cols] shard: momentum1 rows*cols + momentum2 rows, fp32."""
    return STATE_BYTES_PER_VALUE * rows * (cols + 1)


class RowwiseAdamWStorageEstimator(EmbeddingStorageEstimator):
    """TorchRec's storage estimator + the exact rowwise AdamW state of each shard.

    TorchRec derives optimizer memory from ``param._optimizer_classes`` (unset here, so it adds 0); this adds
    ``optimizer_state_bytes`` per shard of options whose sharder carries the PARTIAL_ROWWISE_ADAM marker, on HBM
    when the compute device is CUDA and the placement is "device", else on DDR (host DRAM).
    """

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map: SharderDataMap) -> None:
        super().estimate(sharding_options, sharder_data_map)
        for option in sharding_options:
            fused = sharder_data_map[option.module_type_key].fused_params
            if fused.get("optimizer") != EmbOptimType.PARTIAL_ROWWISE_ADAM or STATE_PLACEMENT_KEY not in fused:
                continue
            on_hbm = self._topology.compute_device == "cuda" and fused[STATE_PLACEMENT_KEY] == "device"
            for shard in option.shards:
                extra = optimizer_state_bytes(shard.size[0], shard.size[1])
                assert shard.storage is not None
                if on_hbm:
                    shard.storage.hbm += extra
                else:
                    shard.storage.ddr += extra


def build_planner(cfg: ShardingConfig, world_size: int, compute_device: str, table_dims: Dict[str, int],
                  local_world_size: Optional[int] = None) -> EmbeddingShardingPlanner:
    """EmbeddingShardingPlanner: Topology from the config's memory caps, one sharding type, kernel 'fused'.

    table_dims: {table name: embedding dim}. column_wise splits a table into ``world_size`` column blocks
    (``min_partition`` = dim / world_size, a multiple of 4) instead of TorchRec's 128-wide default.
    """
    topo_kwargs: Dict[str, Any] = {}
    if cfg.hbm_cap_bytes:
        topo_kwargs["hbm_cap"] = cfg.hbm_cap_bytes
    if cfg.ddr_cap_bytes:
        topo_kwargs["ddr_cap"] = cfg.ddr_cap_bytes
    topology = Topology(world_size=world_size, compute_device=compute_device,
                        local_world_size=local_world_size or world_size, **topo_kwargs)
    constraints = {}
    for name, dim in table_dims.items():
        cw_dim = max(4, (dim // world_size) // 4 * 4) if cfg.sharding_type == "column_wise" else None
        constraints[name] = ParameterConstraints(sharding_types=[cfg.sharding_type], min_partition=cw_dim,
                                                 compute_kernels=[EmbeddingComputeKernel.FUSED.value])
    estimators = [EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topology,
                                                       constraints=constraints),
                  RowwiseAdamWStorageEstimator(topology=topology, constraints=constraints)]
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=cfg.batch_size, constraints=constraints,
                                     estimator=estimators)
    return EmbeddingShardingPlanner(topology=topology, batch_size=cfg.batch_size, enumerator=enumerator,
                                    constraints=constraints, debug=False)


def table_dims(module: nn.Module) -> Dict[str, int]:
    """{table name: embedding dim} of every EmbeddingCollection in ``module`` (meta tables included)."""
    return {c.name: c.embedding_dim for m in module.modules() if isinstance(m, EmbeddingCollection)
            for c in m.embedding_configs()}


def local_world_size(world_size: int) -> int:
    """Processes per host: LOCAL_WORLD_SIZE (set by torchrun / the SLURM launcher), else ``world_size``."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def plan_sharding(module: nn.Module, cfg: ShardingConfig, world_size: int, compute_device: str,
                  local_world_size: Optional[int] = None, pg: Optional[dist.ProcessGroup] = None,
                  ) -> Tuple[ShardingPlan, RowwiseAdamWEmbeddingCollectionSharder, EmbeddingShardingPlanner]:
    """The sharding plan of every EmbeddingCollection in ``module`` (tables may be on the meta device), the
    sharder that executes it and the planner (its ``_best_plan`` holds the storage estimates). With ``pg`` the
    plan is made collectively (rank 0 plans, all ranks get it), as the trainer does; without, in this process
    only (``hstu plan``). The one planner path for both."""
    cfg.validate()
    sharder = RowwiseAdamWEmbeddingCollectionSharder(cfg)
    planner = build_planner(cfg, world_size, compute_device, table_dims(module), local_world_size)
    if pg is not None:
        plan = planner.collective_plan(module, [sharder], pg)  # type: ignore[list-item]
    else:
        plan = planner.plan(module, [sharder])  # type: ignore[list-item]
    return plan, sharder, planner


def shard_embedding_collection(module: nn.Module, cfg: ShardingConfig, pg: Optional[dist.ProcessGroup] = None,
                               device: Optional[torch.device] = None) -> DistributedModelParallel:
    """Plan (collectively) and shard every EmbeddingCollection in ``module``; returns the DMP.

    Needs an initialised process group (gloo on CPU, nccl on GPU). ``device``: this rank's compute device
    (default cuda:LOCAL_RANK when CUDA is available, else cpu). Optimizer state: ``dmp.fused_optimizer``.
    Collections on the meta device are materialised per shard (each rank allocates only its shards).
    """
    cfg.validate()
    pg = pg or dist.GroupMember.WORLD
    assert pg is not None, "init the process group first (gloo on CPU, nccl on GPU: trainer/distributed.py setup)"
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
    world = dist.get_world_size(pg)
    plan, sharder, _ = plan_sharding(module, cfg, world, device.type, local_world_size(world), pg)
    return DistributedModelParallel(module, env=ShardingEnv.from_process_group(pg), device=device, plan=plan,
                                    sharders=[sharder])  # type: ignore[list-item]


def rowwise_kernels(module: nn.Module) -> List[RowwiseAdamWEmbedding]:
    """The rowwise AdamW kernels of a DMP (TorchRec keeps lookups in a plain list, outside ``modules()``)."""
    out: List[RowwiseAdamWEmbedding] = []
    for m in module.modules():
        if isinstance(m, ShardedEmbeddingCollection):
            for lookup in m._lookups:
                out.extend(k for k in lookup.modules() if isinstance(k, RowwiseAdamWEmbedding))
    return out


def element_bytes(dmp: nn.Module) -> Dict[str, Any]:
    """Bytes per embedding element on this rank, measured from the kernels' real tensors.

    Weights count as "device" (the compute device); momentum1/momentum2 count as "host" when the state
    placement is host, else "device". Returns {"device", "host", "elements", "state_tensor_device"}.
    """
    dev = host = elements = 0
    state_devices = set()
    for kernel in rowwise_kernels(dmp):
        e = kernel.emb_module
        elements += e.weights.numel()
        dev += e.weights.numel() * e.weights.element_size()
        state = sum(t.numel() * t.element_size() for t in (e.momentum1, e.momentum2))
        if e.state_placement == "host":
            host += state
        else:
            dev += state
        state_devices.add(str(e.momentum1.device))
    n = max(elements, 1)
    return {"device": dev / n, "host": host / n, "elements": elements, "state_tensor_device": sorted(state_devices)}


__all__ = [
    "TABLE_NAME", "FEATURE_NAME", "make_item_embedding_collection", "rowwise_adamw_fused_params",
    "RowwiseAdamWGroupedEmbeddingsLookup", "RowwiseAdamWShardedEmbeddingCollection",
    "RowwiseAdamWEmbeddingCollectionSharder", "RowwiseAdamWStorageEstimator", "optimizer_state_bytes",
    "build_planner", "table_dims", "local_world_size", "plan_sharding", "shard_embedding_collection",
    "rowwise_kernels", "element_bytes",
]
