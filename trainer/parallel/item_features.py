"""The item tower's feature tables on ONE TorchRec EmbeddingCollection (sharded by DMP), for retrieval and ranking
with ``model.item_features.enabled`` and ``sharding.enabled`` (docs/model.md "Item tower").

:class:`CollectionFeatureTables` replaces ``ItemTower.tables`` (a ModuleDict of ``nn.Embedding(padding_idx=0)``
whose weights it copies, so a sharded run starts from exactly the plain run's initialisation; tables on the meta
device — ``sharding.table_init=per_shard`` — stay there and DMP initialises each rank's shards from ``(init_seed,
table, row)``, trainer/parallel/table_init.py): one table
``item_feature_<name>_table`` per feature, key ``item_feature_<name>``. ``lookup({name: idx [N, w]})`` is ONE KJT
lookup with one bag per feature -> ``{name: [N, w, D]}`` with the rows of index 0 zeroed (so padding gets no
gradient, as ``padding_idx=0`` in the plain tables). After sharding the lookup is a collective trained by the
fused rowwise AdamW, like the id table (trainer/parallel/item_embeddings.py). :func:`plain_feature_name` maps the
sharded state_dict names back to the plain ``item_tower.tables.<name>.weight``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.trainer.parallel.sharding import _DTYPES
from hstu.trainer.parallel.table_init import seeded_init_fn

TOWER_TABLES = "item_tower.tables"
COLLECTION_PREFIX = f"{TOWER_TABLES}.collection.embeddings.item_feature_"


def feature_key(name: str) -> str:
    return f"item_feature_{name}"


def plain_feature_name(name: str) -> str:
    """``item_tower.tables.collection.embeddings.item_feature_<f>_table.weight`` -> ``item_tower.tables.<f>.weight``;
    any other name is returned unchanged."""
    if not (name.startswith(COLLECTION_PREFIX) and name.endswith("_table.weight")):
        return name
    return f"{TOWER_TABLES}.{name[len(COLLECTION_PREFIX):-len('_table.weight')]}.weight"


class CollectionFeatureTables(nn.Module):
    """``lookup({name: idx [N, w] int64}) -> {name: [N, w, D] float32}`` from one EmbeddingCollection."""

    def __init__(self, plain: nn.ModuleDict, weight_dtype: str = "float32", init_seed: Optional[int] = None
                 ) -> None:
        super().__init__()
        self.names: List[str] = list(plain.keys())
        meta = any(plain[n].weight.is_meta for n in self.names)
        if meta and init_seed is None:
            raise ValueError("CollectionFeatureTables: meta-device tables need init_seed (per-shard init)")
        configs = [EmbeddingConfig(name=f"{feature_key(n)}_table", embedding_dim=plain[n].embedding_dim,
                                   num_embeddings=plain[n].num_embeddings, feature_names=[feature_key(n)],
                                   data_type=_DTYPES[weight_dtype][1],
                                   init_fn=seeded_init_fn(init_seed, f"{feature_key(n)}_table") if meta else None)
                   for n in self.names]
        if meta:  # DMP materialises each rank's shards and calls init_fn on them (trainer/parallel/table_init.py)
            self.collection = EmbeddingCollection(tables=configs, device=torch.device("meta"))
            return
        with torch.random.fork_rng(devices=[]):  # the collection's own init must not move the global RNG
            self.collection = EmbeddingCollection(tables=configs, device=torch.device("cpu"))
        with torch.no_grad():
            for n in self.names:
                self.collection.embeddings[f"{feature_key(n)}_table"].weight.copy_(plain[n].weight)

    def lookup(self, blocks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if sorted(blocks) != sorted(self.names):
            raise KeyError(f"feature lookup needs exactly {self.names}, got {sorted(blocks)}")
        ids = [blocks[n].reshape(-1).long() for n in self.names]
        lengths = torch.tensor([t.numel() for t in ids], dtype=torch.int64, device=ids[0].device)
        out = self.collection(KeyedJaggedTensor(keys=[feature_key(n) for n in self.names], values=torch.cat(ids),
                                                lengths=lengths))
        result = {}
        for n in self.names:
            emb = out[feature_key(n)].values().float().reshape(*blocks[n].shape, -1)  # [N, w, D]
            result[n] = emb * (blocks[n] != 0).unsqueeze(-1).to(emb.dtype)
        return result
