"""Generative ranking with HSTU (docs/ranking.md): items and actions interleaved in one jagged sequence, candidates
appended target-aware, multi-task heads at item positions only.

Token embedding (row t of the batch, kinds from ``hstu.trainer.data.ranking_batch``):
    context c  : ctx_table[c][id]            item : item_table[id]
    action     : action_table[id] (+ item_table[paired item] when ``action_with_item``)
    side f     : side_table[f][id]
    (with item features every item row item_table[i] is the item tower's ItemTower(i, item_table[i]) instead,
    modules/item_tower.py)
    h_t = e_t·√D + kind_emb[kind] + pos_emb[position] (+ time_emb[log-bucket(time gap)] for the production variant)
Layers: the HSTU layers of modules/hstu.py (``model.variant``), causal, with ``num_targets`` (candidates see the
history + themselves) and ``contextual_len`` (the C prefix tokens are visible to all). Heads: LayerNorm →
Linear(D, hidden) → SiLU → Linear(hidden, K [+1 regression]) on the rows in ``batch.pred_rows`` only.

The batch is duck-typed (``hstu.trainer.data.ranking_batch.RankingBatch``); nothing from the trainer is imported.
The embedding tables (item, action, contextual, side) live in :class:`RankingTables`, apart from the dense tower;
the model only reaches them through :class:`RankingLookup` (one batched lookup per forward), which the sharded
TorchRec tables of ``hstu.trainer.parallel.ranking_embeddings`` also implement (``sharding.enabled``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hstu.modules.embeddings import INIT_STD, ItemEmbeddings, table_device
from hstu.modules.hstu import ProductionHSTULayer, ResearchHSTULayer, cached_layers
from hstu.modules.item_tower import ItemTower, build_item_tower
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
    emb = nn.Embedding(rows, dim, padding_idx=0, device=table_device())
    nn.init.trunc_normal_(emb.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


class RankingLookup:
    """Token-embedding logic over an abstract batched lookup, shared by the plain :class:`RankingTables` and the
    sharded TorchRec tables (``hstu.trainer.parallel.ranking_embeddings``).

    Table keys: ``item``, ``action``, ``context_<c>`` (one per contextual feature), ``side_<f>`` (one per side
    series). Subclasses set ``dim``, ``num_contextual``, ``num_side`` and implement :meth:`lookup`; every method
    below issues exactly ONE ``lookup`` call (on the sharded path one collective, the same on every rank)."""

    dim: int
    num_contextual: int
    num_side: int

    def table_keys(self) -> List[str]:
        return (["item", "action"] + [f"context_{c}" for c in range(self.num_contextual)]
                + [f"side_{f}" for f in range(self.num_side)])

    def lookup(self, requests: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{table key: ids [N_k] int64} -> {table key: [N_k, D] float32}; id 0 = padding (zero vector)."""
        raise NotImplementedError

    def lookup_many(self, parts: Sequence[Tuple[str, torch.Tensor]]) -> List[torch.Tensor]:
        """[(table key, ids [N_i])] -> [[N_i, D]] through one :meth:`lookup` (ids of one table concatenated)."""
        by_key: Dict[str, List[torch.Tensor]] = {}
        for key, ids in parts:
            by_key.setdefault(key, []).append(ids.reshape(-1))
        out = self.lookup({k: torch.cat(v) if len(v) > 1 else v[0] for k, v in by_key.items()})
        splits = {k: list(torch.split(out[k], [t.numel() for t in v])) for k, v in by_key.items()}
        return [splits[key].pop(0) for key, _ in parts]

    def contextual_embeddings(self, context_ids: torch.Tensor) -> torch.Tensor:
        """[B, C] -> [B, C, D]."""
        if not self.num_contextual:
            return context_ids.new_zeros(context_ids.shape + (self.dim,), dtype=torch.float32)
        embs = self.lookup_many([(f"context_{c}", context_ids[:, c]) for c in range(self.num_contextual)])
        return torch.stack(embs, 1)

    def token_embeddings(self, batch: Any, action_with_item: bool, item_tower: Optional[nn.Module] = None
                         ) -> torch.Tensor:
        """Embedding of every token of a RankingBatch: [T, D] (kind by kind; see the module docstring). With an
        ``item_tower`` (modules/item_tower.py) every item row — item tokens and the items paired with actions —
        is the tower's vector over its id row and content features (one tower call)."""
        kinds, ids, feats = batch.token_kinds, batch.token_ids, batch.token_features
        sel = {k: torch.nonzero(kinds == k, as_tuple=True)[0] for k in (KIND_ITEM, KIND_ACTION)}
        groups = [(f"context_{c}", torch.nonzero((kinds == KIND_CONTEXT) & (feats == c), as_tuple=True)[0])
                  for c in range(self.num_contextual)]
        groups += [(f"side_{f}", torch.nonzero((kinds == KIND_SIDE) & (feats == f), as_tuple=True)[0])
                   for f in range(self.num_side)]
        parts = [("item", ids[sel[KIND_ITEM]]), ("action", ids[sel[KIND_ACTION]])]
        if action_with_item:
            parts.append(("item", batch.paired_items[sel[KIND_ACTION]]))
        embs = self.lookup_many(parts + [(key, ids[rows]) for key, rows in groups])
        if item_tower is not None:
            item_at = [0, 2] if action_with_item else [0]
            towered = through_tower(item_tower, [parts[i][1] for i in item_at], [embs[i] for i in item_at])
            for i, e in zip(item_at, towered):
                embs[i] = e
        action = embs[1] + embs[2] if action_with_item else embs[1]
        out = torch.zeros(ids.shape[0], self.dim, device=ids.device)
        out = out.index_copy(0, sel[KIND_ITEM], embs[0].to(out.dtype))
        out = out.index_copy(0, sel[KIND_ACTION], action.to(out.dtype))
        for (_, rows), e in zip(groups, embs[len(parts):]):
            out = out.index_copy(0, rows, e.to(out.dtype))
        return out


def through_tower(tower: nn.Module, ids: Sequence[torch.Tensor], embs: Sequence[torch.Tensor]
                  ) -> List[torch.Tensor]:
    """Item id rows through the item tower in ONE call (one collective feature lookup on the sharded path):
    ids [[N_i]], their id-table rows [[N_i, D]] -> item vectors [[N_i, D]] (zeros for id 0)."""
    out = tower(torch.cat([i.reshape(-1) for i in ids]), torch.cat(list(embs)))
    return list(torch.split(out, [int(i.numel()) for i in ids]))


class RankingTables(RankingLookup, nn.Module):
    """Item, action, contextual (one per feature) and side-series (one per series) tables, each
    ``nn.Embedding(rows, D, padding_idx=0)`` with GR's truncated-normal init."""

    def __init__(self, spec: RankingSpec, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.items = ItemEmbeddings(spec.num_items, dim)
        self.actions = _table(spec.num_actions + 1, dim)
        self.contextual = nn.ModuleList(_table(v, dim) for v in spec.contextual_vocab)
        self.side = nn.ModuleList(_table(v, dim) for v in spec.side_vocab)
        self.num_contextual, self.num_side = len(self.contextual), len(self.side)

    def table(self, key: str) -> nn.Embedding:
        """The nn.Embedding of a table key (see :meth:`RankingLookup.table_keys`)."""
        if key == "item":
            return self.items.table
        if key == "action":
            return self.actions
        kind, _, index = key.rpartition("_")
        return (self.contextual if kind == "context" else self.side)[int(index)]

    def lookup(self, requests: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {key: self.table(key)(ids) for key, ids in requests.items()}


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

    def __init__(self, model_cfg: "ModelConfig", spec: RankingSpec, ops_backend: BackendLike = "pytorch",
                 item_features: Any = None) -> None:
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
        # item content features (model.item_features; an ItemFeatureTable or alike): item rows = the item tower's
        # vectors over the id rows (docs/model.md "Item tower"); built last so the other tables' init is unchanged
        self.item_tower: Optional[ItemTower] = build_item_tower(model_cfg, item_features, spec.num_items)

    def encode(self, batch: Any) -> torch.Tensor:
        """RankingBatch -> [T, D] contextualised token states."""
        e = self.tables.token_embeddings(batch, self.spec.action_with_item, self.item_tower)
        h = self.input_dropout(self.input_embeddings(e, batch.token_kinds, batch.positions, batch.time_gaps))
        nt = batch.num_targets if int(batch.num_targets.sum()) > 0 else None
        for layer in self.layers:
            h = layer(h, batch.offsets, int(batch.max_len), batch.timestamps if self.research else None,
                      None, num_targets=nt, contextual_len=int(batch.contextual_len))
        return h

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.head(self.encode(batch)[batch.pred_rows])

    # ------------------------------------------------------------------ serving (M-FALCON, docs/serving.md)
    def item_rows(self) -> torch.Tensor:
        """[num_items + 1, D] the raw row of every item token (row 0 = padding): the id table, or the item tower
        over it (then computed once, no grad) — what serving stores as its item table (serving/export_ranking.py)."""
        weight = self.tables.items.table.weight
        if self.item_tower is None:
            return weight.detach()
        with torch.no_grad():
            return self.item_tower(torch.arange(weight.shape[0], device=weight.device), weight).detach()

    def input_embeddings(self, e: torch.Tensor, kinds: torch.Tensor, positions: torch.Tensor,
                         time_gaps: torch.Tensor) -> torch.Tensor:
        """Layer input of tokens from their raw table rows e [M, D] (``RankingTables.token_embeddings``):
        e·√D + kind_emb[kind] + pos_emb[position] (+ production time_emb[bucket(gap)]), as ``encode`` before
        dropout; kinds / positions / time_gaps [M] or [1] (broadcast)."""
        h = e * math.sqrt(self.dim) + self.kind_embeddings(kinds) + self.position_embeddings(
            positions.clamp(max=self.max_tokens - 1))
        if self.time_embeddings is not None:
            h = h + self.time_embeddings(time_bucket_ids(time_gaps, self.time_bucket_base, self.num_time_buckets))
        return h

    def forward_cached(self, e: torch.Tensor, kinds: torch.Tensor, positions: torch.Tensor, time_gaps: torch.Tensor,
                       timestamps: torch.Tensor, t_next: torch.Tensor, contextual_len: torch.Tensor,
                       past_k: torch.Tensor, past_v: torch.Tensor, past_pos: torch.Tensor, past_ts: torch.Tensor,
                       candidates: bool = False):
        """ONE sequence's new rows after a KV cache (serving/ranking.py), equal to ``encode`` on the whole layout.

        e [M, D] raw token rows; kinds, positions (= layout index: position embedding and rab), time_gaps,
        timestamps, t_next (the next layout row's time; the query time for the last history row): [M], or [1]
        when shared (M-FALCON candidates; time_gaps may stay [M]); contextual_len [1]: prefix rows (visible to
        every row). past_k [L, H, N, dqk], past_v [L, H, N, dv], past_pos / past_ts [N]. candidates=False:
        causal continuation (+ prefix); True: each row sees the past and itself. -> (h [M, D], k, v [L, H, M, ·])."""
        h = self.input_dropout(self.input_embeddings(e, kinds, positions, time_gaps))
        visible = None
        if not candidates:
            rows = torch.arange(h.shape[0], device=h.device)
            visible = (rows.view(-1, 1) >= rows.view(1, -1)) | (positions.view(1, -1) < contextual_len.view(1, 1))
        return cached_layers(self.layers, h, positions, timestamps, t_next, past_k, past_v, past_pos, past_ts,
                             candidates, visible)
