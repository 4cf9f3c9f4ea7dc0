"""Generative ranking with HSTU (docs/ranking.md): items and actions interleaved in one jagged sequence, candidates
appended target-aware, multi-task heads at item positions only.

Token embedding (row t of the batch, kinds from ``hstu.trainer.data.ranking_batch``):
    context c  : ctx_table[c][id]            item : item_table[id]
    action     : action_table[id] (+ item_table[paired item] when ``action_with_item``)
    side f     : side_table[f][id]
    h_t = e_t·√D + kind_emb[kind] + pos_emb[position] (+ time_emb[log-bucket(time gap)] for the production variant)
Layers: the HSTU layers of modules/hstu.py (``model.variant``), causal, with ``num_targets`` (candidates see the
history + themselves) and ``contextual_len`` (the C prefix tokens are visible to all). Heads: LayerNorm →
Linear(D, hidden) → SiLU → Linear(hidden, K [+1 regression]) on the rows in ``batch.pred_rows`` only.

The batch is duck-typed (``hstu.trainer.data.ranking_batch.RankingBatch``); nothing from the trainer is imported.
The embedding tables (item, action, contextual, side) live in :class:`RankingTables`, apart from the dense tower,
so they can be replaced by (sharded) TorchRec tables later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hstu.modules.embeddings import INIT_STD, ItemEmbeddings
from hstu.modules.hstu import ProductionHSTULayer, ResearchHSTULayer
from hstu.ops.backend import BackendLike
from hstu.ops.pytorch.hstu_attention import time_bucket_ids

if TYPE_CHECKING:
    from hstu.trainer.config import ModelConfig

KIND_CONTEXT, KIND_ITEM, KIND_ACTION, KIND_SIDE = 0, 1, 2, 3  # = hstu.trainer.data.ranking_batch.KIND_*
NUM_KINDS = 4


@dataclass
class RankingSpec:
    """What the ranking models need to know about the data: table sizes (rows incl. id 0), task names, whether a
    regression target exists, and max_tokens (position table size = attention normaliser)."""

    num_items: int
    num_actions: int
    contextual_vocab: Tuple[int, ...]
    side_vocab: Tuple[int, ...]
    task_names: Tuple[str, ...]
    regression: bool = False
    max_tokens: int = 512
    action_with_item: bool = True
    head_hidden_dim: int = 64


def _table(rows: int, dim: int) -> nn.Embedding:
    emb = nn.Embedding(rows, dim, padding_idx=0)
    nn.init.trunc_normal_(emb.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


class RankingTables(nn.Module):
    """Item, action, contextual (one per feature) and side-series (one per series) tables, each
    ``nn.Embedding(rows, D, padding_idx=0)`` with GR's truncated-normal init."""

    def __init__(self, spec: RankingSpec, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.items = ItemEmbeddings(spec.num_items, dim)
        self.actions = _table(spec.num_actions + 1, dim)
        self.contextual = nn.ModuleList(_table(v, dim) for v in spec.contextual_vocab)
        self.side = nn.ModuleList(_table(v, dim) for v in spec.side_vocab)

    @staticmethod
    def _per_feature(tables: nn.ModuleList, features: torch.Tensor, ids: torch.Tensor, dim: int) -> torch.Tensor:
        """ids [N] with feature index [N] -> [N, D] (one lookup per table)."""
        out = torch.zeros(ids.shape[0], dim, device=ids.device)
        for f, table in enumerate(tables):
            sel = torch.nonzero(features == f, as_tuple=True)[0]
            if sel.numel():
                out = out.index_copy(0, sel, table(ids[sel]))
        return out

    def contextual_embeddings(self, context_ids: torch.Tensor) -> torch.Tensor:
        """[B, C] -> [B, C, D]."""
        if not len(self.contextual):
            return context_ids.new_zeros(context_ids.shape + (self.dim,), dtype=torch.float32)
        return torch.stack([t(context_ids[:, c]) for c, t in enumerate(self.contextual)], 1)

    def token_embeddings(self, batch: Any, action_with_item: bool) -> torch.Tensor:
        """Embedding of every token of a RankingBatch: [T, D] (kind by kind; see the module docstring)."""
        kinds, ids = batch.token_kinds, batch.token_ids
        out = torch.zeros(ids.shape[0], self.dim, device=ids.device)
        for kind in (KIND_ITEM, KIND_ACTION, KIND_CONTEXT, KIND_SIDE):
            sel = torch.nonzero(kinds == kind, as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            if kind == KIND_ITEM:
                e = self.items(ids[sel])
            elif kind == KIND_ACTION:
                e = self.actions(ids[sel])
                if action_with_item:
                    e = e + self.items(batch.paired_items[sel])
            elif kind == KIND_CONTEXT:
                e = self._per_feature(self.contextual, batch.token_features[sel], ids[sel], self.dim)
            else:
                e = self._per_feature(self.side, batch.token_features[sel], ids[sel], self.dim)
            out = out.index_copy(0, sel, e.to(out.dtype))
        return out


class MultiTaskHead(nn.Module):
    """LayerNorm → Linear(D, hidden) → SiLU → Linear(hidden, K) binary logits [+ a regression output]."""

    def __init__(self, dim: int, hidden: int, num_tasks: int, regression: bool) -> None:
        super().__init__()
        self.num_tasks, self.regression = num_tasks, regression
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, num_tasks + int(regression))

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """h [N, D] -> (logits [N, K], regression [N] | None)."""
        y = self.out(F.silu(self.hidden(self.norm(h))))
        return y[:, : self.num_tasks], (y[:, self.num_tasks] if self.regression else None)


class HSTURankingModel(nn.Module):
    """HSTU generative ranker. forward(batch) -> (logits [N, K], regression [N] | None) at batch.pred_rows."""

    def __init__(self, model_cfg: "ModelConfig", spec: RankingSpec, ops_backend: BackendLike = "pytorch") -> None:
        super().__init__()
        if model_cfg.variant not in ("research", "production"):
            raise ValueError(f"model.variant must be research | production, got {model_cfg.variant!r}")
        D = model_cfg.embedding_dim
        self.spec, self.dim, self.max_tokens = spec, D, spec.max_tokens
        self.tables = RankingTables(spec, D)
        self.kind_embeddings = nn.Embedding(NUM_KINDS, D)
        self.position_embeddings = nn.Embedding(spec.max_tokens, D)
        for emb in (self.kind_embeddings, self.position_embeddings):
            bound = math.sqrt(1.0 / emb.num_embeddings)
            nn.init.uniform_(emb.weight, -bound, bound)
        self.time_embeddings: Optional[nn.Embedding] = None
        self.num_time_buckets, self.time_bucket_base = model_cfg.num_time_buckets, model_cfg.time_bucket_base
        if model_cfg.variant == "production":  # research: time enters through the rab inside attention
            self.time_embeddings = nn.Embedding(model_cfg.num_time_buckets + 1, D)
            nn.init.uniform_(self.time_embeddings.weight, -0.1, 0.1)
            layer_cls = ProductionHSTULayer
        else:
            layer_cls = ResearchHSTULayer
        self.research = model_cfg.variant == "research"
        self.input_dropout = nn.Dropout(model_cfg.dropout)
        self.layers = nn.ModuleList(layer_cls(model_cfg, spec.max_tokens, ops_backend)
                                    for _ in range(model_cfg.num_layers))
        self.head = MultiTaskHead(D, spec.head_hidden_dim, len(spec.task_names), spec.regression)

    def encode(self, batch: Any) -> torch.Tensor:
        """RankingBatch -> [T, D] contextualised token states."""
        e = self.tables.token_embeddings(batch, self.spec.action_with_item)
        pos = batch.positions.clamp(max=self.max_tokens - 1)
        h = e * math.sqrt(self.dim) + self.kind_embeddings(batch.token_kinds) + self.position_embeddings(pos)
        if self.time_embeddings is not None:
            h = h + self.time_embeddings(time_bucket_ids(batch.time_gaps, self.time_bucket_base,
                                                         self.num_time_buckets))
        h = self.input_dropout(h)
        nt = batch.num_targets if int(batch.num_targets.sum()) > 0 else None
        for layer in self.layers:
            h = layer(h, batch.offsets, int(batch.max_len), batch.timestamps if self.research else None,
                      None, num_targets=nt, contextual_len=int(batch.contextual_len))
        return h

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.head(self.encode(batch)[batch.pred_rows])
