"""Stochastic Length (trainer/stochastic_length.py): threshold, cut probability, order kept, statistics."""

from dataclasses import dataclass
from typing import Optional

import torch

from hstu.trainer.stochastic_length import apply_stochastic_length, cut_probability, sl_threshold


@dataclass
class Batch:  # the JaggedBatch contract fields (docs/architecture.md)
    item_ids: torch.Tensor
    timestamps: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    max_len: int
    user_ids: torch.Tensor
    target_ids: Optional[torch.Tensor] = None
    target_timestamps: Optional[torch.Tensor] = None
    ratings: Optional[torch.Tensor] = None


def make_batch(lengths):
    lengths = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T = int(offsets[-1])
    items = torch.arange(1, T + 1)  # strictly increasing -> order is checkable
    return Batch(items, items * 10, offsets, lengths, int(lengths.max()), torch.arange(len(lengths)),
                 ratings=(items % 5).to(torch.int8))


def test_threshold_and_probability():
    assert sl_threshold(200, 1.6) == 69  # 200**0.8 = 69.3
    assert sl_threshold(100, 2.0) == 100
    assert sl_threshold(50, 1.0) == 7  # 50**0.5 = 7.07
    p = cut_probability(torch.tensor([10, 69, 70, 100, 200]), 200, 1.6)
    assert p[0] == 0 and p[1] == 0  # L <= threshold: never cut
    assert abs(float(p[3]) - (1 - 200**1.6 / 100**2)) < 1e-9
    assert abs(float(p[4]) - (1 - 200**1.6 / 200**2)) < 1e-9
    assert abs(float(p[2]) - (1 - 200**1.6 / 70**2)) < 1e-9  # just above the threshold: small (~0.02)
    assert float(cut_probability(torch.tensor([69]), 200, 1.6)) == 0.0


def test_statistics_order_and_fields():
    N, alpha, L = 200, 1.6, 100
    thr = sl_threshold(N, alpha)
    batch = make_batch([L] * 2000 + [30] * 50)
    before = batch.item_ids.clone()
    out = apply_stochastic_length(batch, N, alpha, torch.Generator().manual_seed(0))
    assert torch.equal(batch.item_ids, before)  # input untouched
    lens = out.lengths
    assert set(lens[:2000].tolist()) <= {thr, L}
    assert torch.all(lens[2000:] == 30)  # short sequences never cut
    frac_cut = float((lens[:2000] == thr).double().mean())
    p = 1 - N**alpha / L**2  # 0.52
    assert abs(frac_cut - p) < 4 * (p * (1 - p) / 2000) ** 0.5
    assert int(out.offsets[-1]) == int(lens.sum()) == out.item_ids.numel()
    assert out.max_len == int(lens.max())
    assert torch.equal(out.user_ids, batch.user_ids)
    keep_count = torch.zeros(L)
    for b in range(len(lens)):
        seq = out.item_ids[out.offsets[b]:out.offsets[b + 1]]
        assert torch.all(seq[1:] > seq[:-1])  # order kept
        orig = batch.item_ids[batch.offsets[b]:batch.offsets[b + 1]]
        assert bool(torch.isin(seq, orig).all())  # items stay in their own sequence
        assert torch.equal(out.timestamps[out.offsets[b]:out.offsets[b + 1]], seq * 10)
        assert torch.equal(out.ratings[out.offsets[b]:out.offsets[b + 1]], (seq % 5).to(torch.int8))
        if b < 2000 and int(lens[b]) == thr:
            keep_count[seq - orig[0]] += 1
    # a uniformly random subset: every position is kept by about thr/L of the cut sequences
    n_cut = frac_cut * 2000
    freq = keep_count / n_cut
    assert abs(float(freq.mean()) - thr / L) < 1e-6
    assert float((freq - thr / L).abs().max()) < 0.12
    assert float(freq[:10].mean()) > 0.55 and float(freq[-10:].mean()) > 0.55  # not just a prefix/suffix


def test_seeded_and_noop():
    batch = make_batch([120, 5, 300])
    a = apply_stochastic_length(batch, 200, 1.6, torch.Generator().manual_seed(3))
    b = apply_stochastic_length(batch, 200, 1.6, torch.Generator().manual_seed(3))
    assert torch.equal(a.item_ids, b.item_ids) and torch.equal(a.offsets, b.offsets)
    short = make_batch([5, 7])
    assert apply_stochastic_length(short, 200, 1.6, torch.Generator().manual_seed(0)) is short
