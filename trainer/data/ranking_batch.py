"""RankingBatch: the jagged token layout of generative ranking (docs/ranking.md), built vectorised from
:class:`hstu.trainer.data.ranking.RankingData` windows, and the resumable loader that yields it.

Layout of sequence b (C contextual features, n window events, m side tokens, K candidates)::

    [ctx_1 .. ctx_C] [side tokens and x_0 a_0 x_1 a_1 ... x_{n-1} a_{n-1}, merged by time] [y_1 .. y_K]

- train batches (``predict="history"``): K = 0, the loss is at every item token x_k (label = its action's
  labels); causal attention, so x_k sees the prefix, the earlier (item, action) pairs and itself, never a_k;
- eval batches (``predict="candidates"``): the K held-out items y_c are appended as candidates
  (``num_targets``): each sees the history and itself, no candidate sees another, and candidates carry no
  action token. All candidates get the position of the first candidate slot.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.batch_plan import ResumableBatchPlan
from hstu.trainer.data.sequences import gather_ranges
from hstu.trainer.data.sequentialize import window_side_tokens

KIND_CONTEXT, KIND_ITEM, KIND_ACTION, KIND_SIDE = 0, 1, 2, 3
NUM_KINDS = 4


@dataclass
class RankingBatch:
    """B sequences, T tokens in total, N predicted positions.

    token_ids [T] int64 (id in the token's own table), token_kinds [T] int64 (KIND_*), token_features [T] int64
    (contextual / side feature index, else 0), paired_items [T] int64 (item of an action token, else 0),
    timestamps [T] int64, positions [T] int64 (position-embedding index), time_gaps [T] int64 (seconds since
    the previous history item, >= 0), offsets [B+1], lengths [B], max_len int, num_targets [B] int64 (candidates
    at the end of each sequence), contextual_len int (C), user_ids [B], context_ids [B, C] int64,
    pred_rows [N] int64 (token rows with a prediction), pred_seq [N] int64 (their sequence), pred_items [N],
    labels [N, K] float32, regression [N] float32 | None.
    """

    token_ids: torch.Tensor
    token_kinds: torch.Tensor
    token_features: torch.Tensor
    paired_items: torch.Tensor
    timestamps: torch.Tensor
    positions: torch.Tensor
    time_gaps: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    max_len: int
    num_targets: torch.Tensor
    contextual_len: int
    user_ids: torch.Tensor
    context_ids: torch.Tensor
    pred_rows: torch.Tensor
    pred_seq: torch.Tensor
    pred_items: torch.Tensor
    labels: torch.Tensor
    regression: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_events(self) -> int:
        """Tokens in the batch (what the train loop counts as throughput)."""
        return int(self.token_ids.shape[0])

    @property
    def num_predictions(self) -> int:
        return int(self.pred_rows.shape[0])

    def to(self, device: "str | torch.device", non_blocking: bool = False) -> "RankingBatch":
        moved: Dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return RankingBatch(**moved)


def _t(a: np.ndarray, dtype=torch.int64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def build_ranking_batch(data, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, num_candidates: np.ndarray,
                        predict: str = "history", max_side_tokens: int = 32) -> RankingBatch:
    """Users ``rows`` of ``data`` (RankingData) -> RankingBatch.

    starts/ends [B]: the history window [starts, ends) (event indices within each user); num_candidates [B]:
    candidates are events [ends, ends + num_candidates). predict: "history" (train: every window item) or
    "candidates" (eval: the candidates)."""
    if predict not in ("history", "candidates"):
        raise ValueError(f"predict must be history | candidates, got {predict!r}")
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    K = np.asarray(num_candidates, dtype=np.int64) if predict == "candidates" else np.zeros(rows.size, np.int64)
    B, C = rows.size, data.context.shape[1]
    base = data.offsets[rows]
    ev, ev_off = gather_ranges(base + starts, base + ends)  # window events (absolute indices)
    cand, cand_off = gather_ranges(base + ends, base + ends + K)
    n = ends - starts
    if data.side is not None and data.side.num_tokens:
        side_b = data.side.select_users(rows)
        keep, rel, side_off = window_side_tokens(side_b, starts, ends, max_side_tokens)
        side_ids, side_feat, side_ts = side_b.values[keep], side_b.feature[keep], side_b.timestamps[keep]
    else:
        rel, side_off = np.zeros(0, np.int64), np.zeros(B + 1, np.int64)
        side_ids = side_feat = side_ts = np.zeros(0, np.int64)
    m = np.diff(side_off)
    lengths = C + 2 * n + m + K
    offsets = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    T = int(offsets[-1])
    cols = {name: np.zeros(T, np.int64) for name in ("ids", "kinds", "feats", "paired", "ts", "pos", "gaps")}

    def put(seq: np.ndarray, p: np.ndarray, **vals) -> np.ndarray:
        """Write token columns at position p of sequences seq; returns the token rows."""
        r = offsets[seq] + p
        for name, v in vals.items():
            cols[name][r] = v
        return r

    ev_seq = np.repeat(np.arange(B, dtype=np.int64), n)
    k = np.arange(ev.size, dtype=np.int64) - ev_off[ev_seq]
    ev_ts = data.timestamps[ev]
    prev_ts = np.where(k > 0, np.roll(ev_ts, 1), ev_ts)
    # first timestamp of each window (contextual tokens use it); last history time (candidate gaps)
    first_ts = np.where(n > 0, data.timestamps[np.minimum(base + starts, data.timestamps.size - 1)], 0)
    last_ts = np.where(n > 0, data.timestamps[np.maximum(base + ends - 1, 0)], 0)
    # side tokens with rel <= k come before item k: global key seq * (N + 1) + rel is sorted
    stride = int(n.max()) + 1 if B else 1
    side_seq = np.repeat(np.arange(B, dtype=np.int64), m)
    side_key = side_seq * stride + rel
    before = np.searchsorted(side_key, ev_seq * stride + k, side="right") - side_off[ev_seq]
    item_p = C + 2 * k + before
    item_rows = put(ev_seq, item_p, ids=data.item_ids[ev], kinds=KIND_ITEM, ts=ev_ts, pos=item_p,
                    gaps=ev_ts - prev_ts)
    put(ev_seq, item_p + 1, ids=data.actions[ev], kinds=KIND_ACTION, paired=data.item_ids[ev], ts=ev_ts,
        pos=item_p + 1)
    if side_ids.size:
        q = np.arange(side_ids.size, dtype=np.int64) - side_off[side_seq]
        sp = C + 2 * rel + q
        prev_main = np.where(rel > 0, data.timestamps[np.maximum(base[side_seq] + starts[side_seq] + rel - 1, 0)],
                             side_ts)
        put(side_seq, sp, ids=side_ids, kinds=KIND_SIDE, feats=side_feat, ts=side_ts, pos=sp,
            gaps=np.maximum(side_ts - prev_main, 0))
    if C:
        cseq = np.repeat(np.arange(B, dtype=np.int64), C)
        cidx = np.tile(np.arange(C, dtype=np.int64), B)
        put(cseq, cidx, ids=data.context[rows].reshape(-1), kinds=KIND_CONTEXT, feats=cidx, ts=first_ts[cseq],
            pos=cidx)
    cand_seq = np.repeat(np.arange(B, dtype=np.int64), K)
    c = np.arange(cand.size, dtype=np.int64) - cand_off[cand_seq]
    slot = C + 2 * n[cand_seq] + m[cand_seq]
    cand_ts = data.timestamps[cand]
    cand_rows = put(cand_seq, slot + c, ids=data.item_ids[cand], kinds=KIND_ITEM, ts=cand_ts, pos=slot,
                    gaps=np.maximum(cand_ts - last_ts[cand_seq], 0))
    if predict == "history":
        pred_rows, pred_seq, src = item_rows, ev_seq, ev
    else:
        pred_rows, pred_seq, src = cand_rows, cand_seq, cand
    reg = None if data.regression is None else _t(data.regression[src], torch.float32)
    return RankingBatch(
        token_ids=_t(cols["ids"]), token_kinds=_t(cols["kinds"]), token_features=_t(cols["feats"]),
        paired_items=_t(cols["paired"]), timestamps=_t(cols["ts"]), positions=_t(cols["pos"]),
        time_gaps=_t(np.maximum(cols["gaps"], 0)), offsets=_t(offsets),
        lengths=_t(lengths), max_len=int(lengths.max()) if B else 0, num_targets=_t(K), contextual_len=int(C),
        user_ids=_t(data.user_ids[rows]), context_ids=_t(data.context[rows].reshape(B, C)),
        pred_rows=_t(pred_rows), pred_seq=_t(pred_seq), pred_items=_t(data.item_ids[src]),
        labels=_t(data.labels[src], torch.float32), regression=reg,
    )


class RankingLoader(ResumableBatchPlan):
    """Iterable of RankingBatch over fixed per-user windows; one ``for`` loop = (the rest of) one epoch.

    rows [U'] (row indices into data), starts/ends [U'] (history windows), num_candidates [U'] (eval),
    predict "history" | "candidates". shuffle: users permuted by np.random.default_rng(seed + epoch); then the
    loader is resumable: ``state_dict()`` = (epoch, batches consumed). rank / world_size: this rank's slice of
    every GLOBAL batch of ``batch_size`` users. Plan, slicing and position: ResumableBatchPlan (batch_plan.py)."""

    def __init__(self, data, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, num_candidates: np.ndarray,
                 batch_size: int, *, predict: str, shuffle: bool, seed: int = 0, max_side_tokens: int = 32,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(rows, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        if world_size > 1 and len(rows) < world_size:
            raise DataError(f"{len(rows)} users cannot be split over {world_size} processes (each needs >= 1)")
        self.data, self.predict = data, predict
        self.starts, self.ends = (np.asarray(a, dtype=np.int64) for a in (starts, ends))
        self.num_candidates = np.asarray(num_candidates, dtype=np.int64)
        self.max_side_tokens = int(max_side_tokens)

    def plan(self, epoch: int) -> List[np.ndarray]:
        """Index arrays (into self.rows) of this rank's slice of every global batch of ``epoch``."""
        return self.batch_indices(epoch)

    def batch(self, sel: np.ndarray) -> RankingBatch:
        return build_ranking_batch(self.data, self.rows[sel], self.starts[sel], self.ends[sel],
                                   self.num_candidates[sel], self.predict, self.max_side_tokens)

    def __iter__(self) -> Iterator[RankingBatch]:
        yield from self._consume(self.batch(sel) for sel in self._pending())
