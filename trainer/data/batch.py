"""JaggedBatch: what the loaders yield -- concatenated (never padded) sequences plus offsets."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

import numpy as np
import torch

from hstu.trainer.data.sequences import UserSequences, gather_ranges


@dataclass
class JaggedBatch:
    """B sequences, T = sum(lengths) events (see docs/architecture.md).

    item_ids [T] int64, timestamps [T] int64, offsets [B+1] int64, lengths [B] int64, max_len int,
    user_ids [B] int64, target_ids [B] int64 | None (eval), target_timestamps [B] int64 | None (eval),
    ratings [T] int8 | None, action_types [T] int8 | None (extension, synthetic data only).
    """

    item_ids: torch.Tensor
    timestamps: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    max_len: int
    user_ids: torch.Tensor
    target_ids: Optional[torch.Tensor] = None
    target_timestamps: Optional[torch.Tensor] = None
    ratings: Optional[torch.Tensor] = None
    action_types: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_events(self) -> int:
        return int(self.item_ids.shape[0])

    def to(self, device: "str | torch.device", non_blocking: bool = False) -> "JaggedBatch":
        """Copy with every tensor moved to ``device``."""
        moved: Dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return JaggedBatch(**moved)

    def to_kjt(self):
        """torchrec KeyedJaggedTensor with the single key "item_id" (values = item_ids, lengths = lengths)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        return KeyedJaggedTensor(keys=["item_id"], values=self.item_ids, lengths=self.lengths)


def _tensor(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def batch_from_sequences(
    seqs: UserSequences,
    rows: np.ndarray,
    target_ids: Optional[np.ndarray] = None,
    target_timestamps: Optional[np.ndarray] = None,
) -> JaggedBatch:
    """Users ``rows`` (row indices into ``seqs``) -> JaggedBatch (vectorised gather).

    target_ids / target_timestamps: per-user arrays aligned with ``seqs`` rows (eval), or None (train)."""
    rows = np.asarray(rows, dtype=np.int64)
    idx, offsets = gather_ranges(seqs.offsets[rows], seqs.offsets[rows + 1])
    lengths = np.diff(offsets)
    take = lambda a: None if a is None else a[idx]  # noqa: E731
    return JaggedBatch(
        item_ids=_tensor(seqs.item_ids[idx]),
        timestamps=_tensor(seqs.timestamps[idx]),
        offsets=_tensor(offsets),
        lengths=_tensor(lengths),
        max_len=int(lengths.max()) if lengths.size else 0,
        user_ids=_tensor(seqs.user_ids[rows]),
        target_ids=None if target_ids is None else _tensor(target_ids[rows]),
        target_timestamps=None if target_timestamps is None else _tensor(target_timestamps[rows]),
        ratings=_tensor(take(seqs.ratings)),
        action_types=_tensor(take(seqs.action_types)),
    )
