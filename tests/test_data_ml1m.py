"""The real MovieLens-1M release (read from ../shared/data/ml-1m; never copied into the repo)."""

from pathlib import Path

import numpy as np
import pytest

from hstu.trainer.config import DataConfig
from hstu.trainer.data import build_loaders, load_sequences, prepare
from hstu.trainer.data.movielens import read_movielens_events

ML1M_DIR = Path(__file__).resolve().parents[2] / "shared/data/ml-1m"
pytestmark = pytest.mark.skipif(not (ML1M_DIR / "ratings.dat").is_file(), reason=f"{ML1M_DIR} not present")


def test_ml1m_counts():
    ev = read_movielens_events("ml-1m", ML1M_DIR / "ratings.dat", progress=False)
    assert len(ev) == 1_000_209
    assert np.unique(ev.user).size == 6_040
    assert np.unique(ev.item).size == 3_706
    assert ev.item.max() == 3952
    assert ev.rating.min() == 1 and ev.rating.max() == 5


def test_ml1m_sequences_cache_and_split(tmp_path):
    cfg = DataConfig(name="ml-1m", data_dir=str(ML1M_DIR), cache_dir=str(tmp_path), max_seq_len=200)
    first = prepare(cfg, progress=False)
    assert first["users"] == 6_040 and first["num_items"] == 3952 and not first["cache_hit"]
    assert (first["raw_events"], first["raw_users"], first["raw_items"]) == (1_000_209, 6_040, 3_706)
    second = prepare(cfg, progress=False)
    assert second["cache_hit"] and second["raw_events"] == 1_000_209  # raw counts survive in the cache
    seqs = load_sequences(cfg, progress=False)
    seqs.validate()
    assert seqs.lengths().min() == 20 and seqs.lengths().max() == 201
    train, evaluation = build_loaders(cfg, seqs)
    assert len(evaluation) == -(-6_040 // cfg.eval_batch_size)
    batch = next(iter(evaluation))
    assert batch.user_ids[0].item() == 1 and batch.max_len <= 200
    # user 1's held-out target is their last rating by (timestamp, item id)
    ev = read_movielens_events("ml-1m", ML1M_DIR / "ratings.dat", progress=False)
    mine = np.flatnonzero(ev.user == 1)
    last = mine[np.lexsort((ev.item[mine], ev.timestamp[mine]))[-1]]
    assert batch.target_ids[0].item() == ev.item[last]
