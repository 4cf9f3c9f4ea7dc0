"""Full-ranking metrics (trainer/evaluate.py) against hand-computed ranks."""

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from hstu.trainer.config import EvalConfig
from hstu.trainer.evaluate import (
    evaluate,
    evaluate_popularity,
    metrics_from_ranks,
    popularity_counts,
    rank_targets,
)

# item scores for one user with user vector [1, 0]: item j scores table[j, 0]
TABLE = torch.tensor([[100.0, 0], [0.5, 0], [0.9, 0], [0.1, 0], [0.7, 0], [0.9, 0], [-1.0, 0]])  # row 0 = padding


@dataclass
class FakeBatch:
    item_ids: torch.Tensor
    offsets: torch.Tensor
    target_ids: torch.Tensor
    user_vecs: torch.Tensor
    timestamps: Optional[torch.Tensor] = None

    def to(self, device):
        return replace(self, **{k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})


class FakeModel(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def item_vectors(self, ids):
        return self.table[ids]

    def user_vectors(self, batch):
        return batch.user_vecs


def test_rank_hand_computed_padding_never_ranked():
    u = torch.tensor([[1.0, 0.0]])
    # target 4 (0.7): higher are items 2 (0.9) and 5 (0.9) -> rank 3; padding row 0 (100) is not a candidate
    assert rank_targets(u, torch.tensor([4]), TABLE).tolist() == [3]
    assert rank_targets(u, torch.tensor([2]), TABLE).tolist() == [1]  # tie with item 5: optimistic rank 1
    assert rank_targets(u, torch.tensor([6]), TABLE).tolist() == [6]
    assert rank_targets(-u, torch.tensor([6]), TABLE).tolist() == [1]


def test_history_removal_but_never_the_target():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([4, 3])
    hist = torch.tensor([2, 1, 3, 5])  # user 0 saw 2 and 1; user 1 saw 3 (its own target) and 5
    offs = torch.tensor([0, 2, 4])
    # user 0: higher than 0.7 = {2, 5}; 2 removed -> rank 2.  user 1 (0.1): higher = {1,2,4,5}; 5 removed,
    # the target 3 stays a candidate -> rank 4
    assert rank_targets(u, targets, TABLE, hist, offs).tolist() == [2, 4]
    assert rank_targets(u, targets, TABLE).tolist() == [3, 5]


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(58, 8, generator=g)
    users = torch.randn(9, 8, generator=g)
    targets = torch.randint(1, 58, (9,), generator=g)
    lengths = torch.randint(0, 12, (9,), generator=g)
    offs = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    hist = torch.randint(1, 58, (int(offs[-1]),), generator=g)
    full = rank_targets(users, targets, table, hist, offs, item_chunk_size=10_000)
    brute = []
    for b in range(9):
        s = table @ users[b]
        seen = set(hist[offs[b]:offs[b + 1]].tolist()) - {int(targets[b])}
        brute.append(1 + sum(1 for j in range(1, 58) if j not in seen and s[j] > s[targets[b]]))
    assert full.tolist() == brute
    for chunk in (1, 3, 7, 57):
        assert torch.equal(rank_targets(users, targets, table, hist, offs, item_chunk_size=chunk), full)


def test_metrics_from_ranks():
    m = metrics_from_ranks(torch.tensor([1, 3, 12]), ks=[1, 10], ndcg_ks=[10, 20])
    assert m["num_users"] == 3
    assert math.isclose(m["hr@1"], 1 / 3) and math.isclose(m["hr@10"], 2 / 3)
    assert math.isclose(m["ndcg@10"], (1 + 1 / math.log2(4)) / 3)
    assert math.isclose(m["ndcg@20"], (1 + 1 / math.log2(4) + 1 / math.log2(13)) / 3)
    assert math.isclose(m["mrr"], (1 + 1 / 3 + 1 / 12) / 3)


def _batches():
    b1 = FakeBatch(torch.tensor([2, 1]), torch.tensor([0, 2]), torch.tensor([4]), torch.tensor([[1.0, 0.0]]))
    b2 = FakeBatch(torch.tensor([3, 5, 6]), torch.tensor([0, 0, 3]), torch.tensor([6, 3]),
                   torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    return [b1, b2]


def test_evaluate_model_over_batches():
    cfg = EvalConfig(ks=[1, 10], ndcg_ks=[10], remove_history=True, item_chunk_size=2)
    model = FakeModel(TABLE)
    model.train()
    metrics, ranks = evaluate(model, _batches(), num_items=6, eval_cfg=cfg, return_ranks=True)
    # user0 rank 2 (see above); user1 (-u, target 6 = -1.0) rank 1; user2 (hist 3,5,6; target 3) rank 4
    assert ranks.tolist() == [2, 1, 4]
    assert metrics == metrics_from_ranks(torch.tensor([2, 1, 4]), [1, 10], [10])
    assert model.training  # mode restored
    no_hist = evaluate(model, _batches(), 6, replace(cfg, remove_history=False))
    assert no_hist["mrr"] < metrics["mrr"]


def test_popularity_baseline():
    # 3 users (CSR): the last event of each user is its eval target and is not counted
    items = torch.tensor([1, 2, 2, 9, 2, 3, 3, 1, 5])
    offsets = torch.tensor([0, 4, 7, 9])
    counts = popularity_counts(items, offsets, num_items=6)
    assert counts.tolist() == [0, 2, 3, 1, 0, 0, 0]
    cfg = EvalConfig(ks=[1, 2], ndcg_ks=[2], remove_history=False)
    batch = FakeBatch(torch.tensor([1]), torch.tensor([0, 1, 1]), torch.tensor([1, 5]), torch.zeros(2, 1))
    m = evaluate_popularity(counts, [batch], cfg)
    # popularity order: 2 (3), 1 (2), 3 (1), then 4, 5, 6 (0; ties -> smaller id first) -> ranks 2 and 5
    assert m == metrics_from_ranks(torch.tensor([2, 5]), [1, 2], [2])
    m_hist = evaluate_popularity(counts, [batch], replace(cfg, remove_history=True))
    assert m_hist == metrics_from_ranks(torch.tensor([2, 5]), [1, 2], [2])  # own history = target: not removed
