"""The item-embedding stage on a TorchRec EmbeddingCollection (sharded by DMP), for ``sharding.enabled=true``.

- :class:`CollectionItemEmbeddings` replaces ``RetrievalModel.item_embeddings`` (same weights as the plain
  ``ItemEmbeddings`` it is built from): ``ids [N] -> [N, D]`` through one KJT lookup (key ``item_id``, one bag).
  After ``shard_embedding_collection`` its ``collection`` is a ShardedEmbeddingCollection: the lookup is a
  collective (input all-to-all of ids, local gather, output all-to-all of rows), so every rank must call it
  the same number of times. ``prefetch(ids)`` starts the input dist of a later ``forward(ids)`` early.
- :func:`full_table` gathers the sharded table on every rank; :func:`plain_state_dict` exports a DMP model as
  the state_dict of the plain ``RetrievalModel`` (best.pt, ``hstu eval``).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.trainer.parallel.sharding import FEATURE_NAME, TABLE_NAME, make_item_embedding_collection
from hstu.trainer.parallel.table_init import seeded_init_fn

COLLECTION_KEY = f"item_embeddings.collection.embeddings.{TABLE_NAME}.weight"
PLAIN_KEY = "item_embeddings.table.weight"


def one_bag_kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
    """ids [N] -> KJT with key item_id holding one bag of N ids."""
    lengths = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    return KeyedJaggedTensor(keys=[FEATURE_NAME], values=ids.long(), lengths=lengths)


class _Prefetched:
    """An input dist started early: ids, the sharding context and the awaitable of the distributed ids."""

    def __init__(self, ids: torch.Tensor, ctx: Any, awaitable: Any) -> None:
        self.ids, self.ctx, self.awaitable = ids, ctx, awaitable


class CollectionItemEmbeddings(nn.Module):
    """``ids [N] int64 -> [N, D]`` from table ``item_id_table`` [num_items + 1, D] of an EmbeddingCollection.

    Built from a plain :class:`hstu.modules.embeddings.ItemEmbeddings` whose weights it copies (so a sharded run
    starts from exactly the plain run's initialisation) — or, when the plain table is on the meta device
    (``sharding.table_init=per_shard``), a meta collection that DMP materialises per shard and initialises from
    ``(init_seed, table, row)`` (trainer/parallel/table_init.py). Row 0 (padding) is never looked up in training.
    """

    def __init__(self, plain: nn.Module, weight_dtype: str = "float32", init_seed: Optional[int] = None) -> None:
        super().__init__()
        self.num_items, self.embedding_dim = plain.num_items, plain.embedding_dim
        rows = plain.num_items + 1
        if plain.table.weight.is_meta:
            if init_seed is None:
                raise ValueError("CollectionItemEmbeddings: a meta-device table needs init_seed (per-shard init)")
            self.collection = make_item_embedding_collection(rows, plain.embedding_dim, weight_dtype,
                                                             torch.device("meta"),
                                                             init_fn=seeded_init_fn(init_seed, TABLE_NAME))
        else:
            self.collection = make_item_embedding_collection(rows, plain.embedding_dim, weight_dtype)
            with torch.no_grad():
                self.collection.embeddings[TABLE_NAME].weight.copy_(plain.table.weight)
        self._prefetched: Optional[_Prefetched] = None

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start the input dist of ``forward(ids)`` now (ids [N]; same tensor object later). Collective."""
        sharded = self.collection
        ctx = sharded.create_context()
        # first wait: the lengths/splits all-to-all is done and the ids all-to-all is issued (async)
        self._prefetched = _Prefetched(ids, ctx, sharded.input_dist(ctx, one_bag_kjt(ids)).wait())

    def drop_prefetch(self) -> None:
        """Complete and discard a started prefetch (its collective must still finish on every rank)."""
        if self._prefetched is not None:
            self._prefetched.awaitable.wait()
            self._prefetched = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pre = self._prefetched
        if pre is not None and pre.ids is ids:
            self._prefetched = None
            out = self.collection.compute_and_output_dist(pre.ctx, pre.awaitable.wait())
        else:
            out = self.collection(one_bag_kjt(ids))
        return out[FEATURE_NAME].values()


def find_item_embeddings(model: nn.Module) -> Optional[CollectionItemEmbeddings]:
    """The CollectionItemEmbeddings inside ``model`` (a DMP or a plain module), or None."""
    inner = getattr(model, "module", model)
    for m in inner.modules():
        if isinstance(m, CollectionItemEmbeddings):
            return m
    return None


def full_table(weight: Any, pg: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """A sharded table (ShardedTensor, any sharding type) -> the full [R, D] tensor on every rank (collective:
    each rank writes its shards into zeros, then one all_reduce SUM). A plain tensor is returned as is."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if not isinstance(weight, ShardedTensor):
        return weight.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "use DTensor": TorchRec 1.8 hands out ShardedTensors
        shards, size, dtype = weight.local_shards(), tuple(weight.size()), weight.dtype
    device = shards[0].tensor.device if shards else torch.device("cpu")
    full = torch.zeros(size, dtype=torch.float32, device=device)
    for shard in shards:
        r0, c0 = shard.metadata.shard_offsets
        rows, cols = shard.tensor.shape
        full[r0:r0 + rows, c0:c0 + cols] = shard.tensor.float()
    dist.all_reduce(full, group=pg)
    return full.to(dtype)


def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of the plain RetrievalModel (CPU tensors): the sharded table is gathered (collective) and
    renamed to ``item_embeddings.table.weight``, sharded feature tables to ``item_tower.tables.<f>.weight``;
    dense parameters keep their names."""
    from hstu.trainer.parallel.item_features import plain_feature_name

    sd = model.state_dict()
    out = {}
    for key, value in sd.items():
        if key == COLLECTION_KEY:
            out[PLAIN_KEY] = full_table(value).cpu()
        elif plain_feature_name(key) != key:  # an item-tower feature table (trainer/parallel/item_features.py)
            out[plain_feature_name(key)] = full_table(value).cpu()
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu()
    return out
