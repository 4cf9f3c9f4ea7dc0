"""evaluate() never builds the whole item table (issue 18): every item_vectors call asks for at most
eval.item_chunk_size ids (items 1..N once each, plus each batch's targets), and the ranks equal rank_targets over
the full table computed separately (random vectors, with and without history removal, several chunk sizes)."""

from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

from hstu.trainer.config import EvalConfig
from hstu.trainer.evaluate import evaluate, rank_targets


@dataclass
class Batch:
    item_ids: torch.Tensor
    offsets: torch.Tensor
    target_ids: torch.Tensor
    user_vecs: torch.Tensor
    timestamps: Optional[torch.Tensor] = None

    def to(self, device):
        return replace(self, **{k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})


class CountingModel(torch.nn.Module):
    """item_vectors = L2-normalised rows of a fixed table; records the ids of every item_vectors call."""

    def __init__(self, table):
        super().__init__()
        self.table, self.calls = table, []

    def item_vectors(self, ids):
        self.calls.append(ids.clone())
        return torch.nn.functional.normalize(self.table[ids], dim=-1)

    def user_vectors(self, batch):
        return batch.user_vecs


def _batches(num_items, dim, g):
    out = []
    for b in range(4):
        n = 5 + b
        lengths = torch.randint(0, 6, (n,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        out.append(Batch(torch.randint(1, num_items + 1, (int(lengths.sum()),), generator=g), offsets,
                         torch.randint(1, num_items + 1, (n,), generator=g), torch.randn(n, dim, generator=g)))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("remove_history", [True, False])
def test_chunked_evaluation_equals_the_full_table_ranks(chunk, remove_history):
    g = torch.Generator().manual_seed(chunk)
    num_items, dim = 203, 6
    table = torch.randn(num_items + 1, dim, generator=g)
    table[5] = table[9]  # exact ties too
    batches = _batches(num_items, dim, g)
    cfg = EvalConfig(ks=[1, 10], ndcg_ks=[10], remove_history=remove_history, item_chunk_size=chunk)
    model = CountingModel(table)
    _, ranks = evaluate(model, batches, num_items, cfg, return_ranks=True)
    full = torch.nn.functional.normalize(table, dim=-1)
    want = torch.cat([rank_targets(b.user_vecs, b.target_ids, full, b.item_ids if remove_history else None,
                                   b.offsets if remove_history else None, item_chunk_size=10_000) for b in batches])
    assert torch.equal(ranks, want)
    item_calls = model.calls[len(batches):]  # the first calls: each batch's targets
    assert max(c.numel() for c in model.calls) <= max(chunk, max(b.target_ids.numel() for b in batches))
    assert torch.equal(torch.cat(item_calls), torch.arange(1, num_items + 1))  # items 1..N, once, in chunks
