"""Deterministic, resumable loaders of JaggedBatch over a CSR view (train or leave-one-out eval).

The batch plan (which users go in which batch) is made in the main process from (seed + epoch); DataLoader
workers (persistent when num_workers > 0) only gather the rows, so batches are identical for any num_workers.
``state_dict()`` = (epoch, batches consumed): a loader restored from it continues the epoch at that position
with exactly the batches the original loader would have produced next. Plan, data-parallel slicing
(``rank``/``world_size``) and position: the shared ResumableBatchPlan (trainer/data/batch_plan.py).
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hstu.trainer.data.batch import JaggedBatch, batch_from_sequences
from hstu.trainer.data.batch_plan import ResumableBatchPlan
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


class SequenceLoader(ResumableBatchPlan):
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
        super().__init__(np.flatnonzero(seqs.lengths() >= min_len), batch_size, shuffle=shuffle, seed=seed,
                         resumable=resumable, rank=rank, world_size=world_size)
        self.seqs, self.num_workers = seqs, int(num_workers)
        self._dataset = _RowsDataset(seqs, target_ids, target_timestamps)
        self._sampler = _PlannedBatches()
        self._dataloader: Optional[DataLoader] = None

    @classmethod
    def for_eval(cls, view: EvalSequences, batch_size: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1) -> "SequenceLoader":
        return cls(view.history, batch_size, shuffle=False, num_workers=num_workers, target_ids=view.target_ids,
                   target_timestamps=view.target_timestamps, resumable=False, rank=rank, world_size=world_size)

    def plan(self, epoch: int) -> List[np.ndarray]:
        """Row-index arrays of every batch of ``epoch``, in order."""
        return [self.rows[sel] for sel in self.batch_indices(epoch)]

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
        batches = [self.rows[sel] for sel in self._pending()]
        if self.num_workers == 0:
            source: Iterator[JaggedBatch] = (self._dataset[rows] for rows in batches)
        else:
            self._sampler.batches = batches
            source = iter(self._loader())
        yield from self._consume(source)
