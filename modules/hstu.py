"""HSTU encoder over jagged sequences: both published variants (docs/model.md compares them side by side).

research   (GR research/, the public tables): LN(no affine) → X·W_uvqk (no bias) → SiLU(U, V, Q, K)
           → A = SiLU(QKᵀ + rab)/N (alpha = 1), causal → out = Linear_o(Dropout(U ⊙ LN(A·V))) + X,
           rab = relative position (2N−1 Toeplitz) + relative time bucket (num_time_buckets+1), per layer.
production (GR modules/stu.py): LN(affine) → X·W + b → SiLU(U) only → A = SiLU(QKᵀ/√d_qk)/N, no rab
           → out = Dropout(cat[U, A·V, U ⊙ LN(A·V)]) · W_o + X; time enters as an input embedding.
N = max_seq_len (a constant, so outputs never depend on how sequences are batched).
Both variants run their two fused steps through the ops dispatchers, so ``ops.backend`` picks the PyTorch
reference or the Triton kernel for each: attention (ops/hstu_attention.py) and U ⊙ LN(A·V) [+ concat] + dropout
(ops/norm_gating.py, via ``gate_and_dropout``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hstu.ops.backend import Backend, BackendLike, resolve_backend
from hstu.ops.hstu_attention import AttentionArgs, jagged_hstu_attention
from hstu.ops.jagged import last_rows, positions_in_sequence, sequence_ids
from hstu.ops.norm_gating import norm_gating
from hstu.ops.silu_split import silu_split
from hstu.ops.pytorch.hstu_attention import (attention_plan, max_pos_from_table, relative_position_ids,
                                             time_bucket_ids)

if TYPE_CHECKING:  # typing only: modules never import the trainer at runtime
    from hstu.trainer.config import ModelConfig

LN_EPS = 1e-6


def gate_and_dropout(attn: torch.Tensor, u: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], *, dropout: float, training: bool, concat: bool,
                     backend: Backend) -> torch.Tensor:
    """U ⊙ LN(A·V) (concat: cat[U, A·V, U ⊙ LN(A·V)]) then dropout, through the fused op's dispatcher
    (ops/norm_gating.py). attn, u [N, H·dv] -> [N, H·dv] | [N, 3·H·dv].

    PyTorch backend: the op without dropout, then torch's ``F.dropout`` — the RNG stream every earlier run used,
    so fixed-seed training is unchanged. CPU and Triton backends: dropout fused in the kernel (a counter-based
    Philox mask, seed drawn from torch's CPU generator per call), so the same torch seed drops other elements than
    on the PyTorch backend (same rate and scaling; equal outputs when dropout is 0 or in eval). On CPU the fused
    op draws the same seed as the op followed by ``backend_dropout`` (its path before the C++ norm_gating
    kernel) and drops the same elements: fixed-seed ``ops.backend=cpu`` runs change by float rounding only."""
    if backend in (Backend.TRITON, Backend.CPU):
        return norm_gating(attn, u, weight, bias, eps=LN_EPS, dropout_p=dropout, training=training, concat=concat,
                           backend=backend)
    y = norm_gating(attn, u, weight, bias, eps=LN_EPS, concat=concat, backend=backend)
    return backend_dropout(y, dropout, training, backend)


def backend_dropout(x: torch.Tensor, p: float, training: bool, backend: Backend) -> torch.Tensor:
    """Dropout as the backend does it: PyTorch, torch's ``F.dropout`` (the RNG stream of every earlier run);
    CPU, the seeded Philox dropout of ops/cpu/dropout.py (the masks norm_gating's reference and Triton draw for
    the same seed, ~2x faster than ``bernoulli_``)."""
    if backend == Backend.CPU and training and p > 0.0:
        from hstu.ops.cpu.dropout import cpu_seeded_dropout

        return cpu_seeded_dropout(x, p, training)
    return F.dropout(x, p=p, training=training)


def input_time_bucket_ids(delta: torch.Tensor, num_buckets: int, fn: str = "sqrt") -> torch.Tensor:
    """Production input time buckets of Δ = query_time − t_j (seconds), as GR pytorch_add_timestamp_positional_
    embeddings: x = max(Δ, 1e-6)/60; sqrt: floor(√x), log: floor(max(ln x, 0)); clamped to [0, num_buckets]."""
    x = delta.to(torch.float64).clamp(min=1e-6) / 60.0
    x = torch.sqrt(x) if fn == "sqrt" else torch.log(x)
    return torch.floor(x.clamp(min=0)).clamp(max=num_buckets).long()


class CachedLayerMixin:
    """Cached / incremental forward of ONE sequence, for serving (M-FALCON, appended events; docs/serving.md).

    Needs ``project(x) -> (u, v, q, k)`` and ``finish(x, u, attn) -> y`` (the two halves of ``forward``, so both
    paths share every weight and formula), ``attention_alpha``, ``rab_indices`` and ``relative_bias``. Training
    never calls it."""

    def rab_indices(self, q_pos: torch.Tensor, k_pos: torch.Tensor, q_tnext: torch.Tensor, k_ts: torch.Tensor):
        """Table indices of the rab of query rows (position, t_next) vs key rows (position, timestamp), broadcast
        like the inputs (e.g. [M, 1] vs [1, N] -> [M, N]). The same for every layer of a stack (computed once)."""
        return None

    def relative_bias(self, indices) -> Optional[torch.Tensor]:
        """rab values of ``rab_indices(...)`` from this layer's tables; None when the layer has no rab."""
        return None

    def forward_cached(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                       bias_past: Optional[torch.Tensor], bias_new: Optional[torch.Tensor],
                       candidates: bool = False, visible_new: Optional[torch.Tensor] = None):
        """x [M, D]: new rows of one sequence; past_k [H, N, dqk], past_v [H, N, dv]: cached keys/values of the N
        rows before them. Every new row attends to all past rows and, candidates=False, to new rows j <= i
        (causal), candidates=True, to itself only (M-FALCON). bias_past [M|1, N]; bias_new [M, M] (causal) or
        [M|1] (candidates); visible_new [M, M] bool replaces the causal mask among new rows (ranking: the
        contextual prefix is visible to every row). Returns (y [M, D], k [H, M, dqk], v [H, M, dv]) — the new
        rows' cache entries."""
        M = x.shape[0]
        H = self.num_heads
        u, v, q, k = self.project(x)
        q, k, v = (t.reshape(M, H, -1).transpose(0, 1) for t in (q, k, v))  # [H, M, d]
        alpha = self.attention_alpha
        qa = q * alpha if alpha != 1.0 else q
        s = torch.matmul(qa, past_k.transpose(1, 2))  # [H, M, N]
        if bias_past is not None:
            s = s + bias_past.to(s.dtype)
        attn = torch.matmul(F.silu(s), past_v)  # [H, M, dv]
        if candidates:
            s_self = (qa * k).sum(-1)  # [H, M]
            if bias_new is not None:
                s_self = s_self + bias_new.to(s_self.dtype)
            attn = attn + F.silu(s_self).unsqueeze(-1) * v
        else:
            s_new = torch.matmul(qa, k.transpose(1, 2))  # [H, M, M]
            if bias_new is not None:
                s_new = s_new + bias_new.to(s_new.dtype)
            if visible_new is None:
                rows = torch.arange(M, device=x.device)
                visible_new = rows.view(-1, 1) >= rows.view(1, -1)
            attn = attn + torch.matmul(F.silu(s_new) * visible_new, v)
        attn = (attn / float(self.max_seq_len)).transpose(0, 1).reshape(M, -1)
        return self.finish(x, u, attn), k, v


class ResearchHSTULayer(CachedLayerMixin, nn.Module):
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
                query_timestamps: Optional[torch.Tensor] = None, num_targets: Optional[torch.Tensor] = None,
                contextual_len: int = 0, plan: Any = None) -> torch.Tensor:
        """num_targets [B] / contextual_len: candidate and contextual-prefix masks of the op (ranking); plan:
        the batch's attention plan (``attention_plan_for``), shared by the layers of a stack."""
        T = x.shape[0]
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        u, v, q, k = self.project(x)
        args = AttentionArgs(
            offsets, max_len, alpha=1.0, norm=float(self.max_seq_len), causal=True,
            pos_weights=self.pos_weights, time_weights=self.time_weights,
            timestamps=timestamps if self.time_weights is not None else None,
            query_timestamps=query_timestamps if self.time_weights is not None else None,
            time_bucket_base=self.time_bucket_base, num_targets=num_targets, contextual_len=contextual_len)
        attn = jagged_hstu_attention(q.reshape(T, H, dqk), k.reshape(T, H, dqk), v.reshape(T, H, dv), args,
                                     backend=self.backend, plan=plan).reshape(T, H * dv)
        return self.finish(x, u, attn)

    attention_alpha = 1.0

    def project(self, x: torch.Tensor):
        """x [N, D] -> (u, v [N, H·dv], q, k [N, H·dqk]): LN → X·W_uvqk → SiLU on all four."""
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        return silu_split(F.layer_norm(x, [x.shape[-1]], eps=LN_EPS) @ self.uvqk, [dv * H, dv * H, dqk * H, dqk * H],
                          self.backend)

    def finish(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn = A·V [N, H·dv] -> Linear_o(Dropout(U ⊙ LN(A·V))) + X."""
        y = gate_and_dropout(attn, u, None, None, dropout=self.dropout, training=self.training, concat=False,
                             backend=self.backend)
        return self.output(y) + x

    def rab_indices(self, q_pos, k_pos, q_tnext, k_ts):
        """(j − i + P − 1 clamped, bucket(t_next(i) − t_j)) as the attention op; None for an absent table."""
        pos = time = None
        if self.pos_weights is not None:
            pos = relative_position_ids(q_pos, k_pos, max_pos_from_table(self.pos_weights))
        if self.time_weights is not None:
            time = time_bucket_ids(q_tnext - k_ts, self.time_bucket_base, self.time_weights.numel() - 1)
        return pos, time

    def relative_bias(self, indices):
        """pos_weights[pos index] + time_weights[time index]."""
        pos, time = indices
        bias = self.pos_weights[pos] if pos is not None else None
        if time is not None:
            tb = self.time_weights[time]
            bias = tb if bias is None else bias + tb
        return bias


class ProductionHSTULayer(CachedLayerMixin, nn.Module):
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
        self.output_norm = nn.LayerNorm(cfg.linear_dim * H, eps=LN_EPS)  # its affine: the fused op's weight, bias
        self.output_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * cfg.linear_dim * H, D)))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_len: int, timestamps: Optional[torch.Tensor] = None,
                query_timestamps: Optional[torch.Tensor] = None, num_targets: Optional[torch.Tensor] = None,
                contextual_len: int = 0, plan: Any = None) -> torch.Tensor:
        """num_targets [B] / contextual_len: candidate and contextual-prefix masks of the op (ranking); plan:
        the batch's attention plan (``attention_plan_for``), shared by the layers of a stack."""
        T = x.size(0)
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        u, v, q, k = self.project(x)
        args = AttentionArgs(offsets, max_len, alpha=1.0 / math.sqrt(dqk), norm=float(self.max_seq_len),
                             causal=True, num_targets=num_targets, contextual_len=contextual_len)
        attn = jagged_hstu_attention(q.reshape(T, H, dqk), k.reshape(T, H, dqk), v.reshape(T, H, dv), args,
                                     backend=self.backend, plan=plan).reshape(T, H * dv)
        return self.finish(x, u, attn)

    @property
    def attention_alpha(self) -> float:
        return 1.0 / math.sqrt(self.attention_dim)

    def project(self, x: torch.Tensor):
        """x [N, D] -> (SiLU(u), v, q, k): LN(affine) → X·W + b; SiLU on U only."""
        H, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        uvqk = torch.addmm(self.uvqk_bias, self.input_norm(x), self.uvqk_weight)
        u, v, q, k = torch.split(uvqk, [dv * H, dv * H, dqk * H, dqk * H], dim=1)
        return F.silu(u), v, q, k

    def finish(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn = A·V [N, H·dv] -> Dropout(cat[U, A·V, U ⊙ LN(A·V)]) · W_o + X."""
        y = gate_and_dropout(attn, u, self.output_norm.weight, self.output_norm.bias, dropout=self.dropout,
                             training=self.training, concat=True, backend=self.backend)
        return torch.addmm(x, y, self.output_weight)


def attention_plan_for(layers, offsets: torch.Tensor, num_tokens: int, timestamps: Optional[torch.Tensor],
                       query_timestamps: Optional[torch.Tensor] = None, num_targets: Optional[torch.Tensor] = None,
                       contextual_len: int = 0, dtype: torch.dtype = torch.float32):
    """The attention plan (length groups, rab bucket indices, masks) of one batch for a stack of identical
    layers, built once instead of in every layer; None for the Triton backend (it plans itself)."""
    first = layers[0] if len(layers) else None
    if first is None or first.backend == Backend.TRITON:
        return None
    pos_w, time_w = getattr(first, "pos_weights", None), getattr(first, "time_weights", None)
    build = attention_plan
    if first.backend == Backend.CPU:
        from hstu.ops.cpu.hstu_attention import cpu_attention_plan as build
    return build(
        offsets, norm=float(first.max_seq_len), causal=True,
        pos_table_size=None if pos_w is None else pos_w.numel(),
        time_table_size=None if time_w is None else time_w.numel(),
        timestamps=timestamps if time_w is not None else None,
        query_timestamps=query_timestamps if time_w is not None else None,
        time_bucket_base=getattr(first, "time_bucket_base", 0.301), num_targets=num_targets,
        contextual_len=contextual_len, dtype=dtype, num_tokens=num_tokens)


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
        q_time = None
        if self.time_embeddings is not None and T > 0:
            if timestamps is None:
                raise ValueError("the production HSTU variant needs timestamps")
            q_time = self._query_times(timestamps, offsets, query_timestamps)[sequence_ids(offsets, T)]
        h = self.input_embeddings(x, positions_in_sequence(offsets, T), timestamps, q_time)
        backend = self.layers[0].backend if len(self.layers) else Backend.PYTORCH
        h = backend_dropout(h, self.input_dropout.p, self.training, backend)
        plan = attention_plan_for(self.layers, offsets, T, timestamps, query_timestamps)
        for layer in self.layers:
            h = layer(h, offsets, int(max_len), timestamps, query_timestamps, plan=plan)
        return h

    def input_embeddings(self, x: torch.Tensor, pos: torch.Tensor, timestamps: Optional[torch.Tensor],
                         query_times: Optional[torch.Tensor]) -> torch.Tensor:
        """x·√D + pos_emb[min(pos, max_seq_len − 1)] (+ production time_emb[bucket(query_time − t)] when
        query_times is given); pos / timestamps / query_times [T] or [1] (broadcast). Before dropout."""
        h = x * math.sqrt(self.embedding_dim) + self.position_embeddings(pos.clamp(max=self.max_seq_len - 1))
        if self.time_embeddings is not None and query_times is not None:
            buckets = input_time_bucket_ids(query_times.long() - timestamps.long(), self.num_input_time_buckets,
                                            self.time_bucket_fn)
            h = h + self.time_embeddings(buckets)
        return h

    def forward_cached(self, x: torch.Tensor, pos: torch.Tensor, timestamps: torch.Tensor, t_next: torch.Tensor,
                       query_times: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                       past_pos: torch.Tensor, past_ts: torch.Tensor, candidates: bool = False):
        """Serving path for ONE sequence (docs/serving.md), equal to ``forward`` on the whole sequence.

        x [M, D] item embeddings of the new rows; pos, timestamps, t_next (the time the research rab uses for
        the row: the next event's, or the query time for the last row), query_times (production time
        embedding): [M], or [1] when shared by all rows (M-FALCON candidates). past_k [L, H, N, dqk],
        past_v [L, H, N, dv], past_pos [N], past_ts [N]: cache of the N rows before. candidates=False: new rows
        are a causal continuation; True: each sees the past and itself only. Returns (h [M, D] before the
        model's L2 norm, k [L, H, M, dqk], v [L, H, M, dv])."""
        h = self.input_dropout(self.input_embeddings(x, pos, timestamps, query_times))
        return cached_layers(self.layers, h, pos, timestamps, t_next, past_k, past_v, past_pos, past_ts, candidates)


def cached_layers(layers, h: torch.Tensor, pos: torch.Tensor, timestamps: torch.Tensor, t_next: torch.Tensor,
                  past_k: torch.Tensor, past_v: torch.Tensor, past_pos: torch.Tensor, past_ts: torch.Tensor,
                  candidates: bool = False, visible_new: Optional[torch.Tensor] = None):
    """The cached layer stack shared by every serving step (retrieval ``HSTUEncoder``, ``HSTURankingModel``).

    h [M, D] layer input of the new rows; pos / timestamps / t_next [M] or [1] (rab inputs: sequence index,
    own time, the time the row's rab uses); past_* the cache of the N rows before (see forward_cached).
    visible_new [M, M] bool (candidates=False only): which new rows each new row sees (default causal).
    Returns (h [M, D], k [L, H, M, dqk], v [L, H, M, dv])."""
    qp, qt = pos.view(-1, 1), t_next.view(-1, 1)
    first = layers[0]  # rab index tables depend on the config only: computed once for all layers
    idx_past = first.rab_indices(qp, past_pos.view(1, -1), qt, past_ts.view(1, -1))
    if candidates:
        idx_new = first.rab_indices(pos, pos, t_next, timestamps)
    else:
        idx_new = first.rab_indices(qp, pos.view(1, -1), qt, timestamps.view(1, -1))
    ks, vs = [], []
    for i, layer in enumerate(layers):
        h, k, v = layer.forward_cached(h, past_k[i], past_v[i], layer.relative_bias(idx_past),
                                       layer.relative_bias(idx_new), candidates, visible_new)
        ks.append(k)
        vs.append(v)
    return h, torch.stack(ks), torch.stack(vs)
