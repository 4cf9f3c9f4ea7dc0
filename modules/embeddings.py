"""Item embedding stage: ids -> vectors. Kept separate from the dense tower so it can be replaced by a TorchRec
(sharded) EmbeddingCollection keyed "item_id" without touching the encoders."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

INIT_STD = 0.02
_TABLE_DEVICE: ContextVar[Optional[torch.device]] = ContextVar("hstu_table_device", default=None)


@contextmanager
def tables_on(device: Union[str, torch.device, None]) -> Iterator[None]:
    """Embedding tables (ItemEmbeddings, the ranking tables) built inside are created on ``device``; "meta"
    allocates nothing (sharding.table_init=per_shard: each rank later materialises only its shards)."""
    token = _TABLE_DEVICE.set(torch.device(device) if device is not None else None)
    try:
        yield
    finally:
        _TABLE_DEVICE.reset(token)


def table_device() -> Optional[torch.device]:
    """The device of :func:`tables_on` in effect (None: the default device)."""
    return _TABLE_DEVICE.get()


def to_device_keeping_meta(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)`` for every tensor except meta ones (tables built under ``tables_on("meta")``)."""
    return module._apply(lambda t: t if t.is_meta else t.to(device))


class ItemEmbeddings(nn.Module):
    """``nn.Embedding(num_items + 1, D, padding_idx=0)``; id 0 = padding / none (zero vector, no gradient).

    Init as GR research (LocalEmbeddingModule): truncated normal, std 0.02, cut at ±2 std; row 0 zeroed."""

    def __init__(self, num_items: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_items, self.embedding_dim = num_items, embedding_dim
        self.table = nn.Embedding(num_items + 1, embedding_dim, padding_idx=0, device=table_device())
        nn.init.trunc_normal_(self.table.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        with torch.no_grad():
            self.table.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int64 in 0..num_items -> [..., D]."""
        return self.table(ids)
