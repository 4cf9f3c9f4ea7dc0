"""M-FALCON candidate ranking and incremental user state over a cached HSTU history (docs/serving.md).

Torch-only on purpose: the standalone loader (serving/artifact.py) runs this same engine on the exported dense
programs, the in-process path (:meth:`MFalcon.from_model`) on a trained ``RetrievalModel``'s eager encoder.

The engine needs two *dense steps* for ONE user (both take the same 9 tensors)::

    extend(x [M, D], pos, ts, t_next, q_time [M], past_k [L, H, N, dqk], past_v [L, H, N, dv], past_pos [N],
           past_ts [N]) -> (enc [M, D], k [L, H, M, dqk], v [L, H, M, dv])   new rows = causal continuation
    score(x [M, D], pos, ts, t_next, q_time [1], <past...>) -> enc [M, D]  each row sees past + itself only

``enc`` is the model output (L2-normalised when the model is). :class:`DenseStep` is that step for an
``HSTUEncoder``; it is also what serving/export.py hands to ``torch.export``.

Conventions (checked against the full model in tests/test_serving_mfalcon.py):
- history = the last ``max_seq_len`` events (as training); positions 0..n−1; the query time ``qt`` defaults to
  the last history timestamp (the model's default when no target time is known).
- research rab: row i uses t_next(i) = t_{i+1}; the last history row uses qt.
- a candidate is scored as if it were appended alone: position n, timestamp qt, t_next qt — identical for
  every candidate, so the rab row against the history is computed once per micro-batch and broadcast.
- score(c) = <enc(candidate row), item_vector(c)> (for a retrieval model: its candidate-aware inner product).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from hstu.serving.inputs import check_append_time, check_time_order, query_time_or

DEFAULT_MICRO_BATCH = 1024  # b_m: candidates per score call (CPU: larger is faster; benchmarks/serving.py sweeps it)
DEFAULT_PREFILL_CHUNK = 1024  # history rows per extend call when encoding (bounds the [H, M, M] scores)

Tensorish = Union[torch.Tensor, Sequence[int]]


class DenseStep(nn.Module):
    """``encoder.forward_cached`` + the model's output L2 norm, as one module (the exported unit).

    candidates=False -> returns (enc, k, v); True -> returns enc (k, v of candidates are never cached)."""

    def __init__(self, encoder: nn.Module, l2_norm: bool, candidates: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.encoder, self.l2_norm, self.candidates, self.eps = encoder, bool(l2_norm), bool(candidates), float(eps)

    def forward(self, x, pos, ts, t_next, q_time, past_k, past_v, past_pos, past_ts):
        h, k, v = self.encoder.forward_cached(x, pos, ts, t_next, q_time, past_k, past_v, past_pos, past_ts,
                                              candidates=self.candidates)
        if self.l2_norm:
            h = h / h.norm(dim=-1, keepdim=True).clamp(min=self.eps)
        return h if self.candidates else (h, k, v)


@dataclass(frozen=True)
class UserState:
    """Cached history of one user. k [L, H, n, dqk] / v [L, H, n, dv]: every layer's keys and values; last [D]:
    the encoding of the last row (the user vector for retrieval; zeros when n = 0)."""

    item_ids: torch.Tensor  # [n] int64
    timestamps: torch.Tensor  # [n] int64
    query_time: int
    k: torch.Tensor
    v: torch.Tensor
    last: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.item_ids.numel())

    def prefix(self, n: int) -> "UserState":
        """The first n rows (their cache entries are final when nothing after them changes)."""
        return replace(self, item_ids=self.item_ids[:n], timestamps=self.timestamps[:n], k=self.k[:, :, :n],
                       v=self.v[:, :, :n])


def _ids(x: Tensorish, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.numel() == 0 and t.dim() == 1:  # [] / empty list: an empty history
        return t.to(torch.int64)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer sequence, got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.int64)


def extend_cache(step: Callable, k: torch.Tensor, v: torch.Tensor, past_pos: torch.Tensor, past_ts: torch.Tensor,
                 pos: torch.Tensor, ts: torch.Tensor, chunk: int):
    """Prefill r new rows (pos, ts [r]) after a cache in chunks of ``chunk`` rows; shared by every engine.

    step(s, e, k, v, past_pos, past_ts) -> (enc [e−s, ·], k_new [L, H, e−s, dqk], v_new) runs rows s..e−1
    against the cache so far. Returns (enc of the last row, k, v, past_pos, past_ts) with the new rows cached."""
    last = None
    for s in range(0, int(pos.numel()), chunk):
        e = min(int(pos.numel()), s + chunk)
        enc, k_new, v_new = step(s, e, k, v, past_pos, past_ts)
        if k.shape[2]:
            k, v = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
            past_pos, past_ts = torch.cat([past_pos, pos[s:e]]), torch.cat([past_ts, ts[s:e]])
        else:  # empty cache: nothing to concatenate
            k, v, past_pos, past_ts = k_new, v_new, pos[s:e], ts[s:e]
        last = enc[-1]
    return last, k, v, past_pos, past_ts


def in_micro_batches(m: int, micro_batch: int, fn: Callable[[int, int], torch.Tensor],
                     empty: torch.Tensor) -> torch.Tensor:
    """cat(fn(s, e) for consecutive [s, e) of at most micro_batch candidates) along dim 0; ``empty`` when m = 0."""
    out = [fn(s, min(m, s + micro_batch)) for s in range(0, m, max(1, int(micro_batch)))]
    return torch.cat(out) if out else empty


def per_user_query_times(histories: Sequence, candidates: Sequence, query_times: Optional[Sequence]) -> list:
    """Batched calls: query time per user (None each by default), after checking the lists agree in length."""
    if len(histories) != len(candidates):
        raise ValueError(f"{len(histories)} histories but {len(candidates)} candidate lists")
    qts = list(query_times) if query_times is not None else [None] * len(histories)
    if len(qts) != len(histories):
        raise ValueError(f"{len(qts)} query_times for {len(histories)} histories")
    return qts


class MFalcon:
    """Encode a history once (KV cache), rank candidates in micro-batches, append events incrementally."""

    def __init__(self, extend: Callable, score: Callable, embed: Callable[[torch.Tensor], torch.Tensor],
                 item_vectors: Callable[[torch.Tensor], torch.Tensor], *, variant: str, max_seq_len: int,
                 num_items: int, num_layers: int, num_heads: int, attention_dim: int, linear_dim: int,
                 embedding_dim: int, micro_batch: int = DEFAULT_MICRO_BATCH,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if variant not in ("research", "production"):
            raise ValueError(f"variant must be research | production, got {variant!r}")
        self.extend, self.score, self.embed, self.item_vectors = extend, score, embed, item_vectors
        self.variant, self.max_seq_len, self.num_items = variant, int(max_seq_len), int(num_items)
        self.shape = (int(num_layers), int(num_heads), int(attention_dim), int(linear_dim))
        self.embedding_dim = int(embedding_dim)
        self.micro_batch, self.prefill_chunk = int(micro_batch), int(prefill_chunk)

    @classmethod
    def from_model(cls, model: nn.Module, **kw) -> "MFalcon":
        """In-process engine on a trained RetrievalModel (HSTU encoder; eval mode is the caller's business)."""
        from hstu.modules.model import L2_EPS  # lazy: this module stays importable without hstu.modules

        enc = model.encoder
        if not hasattr(enc, "forward_cached"):
            raise ValueError(f"M-FALCON needs an HSTU encoder with forward_cached, got {type(enc).__name__} "
                             "(model.arch sasrec is not supported)")
        layer = enc.layers[0]
        return cls(DenseStep(enc, model.l2_norm_output, False, L2_EPS), DenseStep(enc, model.l2_norm_output, True,
                   L2_EPS), model.embed_items, model.item_vectors, variant=enc.variant, max_seq_len=enc.max_seq_len,
                   num_items=model.num_items, num_layers=len(enc.layers), num_heads=layer.num_heads,
                   attention_dim=layer.attention_dim, linear_dim=layer.linear_dim,
                   embedding_dim=enc.embedding_dim, **kw)

    # ------------------------------------------------------------------------------------------------ state
    def empty_state(self, query_time: int = 0) -> UserState:
        L, H, dqk, dv = self.shape
        z = torch.zeros(0, dtype=torch.int64)
        return UserState(z, z, int(query_time), torch.zeros(L, H, 0, dqk), torch.zeros(L, H, 0, dv),
                         torch.zeros(self.embedding_dim))

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if ids.numel() and (int(ids.min()) < 1 or int(ids.max()) > self.num_items):
            raise ValueError(f"{name}: item ids must lie in 1..{self.num_items}, got {int(ids.min())}.."
                             f"{int(ids.max())}")

    def _run(self, state: UserState, ids: torch.Tensor, ts: torch.Tensor, qt: int) -> UserState:
        """Append rows (ids, ts) after ``state`` whose rows are final; the last new row's t_next is qt."""
        if ids.numel() == 0:
            return replace(state, query_time=qt)
        n0 = state.length
        t_next = torch.cat([ts[1:], torch.tensor([qt], dtype=torch.int64)])
        pos = torch.arange(n0, n0 + ids.numel(), dtype=torch.int64)

        def step(s: int, e: int, k, v, past_pos, past_ts):
            return self.extend(self.embed(ids[s:e]), pos[s:e], ts[s:e], t_next[s:e],
                               torch.full((e - s,), qt, dtype=torch.int64), k, v, past_pos, past_ts)

        last, k, v, _, all_ts = extend_cache(step, state.k, state.v, torch.arange(n0, dtype=torch.int64),
                                             state.timestamps, pos, ts, self.prefill_chunk)
        return UserState(torch.cat([state.item_ids, ids]), all_ts, qt, k, v, last)

    @torch.inference_mode()
    def encode(self, item_ids: Tensorish, timestamps: Tensorish, query_time: Optional[int] = None) -> UserState:
        """Encode a history (the last max_seq_len events kept) once; qt defaults to the last timestamp."""
        ids, ts = _ids(item_ids, "history_ids"), _ids(timestamps, "history_timestamps")
        if ids.shape != ts.shape:
            raise ValueError(f"history_ids and history_timestamps differ in length: {ids.numel()} vs {ts.numel()}")
        self._check_ids(ids, "history_ids")
        check_time_order(ts, "history_timestamps")
        ids, ts = ids[-self.max_seq_len:], ts[-self.max_seq_len:]
        qt = query_time_or(query_time, int(ts[-1]) if ts.numel() else 0)
        return self._run(self.empty_state(qt), ids, ts, qt)

    @torch.inference_mode()
    def append(self, state: UserState, item_ids: Tensorish, timestamps: Tensorish,
               query_time: Optional[int] = None) -> UserState:
        """New events (and/or a new query time) without re-encoding the cached history; equal to ``encode`` of
        the whole history. qt defaults to the last new timestamp (the state's qt when no events are given).

        research: rows < n−1 are unchanged (causal; their t_next is fixed), but the old last row used qt as its
        t_next and now uses the first new event's time -> that ONE row is dropped from the cache and recomputed
        with the new rows (against rows < n−1). production: the time embedding of EVERY row is relative to qt,
        so a changed qt re-encodes the history (an unchanged qt appends only the new rows). Exceeding
        max_seq_len shifts every position -> the last max_seq_len events are re-encoded (as training sees them)."""
        ids, ts = _ids(item_ids, "item_ids"), _ids(timestamps, "timestamps")
        if ids.shape != ts.shape:
            raise ValueError(f"item_ids and timestamps differ in length: {ids.numel()} vs {ts.numel()}")
        self._check_ids(ids, "item_ids")
        check_append_time(ts, int(state.timestamps[-1]) if state.length else None)
        qt = query_time_or(query_time, int(ts[-1]) if ids.numel() else state.query_time)
        n = state.length
        if n + ids.numel() > self.max_seq_len or n == 0 or (self.variant == "production" and qt != state.query_time):
            return self.encode(torch.cat([state.item_ids, ids]), torch.cat([state.timestamps, ts]), qt)
        if self.variant == "production":
            return self._run(state, ids, ts, qt)
        if not ids.numel() and qt == state.query_time:
            return state
        return self._run(state.prefix(n - 1), torch.cat([state.item_ids[-1:], ids]),
                         torch.cat([state.timestamps[-1:], ts]), qt)

    # ------------------------------------------------------------------------------------------------ scoring
    def user_vector(self, state: UserState) -> torch.Tensor:
        """[D] encoding of the last history row (what retrieval scores against the catalog). An empty history
        has none: ValueError (cold-start users need the caller's fallback list; docs/serving.md)."""
        if state.length == 0:
            raise ValueError("history_ids is empty: retrieval needs at least one history event (an empty history "
                             "has no user vector; serve cold-start users a fallback list, docs/serving.md)")
        return state.last

    @torch.inference_mode()
    def rank(self, state: UserState, candidates: Tensorish, micro_batch: Optional[int] = None) -> torch.Tensor:
        """[m] scores of the candidates; each is encoded at position n after the cached history, seeing the
        history and itself only, in micro-batches of b_m (cost linear in m, history never re-encoded)."""
        cand = _ids(candidates, "candidates")
        self._check_ids(cand, "candidates")
        bm = int(micro_batch or self.micro_batch)
        n, qt = state.length, torch.tensor([state.query_time], dtype=torch.int64)
        pos = torch.tensor([n], dtype=torch.int64)
        past_pos = torch.arange(n, dtype=torch.int64)

        def score(s: int, e: int) -> torch.Tensor:
            chunk = cand[s:e]
            enc = self.score(self.embed(chunk), pos, qt, qt, qt, state.k, state.v, past_pos, state.timestamps)
            return (enc * self.item_vectors(chunk)).sum(-1)

        return in_micro_batches(cand.numel(), bm, score, torch.zeros(0))
