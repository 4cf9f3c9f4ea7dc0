"""DLRM-style ranking baseline (``model.arch: dlrm``, task=ranking): the same features and labels as the HSTU
ranker, no sequence model.

Per predicted impression (row r of ``batch.pred_rows``, sequence b), F feature vectors of width D:
    ctx_1..ctx_C  contextual embeddings of user b
    cand          candidate item embedding (item rows: the item tower's vectors with model.item_features)
    hist_items    mean item embedding of the history items before r   (train: x_0..x_{k−1}; eval: all history)
    hist_actions  mean action embedding of those items' actions
    hist_side     mean side-token embedding before r (when the data has side series)
DLRM interaction: all pairwise dot products of the F vectors; top MLP over [the F vectors, the dot products]
(widths ``ranking.dlrm_mlp``, ReLU) → K binary logits [+ regression]. Prefix means use one cumulative sum
over the jagged batch, so a whole train sequence is scored at once, like the HSTU ranker.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hstu.modules.ranking import KIND_ACTION, KIND_ITEM, KIND_SIDE, RankingSpec, RankingTables, through_tower
from hstu.ops.jagged import sequence_ids


def _prefix_means(values: torch.Tensor, keep: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor
                  ) -> torch.Tensor:
    """Mean of values[j] over rows j of the same sequence with keep[j] and j < r, for each r in ``rows``
    (zeros when none). values [T, D], keep [T] bool, offsets [B+1], rows [N] -> [N, D]."""
    v = values * keep.unsqueeze(1).to(values.dtype)
    zero = values.new_zeros(1, values.shape[1])
    cs = torch.cat([zero, v.double().cumsum(0)])  # [T+1, D]; float64 keeps long batches exact enough
    cnt = torch.cat([keep.new_zeros(1, dtype=torch.float64), keep.double().cumsum(0)])
    start = offsets[:-1].long()[sequence_ids(offsets, values.shape[0])[rows]]
    total = cs[rows] - cs[start]
    n = (cnt[rows] - cnt[start]).clamp(min=1.0).unsqueeze(1)
    return (total / n).to(values.dtype)


class DLRMRanking(nn.Module):
    """forward(batch) -> (logits [N, K], regression [N] | None) at batch.pred_rows."""

    def __init__(self, embedding_dim: int, spec: RankingSpec, mlp: Sequence[int] = (256, 128),
                 dropout: float = 0.0, item_tower: Optional[nn.Module] = None) -> None:
        super().__init__()
        D = embedding_dim
        self.spec, self.dim = spec, D
        self.tables = RankingTables(spec, D)
        self.num_features = len(spec.contextual_vocab) + 3 + int(len(spec.side_vocab) > 0)
        F_ = self.num_features
        layers, width = [], F_ * D + F_ * (F_ - 1) // 2
        for w in mlp:
            layers += [nn.Linear(width, w), nn.ReLU(), nn.Dropout(dropout)]
            width = w
        self.top = nn.Sequential(*layers)
        self.num_tasks = len(spec.task_names)
        self.out = nn.Linear(width, self.num_tasks + int(spec.regression))
        iu = torch.triu_indices(F_, F_, offset=1)
        self.register_buffer("pair_i", iu[0], persistent=False)
        self.register_buffer("pair_j", iu[1], persistent=False)
        self.item_tower = item_tower  # item content features (modules/item_tower.py): item rows = its vectors

    def features(self, batch: Any) -> torch.Tensor:
        """[N, F, D] feature vectors of every predicted impression."""
        rows, kinds = batch.pred_rows, batch.token_kinds
        T = kinds.shape[0]
        cand_start = (batch.offsets[1:] - batch.num_targets).long()
        is_cand = torch.arange(T, device=kinds.device) >= cand_start[sequence_ids(batch.offsets, T)]
        hist_item = (kinds == KIND_ITEM) & ~is_cand
        ids, feats_t = batch.token_ids, batch.token_features
        hist_rows = torch.nonzero(hist_item, as_tuple=True)[0]
        action_rows = torch.nonzero(kinds == KIND_ACTION, as_tuple=True)[0]
        side = kinds == KIND_SIDE
        side_groups = [torch.nonzero(side & (feats_t == f), as_tuple=True)[0] for f in range(self.tables.num_side)]
        C = self.tables.num_contextual
        parts = [("item", batch.pred_items), ("item", ids[hist_rows]), ("action", ids[action_rows])]
        parts += [(f"context_{c}", batch.context_ids[:, c]) for c in range(C)]
        parts += [(f"side_{f}", ids[sg]) for f, sg in enumerate(side_groups)]
        embs = self.tables.lookup_many(parts)  # ONE lookup (one collective on the sharded path)
        if self.item_tower is not None:  # candidate and history item rows: one tower call
            embs[0], embs[1] = through_tower(self.item_tower, [parts[0][1], parts[1][1]], embs[:2])
        zeros = torch.zeros(T, self.dim, device=kinds.device)
        item_vals = zeros.index_copy(0, hist_rows, embs[1].to(zeros.dtype))
        action_vals = zeros.index_copy(0, action_rows, embs[2].to(zeros.dtype))
        ctx = (torch.stack(embs[3:3 + C], 1) if C else
               zeros.new_zeros(batch.context_ids.shape[0], 0, self.dim))  # [B, C, D]
        feats = [ctx[batch.pred_seq]]  # [N, C, D]
        single = [embs[0],
                  _prefix_means(item_vals, hist_item, batch.offsets, rows),
                  _prefix_means(action_vals, kinds == KIND_ACTION, batch.offsets, rows)]
        if self.tables.num_side:
            side_vals = zeros
            for sel, e in zip(side_groups, embs[3 + C:]):
                side_vals = side_vals.index_copy(0, sel, e.to(zeros.dtype))
            single.append(_prefix_means(side_vals, side, batch.offsets, rows))
        return torch.cat(feats + [torch.stack(single, 1)], 1)

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        f = self.features(batch)  # [N, F, D]
        dots = torch.bmm(f, f.transpose(1, 2))[:, self.pair_i, self.pair_j]  # [N, F(F-1)/2]
        y = self.out(self.top(torch.cat([f.flatten(1), dots], 1)))
        return y[:, : self.num_tasks], (y[:, self.num_tasks] if self.spec.regression else None)

