"""Synthetic, learnable interaction data (the embedded default dataset).

World (fixed by ``cfg.seed``): items 1..I get Zipfian popularity (p ~ rank^-s, ranks shuffled) and are split
into ``num_interests`` clusters; each cluster has a hidden cyclic order of its items.

User u (its own RNG seeded by (seed, u), so any user range can be generated alone, in any order):
- a length in [min_seq_len, max_seq_len], 1-3 preferred clusters, a current interest that moves with
  probability ``drift`` per event (to a preferred cluster, or 20% of the time to a popularity-weighted one);
- each event: with probability ``interest_focus`` from the current cluster -- then with probability
  ``sequential_strength`` the item 1-3 steps after the previous item in the cluster's hidden order (steps
  1/2/3 with p .6/.25/.15), else a popularity-weighted item of the cluster; otherwise a globally popular item;
- timestamps strictly increase (gaps ~ 10 min, with occasional multi-day breaks);
- optional action types 1..K (``num_action_types``): in-interest events skew to the upper half.

So "next item given the recent items" is far more predictable than "most popular item": a bigram model beats
the popularity baseline by a wide margin on HR@10 (tests/test_data_synthetic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from hstu.trainer.config import SyntheticConfig
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.sequences import UserSequences, concat_sequences

GENERATOR_VERSION = 1
_STEP_CDF = (0.6, 0.85)  # successor step 1 / 2 / 3
_WILD_SWITCH = 0.2  # share of interest moves that go to any cluster rather than a preferred one
_T0 = 1_500_000_000


@dataclass
class SyntheticWorld:
    """Item-level structure shared by all users. Item arrays are indexed by item id (row 0 unused)."""

    popularity: np.ndarray  # [I+1] float, sums to 1 over 1..I
    cluster_of: np.ndarray  # [I+1] int64
    pos_in_cluster: np.ndarray  # [I+1] int64 position in its cluster's hidden order
    cluster_items: np.ndarray  # [I] items grouped by cluster, each cluster in hidden order
    cluster_offsets: np.ndarray  # [C+1]
    global_cdf: np.ndarray  # [I] popularity cdf over items 1..I
    local_cum: np.ndarray  # [I] cluster index + within-cluster popularity cdf (monotone)
    cluster_cdf: np.ndarray  # [C] cdf of cluster popularity

    @property
    def num_clusters(self) -> int:
        return int(self.cluster_offsets.shape[0] - 1)


def build_world(cfg: SyntheticConfig) -> SyntheticWorld:
    I = int(cfg.num_items)
    C = max(1, min(int(cfg.num_interests), I))
    if I < 1:
        raise DataError(f"synthetic.num_items must be >= 1, got {I}")
    rng = np.random.default_rng([cfg.seed, 0])
    pop = np.zeros(I + 1)
    pop[1:] = (rng.permutation(I) + 1.0) ** -float(cfg.zipf_exponent)
    pop /= pop.sum()
    cluster_items = rng.permutation(I).astype(np.int64) + 1
    sizes = np.full(C, I // C) + (np.arange(C) < I % C)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cluster_of = np.zeros(I + 1, dtype=np.int64)
    pos_in = np.zeros(I + 1, dtype=np.int64)
    local_cum = np.empty(I)
    for c in range(C):
        members = cluster_items[offsets[c] : offsets[c + 1]]
        cluster_of[members] = c
        pos_in[members] = np.arange(members.size)
        cdf = np.cumsum(pop[members]) / pop[members].sum()
        cdf[-1] = 1.0
        local_cum[offsets[c] : offsets[c + 1]] = c + cdf
    cluster_pop = np.add.reduceat(pop[cluster_items], offsets[:-1])
    global_cdf = np.cumsum(pop[1:])
    global_cdf[-1] = 1.0
    cluster_cdf = np.cumsum(cluster_pop) / cluster_pop.sum()
    cluster_cdf[-1] = 1.0
    return SyntheticWorld(pop, cluster_of, pos_in, cluster_items, offsets, global_cdf, local_cum, cluster_cdf)


def generate_user(cfg: SyntheticConfig, world: SyntheticWorld, u: int):
    """User index u -> (items [n] int64, timestamps [n] int64, action_types [n] int8 | None)."""
    rng = np.random.default_rng([cfg.seed, 1, u])
    lo, hi = int(cfg.min_seq_len), max(int(cfg.min_seq_len), int(cfg.max_seq_len))
    n = int(rng.integers(lo, hi + 1))
    C = world.num_clusters
    preferred = rng.choice(C, size=min(C, int(rng.integers(1, 4))), replace=False,
                           p=np.diff(world.cluster_cdf, prepend=0.0))
    # current interest: re-drawn at event 0 and at each drift event
    moves = rng.random(n) < cfg.drift
    moves[0] = True
    wild = rng.random(n) < _WILD_SWITCH
    picks = np.where(wild, np.searchsorted(world.cluster_cdf, rng.random(n), side="right").clip(0, C - 1),
                     preferred[rng.integers(0, preferred.size, n)])
    interest = picks[np.flatnonzero(moves)][np.cumsum(moves) - 1]
    focus = rng.random(n) < cfg.interest_focus
    follow = rng.random(n) < cfg.sequential_strength
    r = rng.random(n)
    step = 1 + (r > _STEP_CDF[0]) + (r > _STEP_CDF[1])
    popular = np.searchsorted(world.global_cdf, rng.random(n), side="right").clip(0, world.global_cdf.size - 1) + 1
    local_idx = np.searchsorted(world.local_cum, interest + rng.random(n), side="right")
    local = world.cluster_items[local_idx.clip(0, world.cluster_items.size - 1)]

    cluster_of, pos_in, members, offs = (world.cluster_of.tolist(), world.pos_in_cluster.tolist(),
                                         world.cluster_items.tolist(), world.cluster_offsets.tolist())
    items = [0] * n
    prev = 0
    for i, (c, f, fo, s, lc, pp) in enumerate(zip(interest.tolist(), focus.tolist(), follow.tolist(),
                                                    step.tolist(), local.tolist(), popular.tolist())):
        if not f:
            prev = pp
        elif fo and prev and cluster_of[prev] == c:
            size = offs[c + 1] - offs[c]
            prev = members[offs[c] + (pos_in[prev] + s) % size]
        else:
            prev = lc
        items[i] = prev

    gaps = 1 + np.floor(rng.exponential(600.0, n)) + (rng.random(n) < 0.1) * np.floor(rng.exponential(3 * 86400.0, n))
    ts = _T0 + int(rng.integers(0, 2 * 365 * 86400)) + np.cumsum(gaps).astype(np.int64)
    actions = None
    K = int(cfg.num_action_types)
    if K > 0:
        upper = rng.random(n) < np.where(focus, 0.8, 0.2)
        lo_half, hi_half = rng.integers(1, (K + 1) // 2 + 1, n), rng.integers(K // 2 + 1, K + 1, n)
        actions = np.where(upper, hi_half, lo_half).astype(np.int8)
    return np.asarray(items, dtype=np.int64), ts.astype(np.int64), actions


def iter_users(
    cfg: SyntheticConfig, start: int = 0, stop: Optional[int] = None, chunk_size: int = 4096,
    world: Optional[SyntheticWorld] = None,
) -> Iterator[UserSequences]:
    """Yield users [start, stop) (default: all cfg.num_users) as UserSequences chunks of <= chunk_size users.

    User index u gets user id u + 1; its events depend only on (cfg, u), never on the chunking."""
    stop = int(cfg.num_users) if stop is None else int(stop)
    world = world or build_world(cfg)
    for lo in range(int(start), stop, chunk_size):
        users = range(lo, min(stop, lo + chunk_size))
        rows = [generate_user(cfg, world, u) for u in users]
        lengths = np.array([r[0].size for r in rows], dtype=np.int64)
        yield UserSequences(
            user_ids=np.arange(users.start, users.stop, dtype=np.int64) + 1,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            item_ids=np.concatenate([r[0] for r in rows]),
            timestamps=np.concatenate([r[1] for r in rows]),
            ratings=None,
            num_items=int(cfg.num_items),
            action_types=None if rows[0][2] is None else np.concatenate([r[2] for r in rows]),
        )


def generate(cfg: SyntheticConfig, progress: bool = False) -> UserSequences:
    """All cfg.num_users users in memory (use :func:`iter_users` for large configs)."""
    if cfg.num_users < 1:
        raise DataError(f"synthetic.num_users must be >= 1, got {cfg.num_users}")
    if cfg.min_seq_len < 1:
        raise DataError(f"synthetic.min_seq_len must be >= 1, got {cfg.min_seq_len}")
    chunks = []
    with tqdm(total=int(cfg.num_users), unit="user", desc="generate synthetic", disable=not progress) as bar:
        for chunk in iter_users(cfg):
            chunks.append(chunk)
            bar.update(chunk.num_users)
    return concat_sequences(chunks)
