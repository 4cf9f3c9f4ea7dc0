"""Own event logs, step 3: training reads the prepared dataset (trainer/data/events_prepare.py).

``data.events.stream: false`` (default): every shard is read into one UserSequences (rows in user order) and the
usual loaders of the built-in datasets run on it (:func:`build_events_loaders`): a one-shard dataset batches
exactly like the built-in parser's (the parity test).

``data.events.stream: true`` (:class:`ShardedTrainLoader`): rank r of W reads only shards s with s % W == r, one
shard at a time, so loader memory is one shard, not the dataset. Epoch e: the rank's shards in the order of
``default_rng([seed + e, 0x5AD])``, users of a shard in the order of ``default_rng(seed + e)`` (one shard) /
``default_rng([seed + e, shard])``, cut into batches of batch_size // W; every rank runs the same number of
batches (the smallest rank's; the others drop their extra batches of that epoch). The position — (epoch, batches
consumed) and the (shard, offset) it means — is the loader state the DCP checkpoint records
(ResumableBatchPlan), so a killed run resumes bit-identically. Evaluation reads the rank's shards into memory
(histories of at most max_seq_len events per user) and ranks its own users — the same number on every rank (the
evaluation is collective with sharded tables): the smallest rank's count, or ``data.events.eval_users`` when
smaller (which also bounds that memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from hstu.trainer.data.batch import JaggedBatch, batch_from_sequences
from hstu.trainer.data.batch_plan import ResumableBatchPlan
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.events_split import load_shard, sort_by_user, split_shard, train_view
from hstu.trainer.data.loader import SequenceLoader
from hstu.trainer.data.sequences import (EvalSequences, LeaveOneOutSplit, UserSequences, concat_sequences,
                                         select_ranges)
from hstu.trainer.evaluate import popularity_counts

SHARD_ORDER_SALT = 0x5AD


@dataclass
class PreparedEvents:
    """A prepared dataset: its folder, manifest and the options training needs."""

    folder: Path
    manifest: Dict[str, Any]
    max_seq_len: int
    cache_hit: bool = False

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def num_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    @property
    def shards(self) -> List[Dict[str, Any]]:
        return self.manifest["shards"]

    def read(self, shard_ids: List[int], verify: bool = False) -> Tuple[UserSequences, Optional[np.ndarray]]:
        """Shards ``shard_ids`` concatenated, rows in user order -> (sequences, num_pre or None)."""
        parts = [load_shard(self.folder, self.shards[s], verify) for s in shard_ids]
        seqs = concat_sequences([p[0] for p in parts])
        num_pre = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
        return sort_by_user(seqs, num_pre)

    def rank_shards(self, rank: int, world_size: int) -> List[int]:
        mine = list(range(rank, len(self.shards), world_size))
        if not mine:
            raise DataError(f"the prepared dataset has {len(self.shards)} shard(s) for {world_size} ranks: set "
                            f"data.events.num_shards >= {world_size} (a multiple balances best) and prepare again",
                            path=str(self.folder / "manifest.json"))
        return mine


class EventSequences(UserSequences):
    """All users of a prepared dataset in memory (stream=false); ``events`` / ``num_pre`` ride along."""

    events: PreparedEvents
    num_pre: Optional[np.ndarray] = None


class StreamedEvents:
    """Stand-in for UserSequences when training streams (stream=true): counts, and the popularity counts of
    this rank's shards summed over ranks (the most-popular baseline)."""

    def __init__(self, events: PreparedEvents) -> None:
        self.events, self.num_items, self.num_users = events, events.num_items, events.num_users
        self.local_counts: Optional[torch.Tensor] = None

    def popularity_counts(self, env: Any = None) -> torch.Tensor:
        counts = self.local_counts.clone()
        if env is not None and env.world_size > 1:
            env.all_reduce_sum(counts)
        return counts


def load_events(data_cfg: Any, progress: bool = True) -> "EventSequences | StreamedEvents":
    """Prepare (or find) the dataset; stream=false: read it all; stream=true: only the manifest."""
    from hstu.trainer.data.events_prepare import prepare_events

    manifest, folder, hit = prepare_events(data_cfg, progress)
    events = PreparedEvents(folder, manifest, data_cfg.max_seq_len, hit)
    if data_cfg.events.stream:
        return StreamedEvents(events)
    seqs, num_pre = events.read(list(range(len(events.shards))))
    out = EventSequences(**{k: getattr(seqs, k) for k in ("user_ids", "offsets", "item_ids", "timestamps",
                                                          "ratings", "num_items", "action_types")})
    out.events, out.num_pre = events, num_pre
    if out.num_users == 0:
        raise DataError(f"no user has >= {data_cfg.min_seq_len} events", path=str(folder / "manifest.json"))
    return out


def build_events_loaders(data_cfg: Any, source: "EventSequences | StreamedEvents", rank: int = 0,
                         world_size: int = 1) -> Tuple[Any, SequenceLoader, SequenceLoader]:
    """(train, validation, test) loaders of a prepared dataset (see the module docstring)."""
    eval_kw = dict(num_workers=data_cfg.num_workers)
    if isinstance(source, EventSequences):
        split = split_shard(source, source.num_pre, data_cfg.max_seq_len)
        train = SequenceLoader(split.train, data_cfg.batch_size, shuffle=True, seed=data_cfg.seed,
                               num_workers=data_cfg.num_workers, min_len=2, rank=rank, world_size=world_size)
        eval_kw.update(rank=rank, world_size=world_size)
    else:
        events = source.events
        train = ShardedTrainLoader(events, data_cfg.batch_size, data_cfg.seed, rank, world_size)
        split, source.local_counts = _rank_eval_split(events, rank, world_size, data_cfg.events.eval_users)
    validation, test = (SequenceLoader.for_eval(view, data_cfg.eval_batch_size, **eval_kw)
                        for view in (split.validation, split.test))
    return train, validation, test


def _first_users(view: EvalSequences, k: int) -> EvalSequences:
    rows = np.arange(min(k, view.history.num_users))
    h = view.history
    return EvalSequences(select_ranges(h, rows, h.offsets[rows], h.offsets[rows + 1]), view.target_ids[rows],
                         view.target_timestamps[rows])


def eval_user_counts(events: PreparedEvents, world_size: int, eval_users: int) -> Tuple[int, int]:
    """(validation, test) users every rank evaluates: the smallest rank's count, capped by ``eval_users`` (> 0)."""
    out = []
    for key in ("validation_users", "test_users"):
        k = min(sum(int(events.shards[s][key]) for s in events.rank_shards(r, world_size)) for r in range(world_size))
        out.append(min(k, eval_users) if eval_users else k)
    return out[0], out[1]


def _rank_eval_split(events: PreparedEvents, rank: int, world_size: int,
                     eval_users: int) -> Tuple[LeaveOneOutSplit, torch.Tensor]:
    """This rank's validation / test views — the same number of users on every rank (:func:`eval_user_counts`), the
    first in user order of the shards read — and the popularity counts [N+1] of its shards, read one at a time."""
    k_val, k_test = eval_user_counts(events, world_size, eval_users)
    counts = torch.zeros(events.num_items + 1, dtype=torch.long)
    kept: List[Tuple[UserSequences, Optional[np.ndarray]]] = []
    have_val = have_test = 0
    for shard in events.rank_shards(rank, world_size):
        seqs, num_pre = load_shard(events.folder, events.shards[shard])
        counts += popularity_counts(torch.as_tensor(seqs.item_ids), torch.as_tensor(seqs.offsets), events.num_items)
        if have_val < k_val or have_test < k_test or not kept:
            kept.append((seqs, num_pre))
            have_val += int(events.shards[shard]["validation_users"])
            have_test += int(events.shards[shard]["test_users"])
    seqs = concat_sequences([k[0] for k in kept])
    num_pre = None if kept[0][1] is None else np.concatenate([k[1] for k in kept])
    split = split_shard(*sort_by_user(seqs, num_pre), events.max_seq_len)
    split = LeaveOneOutSplit(split.train, _first_users(split.validation, k_val), _first_users(split.test, k_test))
    return split, counts


class ShardedTrainLoader(ResumableBatchPlan):
    """Streaming train loader over this rank's shards (see the module docstring); yields JaggedBatch."""

    def __init__(self, events: PreparedEvents, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(np.zeros(0, dtype=np.int64), batch_size, shuffle=True, seed=seed, rank=rank,
                         world_size=world_size)
        self.events, self.max_seq_len = events, events.max_seq_len
        self.local_batch = max(1, self.batch_size // self.world_size)
        self.mine = events.rank_shards(rank, world_size)
        per_rank = [sum(self._shard_batches(s) for s in events.rank_shards(r, world_size)) for r in range(world_size)]
        self._len = min(per_rank)
        self._total_train = sum(int(s["train_users"]) for s in events.shards)

    def _shard_batches(self, shard: int) -> int:
        return math.ceil(int(self.events.shards[shard]["train_users"]) / self.local_batch)

    def __len__(self) -> int:
        return self._len

    @property
    def num_sequences(self) -> int:
        return self._total_train

    def shard_order(self, epoch: int) -> List[int]:
        order = np.random.default_rng([self.seed + epoch, SHARD_ORDER_SALT]).permutation(len(self.mine))
        return [self.mine[j] for j in order]

    def _user_permutation(self, shard: int, n: int, epoch: int) -> np.ndarray:
        one = len(self.events.shards) == 1  # a one-shard dataset shuffles like SequenceLoader (parity)
        rng = np.random.default_rng(self.seed + epoch if one else [self.seed + epoch, shard])
        return rng.permutation(n)

    def locate(self, epoch: int, batches_consumed: int) -> Tuple[int, int]:
        """(shard, batch offset inside it) of global batch ``batches_consumed`` of ``epoch``; (-1, 0) at the end."""
        done = 0
        for shard in self.shard_order(epoch):
            nb = self._shard_batches(shard)
            if batches_consumed < done + nb:
                return shard, batches_consumed - done
            done += nb
        return -1, 0

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = dict(super().state_dict())
        shard, offset = self.locate(state["epoch"], state["batches_consumed"])
        state.update(shard=shard, offset=offset, permutation_seed=self.seed + state["epoch"],
                     dataset=str(self.events.manifest.get("key", "")))
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "dataset" in state and state["dataset"] != str(self.events.manifest.get("key", "")):
            raise DataError(f"loader state is for prepared dataset {state['dataset'][:16]}, this run reads "
                            f"{str(self.events.manifest.get('key', ''))[:16]}")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise DataError(f"streamed loader state has world_size={state['world_size']}, this run has "
                            f"{self.world_size} (each rank reads its own shards: resume with the same world size)")
        super().load_state_dict(state)

    def _batches(self, epoch: int, start: int) -> Iterator[JaggedBatch]:
        done = 0
        for shard in self.shard_order(epoch):
            nb = self._shard_batches(shard)
            if done + nb <= start:
                done += nb
                continue
            seqs, num_pre = load_shard(self.events.folder, self.events.shards[shard])
            train = train_view(seqs, num_pre, self.max_seq_len)
            rows = np.flatnonzero(train.lengths() >= 2)
            perm = rows[self._user_permutation(shard, rows.size, epoch)]
            for b in range(nb):
                if done >= self._len:
                    return
                if done >= start:
                    yield batch_from_sequences(train, perm[b * self.local_batch:(b + 1) * self.local_batch])
                done += 1
            del seqs, train

    def __iter__(self) -> Iterator[JaggedBatch]:
        self._normalize()
        yield from self._consume(self._batches(self.epoch, self.batches_consumed))


def events_summary(data_cfg: Any, source: "EventSequences | StreamedEvents") -> Dict[str, Any]:
    """``hstu prepare`` summary of a prepared dataset (counts from its manifest)."""
    events = source.events
    m = events.manifest
    return {"dataset": "events", **m["counts"], "num_shards": m["num_shards"], "split": m["options"]["split"],
            "tie_order": m["options"]["tie_order"], "max_seq_len": data_cfg.max_seq_len,
            "dataset_dir": str(events.folder), "cache_hit": events.cache_hit,
            "shard_bytes": sum(int(s["bytes"]) for s in m["shards"])}
