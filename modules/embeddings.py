"""Item embedding stage: ids -> vectors. Kept separate from the dense tower so it can be replaced by a TorchRec
(sharded) EmbeddingCollection keyed "item_id" without touching the encoders."""

from __future__ import annotations

import torch
import torch.nn as nn

INIT_STD = 0.02


class ItemEmbeddings(nn.Module):
    """``nn.Embedding(num_items + 1, D, padding_idx=0)``; id 0 = padding / none (zero vector, no gradient).

    Init as GR research (LocalEmbeddingModule): truncated normal, std 0.02, cut at ±2 std; row 0 zeroed."""

    def __init__(self, num_items: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_items, self.embedding_dim = num_items, embedding_dim
        self.table = nn.Embedding(num_items + 1, embedding_dim, padding_idx=0)
        nn.init.trunc_normal_(self.table.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        with torch.no_grad():
            self.table.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int64 in 0..num_items -> [..., D]."""
        return self.table(ids)
