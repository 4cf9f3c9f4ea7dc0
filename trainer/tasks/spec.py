"""The task spec: the hooks every task provides (:class:`TaskSpec`) and what its ``build_data`` returns
(:class:`TaskData`). The registry is in trainer/tasks/__init__.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, runtime_checkable

import torch


@dataclass
class TaskData:
    """What a task's build_data returns: loaders, catalogue size, user count and the underlying dataset."""

    train_loader: Any
    eval_loader: Any  # the test split
    num_items: int
    num_users: int
    source: Any = None  # retrieval: UserSequences; ranking: RankingData
    valid_loader: Any = None  # the validation split; None when the task has none


@runtime_checkable
class TaskSpec(Protocol):
    """The hooks a task provides, in the order a run uses them (``ctx``: the loop's TrainContext, or — outside
    training, e.g. ``hstu eval`` — a torch.device; ``env``: the DistEnv, None for one process)."""

    name: str

    # -- config (after the one validation pass: rules that need the task object)
    def check_config(self) -> None: ...  # raises ConfigError
    def metric_names(self) -> List[str]: ...  # what evaluate() reports (eval.selection_metric is one of them)
    def selection_value(self, metrics: Dict[str, float]) -> float: ...  # higher is better

    # -- data
    def prepare(self, progress: bool = False) -> Dict[str, Any]: ...  # `hstu prepare`: cache + summary dict
    def build_data(self, env: Any = None) -> TaskData: ...  # this rank's loaders (call before build_model)
    def data_description(self) -> Dict[str, Any]: ...  # how the data was cut, for results.json

    # -- model, sharding, batch, loss
    def build_model(self, device: torch.device) -> torch.nn.Module: ...  # the plain (unsharded) model
    # tables -> TorchRec; tables built on the meta device (sharding.table_init=per_shard) are initialised per shard
    def wrap_sharded_tables(self, model: torch.nn.Module, weight_dtype: str,
                            init_seed: Optional[int] = None) -> None: ...
    def prefetcher(self, model: torch.nn.Module) -> Any: ...  # sharded tables' input-dist prefetch, or None
    def prepare_batch(self, prepared: Any, ctx: Any) -> Any: ...  # task part of pipeline.prepare_batch
    def compute_loss(self, model: torch.nn.Module, batch: Any, ctx: Any) -> torch.Tensor: ...

    # -- evaluation
    def eval_splits(self) -> tuple: ...  # ("validation", "test") | ("test",)
    def evaluate(self, model: torch.nn.Module, ctx: Any, split: str = "test") -> Dict[str, float]: ...
    def baseline(self, metrics: Any, env: Any = None) -> Dict[str, float]: ...  # logged; {} when disabled
    def baseline_metrics(self, env: Any = None) -> Dict[str, float]: ...  # the baseline on the test split

    # -- weights and export
    def plain_state_dict(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]: ...  # sharded -> best.pt
    def export(self, state: Dict[str, torch.Tensor], ckpt: str, out: str, *, embedding_dtype: str,
               overwrite: bool, source: Optional[Dict[str, str]]) -> Dict[str, Any]: ...  # `hstu export`
    # optional: ``streamed_export_keys`` (plain names `hstu export` leaves out of ``state``: the hook streams them
    # from ``ckpt`` in ``chunk_rows`` chunks, an extra keyword of its export)
