"""Item feature parsing (movies.dat, u.item; tiny fixtures written here) and never-seen item holdout."""

import numpy as np
import pytest

from hstu.trainer.config import load_config
from hstu.trainer.data import DataError, build_loaders, build_user_sequences
from hstu.trainer.data import item_features as itf
from hstu.trainer.data.holdout import holdout_items, remove_items, train_item_counts

MOVIES = ("1::Toy Story (1995)::Animation|Children's|Comedy\n"
          "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
          "\n"
          "4::Caf\xe9 au lait, Le (1993)::Comedy\r\n")
U_ITEM = ("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
          "3|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n")


def write(tmp_path, name, text, bom=False):
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("latin-1"))
    return path


def test_movies_dat_rows_latin1_bom_and_table(tmp_path):
    rows = itf.parse_movies_dat(write(tmp_path, "movies.dat", MOVIES, bom=True))
    assert [r.item for r in rows] == [1, 2, 4]
    assert rows[2].title == "Caf\xe9 au lait, Le" and rows[2].year == 1993
    g = itf.ML1M_GENRES
    assert rows[0].genres == [1 + g.index("Animation"), 1 + g.index("Children's"), 1 + g.index("Comedy")]
    table = itf.movie_table(rows, 4, ("genre", "year", "title"), len(g), title_buckets=64, year_bucket_years=5)
    assert table.values.shape == (5, len(g) + 1 + itf.MAX_TITLE_WORDS)
    assert table.cardinalities == (len(g) + 1, itf.num_year_buckets(5), 65)
    assert (table.values[0] == 0).all() and (table.values[3] == 0).all()  # padding row, item without a row
    assert table.block("year")[1, 0] == 1 + (1995 - itf.YEAR_MIN) // 5
    assert table.block("year")[4, 0] == 1 + (1993 - itf.YEAR_MIN) // 5
    assert sorted(table.block("genre")[2][table.block("genre")[2] > 0]) == sorted(rows[1].genres)
    words = table.block("title")[1]
    assert list(words[words > 0]) == itf.title_words("Toy Story", 64) and len(words[words > 0]) == 2
    assert itf.title_words("Story Toy", 64) == itf.title_words("Toy Story", 64)[::-1]  # hashed, no vocabulary


@pytest.mark.parametrize("line, field, value", [
    ("x::A (1990)::Drama", "item", "x"),
    ("5::A (1990)::Dramaa", "genres", "Dramaa"),
    ("5::No year::Drama", "title", "No year"),
    ("5::A (1990)", "line", "5::A (1990)"),
    ("1::Again (1990)::Drama", "item", "1"),
])
def test_movies_dat_malformed_row_names_file_line_field_value(tmp_path, line, field, value):
    path = write(tmp_path, "movies.dat", MOVIES + line + "\n")
    with pytest.raises(DataError) as e:
        itf.parse_movies_dat(path)
    msg = str(e.value)
    assert e.value.line == 5 and e.value.field == field and e.value.value == value
    assert msg.startswith(str(path) + ": line 5: field '" + field + "'") and "\n" not in msg


def test_u_item_genres_release_year_and_errors(tmp_path):
    rows = itf.parse_u_item(write(tmp_path, "u.item", U_ITEM))
    assert rows[0].year == 1995 and rows[0].title == "Toy Story"
    assert rows[0].genres == [1 + itf.ML100K_GENRES.index(g) for g in ("Animation", "Children's", "Comedy")]
    assert rows[1].year is None and rows[1].genres == [1]  # "unknown"
    bad = U_ITEM + "4|X (1990)|1995-01-01||u|" + "|".join("0" * 19) + "\n"
    with pytest.raises(DataError, match=r"u.item: line 3: field 'release_date'.*'1995-01-01'"):
        itf.parse_u_item(write(tmp_path, "u.item", bad))
    bad = U_ITEM + "4|X (1990)|01-Jan-1990||u|" + "|".join("0" * 18) + "|2\n"
    with pytest.raises(DataError, match=r"line 3: field 'genre Western'.*'2'"):
        itf.parse_u_item(write(tmp_path, "u.item", bad))


def test_load_item_features_from_config(tmp_path):
    write(tmp_path, "movies.dat", MOVIES)
    cfg = load_config(None, ["data.name=ml-1m", f"data.data_dir={tmp_path}", "model.item_features.enabled=true",
                             "model.item_features.features=[year]"])
    table = itf.load_item_features(cfg.data, cfg.model.item_features, 3, tmp_path)
    assert table.names == ("year",) and table.values.shape == (4, 1) and table.values[3, 0] == 0
    cfg = load_config(None, ["model.item_features.enabled=true", "data.synthetic.num_items=50",
                             "data.synthetic.num_interests=5"])
    table = itf.load_item_features(cfg.data, cfg.model.item_features, 50)
    assert table.names == ("cluster",) and set(table.values[1:, 0]) <= set(range(1, 6)) and table.values[0, 0] == 0


def test_holdout_removes_items_from_training_only():
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(30), 8)
    item = rng.integers(1, 41, size=user.size)
    ts = np.tile(np.arange(8), 30)
    seqs = build_user_sequences(user, item, ts, max_seq_len=50, min_seq_len=4, tie_order="file")
    held = holdout_items(seqs, 0.25, seed=3)
    assert held.size == round(0.25 * np.unique(seqs.item_ids).size)
    assert np.array_equal(held, holdout_items(seqs, 0.25, seed=3)) and not np.array_equal(held,
                                                                                        holdout_items(seqs, .25, 4))
    cut = remove_items(seqs, held)
    cut.validate()
    assert not np.isin(cut.item_ids, held).any()
    for u in range(seqs.num_users):  # each user keeps exactly its other events, in order
        assert np.array_equal(cut.user(u), seqs.user(u)[~np.isin(seqs.user(u), held)])
    cfg = load_config(None, ["data.holdout_items_frac=0.25", "data.seed=3", "data.max_seq_len=50"])
    train, valid, test = build_loaders(cfg.data, seqs)
    assert not np.isin(train.seqs.item_ids, held).any()
    counts = train_item_counts(train.seqs)
    assert (counts[held] == 0).all() and counts.sum() == train.seqs.item_ids[np.repeat(
        train.seqs.lengths() >= 2, train.seqs.lengths())].size
    targets = np.concatenate([valid.seqs.item_ids, test.seqs.item_ids])  # eval histories keep held-out items
    assert np.isin(held, targets).any()


def test_held_out_items_are_never_negatives():
    import torch
    from types import SimpleNamespace

    from hstu.trainer.pipeline import PreparedBatch
    from hstu.trainer.tasks.retrieval import RetrievalTask, prepare_retrieval_batch

    cfg = load_config(None, ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "data.max_seq_len=12",
                             "data.holdout_items_frac=0.2", "loss.num_negatives=64", "train.progress=false"])
    task = RetrievalTask(cfg)
    data = task.build_data()
    held = holdout_items(data.source, 0.2, cfg.data.seed)
    assert held.size == 8 and sorted(set(range(1, 41)) - set(task.negative_pool.tolist())) == held.tolist()
    ctx = SimpleNamespace(cfg=cfg, num_items=40, neg_generator=torch.Generator().manual_seed(0), device="cpu",
                          task=task, env=None)
    batch = next(iter(data.train_loader))
    seen = set()
    for _ in range(5):
        p = prepare_retrieval_batch(PreparedBatch(batch, int(batch.item_ids.numel())), ctx)
        seen |= set(p.negatives.flatten().tolist())
    assert seen == set(task.negative_pool.tolist())  # every other item is drawn, no held-out one
    task.negative_pool = None  # without holdout: uniform over 1..N, held-out ids included
    p = prepare_retrieval_batch(PreparedBatch(batch, int(batch.item_ids.numel())), ctx)
    assert set(p.negatives.flatten().tolist()) & set(held.tolist())


def test_popularity_baseline_does_not_know_held_out_items():
    import torch

    from hstu.trainer.evaluate import popularity_counts
    from hstu.trainer.tasks.retrieval import RetrievalTask, popularity_baseline

    cfg = load_config(None, ["data.synthetic.num_users=80", "data.synthetic.num_items=30", "data.max_seq_len=12",
                             "data.holdout_items_frac=0.3", "eval.item_groups=true", "eval.ks=[1,5]",
                             "train.progress=false"])
    task = RetrievalTask(cfg)
    data = task.build_data()
    with_pool = task.baseline_metrics()
    full = popularity_baseline(cfg, data.source, data.eval_loader, groups=task.groups())
    assert with_pool["unseen/num_users"] == full["unseen/num_users"] > 0
    assert with_pool["unseen/hr@5"] <= full["unseen/hr@5"] and with_pool["unseen/mrr"] < full["unseen/mrr"]
    counts = popularity_counts(torch.as_tensor(data.source.item_ids), torch.as_tensor(data.source.offsets), 30)
    held = holdout_items(data.source, 0.3, cfg.data.seed)
    assert (counts[held] > 0).all()  # without the pool the baseline would rank them by their real popularity


def test_popularity_baseline_counts_only_training_events(monkeypatch):
    """The most-popular baseline ranks by the events the model trains on: each user's validation item (second to
    last) and test item (last) are not counted — by hand, on histories shorter than data.max_seq_len."""
    import torch

    import hstu.trainer.tasks.retrieval as retrieval
    from hstu.trainer.evaluate import popularity_counts

    cfg = load_config(None, ["data.synthetic.num_users=60", "data.synthetic.num_items=30",
                             "data.synthetic.max_seq_len=20", "data.max_seq_len=50", "train.progress=false"])
    task = retrieval.RetrievalTask(cfg)
    data = task.build_data()
    seen = {}
    orig = retrieval.evaluate_popularity

    def capture(counts, *args, **kwargs):
        seen["counts"] = counts.clone()
        return orig(counts, *args, **kwargs)

    monkeypatch.setattr(retrieval, "evaluate_popularity", capture)
    task.baseline_metrics()
    src = data.source
    expect = torch.zeros(src.num_items + 1, dtype=torch.long)
    for u in range(len(src.offsets) - 1):
        for item in src.item_ids[src.offsets[u]:src.offsets[u + 1] - 2]:  # all but the last two events
            expect[int(item)] += 1
    assert torch.equal(seen["counts"], expect)
    all_but_last = popularity_counts(torch.as_tensor(src.item_ids), torch.as_tensor(src.offsets), src.num_items)
    assert int((all_but_last - expect).sum()) == len(src.offsets) - 1  # before: one validation item per user
