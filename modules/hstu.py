"""HSTU encoder over jagged sequences: both published variants (docs/model.md compares them side by side).

research   (GR research/, the public tables): LN(no affine) → X·W_uvqk (no bias) → SiLU(U, V, Q, K)
           → A = SiLU(QKᵀ + rab)/N (alpha = 1), causal → out = Linear_o(Dropout(U ⊙ LN(A·V))) + X,
           rab = relative position (2N−1 Toeplitz) + relative time bucket (num_time_buckets+1), per layer.
production (GR modules/stu.py): LN(affine) → X·W + b → SiLU(U) only → A = SiLU(QKᵀ/√d_qk)/N, no rab
           → out = Dropout(cat[U, A·V, U ⊙ LN(A·V)]) · W_o + X; time enters as an input embedding.
N = max_seq_len (a constant, so outputs never depend on how sequences are batched).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hstu.ops.backend import BackendLike, resolve_backend
from hstu.ops.hstu_attention import jagged_hstu_attention
from hstu.ops.jagged import last_rows, positions_in_sequence, sequence_ids

if TYPE_CHECKING:  # typing only: modules never import the trainer at runtime
    from hstu.trainer.config import ModelConfig

LN_EPS = 1e-6


def input_time_bucket_ids(delta: torch.Tensor, num_buckets: int, fn: str = "sqrt") -> torch.Tensor:
    """Production input time buckets of Δ = query_time − t_j (seconds), as GR pytorch_add_timestamp_positional_
    embeddings: x = max(Δ, 1e-6)/60; sqrt: floor(√x), log: floor(max(ln x, 0)); clamped to [0, num_buckets]."""
    x = delta.to(torch.float64).clamp(min=1e-6) / 60.0
    x = torch.sqrt(x) if fn == "sqrt" else torch.log(x)
    return torch.floor(x.clamp(min=0)).clamp(max=num_buckets).long()


class ResearchHSTULayer(nn.Module):
    """GR research/ ``SequentialTransductionUnitJagged`` (rel_bias normalization, uvqk, SiLU). [T, D] -> [T, D]."""

    def __init__(self, cfg: "ModelConfig", max_seq_len: int, ops_backend: BackendLike = "pytorch") -> None:
        super().__init__()
        D, H = cfg.embedding_dim, cfg.num_heads
        self.num_heads, self.attention_dim, self.linear_dim = H, cfg.attention_dim, cfg.linear_dim
        self.max_seq_len, self.dropout = max_seq_len, cfg.dropout
        self.time_bucket_base = cfg.time_bucket_base
        self.backend = resolve_backend(ops_backend)
        width = (2 * cfg.linear_dim + 2 * cfg.attention_dim) * H
        self.uvqk = nn.Parameter(torch.empty(D, width).normal_(0.0, 0.02))
        self.output = nn.Linear(cfg.linear_dim * H, D)
        nn.init.xavier_uniform_(self.output.weight)
        self.pos_weights = (
            nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(0.0, 0.02)) if cfg.use_rab_position else None
        )
        self.time_weights = (
            nn.Parameter(torch.empty(cfg.num_time_buckets + 1).normal_(0.0, 0.02)) if cfg.use_rab_time else None
        )

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int, timestamps: Optional[torch.Tensor],
                query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        T, D = x.shape
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        uvqk = F.silu(F.layer_norm(x, [D], eps=LN_EPS) @ self.uvqk)
        u, v, q, k = torch.split(uvqk, [dv * H, dv * H, dqk * H, dqk * H], dim=1)
        attn = jagged_hstu_attention(
            q.reshape(T, H, dqk), k.reshape(T, H, dqk), v.reshape(T, H, dv), offsets, max_len,
            alpha=1.0, norm=float(self.max_seq_len), causal=True,
            pos_weights=self.pos_weights, time_weights=self.time_weights,
            timestamps=timestamps if self.time_weights is not None else None,
            query_timestamps=query_timestamps if self.time_weights is not None else None,
            time_bucket_base=self.time_bucket_base, backend=self.backend,
        ).reshape(T, H * dv)
        y = u * F.layer_norm(attn, [H * dv], eps=LN_EPS)
        return self.output(F.dropout(y, p=self.dropout, training=self.training)) + x


class ProductionHSTULayer(nn.Module):
    """GR modules/stu.py ``STULayer`` (concat_ux, no rab, alpha = 1/√d_qk). [T, D] -> [T, D]."""

    def __init__(self, cfg: "ModelConfig", max_seq_len: int, ops_backend: BackendLike = "pytorch") -> None:
        super().__init__()
        D, H = cfg.embedding_dim, cfg.num_heads
        self.num_heads, self.attention_dim, self.linear_dim = H, cfg.attention_dim, cfg.linear_dim
        self.max_seq_len, self.dropout = max_seq_len, cfg.dropout
        self.backend = resolve_backend(ops_backend)
        width = (2 * cfg.linear_dim + 2 * cfg.attention_dim) * H
        self.input_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.uvqk_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(D, width)))
        self.uvqk_bias = nn.Parameter(torch.zeros(width))
        self.output_norm = nn.LayerNorm(cfg.linear_dim * H, eps=LN_EPS)
        self.output_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * cfg.linear_dim * H, D)))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int, timestamps: Optional[torch.Tensor] = None,
                query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = x.size(0)
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        uvqk = torch.addmm(self.uvqk_bias, self.input_norm(x), self.uvqk_weight)
        u, v, q, k = torch.split(uvqk, [dv * H, dv * H, dqk * H, dqk * H], dim=1)
        u = F.silu(u)
        attn = jagged_hstu_attention(
            q.reshape(T, H, dqk), k.reshape(T, H, dqk), v.reshape(T, H, dv), offsets, max_len,
            alpha=1.0 / math.sqrt(dqk), norm=float(self.max_seq_len), causal=True, backend=self.backend,
        ).reshape(T, H * dv)
        y = torch.cat([u, attn, u * self.output_norm(attn)], dim=1)
        return torch.addmm(x, F.dropout(y, p=self.dropout, training=self.training), self.output_weight)


class HSTUEncoder(nn.Module):
    """Jagged HSTU stack: x·√D + position embedding (+ production time embedding) → dropout → layers.

    forward(x [T, D] item embeddings, offsets [B+1], max_len, timestamps [T] int64, query_timestamps [B] | None)
    -> [T, D]. Position = 0-based index inside the (truncated) sequence, clamped to max_seq_len − 1.
    Output L2 normalisation is done by the model (modules/model.py)."""

    def __init__(self, cfg: "ModelConfig", max_seq_len: int, ops_backend: BackendLike = "pytorch") -> None:
        super().__init__()
        if cfg.variant not in ("research", "production"):
            raise ValueError(f"model.variant must be research | production, got {cfg.variant!r}")
        if cfg.attn_dropout > 0:
            raise ValueError("model.attn_dropout > 0 is not supported by HSTU (the jagged attention op has no "
                             "dropout; GR research does not use it either) - set it to 0")
        D = cfg.embedding_dim
        self.variant, self.embedding_dim, self.max_seq_len = cfg.variant, D, max_seq_len
        self.position_embeddings = nn.Embedding(max_seq_len, D)
        self.time_embeddings: Optional[nn.Embedding] = None
        if cfg.variant == "research":
            nn.init.xavier_normal_(self.position_embeddings.weight)  # what GR's HSTU.reset_params leaves
            layer_cls = ResearchHSTULayer
        else:
            if cfg.input_time_bucket_fn not in ("sqrt", "log"):
                raise ValueError(f"model.input_time_bucket_fn must be sqrt | log, got {cfg.input_time_bucket_fn!r}")
            self.time_bucket_fn, self.num_input_time_buckets = cfg.input_time_bucket_fn, cfg.input_time_buckets
            self.time_embeddings = nn.Embedding(cfg.input_time_buckets + 1, D)
            for table, n in ((self.position_embeddings, max_seq_len), (self.time_embeddings, cfg.input_time_buckets)):
                nn.init.uniform_(table.weight, -math.sqrt(1.0 / n), math.sqrt(1.0 / n))  # GR HSTUPositionalEncoder
            layer_cls = ProductionHSTULayer
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(layer_cls(cfg, max_seq_len, ops_backend) for _ in range(cfg.num_layers))

    def _query_times(self, timestamps: torch.Tensor, offsets: torch.Tensor,
                     query_timestamps: Optional[torch.Tensor]) -> torch.Tensor:
        """[B] query time of each sequence: query_timestamps, else the sequence's last timestamp (as GR)."""
        if query_timestamps is not None:
            return query_timestamps.long()
        return timestamps.long()[last_rows(offsets).clamp(min=0)]

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int, timestamps: Optional[torch.Tensor],
                query_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = x.size(0)
        offsets = offsets.long()
        pos = positions_in_sequence(offsets, T).clamp(max=self.max_seq_len - 1)
        h = x * math.sqrt(self.embedding_dim) + self.position_embeddings(pos)
        if self.time_embeddings is not None and T > 0:
            if timestamps is None:
                raise ValueError("the production HSTU variant needs timestamps")
            q_time = self._query_times(timestamps, offsets, query_timestamps)[sequence_ids(offsets, T)]
            buckets = input_time_bucket_ids(q_time - timestamps.long(), self.num_input_time_buckets,
                                            self.time_bucket_fn)
            h = h + self.time_embeddings(buckets)
        h = self.input_dropout(h)
        for layer in self.layers:
            h = layer(h, offsets, int(max_len), timestamps, query_timestamps)
        return h
