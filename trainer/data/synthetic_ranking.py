"""Streaming synthetic ranking data: impressions with four action types whose probabilities depend on a hidden
user–item affinity, so they are learnable from the user's history (docs/ranking.md).

World, O(clusters + creators) memory whatever the catalogue size: item i sits in slot
``(a·(i−1) + b) mod I`` (a bijection, a coprime to I); slots are split evenly into ``num_clusters`` clusters;
inside a cluster, the item at within-cluster rank k has popularity ~ (k+1)^−s and creator
``cluster·creators_per_cluster + k mod creators_per_cluster``; item quality q(i) comes from a hash of i.

User u (its own RNG seeded by (seed, u): any user range can be generated alone, in any order):
- contextual: country (skews the preferred clusters), age group (shifts the activity bias b_u);
- 1–3 preferred clusters with weights; a current interest cluster re-drawn with prob. ``interest_switch``;
- followed creators: 1–2 at the start, one more with prob. ``follow_prob`` per event (mostly in preferred
  clusters); raw slow series = a snapshot at every event of the latest followed creator (``creator``) and of
  the region (``region``, changes with prob. ``move_prob``; carries no signal); both are compressed and
  merged by trainer/data/sequentialize.py; a dense ``watch_seconds`` feature is generated and dropped;
- impressions: 10% from the current interest, 10% from a followed creator, 80% from any cluster (so what a
  user saw says little about what they like: the actions on it do);
- affinity a = 1.5·pref(cluster) + 0.5·[current interest] + followed(creator) + q(i) + b_u, and
  click ~ σ(1.2a − 1), like ~ click·σ(1.3a − 1.5), share ~ click·σ(a + followed − 2.5),
  complete ~ click·σ(a + 0.8q − 0.5); action token = 1 + click + 2·like + 4·share + 8·complete (1..16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.ranking import RankingData
from hstu.trainer.data.sequentialize import SideTokens, sequentialize_series

GENERATOR_VERSION = 1
TASKS = ("click", "like", "share", "complete")
CONTEXT = ("country", "age_group")
AGE_BIAS = (-0.3, 0.0, 0.2, 0.0, -0.2)
NUM_REGIONS = 32
_SRC_INTEREST, _SRC_FOLLOW = 0.1, 0.1  # impression sources: current interest, followed creator, else any cluster
_T0 = 1_600_000_000


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _hash_uniform(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, x) -> uniform (0, 1) floats; x int64 [N]."""
    z = (x.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(2**53)


@dataclass
class RankingWorld:
    """Catalogue structure (no per-item arrays): slot bijection, cluster size, creators, country tastes."""

    num_items: int
    num_clusters: int
    slots_per_cluster: int
    creators_per_cluster: int
    a: int
    a_inv: int
    b: int
    zipf: float
    country_clusters: np.ndarray  # [G, 3] favourite clusters of each country
    seed: int

    def cluster_size(self, c: np.ndarray) -> np.ndarray:
        return np.minimum(self.slots_per_cluster, self.num_items - c * self.slots_per_cluster)

    def item_of(self, cluster: np.ndarray, k: np.ndarray) -> np.ndarray:
        slot = cluster * self.slots_per_cluster + k
        return (self.a_inv * ((slot - self.b) % self.num_items)) % self.num_items + 1

    def slot_of(self, items: np.ndarray) -> np.ndarray:
        return (self.a * (items - 1) + self.b) % self.num_items

    def cluster_of(self, items: np.ndarray) -> np.ndarray:
        return self.slot_of(items) // self.slots_per_cluster

    def creator_of(self, items: np.ndarray) -> np.ndarray:
        """1-based creator id."""
        slot = self.slot_of(items)
        c, k = slot // self.slots_per_cluster, slot % self.slots_per_cluster
        return c * self.creators_per_cluster + k % self.creators_per_cluster + 1

    def quality(self, items: np.ndarray) -> np.ndarray:
        u = _hash_uniform(items, self.seed)
        return 0.35 * np.log(u / (1.0 - u))

    def zipf_rank(self, size: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Within-cluster rank in [0, size) with P(k) ~ (k+1)^-s (continuous inverse-cdf approximation)."""
        s = self.zipf
        if abs(s - 1.0) < 1e-9:
            x = np.exp(u * np.log(size + 1.0))
        else:
            x = (u * ((size + 1.0) ** (1 - s) - 1.0) + 1.0) ** (1.0 / (1 - s))
        return np.minimum(np.floor(x).astype(np.int64) - 1, size - 1).clip(min=0)


def build_world(cfg) -> RankingWorld:
    I, C = int(cfg.num_items), int(cfg.num_clusters)
    if I < 1 or C < 1 or C > I:
        raise DataError(f"ranking.synthetic: need 1 <= num_clusters <= num_items, got {C} and {I}")
    S = -(-I // C)
    if int(cfg.creators_per_cluster) < 1 or int(cfg.creators_per_cluster) > I - (C - 1) * S:
        raise DataError(f"ranking.synthetic.creators_per_cluster must be in 1..{I - (C - 1) * S} (the smallest "
                        f"cluster's size), got {cfg.creators_per_cluster}")
    rng = np.random.default_rng([cfg.seed, 100])
    a = int(rng.integers(1, max(I, 2)))
    while math.gcd(a, I) != 1:
        a += 1
    a %= max(I, 1)
    a = a or 1
    b = int(rng.integers(0, I))
    countries = np.stack([rng.choice(C, size=min(3, C), replace=False) for _ in range(int(cfg.num_countries))])
    return RankingWorld(I, C, S, int(cfg.creators_per_cluster), a, pow(a, -1, I) if I > 1 else 0, b,
                        float(cfg.zipf_exponent), countries, int(cfg.seed))


def _forward_fill(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[last index <= i where mask] (mask[0] must be True)."""
    return values[np.flatnonzero(mask)][np.cumsum(mask) - 1]


def generate_user(cfg, world: RankingWorld, u: int) -> dict:
    """User index u -> dict of raw arrays (items, ts, actions, labels [n, 4], dense, snapshots, context)."""
    rng = np.random.default_rng([cfg.seed, 101, u])
    C, cpc = world.num_clusters, world.creators_per_cluster
    n = int(rng.integers(int(cfg.min_seq_len), max(int(cfg.min_seq_len), int(cfg.max_seq_len)) + 1))
    country = int(rng.integers(0, world.country_clusters.shape[0]))
    age = int(rng.integers(0, len(AGE_BIAS)))
    bias = AGE_BIAS[age] + 0.3 * rng.standard_normal()
    n_pref = min(C, int(rng.integers(1, 4)))
    local = rng.random(n_pref) < 0.5
    prefs = np.where(local, rng.choice(world.country_clusters[country], n_pref), rng.integers(0, C, n_pref))
    prefs, first = np.unique(prefs, return_index=True)
    weights = rng.dirichlet(np.ones(prefs.size)) * prefs.size  # mean 1
    # current interest (sticky)
    switch = rng.random(n) < cfg.interest_switch
    switch[0] = True
    interest = _forward_fill(switch, rng.choice(prefs, n, p=weights / weights.sum()))
    # follows: (creator, start event); initial ones start at -1
    n_init = int(rng.integers(1, 3))
    follow_at = np.flatnonzero(rng.random(n) < cfg.follow_prob)
    n_f = n_init + follow_at.size
    f_cluster = np.where(rng.random(n_f) < 0.7, rng.choice(prefs, n_f, p=weights / weights.sum()),
                         rng.integers(0, C, n_f))
    f_creator = f_cluster * cpc + rng.integers(0, cpc, n_f) + 1
    f_start = np.concatenate([np.full(n_init, -1), follow_at])
    t = np.arange(n)
    active = np.searchsorted(f_start, t, side="right")  # follows in force at event t (>= n_init)
    # impressions
    src = rng.random(n)
    from_follow = (src >= _SRC_INTEREST) & (src < _SRC_INTEREST + _SRC_FOLLOW)
    cluster = np.where(src < _SRC_INTEREST, interest, rng.integers(0, C, n))
    k = world.zipf_rank(world.cluster_size(cluster), rng.random(n))
    creator_pick = f_creator[np.minimum((rng.random(n) * active).astype(np.int64), active - 1)]
    fc = (creator_pick - 1) // cpc
    fl = (creator_pick - 1) % cpc
    per = (world.cluster_size(fc) - fl - 1) // cpc + 1
    fk = fl + cpc * world.zipf_rank(per, rng.random(n))
    items = np.where(from_follow, world.item_of(fc, fk), world.item_of(cluster, k))
    # affinity and actions
    ic, cr, q = world.cluster_of(items), world.creator_of(items), world.quality(items)
    pref = np.zeros(n)
    for c, w in zip(prefs.tolist(), weights.tolist()):
        pref += w * (ic == c)
    order = np.lexsort((f_start, f_creator))
    uc, first_idx = np.unique(f_creator[order], return_index=True)
    earliest = f_start[order][first_idx]
    j = np.minimum(np.searchsorted(uc, cr), uc.size - 1)
    followed = ((uc[j] == cr) & (earliest[j] <= t)).astype(np.float64)
    aff = 1.5 * pref + 0.5 * (ic == interest) + followed + q + bias
    r = rng.random((n, 4))
    click = r[:, 0] < _sigmoid(1.2 * aff - 1.0)
    like = click & (r[:, 1] < _sigmoid(1.3 * aff - 1.5))
    share = click & (r[:, 2] < _sigmoid(aff + followed - 2.5))
    complete = click & (r[:, 3] < _sigmoid(aff + 0.8 * q - 0.5))
    labels = np.stack([click, like, share, complete], 1)
    actions = 1 + labels.astype(np.int64) @ np.array([1, 2, 4, 8])
    gaps = 1 + np.floor(rng.exponential(600.0, n)) + (rng.random(n) < 0.1) * np.floor(rng.exponential(2 * 86400.0, n))
    ts = _T0 + int(rng.integers(0, 365 * 86400)) + np.cumsum(gaps).astype(np.int64)
    # raw slow series: initial follows just before the first event, then one snapshot per event
    latest = f_creator[active - 1]
    creator_vals = np.concatenate([f_creator[:n_init], latest])
    creator_ts = np.concatenate([ts[0] - n_init + np.arange(n_init) - 1, ts])
    moves = rng.random(n) < cfg.move_prob
    moves[0] = True
    region = _forward_fill(moves, rng.integers(1, NUM_REGIONS + 1, n))
    dense = click * rng.exponential(300.0, n)  # watch_seconds: dropped by sequentialization
    return dict(items=items.astype(np.int64), ts=ts, actions=actions, labels=labels.astype(np.float32),
                creator=(creator_vals.astype(np.int64), creator_ts.astype(np.int64)), region=(region, ts.copy()),
                dense=dense, context=np.array([country + 1, age + 1], dtype=np.int64))


def _chunk(cfg, world: RankingWorld, users: Sequence[int]) -> RankingData:
    """Users ``users`` (a range or any index sequence / int array [B], in that order, repeats allowed) -> one
    RankingData of B users; user id = index + 1."""
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    if users.size == 0:
        raise DataError("ranking.synthetic: cannot generate an empty set of users")
    rows = [generate_user(cfg, world, int(u)) for u in users]
    lengths = np.array([r["items"].size for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cat = lambda key: np.concatenate([r[key] for r in rows])  # noqa: E731
    series = {}
    for name in ("creator", "region"):
        vals = [r[name][0] for r in rows]
        s_off = np.concatenate([[0], np.cumsum([v.size for v in vals])]).astype(np.int64)
        series[name] = (s_off, np.concatenate(vals), np.concatenate([r[name][1] for r in rows]))
    ts = cat("ts")
    side = sequentialize_series(offsets, ts, series)  # dense 'watch_seconds' is not passed: dropped
    return RankingData(
        user_ids=users + 1, offsets=offsets, item_ids=cat("items"),
        timestamps=ts, actions=cat("actions"), labels=cat("labels"), task_names=TASKS,
        num_items=world.num_items, num_actions=16, context=np.stack([r["context"] for r in rows]),
        context_names=CONTEXT, context_vocab=(world.country_clusters.shape[0] + 1, len(AGE_BIAS) + 1),
        side=side, side_vocab=(world.num_clusters * world.creators_per_cluster + 1, NUM_REGIONS + 1))


def generate_users(cfg, users: Sequence[int], world: Optional[RankingWorld] = None) -> RankingData:
    """Users with indices ``users`` (any order; int array [B]) as one RankingData, row b = user users[b] (id
    users[b] + 1); each user's data depends only on (cfg, index), so this equals the same rows of
    :func:`generate_ranking`. Used by the streaming loader (trainer/data/ranking_stream.py)."""
    return _chunk(cfg, world or build_world(cfg), users)


def iter_ranking_users(cfg, start: int = 0, stop: Optional[int] = None, chunk_size: int = 4096,
                       world: Optional[RankingWorld] = None) -> Iterator[RankingData]:
    """Yield users [start, stop) as RankingData chunks of <= chunk_size users (user id = index + 1); a user's
    data depends only on (cfg, index), never on the chunking. Memory: one chunk at a time."""
    stop = int(cfg.num_users) if stop is None else int(stop)
    world = world or build_world(cfg)
    for lo in range(int(start), stop, chunk_size):
        yield _chunk(cfg, world, range(lo, min(stop, lo + chunk_size)))


def concat_ranking(parts: List[RankingData]) -> RankingData:
    """Concatenate RankingData chunks of consecutive users."""
    first = parts[0]
    shift = np.cumsum([0] + [p.num_events for p in parts[:-1]])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, shift)])
    side_shift = np.cumsum([0] + [p.side.num_tokens for p in parts[:-1]])
    side = SideTokens(
        first.side.names,
        np.concatenate([np.zeros(1, np.int64)] + [p.side.offsets[1:] + s for p, s in zip(parts, side_shift)]),
        *(np.concatenate([getattr(p.side, k) for p in parts]) for k in ("feature", "values", "timestamps",
                                                                       "insert_at")))
    cat = lambda key: np.concatenate([getattr(p, key) for p in parts])  # noqa: E731
    return RankingData(
        user_ids=cat("user_ids"), offsets=offsets, item_ids=cat("item_ids"), timestamps=cat("timestamps"),
        actions=cat("actions"), labels=cat("labels"), task_names=first.task_names, num_items=first.num_items,
        num_actions=first.num_actions, context=cat("context"), context_names=first.context_names,
        context_vocab=first.context_vocab, side=side, side_vocab=first.side_vocab)


def generate_ranking(cfg, progress: bool = False) -> RankingData:
    """All cfg.num_users users in memory (use :func:`iter_ranking_users` to stream large configs)."""
    if cfg.num_users < 1 or cfg.min_seq_len < 2:
        raise DataError(f"ranking.synthetic: need num_users >= 1 and min_seq_len >= 2, got {cfg.num_users}, "
                        f"{cfg.min_seq_len}")
    chunks = []
    with tqdm(total=int(cfg.num_users), unit="user", desc="generate ranking", disable=not progress) as bar:
        for chunk in iter_ranking_users(cfg):
            chunks.append(chunk)
            bar.update(chunk.num_users)
    return concat_ranking(chunks)
