"""Deterministic, resumable loaders of JaggedBatch over a CSR view (train or leave-one-out eval).

The batch plan (which users go in which batch) is made in the main process from (seed + epoch); DataLoader
workers (persistent when num_workers > 0) only gather the rows, so batches are identical for any num_workers.
``state_dict()`` = (epoch, batches consumed): a loader restored from it continues the epoch at that position
with exactly the batches the original loader would have produced next.

Data parallel (``rank``/``world_size``): the plan of global batches (data.batch_size users each) is the same on
every rank; rank r takes the r-th of ``world_size`` contiguous slices of every global batch, so each rank has
the same number of batches per epoch and world sizes 1 and N see the same users per step. With N > 1 a last
global batch smaller than N is merged into the one before it (no rank ever gets an empty batch).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hstu.trainer.data.batch import JaggedBatch, batch_from_sequences
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.sequences import EvalSequences, UserSequences


class _RowsDataset(Dataset):
    """dataset[rows] -> JaggedBatch of those users (rows: int64 array of row indices)."""

    def __init__(self, seqs: UserSequences, target_ids: Optional[np.ndarray], target_timestamps: Optional[np.ndarray]):
        self.seqs, self.target_ids, self.target_timestamps = seqs, target_ids, target_timestamps

    def __len__(self) -> int:
        return self.seqs.num_users

    def __getitem__(self, rows: np.ndarray) -> JaggedBatch:
        return batch_from_sequences(self.seqs, rows, self.target_ids, self.target_timestamps)


class _PlannedBatches(Sampler):
    """Yields the row arrays planned for the current pass (set by SequenceLoader before each pass)."""

    def __init__(self) -> None:
        self.batches: List[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only gather rows


def num_global_batches(num_rows: int, batch_size: int, world_size: int) -> int:
    """Global batches per epoch (the same on every rank): ceil(num_rows / batch_size), one fewer when
    world_size > 1 merges a tail smaller than world_size into the batch before (see global_batch_slices)."""
    n = -(-num_rows // batch_size)
    tail = num_rows - (n - 1) * batch_size
    return n - 1 if world_size > 1 and n > 1 and tail < world_size else n


def global_batch_slices(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> List[np.ndarray]:
    """``order`` [R] cut into global batches of ``batch_size`` -> this rank's contiguous slice of each (the
    r-th of ``np.array_split(batch, world_size)``); with world_size > 1 a last batch smaller than world_size
    is merged into the one before, so no rank gets an empty batch. Shared by SequenceLoader and RankingLoader."""
    batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    if world_size == 1:
        return batches
    if len(batches) > 1 and batches[-1].size < world_size:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return [np.array_split(b, world_size)[rank] for b in batches]


class SequenceLoader:
    """Iterable of JaggedBatch; one ``for`` loop = (the rest of) one epoch.

    seqs: CSR view (train sequences or eval histories); target_ids / target_timestamps [U] for eval.
    shuffle: permute users with np.random.default_rng(seed + epoch). resumable: track (epoch, batches consumed)
    and continue from there on the next iteration (default: = shuffle; eval loaders always restart).
    min_len: users with shorter sequences are skipped (train: 2, a single item has no next-item label).
    rank / world_size: which slice of every global batch this process reads (see the module docstring).
    """

    def __init__(
        self,
        seqs: UserSequences,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        num_workers: int = 0,
        target_ids: Optional[np.ndarray] = None,
        target_timestamps: Optional[np.ndarray] = None,
        min_len: int = 1,
        resumable: Optional[bool] = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.seqs, self.batch_size, self.shuffle, self.seed = seqs, int(batch_size), shuffle, int(seed)
        self.num_workers = int(num_workers)
        self.resumable = shuffle if resumable is None else resumable
        self.rows = np.flatnonzero(seqs.lengths() >= min_len).astype(np.int64)
        self._dataset = _RowsDataset(seqs, target_ids, target_timestamps)
        self._sampler = _PlannedBatches()
        self._dataloader: Optional[DataLoader] = None
        self.epoch, self.batches_consumed = 0, 0

    @classmethod
    def for_eval(cls, view: EvalSequences, batch_size: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1) -> "SequenceLoader":
        return cls(view.history, batch_size, shuffle=False, num_workers=num_workers, target_ids=view.target_ids,
                   target_timestamps=view.target_timestamps, resumable=False, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return num_global_batches(self.rows.size, self.batch_size, self.world_size)

    @property
    def num_sequences(self) -> int:
        return int(self.rows.size)

    def plan(self, epoch: int) -> List[np.ndarray]:
        """Row-index arrays of every batch of ``epoch``, in order."""
        rows = self.rows
        if self.shuffle:
            rows = rows[np.random.default_rng(self.seed + epoch).permutation(rows.size)]
        return global_batch_slices(rows, self.batch_size, self.rank, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (no-op when already positioned inside that epoch)."""
        self._normalize()
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def _normalize(self) -> None:
        if self.batches_consumed >= len(self) > 0:
            self.epoch, self.batches_consumed = self.epoch + 1, 0

    def state_dict(self) -> Dict[str, int]:
        self._normalize()
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_sequences": self.num_sequences,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """The position counts global batches, so a state saved with another world size resumes at the same
        global batch (only the merged tail batch can differ between world sizes)."""
        for key in ("seed", "batch_size", "num_sequences"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(f"loader state has {key}={state[key]}, this loader has {getattr(self, key)}")
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
        self._normalize()

    def _loader(self) -> DataLoader:
        if self._dataloader is None:
            self._dataloader = DataLoader(
                self._dataset,
                batch_size=None,
                sampler=self._sampler,
                collate_fn=_identity,
                num_workers=self.num_workers,
                persistent_workers=True,
                worker_init_fn=_worker_init,
            )
        return self._dataloader

    def __iter__(self) -> Iterator[JaggedBatch]:
        if self.resumable:
            self._normalize()
            epoch, start = self.epoch, self.batches_consumed
        else:
            epoch, start = self.epoch, 0
        batches = self.plan(epoch)[start:]
        if self.num_workers == 0:
            source: Iterator[JaggedBatch] = (self._dataset[rows] for rows in batches)
        else:
            self._sampler.batches = batches
            source = iter(self._loader())
        for batch in source:
            if self.resumable:
                self.batches_consumed += 1
            yield batch
        if self.resumable:
            self._normalize()
