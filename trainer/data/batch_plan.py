"""The resumable batch plan shared by the loaders (SequenceLoader: trainer/data/loader.py; RankingLoader /
StreamingRankingLoader: trainer/data/ranking_batch.py, ranking_stream.py).

A loader over ``rows`` (one entry per user) plans the batches of an epoch deterministically from (seed + epoch):
users permuted by ``np.random.default_rng(seed + epoch)`` when shuffled, cut into GLOBAL batches of
``batch_size``; rank r of ``world_size`` reads the r-th contiguous slice of each (:func:`global_batch_slices`), so
every rank has the same number of batches and world sizes 1 and N see the same users per step. The position is
(epoch, global batches consumed) — world-size independent —, kept by :class:`ResumableBatchPlan`: ``set_epoch``,
``state_dict`` / ``load_state_dict`` and the normalisation of a finished epoch to the start of the next.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np

from hstu.trainer.data.errors import DataError


def num_global_batches(num_rows: int, batch_size: int, world_size: int) -> int:
    """Global batches per epoch (the same on every rank): ceil(num_rows / batch_size), one fewer when
    world_size > 1 merges a tail smaller than world_size into the batch before (see global_batch_slices)."""
    n = -(-num_rows // batch_size)
    tail = num_rows - (n - 1) * batch_size
    return n - 1 if world_size > 1 and n > 1 and tail < world_size else n


def global_batch_slices(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> List[np.ndarray]:
    """``order`` [R] cut into global batches of ``batch_size`` -> this rank's contiguous slice of each (the
    r-th of ``np.array_split(batch, world_size)``); with world_size > 1 a last batch smaller than world_size
    is merged into the one before, so no rank gets an empty batch."""
    batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    if world_size == 1:
        return batches
    if len(batches) > 1 and batches[-1].size < world_size:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return [np.array_split(b, world_size)[rank] for b in batches]


class ResumableBatchPlan:
    """Batch plan + resumable position of a loader over ``rows`` [U] (see the module docstring).

    shuffle: permute users per epoch; resumable (default: = shuffle): iterating continues from (epoch, batches
    consumed) and advances it — a non-resumable loader (eval) always yields its whole plan. Subclasses build a
    batch from the index arrays of :meth:`batch_indices` and iterate through :meth:`_pending` / :meth:`_consume`.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                 resumable: Optional[bool] = None, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, int(seed)
        self.resumable = shuffle if resumable is None else resumable
        self.epoch, self.batches_consumed = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return num_global_batches(self.rows.size, self.batch_size, self.world_size)

    @property
    def num_sequences(self) -> int:
        return int(self.rows.size)

    def batch_indices(self, epoch: int) -> List[np.ndarray]:
        """Index arrays (into ``self.rows``) of this rank's slice of every global batch of ``epoch``, in order."""
        idx = np.arange(self.rows.size)
        if self.shuffle:
            idx = np.random.default_rng(self.seed + epoch).permutation(self.rows.size)
        return global_batch_slices(idx, self.batch_size, self.rank, self.world_size)

    # -- position
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (no-op when already positioned inside that epoch)."""
        self._normalize()
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def _normalize(self) -> None:
        """A finished epoch is the start of the next one."""
        if self.batches_consumed >= len(self) > 0:
            self.epoch, self.batches_consumed = self.epoch + 1, 0

    def state_dict(self) -> Dict[str, int]:
        self._normalize()
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed,
                "batch_size": self.batch_size, "num_sequences": self.num_sequences, "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """The position counts global batches, so a state saved with another world size resumes at the same
        global batch (only the merged tail batch can differ between world sizes)."""
        for key in ("seed", "batch_size", "num_sequences"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(f"loader state has {key}={state[key]}, this loader has {getattr(self, key)}")
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
        self._normalize()

    # -- iteration helpers
    def _pending(self) -> List[np.ndarray]:
        """Index arrays of the batches this pass yields: the rest of the current epoch (resumable), else all."""
        if not self.resumable:
            return self.batch_indices(self.epoch)
        self._normalize()
        return self.batch_indices(self.epoch)[self.batches_consumed:]

    def _consume(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield ``batches`` (those of :meth:`_pending`, built), advancing the position of a resumable loader."""
        for batch in batches:
            if self.resumable:
                self.batches_consumed += 1
            yield batch
        if self.resumable:
            self._normalize()
