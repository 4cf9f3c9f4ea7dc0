"""The real MovieLens-1M release exported to Parquet (in a temp dir, never kept) and read as own event logs gives the
same sequences and the same fixed-seed metrics as the built-in ML-1M parser (issue 17 "done when")."""

from pathlib import Path

import numpy as np
import pytest

from events_utils import write_table
from hstu.trainer.config import load_config
from hstu.trainer.data import load_sequences
from hstu.trainer.data.movielens import read_movielens_events

ML1M_DIR = Path(__file__).resolve().parents[2] / "shared/data/ml-1m"
pytestmark = [pytest.mark.skipif(not (ML1M_DIR / "ratings.dat").is_file(), reason=f"{ML1M_DIR} not present"),
              pytest.mark.timeout(600)]
RUN = ["data.max_seq_len=50", "data.batch_size=128", "data.eval_batch_size=512", "model.embedding_dim=16",
       "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2", "loss.num_negatives=32",
       "train.max_steps=6", "train.epochs=1", "train.progress=false", "train.tensorboard=false",
       "train.num_threads=2", "eval.ks=[10,50]", "eval.ndcg_ks=[10]", "eval.selection_metric=ndcg@10"]


def test_ml1m_parquet_export_matches_the_builtin_parser(tmp_path):
    from hstu.trainer.train import train

    raw = read_movielens_events("ml-1m", ML1M_DIR / "ratings.dat", progress=False)
    f = write_table(tmp_path / "ml-1m.parquet", {"user_id": raw.user, "item_id": raw.item, "rating": raw.rating,
                                                 "timestamp": raw.timestamp})
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    events = ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s", "data.events.item_ids=raw",
              "data.events.rating_column=rating", "data.events.num_shards=1", cache, "data.tie_order=item_id"]
    builtin = ["data.name=ml-1m", f"data.data_dir={ML1M_DIR}", cache, "data.tie_order=item_id"]
    a = load_sequences(load_config(None, [*RUN, *events]).data, progress=False)
    b = load_sequences(load_config(None, [*RUN, *builtin]).data, progress=False)
    assert a.num_users == 6040 and a.num_items == b.num_items == 3952
    for k in ("user_ids", "offsets", "item_ids", "timestamps", "ratings"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    ref = train(load_config(None, [*RUN, *builtin, f"run_dir={tmp_path / 'builtin'}"]))
    got = train(load_config(None, [*RUN, *events, f"run_dir={tmp_path / 'events'}"]))
    assert ref.final_metrics == got.final_metrics and ref.final_metrics["hr@50"] > 0
