"""M-FALCON for the generative RANKING model (modules/ranking.py, docs/serving.md "Ranking model").

Torch-only on purpose (the standalone loader runs it on the exported programs; :meth:`RankingMFalcon.from_model`
on a trained ``HSTURankingModel``). One user = one token layout, built here exactly as the trainer's
``build_ranking_batch`` builds an eval example (tests/test_serving_ranking.py compares the two)::

    [ctx_1 .. ctx_C] [side tokens and x_0 a_0 … x_{n-1} a_{n-1}, merged by time] [candidate]

- history = the last ``max_seq_len`` events; side snapshots are run-compressed per series, merged before the
  first event with time >= theirs (ties: side first), windowed like ``window_side_tokens`` (tokens inside the
  window + per series the latest one before it, at most ``max_side_tokens``, the newest kept);
- the history (prefix + events) is encoded ONCE, every layer's K/V cached (the prefix rows see the whole prefix,
  the other rows are causal + prefix), the last history row's rab uses t_next = the query time qt;
- every candidate is scored as if it were the only target: layout index = position = ``slot`` (the history's
  token count), timestamp qt, time gap = its timestamp − the last history event's (production time embedding;
  default timestamp qt), t_next qt; it sees the history and itself only. This is exactly the training model on
  history + [c] with ``num_targets = 1``; with all candidates as targets in one sequence (the eval batch) it is
  exact for the production variant, and for the research variant exact except that the op shifts the relative
  POSITION bias of candidate c by c (its layout index is slot + c there; time bias exact when every candidate has
  time qt).
- outputs: per-task probabilities sigmoid(logits) [m, K] (+ the regression output [m] when the model has one);
- ``append`` (incremental user state): the new full layout is built by the same ``layout`` path, compared row by
  row with the cached one on every input the dense step reads; the cache is kept up to the first changed row (the
  whole prefix when that row is a contextual one, which see each other) and only the rows from there on are run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from hstu.serving.mfalcon import DEFAULT_MICRO_BATCH, DEFAULT_PREFILL_CHUNK, Tensorish, _ids, extend_cache, \
    in_micro_batches, per_user_query_times
from hstu.serving.inputs import check_append_time, check_time_order, query_time_or
from hstu.serving.retrieval import ItemTable

KIND_CONTEXT, KIND_ITEM, KIND_ACTION, KIND_SIDE = 0, 1, 2, 3  # = hstu.modules.ranking.KIND_*
STEP_INPUTS = ["e", "kinds", "pos", "gaps", "ts", "t_next", "contextual_len", "past_k", "past_v", "past_pos",
               "past_ts"]


@dataclass
class RankingHistory:
    """One user's request. item_ids / actions / timestamps [n]: the events (time order; action ids
    1..num_actions); context [C]: contextual ids in the model's feature order (0 = unknown); side: series index
    (or name) -> (values [s] >= 1, timestamps [s]) snapshots in time order (compressed here as in training)."""

    item_ids: Tensorish
    actions: Tensorish
    timestamps: Tensorish
    context: Tensorish = ()
    side: Mapping[Union[int, str], Tuple[Tensorish, Tensorish]] = field(default_factory=dict)


class RankScores(NamedTuple):
    probabilities: torch.Tensor  # [m, K] sigmoid of the task logits
    logits: torch.Tensor  # [m, K]
    regression: Optional[torch.Tensor]  # [m] or None


@dataclass(frozen=True)
class Layout:
    """Token columns of one user's history layout ([T] int64 each) + what candidates need."""

    ids: torch.Tensor
    kinds: torch.Tensor
    features: torch.Tensor
    paired: torch.Tensor
    timestamps: torch.Tensor
    positions: torch.Tensor
    gaps: torch.Tensor
    contextual_len: int
    last_event_time: int  # the last history event's time (0 without events): candidate gaps start there


@dataclass(frozen=True)
class RankingState:
    """Encoded history of one user: the layout, every layer's K [L, H, T, dqk] / V [L, H, T, dv], query time.

    history: what ``append`` rebuilds the layout from (int64 tensors; the window's events, the context, the side
    series by index, run-compressed, without the snapshots no later window can use); recomputed: rows run through
    the dense step to build this state (``encode``: all T; ``append``: from the first changed row on)."""

    layout: Layout
    query_time: int
    k: torch.Tensor
    v: torch.Tensor
    history: Optional[RankingHistory] = None
    recomputed: int = 0

    @property
    def length(self) -> int:
        return int(self.layout.ids.numel())


def as_history(h: Any) -> RankingHistory:
    """RankingHistory from itself, a dict of its fields, or a tuple (item_ids, actions, timestamps[, context,
    side])."""
    if isinstance(h, RankingHistory):
        return h
    if isinstance(h, Mapping):
        return RankingHistory(**h)
    return RankingHistory(*h)


def side_columns(h: RankingHistory) -> Dict[str, torch.Tensor]:
    """side_features / side_values / side_timestamps [S] of a history (the recorded-request format)."""
    parts = [(torch.full_like(_ids(v, "side values"), int(f)), _ids(v, "side values"), _ids(t, "side timestamps"))
             for f, (v, t) in h.side.items()]
    z = torch.zeros(0, dtype=torch.int64)
    return {name: torch.cat([p[i] for p in parts]) if parts else z
            for i, name in enumerate(("side_features", "side_values", "side_timestamps"))}


def history_from_record(r: Mapping[str, torch.Tensor]) -> RankingHistory:
    """RankingHistory of a recorded request (records.pt; side series by index)."""
    side = {}
    for f in r["side_features"].unique().tolist():
        sel = r["side_features"] == f
        side[int(f)] = (r["side_values"][sel], r["side_timestamps"][sel])
    return RankingHistory(r["item_ids"], r["actions"], r["timestamps"], r["context"], side)


def build_layout(h: RankingHistory, *, max_seq_len: int, max_side_tokens: int, side_names: Sequence[str] = ()
                 ) -> Layout:
    """Token layout of one user's window (the last max_seq_len events), as the trainer's eval batch."""
    ids, acts, ts = _ids(h.item_ids, "item_ids"), _ids(h.actions, "actions"), _ids(h.timestamps, "timestamps")
    if not ids.shape == acts.shape == ts.shape:
        raise ValueError(f"item_ids, actions and timestamps differ in length: {ids.numel()}, {acts.numel()}, "
                         f"{ts.numel()}")
    check_time_order(ts, "timestamps")
    ctx = _ids(h.context, "context")
    C, n_all = int(ctx.numel()), int(ids.numel())
    s = max(0, n_all - int(max_seq_len))
    n = n_all - s
    feat, val, sts = _side_tokens(h.side, side_names)
    S = int(feat.numel())
    # insert_at: events strictly earlier than the token (ties: side first), over the whole given history
    ins = torch.searchsorted(ts, sts, right=False)
    keep = _window(feat, ins, s, n_all, max_side_tokens)
    feat, val, sts, ins = feat[keep], val[keep], sts[keep], ins[keep]
    rel = torch.where(ins <= s, torch.zeros_like(ins), ins - s)
    order = torch.argsort(rel * (S + 1) + keep, stable=True)  # carried ones first, then time order
    feat, val, sts, rel = feat[order], val[order], sts[order], rel[order]
    m = int(val.numel())
    T = C + 2 * n + m
    cols = {name: torch.zeros(T, dtype=torch.int64) for name in ("ids", "kinds", "feats", "paired", "ts", "gaps")}
    ev_ids, ev_acts, ev_ts = ids[s:], acts[s:], ts[s:]
    k = torch.arange(n, dtype=torch.int64)
    before = torch.searchsorted(rel, k, right=True)  # side tokens with rel <= k precede event k
    item_p = C + 2 * k + before
    prev = torch.cat([ev_ts[:1], ev_ts[:-1]])
    _put(cols, item_p, ids=ev_ids, kinds=KIND_ITEM, ts=ev_ts, gaps=ev_ts - prev)
    _put(cols, item_p + 1, ids=ev_acts, kinds=KIND_ACTION, paired=ev_ids, ts=ev_ts)
    if m:
        sp = C + 2 * rel + torch.arange(m, dtype=torch.int64)
        prev_main = torch.where(rel > 0, ev_ts[(rel - 1).clamp(min=0, max=max(n - 1, 0))] if n else sts, sts)
        _put(cols, sp, ids=val, kinds=KIND_SIDE, feats=feat, ts=sts, gaps=(sts - prev_main).clamp(min=0))
    if C:
        cidx = torch.arange(C, dtype=torch.int64)
        _put(cols, cidx, ids=ctx, kinds=KIND_CONTEXT, feats=cidx, ts=int(ev_ts[0]) if n else 0)
    return Layout(cols["ids"], cols["kinds"], cols["feats"], cols["paired"], cols["ts"],
                  torch.arange(T, dtype=torch.int64), cols["gaps"].clamp(min=0), C, int(ev_ts[-1]) if n else 0)


def _put(cols: Dict[str, torch.Tensor], rows: torch.Tensor, **vals) -> None:
    for name, v in vals.items():
        cols[name][rows] = v if isinstance(v, torch.Tensor) else torch.full_like(rows, int(v))


def _side_tokens(side: Mapping, names: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run-compressed side tokens (feature, value, timestamp) of all series, sorted by (timestamp, feature).
    side: series name or index -> (values, timestamps); names: the model's series (index = feature)."""
    parts = []
    for key, (values, times) in side.items():
        f, v, t = _side_series(key, values, times, names)
        v, t = _compress(v, t)
        parts.append((torch.full_like(v, f), v, t))
    if not parts:
        z = torch.zeros(0, dtype=torch.int64)
        return z, z, z
    feat, val, ts = (torch.cat([p[i] for p in parts]) for i in range(3))
    order = torch.argsort(ts * (len(names) + 1) + feat, stable=True)
    return feat[order], val[order], ts[order]


def _side_series(key: Any, values: Tensorish, times: Tensorish, names: Sequence[str]
                 ) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(feature index, values, timestamps) of one side series given by name or index (checked)."""
    f = names.index(key) if isinstance(key, str) and key in names else key
    if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < len(names):
        raise ValueError(f"side series {key!r}: unknown (this model has {list(names) or 'none'})")
    v, t = _ids(values, f"side[{key!r}] values"), _ids(times, f"side[{key!r}] timestamps")
    if v.shape != t.shape:
        raise ValueError(f"side[{key!r}]: values and timestamps differ in length")
    return f, v, t


def _compress(v: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Only the earliest entry of each run of equal consecutive values (idempotent)."""
    first = torch.ones_like(v, dtype=torch.bool)
    first[1:] = v[1:] != v[:-1]
    return v[first], t[first]


def stored_history(h: RankingHistory, *, max_seq_len: int, side_names: Sequence[str]) -> RankingHistory:
    """What a state keeps of its history for ``append``: builds the SAME layout as ``h`` now and after any later
    events / snapshots. Events before the window are dropped (the window only moves forward; a side token's
    insertion index then becomes max(0, index − s), which windows, carries and orders it exactly as before);
    side series are stored run-compressed (compression is idempotent and a new snapshot is compared with the
    series' last value, which is kept) by feature index, without the snapshots before the window that a later
    one of the same series supersedes — only those before an existing event: one at or after the last event
    may still move inside a later window (kept whole when a series is not in time order)."""
    ids, acts, ts = _ids(h.item_ids, "item_ids"), _ids(h.actions, "actions"), _ids(h.timestamps, "timestamps")
    s = max(0, int(ts.numel()) - int(max_seq_len))
    side = {}
    for key, (values, times) in h.side.items():
        f, v, t = _side_series(key, values, times, side_names)
        v, t = _compress(v, t)
        if t.numel() > 1 and bool((t[1:] >= t[:-1]).all()):
            ins = torch.searchsorted(ts, t, right=False)  # non-decreasing: t is sorted
            before = int(((ins <= s) & (ins < ts.numel())).sum())  # ins < n: no later event moves it
            v, t = v[max(0, before - 1):], t[max(0, before - 1):]
        side[f] = (v, t)
    return RankingHistory(ids[s:], acts[s:], ts[s:], _ids(h.context, "context"), side)


def _window(feat: torch.Tensor, ins: torch.Tensor, s: int, e: int, max_tokens: int) -> torch.Tensor:
    """Indices of the kept side tokens (window_side_tokens of ONE user, window [s, e)), in token order."""
    inside = (ins > s) & (ins < e)
    carried = torch.zeros_like(inside)
    for f in feat.unique().tolist():
        before = ((feat == f) & (ins <= s)).nonzero().flatten()
        if before.numel():
            carried[before[-1]] = True  # tokens are in time order: the latest in force at the window start
    keep = (inside | carried).nonzero().flatten()
    return keep[max(0, keep.numel() - max_tokens):] if max_tokens >= 0 else keep


class TokenTables:
    """Raw token rows of the ranking model's tables (each an ItemTable: fp32 | bf16 | int8 rowwise), looked up by
    kind as ``RankingTables.token_embeddings``: item, action (+ its item's row when action_with_item), contextual
    and side (one table per feature)."""

    def __init__(self, items: ItemTable, actions: ItemTable, contextual: Sequence[ItemTable],
                 side: Sequence[ItemTable], action_with_item: bool) -> None:
        self.items, self.actions, self.action_with_item = items, actions, bool(action_with_item)
        self.contextual, self.side = list(contextual), list(side)
        self.dim = items.dim

    def named(self) -> Dict[str, ItemTable]:
        out = {"items": self.items, "actions": self.actions}
        out.update({f"contextual.{i}": t for i, t in enumerate(self.contextual)})
        out.update({f"side.{i}": t for i, t in enumerate(self.side)})
        return out

    def lookup(self, ids: torch.Tensor, kinds: torch.Tensor, features: torch.Tensor,
               paired: torch.Tensor) -> torch.Tensor:
        """Token columns [T] -> fp32 [T, D] raw rows."""
        out = torch.zeros(ids.numel(), self.dim)
        for kind in (KIND_ITEM, KIND_ACTION, KIND_CONTEXT, KIND_SIDE):
            sel = (kinds == kind).nonzero().flatten()
            if not sel.numel():
                continue
            if kind == KIND_ITEM:
                e = self.items.lookup(ids[sel])
            elif kind == KIND_ACTION:
                e = self.actions.lookup(ids[sel])
                if self.action_with_item:
                    e = e + self.items.lookup(paired[sel])
            else:
                tables, e = (self.contextual if kind == KIND_CONTEXT else self.side), torch.zeros(sel.numel(),
                                                                                                 self.dim)
                for f, table in enumerate(tables):
                    fs = (features[sel] == f).nonzero().flatten()
                    if fs.numel():
                        e[fs] = table.lookup(ids[sel][fs])
            out[sel] = e
        return out


class RankingStep(nn.Module):
    """``HSTURankingModel.forward_cached`` (+ the task heads on candidate rows): the exported unit.

    candidates=False -> (h [M, D], k, v); True -> y [M, K (+1 regression)] head outputs (logits [, regression])."""

    def __init__(self, model: nn.Module, candidates: bool) -> None:
        super().__init__()
        self.model, self.candidates = model, bool(candidates)

    def forward(self, e, kinds, pos, gaps, ts, t_next, contextual_len, past_k, past_v, past_pos, past_ts):
        h, k, v = self.model.forward_cached(e, kinds, pos, gaps, ts, t_next, contextual_len, past_k, past_v,
                                            past_pos, past_ts, candidates=self.candidates)
        if not self.candidates:
            return h, k, v
        logits, reg = self.model.head(h)
        return logits if reg is None else torch.cat([logits, reg.unsqueeze(1)], 1)


def _check_range(x: torch.Tensor, lo: int, hi: int, name: str) -> None:
    if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
        raise ValueError(f"{name}: ids must lie in {lo}..{hi}, got {int(x.min())}..{int(x.max())}")


def _t_next(lay: Layout, qt: int) -> torch.Tensor:
    """[T] the time each layout row's research rab uses: the next row's timestamp, qt on the last row."""
    return torch.cat([lay.timestamps[1:], torch.tensor([int(qt)], dtype=torch.int64)])


class RankingMFalcon:
    """Encode a user's ranking layout once (KV cache), score candidates in micro-batches -> RankScores."""

    def __init__(self, extend: Callable, score: Callable, tables: TokenTables, *, variant: str, max_seq_len: int,
                 max_side_tokens: int, num_layers: int, num_heads: int, attention_dim: int, linear_dim: int,
                 task_names: Sequence[str], regression: bool, side_names: Sequence[str] = (),
                 micro_batch: int = DEFAULT_MICRO_BATCH, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if variant not in ("research", "production"):
            raise ValueError(f"variant must be research | production, got {variant!r}")
        self.extend, self.score, self.tables = extend, score, tables
        self.variant, self.max_seq_len, self.max_side_tokens = variant, int(max_seq_len), int(max_side_tokens)
        self.shape = (int(num_layers), int(num_heads), int(attention_dim), int(linear_dim))
        self.task_names, self.regression = tuple(task_names), bool(regression)
        self.side_names = tuple(side_names) or tuple(f"side{i}" for i in range(len(tables.side)))
        self.micro_batch, self.prefill_chunk = int(micro_batch), int(prefill_chunk)

    @classmethod
    def from_model(cls, model: nn.Module, *, max_seq_len: int, max_side_tokens: int,
                   side_names: Sequence[str] = (), **kw) -> "RankingMFalcon":
        """In-process engine on a trained HSTURankingModel (eval mode is the caller's business)."""
        if not hasattr(model, "forward_cached"):
            raise ValueError(f"ranking M-FALCON needs an HSTURankingModel, got {type(model).__name__} "
                             "(model.arch dlrm has no sequence to cache)")
        t = model.tables
        wrap = lambda emb: ItemTable(emb.weight.detach(), l2_norm=False)  # noqa: E731  (no copy)
        # item rows: the id table, or with item features the item tower's vectors (HSTURankingModel.item_rows)
        items = model.item_rows() if hasattr(model, "item_rows") else t.items.table.weight.detach()
        tables = TokenTables(ItemTable(items, l2_norm=False), wrap(t.actions), [wrap(x) for x in t.contextual],
                             [wrap(x) for x in t.side], model.spec.action_with_item)
        layer = model.layers[0]
        return cls(RankingStep(model, False), RankingStep(model, True), tables,
                   variant="research" if model.research else "production", max_seq_len=max_seq_len,
                   max_side_tokens=max_side_tokens, num_layers=len(model.layers), num_heads=layer.num_heads,
                   attention_dim=layer.attention_dim, linear_dim=layer.linear_dim,
                   task_names=model.spec.task_names, regression=model.spec.regression, side_names=side_names, **kw)

    def layout(self, history: Any) -> Layout:
        h = as_history(history)
        lay = build_layout(h, max_seq_len=self.max_seq_len, max_side_tokens=self.max_side_tokens,
                           side_names=self.side_names)
        t = self.tables
        if lay.contextual_len != len(t.contextual):
            raise ValueError(f"context: this model has {len(t.contextual)} contextual features, got "
                             f"{lay.contextual_len}")
        for kind, tabs, name in ((KIND_ITEM, [t.items], "item_ids"), (KIND_ACTION, [t.actions], "actions"),
                                 (KIND_CONTEXT, t.contextual, "context"), (KIND_SIDE, t.side, "side values")):
            sel = lay.kinds == kind
            for f, tab in enumerate(tabs):
                fsel = sel & (lay.features == f) if kind in (KIND_CONTEXT, KIND_SIDE) else sel
                lo = 0 if kind == KIND_CONTEXT else 1
                _check_range(lay.ids[fsel], lo, tab.num_rows - 1, name if len(tabs) == 1 else f"{name} [{f}]")
        return lay

    @torch.inference_mode()
    def encode(self, history: Any, query_time: Optional[int] = None) -> RankingState:
        """Encode the history layout once -> RankingState; qt defaults to the last event's timestamp."""
        h = as_history(history)
        lay = self.layout(h)
        qt = query_time_or(query_time, lay.last_event_time)
        kept = stored_history(h, max_seq_len=self.max_seq_len, side_names=self.side_names)
        return self._extend_from(lay, qt, None, 0, kept)

    @torch.inference_mode()
    def append(self, state: RankingState, events: Any, query_time: Optional[int] = None) -> RankingState:
        """New events (and/or side snapshots, a new query time) after a cached history -> the state ``encode`` of
        the whole history gives, without re-encoding what does not change.

        events: a RankingHistory / dict / tuple of the new item_ids, actions, timestamps (at or after the cached
        history's last event), optional ``side`` snapshots (at or after each series' last one) and ``context``
        (empty: keep the state's). qt defaults to the last new event's time (the state's qt without events).
        The new layout is built as ``encode`` builds it and compared row by row with the cached one on every
        input of the dense step (token ids, kinds, features, paired items, positions, time gaps, timestamps,
        research: t_next — production has no rab, no layer reads it); the cache is kept before the first
        changed row (rows before it are final: causal) and the rows from it on are run — e.g. 2 per new event,
        + the research old last row (its t_next was qt), + side tokens merged in. A change inside the contextual
        prefix (whose rows see each other), or a window shift past max_seq_len (the first event changes),
        re-encodes everything. ``recomputed`` on the result counts the rows run."""
        if state.history is None:
            raise ValueError("append: this state has no stored history (build it with encode)")
        old, new = state.history, as_history(events)
        ids, acts, ts = _ids(new.item_ids, "item_ids"), _ids(new.actions, "actions"), _ids(new.timestamps,
                                                                                          "timestamps")
        if not ids.shape == acts.shape == ts.shape:
            raise ValueError(f"item_ids, actions and timestamps differ in length: {ids.numel()}, {acts.numel()}, "
                             f"{ts.numel()}")
        check_append_time(ts, int(old.timestamps[-1]) if old.timestamps.numel() else None)
        side = dict(old.side)
        for key, (values, times) in new.side.items():
            f, v, t = _side_series(key, values, times, self.side_names)
            pv, pt = side.get(f, (v[:0], t[:0]))
            if t.numel() and pt.numel() and int(t.min()) < int(pt.max()):
                raise ValueError(f"side[{key!r}] timestamps: new snapshot at {int(t.min())} before the series' last "
                                 f"cached one ({int(pt.max())}); snapshots must be appended in time order")
            side[f] = (torch.cat([pv, v]), torch.cat([pt, t]))
        ctx = _ids(new.context, "context")
        h = RankingHistory(torch.cat([old.item_ids, ids]), torch.cat([old.actions, acts]),
                           torch.cat([old.timestamps, ts]), ctx if ctx.numel() else old.context, side)
        lay = self.layout(h)
        qt = query_time_or(query_time, int(ts[-1]) if ts.numel() else state.query_time)
        kept = stored_history(h, max_seq_len=self.max_seq_len, side_names=self.side_names)
        return self._extend_from(lay, qt, state, self._first_change(state, lay, qt), kept)

    def _first_change(self, state: RankingState, lay: Layout, qt: int) -> int:
        """Rows of state's cache that stay valid for layout ``lay`` at query time qt: the first row whose dense
        step inputs differ (the old length when the old layout is a prefix of the new one); 0 when that row is
        inside the contextual prefix or the prefix length changed."""
        old = state.layout
        if old.contextual_len != lay.contextual_len:
            return 0
        n = min(state.length, int(lay.ids.numel()))
        diff = torch.zeros(n, dtype=torch.bool)
        for name in ("ids", "kinds", "features", "paired", "positions", "gaps", "timestamps"):
            diff |= getattr(old, name)[:n] != getattr(lay, name)[:n]
        if self.variant == "research":  # the time rab reads t_next (the next row's time; qt on the last row)
            diff |= _t_next(old, state.query_time)[:n] != _t_next(lay, qt)[:n]
        changed = diff.nonzero().flatten()
        first = int(changed[0]) if changed.numel() else n
        return 0 if first < lay.contextual_len else first

    def _extend_from(self, lay: Layout, qt: int, state: Optional[RankingState], first: int,
                     history: RankingHistory) -> RankingState:
        """State of layout ``lay``: state's cache rows < first (final) + rows first.. run through the step."""
        L, H, dqk, dv = self.shape
        if state is None or first == 0:
            k, v = torch.zeros(L, H, 0, dqk), torch.zeros(L, H, 0, dv)
        else:
            k, v = state.k[:, :, :first], state.v[:, :, :first]
        T = int(lay.ids.numel())
        if T == first:
            return RankingState(lay, qt, k, v, history, 0)
        sl = slice(first, T)
        e = self.tables.lookup(lay.ids[sl], lay.kinds[sl], lay.features[sl], lay.paired[sl])
        kinds, pos, gaps, ts, t_next = lay.kinds[sl], lay.positions[sl], lay.gaps[sl], lay.timestamps[sl], \
            _t_next(lay, qt)[sl]
        ctx = torch.tensor([lay.contextual_len], dtype=torch.int64)

        def step(s: int, end: int, k, v, past_pos, past_ts):
            return self.extend(e[s:end], kinds[s:end], pos[s:end], gaps[s:end], ts[s:end], t_next[s:end], ctx, k,
                               v, past_pos, past_ts)

        chunk = max(self.prefill_chunk, lay.contextual_len)  # the prefix must be one block (it sees itself)
        _, k, v, _, _ = extend_cache(step, k, v, lay.positions[:first], lay.timestamps[:first], pos, ts, chunk)
        return RankingState(lay, qt, k, v, history, T - first)

    @torch.inference_mode()
    def rank(self, state: RankingState, candidates: Tensorish, candidate_timestamps: Optional[Tensorish] = None,
             micro_batch: Optional[int] = None) -> RankScores:
        """Per-task probabilities [m, K] (+ regression [m]) of the candidates, each scored after the cached
        history as if alone (see the module docstring), in micro-batches of b_m: cost linear in m.
        candidate_timestamps [m] (production variant only; default: the query time) set the time gaps."""
        cand = _ids(candidates, "candidates")
        _check_range(cand, 1, self.tables.items.num_rows - 1, "candidates")
        lay, qt = state.layout, torch.tensor([state.query_time], dtype=torch.int64)
        cts = qt.expand(cand.numel()) if candidate_timestamps is None else _ids(candidate_timestamps,
                                                                                 "candidate_timestamps")
        if cts.shape != cand.shape:
            raise ValueError(f"candidate_timestamps has {cts.numel()} values for {cand.numel()} candidates")
        if self.variant == "research" and bool((cts != state.query_time).any()):
            raise ValueError("research variant: every candidate takes the query time (the last history row's rab "
                             "reads the candidate time, so it must be shared); pass query_time= instead")
        gaps = (cts - lay.last_event_time).clamp(min=0)
        kind, pos = torch.tensor([KIND_ITEM]), torch.tensor([state.length], dtype=torch.int64)
        ctx = torch.tensor([lay.contextual_len], dtype=torch.int64)

        def score(s: int, e: int) -> torch.Tensor:
            x = self.tables.items.lookup(cand[s:e])
            return self.score(x, kind, pos, gaps[s:e], qt, qt, ctx, state.k, state.v, lay.positions,
                              lay.timestamps)

        K = len(self.task_names)
        y = in_micro_batches(cand.numel(), int(micro_batch or self.micro_batch), score,
                             torch.zeros(0, K + int(self.regression)))
        logits = y[:, :K]
        return RankScores(torch.sigmoid(logits), logits, y[:, K] if self.regression else None)

    def rank_batch(self, histories: Sequence[Any], candidates: Sequence[Tensorish], *,
                   query_times: Optional[Sequence[Optional[int]]] = None,
                   micro_batch: Optional[int] = None) -> List[RankScores]:
        """Several users in one call: histories[b] with candidates[b] (jagged: any m_b) -> [RankScores]; equal to
        per-user ``rank(encode(...))`` (each user's history is its own KV cache)."""
        qts = per_user_query_times(histories, candidates, query_times)
        return [self.rank(self.encode(h, qt), c, micro_batch=micro_batch)
                for h, c, qt in zip(histories, candidates, qts)]
