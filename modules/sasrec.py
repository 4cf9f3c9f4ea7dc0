"""SASRec baseline (Kang & McAuley 2018) on the jagged encoder interface, as GR research/ sasrec.py.

Block (GR / original SASRec, LayerNorms without affine, eps 1e-8):
    Q = LN(x);  h = LN(Q + MHA(Q, x, x, causal));  x' = h + Dropout(W2 · Dropout(ReLU(W1 · h)))
Input: x·√D + learned absolute position embedding, dropout. Output L2 normalisation is done by the model.
Padding: the batch is padded internally to the batch ``max_len`` (``hstu.ops.jagged.jagged_to_padded``, pure
torch, equivalent to fbgemm jagged_to_padded_dense) for ``nn.MultiheadAttention``; padded keys come after every
valid query so the causal mask alone keeps them out, and padded rows are dropped on the way back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hstu.ops.backend import BackendLike
from hstu.ops.jagged import jagged_to_padded, padded_to_jagged, positions_in_sequence

if TYPE_CHECKING:
    from hstu.trainer.config import ModelConfig

LN_EPS = 1e-8


class SASRecBlock(nn.Module):
    """One SASRec block on padded [B, N, D] with a causal bool mask [N, N] (True = masked)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=attn_dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        q = F.layer_norm(x, [self.dim], eps=LN_EPS)
        attn, _ = self.attention(q, x, x, attn_mask=causal_mask, need_weights=False)
        h = F.layer_norm(q + attn, [self.dim], eps=LN_EPS)
        return h + self.ffn(h)


class SASRecEncoder(nn.Module):
    """Causal softmax transformer. forward(x [T, D], offsets [B+1], max_len, timestamps, query_timestamps) -> [T, D];
    timestamps are ignored (SASRec has no time features); ``ops_backend`` is accepted for a uniform signature."""

    def __init__(self, cfg: "ModelConfig", max_seq_len: int, ops_backend: BackendLike = "pytorch") -> None:
        super().__init__()
        D = cfg.embedding_dim
        self.embedding_dim, self.max_seq_len = D, max_seq_len
        self.position_embeddings = nn.Embedding(max_seq_len, D)
        nn.init.trunc_normal_(self.position_embeddings.weight, std=math.sqrt(1.0 / D),
                              a=-2 * math.sqrt(1.0 / D), b=2 * math.sqrt(1.0 / D))
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            SASRecBlock(D, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.num_layers)
        )
        for p in self.blocks.parameters():  # GR SASRec.reset_state: xavier_normal on every matrix
            if p.dim() >= 2:
                nn.init.xavier_normal_(p)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int, timestamps: Optional[torch.Tensor] = None,
                query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = x.size(0)
        offsets = offsets.long()
        pos = positions_in_sequence(offsets, T).clamp(max=self.max_seq_len - 1)
        h = self.input_dropout(x * math.sqrt(self.embedding_dim) + self.position_embeddings(pos))
        N = int(max_len)
        if T == 0 or N == 0:
            return h
        padded = jagged_to_padded(h, offsets, N)  # [B, N, D]
        causal_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)
        for block in self.blocks:
            padded = block(padded, causal_mask)
        return padded_to_jagged(padded, offsets, T)
