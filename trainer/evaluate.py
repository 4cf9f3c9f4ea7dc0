"""Full-ranking retrieval evaluation (hstu-spec.md): every user's leave-one-out target is ranked against ALL items.

Protocol
- Score of item j for user b = <user_vector_b, item_vector_j> (inner product; vectors as the model returns them).
- Candidates are items 1..num_items; item 0 (padding) is never ranked.
- rank = 1 + #candidates scoring *strictly* higher than the target. Ties are therefore resolved in the target's
  favour (optimistic); with float scores of distinct learned vectors exact ties are rare. GR's code takes a
  top-k, which breaks ties arbitrarily.
- ``remove_history`` (default True, as GR's ``filter_invalid_ids``): items in the user's history are dropped
  from the candidates. GR also drops the target when it occurs in the history (the user then counts as a miss);
  we never remove the target itself: a re-consumed target is ranked like any other target. This only matters
  for datasets with repeats (MovieLens has none).
- Items are scored in chunks of ``item_chunk_size`` so memory is O(B · chunk) for any catalog size.
- Metrics: HR@K = P(rank ≤ K); NDCG@K = 1/log2(rank+1) if rank ≤ K else 0 (one relevant item); MRR = mean 1/rank.

A most-popular baseline (items ranked by training frequency) uses the same ranking code.

Target groups (``eval.item_groups``, :func:`item_groups`): the same metrics restricted to the users whose target
is a cold item (<= ``eval.cold_max_events`` training events) -> keys ``cold/hr@10``, ..., ``cold/num_users`` —
and to those whose target never occurs in training (``unseen/...``; e.g. the ``data.holdout_items_frac`` items).

Data parallel: each rank ranks its own slice of the users (its eval loader) and passes ``reduce`` (an in-place
SUM over ranks); metric sums and user counts are reduced before dividing, so the result equals a
single-process evaluation. No rank builds the whole item table: items are looked up a chunk at a time (a
collective lookup when the table is sharded) and scored against all of the rank's users (:func:`evaluate`).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

Metrics = Dict[str, float]
Reduce = Callable[[torch.Tensor], torch.Tensor]  # in-place SUM over ranks, e.g. DistEnv.all_reduce_sum


def history_mask(
    history_ids: torch.Tensor, history_offsets: torch.Tensor, target_ids: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """Bool [B, hi-lo]: True where item lo+c is in user b's history (the target itself is never masked).

    history_ids [T] int64, history_offsets [B+1] int64, target_ids [B] int64.
    """
    B = history_offsets.numel() - 1
    lengths = history_offsets[1:] - history_offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(B, device=history_ids.device), lengths)
    sel = (history_ids >= lo) & (history_ids < hi) & (history_ids != target_ids[rows])
    mask = torch.zeros(B, hi - lo, dtype=torch.bool, device=history_ids.device)
    mask[rows[sel], history_ids[sel] - lo] = True
    return mask


@torch.no_grad()
def rank_targets(
    user_vecs: torch.Tensor,
    target_ids: torch.Tensor,
    item_table: torch.Tensor,
    history_ids: Optional[torch.Tensor] = None,
    history_offsets: Optional[torch.Tensor] = None,
    item_chunk_size: int = 65536,
) -> torch.Tensor:
    """1-based rank of each target among items 1..N (N = item_table rows − 1).

    Args:
        user_vecs: [B, D]; target_ids: [B] int64 in 1..N; item_table: [N+1, D] (row 0 = padding, never ranked).
        history_ids / history_offsets: jagged histories ([T], [B+1]); when given, history items (except the
            target) are removed from the candidates.
        item_chunk_size: items scored per chunk.
    Returns: ranks [B] int64. Scores are computed in the dtype of ``user_vecs`` with autocast disabled.
    """
    with torch.autocast(device_type=user_vecs.device.type, enabled=False):
        return _rank_targets(user_vecs, target_ids, item_table, history_ids, history_offsets, item_chunk_size)


def _rank_targets(user_vecs, target_ids, item_table, history_ids, history_offsets, item_chunk_size) -> torch.Tensor:
    num_items = item_table.shape[0] - 1
    target_ids = target_ids.to(user_vecs.device)
    target_scores = (user_vecs * item_table[target_ids].to(user_vecs.dtype)).sum(-1, keepdim=True)  # [B, 1]
    higher = torch.zeros(user_vecs.shape[0], dtype=torch.long, device=user_vecs.device)
    chunk = max(1, int(item_chunk_size))
    for lo in range(1, num_items + 1, chunk):
        hi = min(num_items + 1, lo + chunk)
        scores = user_vecs @ item_table[lo:hi].to(user_vecs.dtype).t()  # [B, C]
        beats = scores > target_scores
        ids = torch.arange(lo, hi, device=user_vecs.device)
        beats &= ids.unsqueeze(0) != target_ids.unsqueeze(1)
        if history_ids is not None and history_offsets is not None:
            beats &= ~history_mask(history_ids.to(user_vecs.device), history_offsets.to(user_vecs.device),
                                   target_ids, lo, hi)
        higher += beats.sum(1)
    return higher + 1


def metric_sums(ranks: torch.Tensor, ks: Sequence[int], ndcg_ks: Sequence[int]) -> Dict[str, float]:
    """Per-batch sums (not means) of hr@K, ndcg@K and mrr for ranks [B]; divide by num_users at the end."""
    r = ranks.double()
    out: Dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = float((r <= k).sum())
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = float(torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).sum())
    out["mrr"] = float((1.0 / r).sum())
    return out


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int], ndcg_ks: Sequence[int]) -> Metrics:
    """Mean metrics for ranks [B]: {"hr@K", "ndcg@K", "mrr", "num_users"}."""
    n = int(ranks.numel())
    sums = metric_sums(ranks, ks, ndcg_ks)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["num_users"] = n
    return out


def item_groups(train_counts: torch.Tensor, cold_max_events: int) -> Dict[str, torch.Tensor]:
    """train_counts [N+1] (training events per item) -> {"cold": bool [N+1] (<= cold_max_events events),
    "unseen": bool [N+1] (no training event)}; row 0 (padding) is in neither."""
    cold, unseen = train_counts <= cold_max_events, train_counts == 0
    cold[0] = unseen[0] = False
    return {"cold": cold, "unseen": unseen}


class _GroupedAccumulator:
    """One accumulator over all targets plus one per target group (bool [N+1] masks over item ids)."""

    def __init__(self, ks: Sequence[int], ndcg_ks: Sequence[int],
                 groups: Optional[Dict[str, torch.Tensor]] = None) -> None:
        self.all = _Accumulator(ks, ndcg_ks)
        self.groups = {name: (mask.cpu(), _Accumulator(ks, ndcg_ks)) for name, mask in (groups or {}).items()}

    def add(self, ranks: torch.Tensor, target_ids: torch.Tensor) -> None:
        self.all.add(ranks)
        for mask, acc in self.groups.values():
            acc.add(ranks[mask[target_ids.cpu()].to(ranks.device)])

    def result(self, reduce: Optional[Reduce] = None) -> Metrics:
        out = self.all.result(reduce)
        for name, (_, acc) in self.groups.items():  # every rank reduces every group: same collective count
            out.update({f"{name}/{k}": v for k, v in acc.result(reduce).items()})
        return out


class _Accumulator:
    def __init__(self, ks: Sequence[int], ndcg_ks: Sequence[int]) -> None:
        self.ks, self.ndcg_ks, self.sums, self.n = list(ks), list(ndcg_ks), {}, 0
        self.ranks: list = []

    def add(self, ranks: torch.Tensor) -> None:
        for k, v in metric_sums(ranks, self.ks, self.ndcg_ks).items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += int(ranks.numel())
        self.ranks.append(ranks.cpu())

    def result(self, reduce: Optional[Reduce] = None) -> Metrics:
        keys = [f"hr@{k}" for k in self.ks] + [f"ndcg@{k}" for k in self.ndcg_ks] + ["mrr"]
        sums = torch.tensor([self.sums.get(k, 0.0) for k in keys] + [self.n], dtype=torch.float64)
        if reduce is not None:
            reduce(sums)
        n = int(sums[-1])
        out: Metrics = {k: float(v) / max(n, 1) for k, v in zip(keys, sums[:-1].tolist())}
        out["num_users"] = n
        return out


@torch.no_grad()
def all_item_vectors(model, num_items: int, device, chunk: int = 65536) -> torch.Tensor:
    """model.item_vectors over ids 0..num_items, computed in chunks -> [N+1, D]."""
    parts = []
    for lo in range(0, num_items + 1, chunk):
        ids = torch.arange(lo, min(num_items + 1, lo + chunk), device=device)
        parts.append(model.item_vectors(ids).float())
    return torch.cat(parts, dim=0)


def _history(batch, remove_history: bool):
    return (batch.item_ids, batch.offsets) if remove_history else (None, None)


@torch.no_grad()
def evaluate(model, loader: Iterable, num_items: int, eval_cfg, device="cpu", return_ranks: bool = False,
             reduce: Optional[Reduce] = None, groups: Optional[Dict[str, torch.Tensor]] = None):
    """Full-ranking evaluation of ``model`` on an eval loader of JaggedBatch (target_ids set).

    Uses ``model.user_vectors(batch)`` [B, D] and ``model.item_vectors(ids)``; ``eval_cfg`` is an EvalConfig.
    Returns metrics dict (and this process's ranks [U] when ``return_ranks``). Restores the model's train/eval
    mode. ``reduce``: see the module docstring (every rank must have the same number of batches). ``groups``:
    {name: bool [N+1]} target groups (:func:`item_groups`) also reported as ``name/<metric>``.

    The item table is never built whole: this rank's user vectors [U, D] and target scores come first (one pass
    over the loader), then items 1..N are looked up ``eval.item_chunk_size`` at a time (the same chunks on every
    rank: a collective lookup when the table is sharded) and each chunk is scored against every batch — memory
    O(U·D + B·chunk), the item vectors of a chunk at a time; ranks equal :func:`rank_targets` over the full table.
    """
    was_training = model.training
    model.eval()
    try:
        users = []  # per batch: (user vectors [B, D], target ids [B], target scores [B, 1], history ids, offsets)
        for batch in loader:
            batch = batch.to(device)
            user_vecs = model.user_vectors(batch).float()
            target_ids = batch.target_ids.to(device)
            target_vecs = model.item_vectors(target_ids).float()
            hist_ids, hist_off = _history(batch, eval_cfg.remove_history)
            with torch.autocast(device_type=user_vecs.device.type, enabled=False):
                target_scores = (user_vecs * target_vecs).sum(-1, keepdim=True)
            users.append((user_vecs, target_ids, target_scores, hist_ids, hist_off))
        higher = [torch.zeros(u[0].shape[0], dtype=torch.long, device=u[0].device) for u in users]
        chunk = max(1, int(eval_cfg.item_chunk_size))
        for lo in range(1, num_items + 1, chunk):
            hi = min(num_items + 1, lo + chunk)
            ids = torch.arange(lo, hi, device=device)
            vecs = model.item_vectors(ids).float()
            with torch.autocast(device_type=vecs.device.type, enabled=False):
                for (user_vecs, target_ids, target_scores, hist_ids, hist_off), count in zip(users, higher):
                    beats = (user_vecs @ vecs.t()) > target_scores
                    beats &= ids.unsqueeze(0) != target_ids.unsqueeze(1)
                    if hist_ids is not None and hist_off is not None:
                        beats &= ~history_mask(hist_ids, hist_off, target_ids, lo, hi)
                    count += beats.sum(1)
        acc = _GroupedAccumulator(eval_cfg.ks, eval_cfg.ndcg_ks, groups)
        for (_, target_ids, _, _, _), count in zip(users, higher):
            acc.add(count + 1, target_ids)
    finally:
        model.train(was_training)
    result = acc.result(reduce)
    ranks = acc.all.ranks
    return (result, torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)) if return_ranks else result


def popularity_counts(item_ids: torch.Tensor, offsets: torch.Tensor, num_items: int) -> torch.Tensor:
    """Training item frequencies [N+1] from all users' events minus each user's last one (the eval target).

    item_ids [E], offsets [U+1] (the UserSequences CSR layout).
    """
    keep = torch.ones(item_ids.numel(), dtype=torch.bool)
    lengths = offsets[1:] - offsets[:-1]
    keep[(offsets[1:] - 1)[lengths > 0]] = False
    return torch.bincount(item_ids[keep], minlength=num_items + 1)[: num_items + 1]


def popularity_table(counts: torch.Tensor) -> torch.Tensor:
    """[N+1, 1] float64 scores: count, ties broken towards the smaller item id (deterministic ranking)."""
    n = counts.numel()
    ids = torch.arange(n, dtype=torch.float64)
    return (counts.double() - ids / (n + 1)).unsqueeze(1)


@torch.no_grad()
def evaluate_popularity(counts: torch.Tensor, loader: Iterable, eval_cfg, reduce: Optional[Reduce] = None,
                        groups: Optional[Dict[str, torch.Tensor]] = None) -> Metrics:
    """Most-popular baseline: every user gets the same ranking by training frequency ``counts`` [N+1]."""
    table = popularity_table(counts)
    acc = _GroupedAccumulator(eval_cfg.ks, eval_cfg.ndcg_ks, groups)
    for batch in loader:
        batch = batch.to("cpu")
        user_vecs = torch.ones(batch.target_ids.numel(), 1, dtype=torch.float64)
        hist_ids, hist_off = _history(batch, eval_cfg.remove_history)
        acc.add(rank_targets(user_vecs, batch.target_ids, table, hist_ids, hist_off, eval_cfg.item_chunk_size),
                batch.target_ids)
    return acc.result(reduce)
