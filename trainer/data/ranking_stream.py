"""Streaming synthetic ranking data (``ranking.synthetic.stream=true``; docs/ranking.md "Streaming synthetic data"):
train batches are generated on the fly, user by user, so a run never holds the dataset.

:class:`StreamingRankingLoader` is a drop-in for the TRAIN :class:`RankingLoader` (trainer/data/ranking_batch.py):
the same plan (users permuted by ``np.random.default_rng(seed + epoch)``, GLOBAL batches of ``batch_size``
users, with W > 1 ranks a last global batch smaller than W merged into the one before, rank r reads
``np.array_split(b, W)[r]``), the same resumable position (``state_dict`` / ``load_state_dict``: epoch, global
batches consumed, checked seed / batch_size / num_sequences), and batch for batch the same RankingBatch: for
each batch it generates only this rank's users (``generate_users``, user id = index + 1), applies the same
chronological split (training window = the last ``max_seq_len`` events before the validation and test candidates,
trainer/data/ranking.py) and builds the batch with ``build_ranking_batch(..., predict="history")``.

Memory: one batch (or ``prefetch_batches`` + 1 with the background thread) plus the epoch's permutation of user
indices (8 bytes per user) — not the dataset (~``bytes_per_user`` × users, see benchmarks/ranking_synthetic_scale.py).

Evaluation (:func:`build_streaming_ranking_data`): the first ``eval_users`` users are generated once
(materialised, small) and evaluated with the ordinary eval RankingLoader (``predict="candidates"``); they are
also what the item-rate baseline is fitted on (their training windows), since the full training set is never
held. The eval users are trained on too (as in the materialised path, training sees their history windows).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from hstu.trainer.data.errors import DataError
from hstu.trainer.data.ranking import RankingData, RankingSplit, chronological_split, select_features
from hstu.trainer.data.ranking_batch import RankingBatch, RankingLoader, build_ranking_batch


class SyntheticUsers:
    """Picklable ``users -> RankingData``: the synthetic generator for user indices [B] (row b = user users[b])
    with the run's tasks / contextual features / side series selected (``select_features``)."""

    def __init__(self, synthetic_cfg, tasks: Optional[Sequence[str]] = None, contextual: Optional[Sequence[str]] = None,
                 side_series: Optional[Sequence[str]] = None) -> None:
        from hstu.trainer.data.synthetic_ranking import build_world

        self.cfg, self.world = synthetic_cfg, build_world(synthetic_cfg)
        self.tasks, self.contextual, self.side_series = tasks, contextual, side_series

    def __call__(self, users: np.ndarray) -> RankingData:
        from hstu.trainer.data.synthetic_ranking import generate_users

        data = generate_users(self.cfg, users, self.world)
        return select_features(data, self.tasks, self.contextual, self.side_series, source="dataset synthetic")


class StreamingRankingLoader(RankingLoader):
    """Train loader over users 0..num_users−1 generated per batch by ``make_users`` (see the module docstring).

    make_users(users int64 [B]) -> RankingData of those B users in that order (every user >= 2 events);
    num_users: U (user index u has user id u + 1); max_seq_len / num_eval_targets: the chronological split;
    prefetch_batches: > 0 generates up to that many batches ahead in a background thread (bounded queue; the
    loader position counts batches handed out, so a checkpoint never counts a batch generated ahead).
    Batches: RankingBatch with ``predict="history"`` (loss at every window item), this rank's slice of each
    global batch."""

    def __init__(self, make_users: Callable[[np.ndarray], RankingData], num_users: int, batch_size: int, *,
                 max_seq_len: int, num_eval_targets: int, seed: int = 0, max_side_tokens: int = 32, rank: int = 0,
                 world_size: int = 1, prefetch_batches: int = 0) -> None:
        if num_users < 1:
            raise DataError(f"ranking.synthetic.num_users must be >= 1, got {num_users}")
        if max_seq_len < 1:
            raise DataError(f"data.max_seq_len must be >= 1, got {max_seq_len}")
        if num_eval_targets < 1:
            raise DataError(f"ranking.num_eval_targets must be >= 1, got {num_eval_targets}")
        if prefetch_batches < 0:
            raise DataError(f"ranking.synthetic.prefetch_batches must be >= 0, got {prefetch_batches}")
        empty = np.zeros(0, dtype=np.int64)  # windows are computed per batch: no per-user arrays
        super().__init__(None, np.arange(int(num_users), dtype=np.int64), empty, empty, empty, batch_size,
                         predict="history", shuffle=True, seed=seed, max_side_tokens=max_side_tokens, rank=rank,
                         world_size=world_size)
        self.make_users = make_users
        self.max_seq_len, self.num_eval_targets = int(max_seq_len), int(num_eval_targets)
        self.prefetch_batches = int(prefetch_batches)

    def batch(self, sel: np.ndarray) -> RankingBatch:
        """RankingBatch of users ``self.rows[sel]`` (user indices [B], in that order), generated now."""
        users = self.rows[sel]
        data = self.make_users(users)
        n = data.lengths()
        if data.num_users != users.size or (n < 2).any():
            bad = users[n < 2][:5].tolist() if data.num_users == users.size else users[:5].tolist()
            raise DataError(f"streaming ranking data: every user needs >= 2 events (ranking.synthetic.min_seq_len "
                            f">= 2); users {bad} do not")
        split = chronological_split(data, self.max_seq_len, self.num_eval_targets)
        return build_ranking_batch(data, split.rows, split.train_start, split.train_end, np.zeros_like(split.rows),
                                   "history", self.max_side_tokens)

    def __iter__(self) -> Iterator[RankingBatch]:
        if self.prefetch_batches <= 0:
            yield from super().__iter__()
            return
        todo = self._pending()
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for sel in todo:
                    if stop.is_set() or not put(self.batch(sel)):
                        return
            except BaseException as e:  # handed to the consumer, re-raised there
                put(e)

        worker = threading.Thread(target=produce, name="ranking-stream-prefetch", daemon=True)
        worker.start()
        def received() -> Iterator[RankingBatch]:
            for _ in range(len(todo)):
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item

        try:
            yield from self._consume(received())
        finally:
            stop.set()
            worker.join()


def build_streaming_ranking_data(cfg, rank: int = 0, world_size: int = 1
                                 ) -> Tuple[StreamingRankingLoader, RankingLoader, RankingData, RankingSplit]:
    """RunConfig (task=ranking, data.name=synthetic, ranking.synthetic.stream=true) -> (train loader: streaming,
    this rank's slices; eval loader: the materialised first ``eval_users`` users, candidates, this rank's slices;
    those users' RankingData [eval_users users] and split — what the item-rate baseline is fitted on)."""
    rc, s = cfg.ranking, cfg.ranking.synthetic
    if not 1 <= int(s.eval_users) <= int(s.num_users):
        raise DataError(f"ranking.synthetic.eval_users must be in 1..{s.num_users} with stream=true, got "
                        f"{s.eval_users}")
    if int(s.min_seq_len) < 2:
        raise DataError(f"ranking.synthetic.min_seq_len must be >= 2, got {s.min_seq_len}")
    make_users = SyntheticUsers(s, rc.tasks or None, rc.contextual, rc.side_series)
    train = StreamingRankingLoader(make_users, int(s.num_users), cfg.data.batch_size,
                                   max_seq_len=cfg.data.max_seq_len, num_eval_targets=rc.num_eval_targets,
                                   seed=cfg.data.seed, max_side_tokens=rc.max_side_tokens, rank=rank,
                                   world_size=world_size, prefetch_batches=int(s.prefetch_batches))
    data = make_users(np.arange(int(s.eval_users), dtype=np.int64))
    split = chronological_split(data, cfg.data.max_seq_len, rc.num_eval_targets)
    evaluation = RankingLoader(data, split.rows, split.hist_start, split.hist_end, split.num_candidates,
                               cfg.data.eval_batch_size, predict="candidates", shuffle=False,
                               max_side_tokens=rc.max_side_tokens, rank=rank, world_size=world_size)
    return train, evaluation, data, split
