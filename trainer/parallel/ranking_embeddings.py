"""The ranking model's tables on ONE TorchRec EmbeddingCollection (sharded by DMP), for task=ranking with
``sharding.enabled=true`` (docs/ranking.md, docs/distributed.md).

- :class:`CollectionRankingTables` replaces ``HSTURankingModel.tables`` / ``DLRMRanking.tables`` (a plain
  :class:`hstu.modules.ranking.RankingTables` whose weights it copies, so a sharded run starts from exactly the
  plain run's initialisation). One table per plain table: ``<key>_table`` for feature ``<key>`` with key in
  ``item``, ``action``, ``context_<c>``, ``side_<f>``; all of dim D (one collection needs one dim).
  ``lookup({key: ids})`` is ONE KJT lookup with one bag per key (an empty bag for a key without ids), so every
  rank issues the same collectives whatever its batch holds. After ``shard_embedding_collection`` the lookup is
  a collective (input all-to-all, local gather, output all-to-all) trained by the fused rowwise AdamW.
- :func:`plain_state_dict` exports a DMP ranking model as the state_dict of the plain model (best.pt,
  ``hstu eval``): every table is gathered (collective) and renamed to its ``tables.*`` name.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.modules.ranking import RankingLookup, RankingTables
from hstu.trainer.parallel.item_embeddings import full_table
from hstu.trainer.parallel.item_features import plain_feature_name
from hstu.trainer.parallel.sharding import _DTYPES
from hstu.trainer.parallel.table_init import seeded_init_fn

PREFIX = "tables"  # attribute of the ranking models holding their tables
COLLECTION_PREFIX = f"{PREFIX}.collection.embeddings."
_PLAIN = {"item": "items.table.weight", "action": "actions.weight"}


def table_name(key: str) -> str:
    """Collection table of a ranking table key (``item`` -> ``item_table``; never ``items``: ModuleDict.items)."""
    return f"{key}_table"


def plain_name(name: str) -> str:
    """A sharded ranking model's state_dict name (DMP, DCP ``model.*`` without the prefix) -> the plain model's:
    ``tables.collection.embeddings.<key>_table.weight`` -> ``tables.items.table.weight`` | ``tables.actions.weight``
    | ``tables.contextual.<c>.weight`` | ``tables.side.<f>.weight``; an item-tower feature table's
    (trainer/parallel/item_features.py) -> ``item_tower.tables.<name>.weight``; any other name unchanged."""
    if plain_feature_name(name) != name:
        return plain_feature_name(name)
    if not (name.startswith(COLLECTION_PREFIX) and name.endswith("_table.weight")):
        return name
    key = name[len(COLLECTION_PREFIX):-len("_table.weight")]
    if key in _PLAIN:
        return f"{PREFIX}.{_PLAIN[key]}"
    kind, _, index = key.rpartition("_")
    return f"{PREFIX}.{'contextual' if kind == 'context' else 'side'}.{int(index)}.weight"


class CollectionRankingTables(RankingLookup, nn.Module):
    """The tables of a plain RankingTables as one EmbeddingCollection; ``lookup`` = one KJT lookup.

    ``lookup({key: ids [N_k]}) -> {key: [N_k, D] float32}``; rows of id 0 are zeroed (and so get no gradient),
    as ``nn.Embedding(padding_idx=0)`` does in the plain tables."""

    def __init__(self, plain: RankingTables, weight_dtype: str = "float32", init_seed: Optional[int] = None) -> None:
        super().__init__()
        self.dim, self.num_contextual, self.num_side = plain.dim, plain.num_contextual, plain.num_side
        self.keys: List[str] = plain.table_keys()
        meta = any(plain.table(k).weight.is_meta for k in self.keys)
        if meta and init_seed is None:
            raise ValueError("CollectionRankingTables: meta-device tables need init_seed (per-shard init)")
        configs = [EmbeddingConfig(name=table_name(k), embedding_dim=plain.dim,
                                   num_embeddings=plain.table(k).num_embeddings, feature_names=[k],
                                   data_type=_DTYPES[weight_dtype][1],
                                   init_fn=seeded_init_fn(init_seed, table_name(k)) if meta else None)
                   for k in self.keys]
        if meta:  # DMP materialises each rank's shards and calls init_fn on them (trainer/parallel/table_init.py)
            self.collection = EmbeddingCollection(tables=configs, device=torch.device("meta"))
            return
        with torch.random.fork_rng(devices=[]):  # the collection's own init must not move the global RNG
            self.collection = EmbeddingCollection(tables=configs, device=torch.device("cpu"))
        with torch.no_grad():
            for k in self.keys:
                self.collection.embeddings[table_name(k)].weight.copy_(plain.table(k).weight)

    def kjt(self, requests: Dict[str, torch.Tensor]) -> KeyedJaggedTensor:
        """{key: ids [N_k]} -> KJT over ALL keys, one bag each (empty for keys not requested)."""
        device = next(iter(requests.values())).device if requests else torch.device("cpu")
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        ids = [requests.get(k, empty).reshape(-1).long() for k in self.keys]
        lengths = torch.tensor([t.numel() for t in ids], dtype=torch.int64, device=device)
        return KeyedJaggedTensor(keys=self.keys, values=torch.cat(ids), lengths=lengths)

    def lookup(self, requests: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        unknown = sorted(set(requests) - set(self.keys))
        if unknown:
            raise KeyError(f"unknown ranking table keys {unknown} (tables: {self.keys})")
        out = self.collection(self.kjt(requests))
        result = {}
        for key, ids in requests.items():
            emb = out[key].values().float()  # [N_k, D]
            result[key] = emb * (ids.reshape(-1) != 0).unsqueeze(1).to(emb.dtype)
        return result


def find_ranking_tables(model: nn.Module) -> "CollectionRankingTables | None":
    """The CollectionRankingTables inside ``model`` (a DMP or a plain module), or None."""
    inner = getattr(model, "module", model)
    for m in inner.modules():
        if isinstance(m, CollectionRankingTables):
            return m
    return None


def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of the plain ranking model (CPU tensors): each sharded table is gathered (collective, the
    same order on every rank) and renamed by :func:`plain_name`; dense parameters keep their names."""
    if find_ranking_tables(model) is None:
        raise ValueError("plain_state_dict: the model has no CollectionRankingTables")
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if plain_name(key) != key:
            out[plain_name(key)] = full_table(value).float().cpu()
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu()
    return out


__all__ = ["CollectionRankingTables", "find_ranking_tables", "plain_name", "plain_state_dict", "table_name"]
