"""task=ranking on own logs (data.name=events; docs/data.md "Ranking on your own logs"): the prepared shards,
read into memory, -> RankingData.

- action token of an event: ``action_column`` value + 1 (types 0..127 -> tokens 1..128) when one is declared,
  else the rating (``rating_column``, which must then hold 1..127); ``num_actions`` = the largest token seen;
- binary tasks: ``data.events.labels`` (``NAME=SOURCE OP VALUE``, SOURCE rating | action; default
  ``like=rating>=4``), label = 1.0 where the event's rating / action type satisfies the rule;
- regression target: the rating (``ranking.regression_weight > 0`` needs a rating_column);
- contextual tokens: one per ``context_columns`` entry — each user's value at the last event of its training
  window (the latest context before any validation / test candidate; 0 = null), vocabulary = the column's
  (vocab/context-<column>.parquet) + 1; :func:`user_context`. No side series.

Split: ``leave_one_out`` = the ranking task's chronological split (the last ranking.num_eval_targets events are the
test candidates, the K before them validation; trainer/data/ranking.py); ``time`` = :func:`time_cutoff_windows`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hstu.trainer.data.errors import DataError

OPS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less, "==": np.equal,
       "!=": np.not_equal}


def events_ranking_config(cfg: Any, data_cfg: Any) -> Any:
    """``data_cfg`` (the ranking DataConfig, max_seq_len widened) with, for split=time, keep_after_cutoff = K: the
    shards then hold the first K events at/after the cutoff (the test candidates)."""
    ev = data_cfg.events
    if ev.split != "time":
        return data_cfg
    keep = max(int(ev.keep_after_cutoff), int(cfg.ranking.num_eval_targets))
    return dataclasses.replace(data_cfg, events=dataclasses.replace(ev, keep_after_cutoff=keep))


def label_values(rule: tuple, ratings: Any, actions: Any) -> np.ndarray:
    """One parsed label rule (name, source, op, values) -> [E] float32 0/1."""
    _, source, op, values = rule
    x = (ratings if source == "rating" else actions).astype(np.float64)
    if op == "in":
        return np.isin(x, np.asarray(values)).astype(np.float32)
    return OPS[op](x, values[0]).astype(np.float32)


def events_ranking_data(cfg: Any, progress: bool = True):
    """RunConfig (task=ranking, data.name=events) -> RankingData of every user of the prepared dataset (prepared
    first if needed), ``num_pre`` set for split=time."""
    from hstu.trainer.data.events_loader import load_events
    from hstu.trainer.data.ranking import RankingData, ranking_data_config
    from hstu.trainer.events_config import ranking_labels

    ev = cfg.data.events
    seqs = load_events(ranking_data_config(cfg), progress)
    where = str(seqs.events.folder / "manifest.json")
    ratings, actions = seqs.ratings, seqs.action_types
    if ev.action_column:
        tokens = actions.astype(np.int64) + 1
    else:
        tokens = ratings.astype(np.int64)
        if tokens.size and (tokens.min() < 1 or tokens.max() > 127):
            raise DataError(f"task=ranking takes the action tokens from data.events.rating_column "
                            f"{ev.rating_column!r}: ratings must be 1..127 (rounded), got {int(tokens.min())}.."
                            f"{int(tokens.max())} (declare an action_column instead)", path=where)
    if seqs.num_pre is not None and not (seqs.lengths() > seqs.num_pre).any():
        raise DataError(f"no user has an event at/after data.events.time_cutoff = {ev.time_cutoff!r} (nothing to "
                        "evaluate on)", path=where)
    context, context_names, context_vocab = user_context(seqs.events, np.asarray(seqs.user_ids), cfg)
    rules = ranking_labels(ev)
    labels = np.stack([label_values(r, ratings, actions) for r in rules], 1) if seqs.num_events else \
        np.zeros((0, len(rules)), dtype=np.float32)
    return RankingData(
        user_ids=np.asarray(seqs.user_ids), offsets=np.asarray(seqs.offsets), item_ids=np.asarray(seqs.item_ids),
        timestamps=np.asarray(seqs.timestamps), actions=tokens, labels=np.ascontiguousarray(labels),
        task_names=tuple(r[0] for r in rules), num_items=int(seqs.num_items),
        num_actions=max(1, int(tokens.max()) if tokens.size else 1), context=context,
        context_names=context_names, context_vocab=context_vocab,
        regression=ratings.astype(np.float32) if ev.rating_column else None,
        regression_name="rating" if ev.rating_column else None,
        num_pre=None if seqs.num_pre is None else np.asarray(seqs.num_pre, dtype=np.int64),
        dataset_dir=str(seqs.events.folder))


def time_cutoff_windows(lengths: np.ndarray, num_pre: np.ndarray, max_seq_len: int, num_eval_targets: int):
    """split=time windows (event indices within each user) -> the fields of RankingSplit: users with >= 1 event
    before the cutoff T (every user of a prepared time-split dataset); TEST candidates = their first
    K = min(num_eval_targets, events at/after T) events at/after T (0 = no test candidates), history = the last
    max_seq_len events before T; VALIDATION candidates = the last K_v = min(num_eval_targets, pre − 1) events
    before T, training window = the last max_seq_len events before those. Nothing at/after T is trained on."""
    rows = np.flatnonzero(num_pre >= 1)
    pre = num_pre[rows].astype(np.int64)
    k = np.minimum(num_eval_targets, lengths[rows] - pre)
    k_valid = np.minimum(num_eval_targets, pre - 1)
    train_end = pre - k_valid
    return (rows, np.maximum(0, pre - max_seq_len), pre, k, np.maximum(0, train_end - max_seq_len), train_end,
            k_valid)


def describe_events_split(cfg: Any, data: Any) -> dict:
    """results.json ``data`` entries of an own-logs ranking run: the split (time cutoff) and the dataset folder."""
    from hstu.trainer.events_config import DEFAULT_LABELS

    ev, K = cfg.data.events, cfg.ranking.num_eval_targets
    out = {"labels": list(ev.labels) or list(DEFAULT_LABELS)}
    if getattr(data, "dataset_dir", None):  # where the vocabularies are (hstu export copies them)
        out["dataset_dir"] = data.dataset_dir
    if ev.split == "time":
        out["split"] = (f"time cutoff {ev.time_cutoff}: test = the first {K} events at/after it per user, validation"
                        f" = the last {K} before it, training windows end before the validation events")
    return out


def user_context(events: Any, user_ids: np.ndarray, cfg: Any):
    """Per-user contextual ids [U, C] (rows = ``user_ids``, ascending) from the per-event ``context_<i>`` arrays
    of the shards: the value at the last event of each user's training window (the split's ``train_end - 1``),
    0 for users without one; -> (context, column names, vocab sizes incl. 0)."""
    from types import SimpleNamespace

    from hstu.trainer.data.ranking import chronological_split

    contexts = events.manifest.get("contexts") or []
    out = np.zeros((user_ids.size, len(contexts)), dtype=np.int64)
    if not contexts:
        return out, (), ()
    for record in events.shards:
        with np.load(events.folder / record["file"], allow_pickle=False) as z:
            offsets, uids = z["offsets"], z["user_ids"]
            num_pre = z["num_pre"].astype(np.int64) if "num_pre" in z.files else None
            values = [z[c["array"]] for c in contexts]
        n = np.diff(offsets)
        view = SimpleNamespace(lengths=lambda n=n: n, num_pre=num_pre)
        split = chronological_split(view, int(cfg.data.max_seq_len), int(cfg.ranking.num_eval_targets))
        pos = offsets[split.rows] + split.train_end - 1
        rows = np.searchsorted(user_ids, uids[split.rows])
        for c, arr in enumerate(values):
            out[rows, c] = arr[pos]
    return out, tuple(c["column"] for c in contexts), tuple(int(c["vocab_size"]) + 1 for c in contexts)
