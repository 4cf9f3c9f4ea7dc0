"""Item tower: an item's vector from its id embedding and its content features (docs/model.md "Item tower").

Features are fixed-width int64 blocks of one matrix ``feature_values [num_items + 1, W]`` (a buffer; row =
item id; 0 = padding / missing), feature f in columns ``offsets[f] : offsets[f] + widths[f]`` with indices
into its own table ``nn.Embedding(cardinalities[f], D, padding_idx=0)``. Per item and feature the embeddings of
the non-zero slots are pooled (mean | sum; a single-valued feature is a width-1 block). The parts are combined:

- ``sum``: id part + Σ_f pooled_f
- ``mlp``: Linear((1 + F)·D -> D) · SiLU · Linear(D -> D) over the concatenation [id part, pooled_1..F]

The id part is the id embedding times ``id_weight[id]`` (a buffer, 1 or 0): 0 for items whose id is dropped
(``content_only_max_events``: too few training events) and for every item when ``use_ids`` is false, so such
an item's vector depends on its features only — a new item needs nothing else (serving ``add_items``). The same
vectors are the input tokens and the output vectors that are scored. Id 0 (padding) always maps to zeros.

:meth:`ItemTower.combine` (id part [N, D], packed features [N, W]) -> [N, D] is plain torch, so it exports with
torch.export for serving (serving/export.py).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from hstu.modules.embeddings import INIT_STD, table_device

COMBINES = ("sum", "mlp")
POOLINGS = ("mean", "sum")


class ItemTower(nn.Module):
    """Content part + combination; the id table stays in ``RetrievalModel.item_embeddings`` (unchanged keys).

    names / widths / cardinalities: per feature; values: [num_items + 1, sum(widths)] int64.
    """

    def __init__(self, names: Sequence[str], widths: Sequence[int], cardinalities: Sequence[int],
                 values: torch.Tensor, dim: int, combine: str = "sum", pooling: str = "mean",
                 use_ids: bool = True) -> None:
        super().__init__()
        if combine not in COMBINES or pooling not in POOLINGS:
            raise ValueError(f"combine must be one of {COMBINES}, pooling one of {POOLINGS}: {combine}, {pooling}")
        if not (len(names) == len(widths) == len(cardinalities)) or not names:
            raise ValueError("names, widths and cardinalities must be non-empty and of equal length")
        if values.dim() != 2 or values.shape[1] != sum(widths):
            raise ValueError(f"values must be [num_items + 1, {sum(widths)}], got {tuple(values.shape)}")
        self.names, self.widths = tuple(names), tuple(int(w) for w in widths)
        self.combine_mode, self.pooling, self.dim = combine, pooling, int(dim)
        self.offsets = [sum(self.widths[:f]) for f in range(len(self.widths))]
        self.tables = nn.ModuleDict()
        for name, card in zip(self.names, cardinalities):
            # on the meta device under tables_on("meta") (sharding.table_init=per_shard): initialised per shard
            table = nn.Embedding(int(card), dim, padding_idx=0, device=table_device())
            nn.init.trunc_normal_(table.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()
            self.tables[name] = table
        self.register_buffer("feature_values", values.long().clone())
        self.register_buffer("feature_widths", torch.tensor(self.widths, dtype=torch.int64))
        self.register_buffer("id_weight", torch.full((values.shape[0],), 1.0 if use_ids else 0.0))
        self.mlp = None
        if combine == "mlp":
            self.mlp = nn.Sequential(nn.Linear((1 + len(names)) * dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @property
    def num_items(self) -> int:
        return int(self.feature_values.shape[0]) - 1

    def drop_ids(self, content_only: torch.Tensor) -> None:
        """content_only [num_items + 1] bool: these items use their content part only (id weight 0)."""
        with torch.no_grad():
            self.id_weight.masked_fill_(content_only.to(self.id_weight.device), 0.0)

    def pooled(self, packed: torch.Tensor) -> torch.Tensor:
        """packed [N, W] int64 feature indices -> [N, F, D] pooled embedding per feature."""
        blocks = {name: packed[:, lo:lo + width] for name, lo, width in zip(self.names, self.offsets, self.widths)}
        if isinstance(self.tables, nn.ModuleDict):
            looked_up = {name: self.tables[name](idx) for name, idx in blocks.items()}  # [N, w, D]
        else:  # sharded: trainer/parallel/item_features.py CollectionFeatureTables, one collective lookup
            looked_up = self.tables.lookup(blocks)
        parts = []
        for name in self.names:
            idx = blocks[name]
            emb = looked_up[name].sum(1)  # padding rows are zero
            if self.pooling == "mean":
                emb = emb / (idx > 0).sum(1, keepdim=True).clamp(min=1).to(emb.dtype)
            parts.append(emb)
        return torch.stack(parts, dim=1)

    def combine(self, id_part: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """id_part [N, D] (already weighted; zeros for content-only items), packed [N, W] -> item vectors [N, D]."""
        pooled = self.pooled(packed)  # [N, F, D]
        if self.mlp is None:
            return id_part + pooled.sum(1)
        return self.mlp(torch.cat([id_part.unsqueeze(1), pooled], dim=1).flatten(1))

    def forward(self, ids: torch.Tensor, id_embeddings: torch.Tensor) -> torch.Tensor:
        """ids [N] in 0..num_items, their id embeddings [N, D] -> item vectors [N, D] (zeros for id 0)."""
        id_part = id_embeddings * self.id_weight[ids].unsqueeze(-1).to(id_embeddings.dtype)
        out = self.combine(id_part, self.feature_values[ids])
        return out * (ids != 0).unsqueeze(-1).to(out.dtype)


def build_item_tower(model_cfg: Any, item_features: Any, num_items: int) -> Optional[ItemTower]:
    """The ItemTower of ``item_features`` (an ItemFeatureTable or :func:`features_from_state`'s layout; None ->
    None) for a model of ``num_items`` items with ``model_cfg.item_features`` options (retrieval and ranking)."""
    if item_features is None:
        return None
    values = torch.as_tensor(item_features.values, dtype=torch.int64)
    if values.shape[0] != num_items + 1:
        raise ValueError(f"item features cover {values.shape[0] - 1} items, the model has {num_items}")
    fc = model_cfg.item_features
    return ItemTower(item_features.names, item_features.widths, item_features.cardinalities, values,
                     model_cfg.embedding_dim, fc.combine, fc.pooling, fc.use_ids)


def features_from_state(state: Dict[str, torch.Tensor], prefix: str = "item_tower.") -> Optional[SimpleNamespace]:
    """The feature layout of a saved ItemTower (``prefix`` e.g. "item_tower."): names and cardinalities from the
    table weights (in order), widths and values from the buffers — what RetrievalModel(item_features=...) takes
    to rebuild the same structure (serving export). None when the state has no tower."""
    values = state.get(prefix + "feature_values")
    if values is None:
        return None
    table_prefix = prefix + "tables."
    names = [k[len(table_prefix):-len(".weight")] for k in state if k.startswith(table_prefix)]
    cards = [int(state[f"{table_prefix}{n}.weight"].shape[0]) for n in names]
    widths = [int(w) for w in state[prefix + "feature_widths"].tolist()]
    return SimpleNamespace(names=tuple(names), widths=tuple(widths), cardinalities=tuple(cards), values=values)


class ContentStep(nn.Module):
    """The exported serving program: (id part [M, D], packed features [M, W] int64) -> item vectors [M, D]
    (``ItemTower.combine``; a new item passes zeros as its id part)."""

    def __init__(self, tower: ItemTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, id_part: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return self.tower.combine(id_part, packed)
