"""Sequence cache: hit / miss, invalidation on source or option change, atomic writes, corrupt files."""

import numpy as np
import pytest

import hstu.trainer.data.movielens as movielens
from hstu.trainer.config import DataConfig, SyntheticConfig
from hstu.trainer.data import load_sequences, prepare
from hstu.trainer.data import cache as cache_mod
from hstu.trainer.data.errors import DataError

UDATA = b"".join(b"%d\t%d\t3\t%d\n" % (u, i, 1000 + 7 * i) for u in range(1, 6) for i in range(1, 8))


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_bytes(UDATA)
    return DataConfig(name="ml-100k", data_dir=str(tmp_path / "ml"), cache_dir=str(tmp_path / "cache"),
                      max_seq_len=4, min_seq_len=3)


def _no_parse(*args, **kwargs):
    raise AssertionError("cache hit expected: the parser must not run")


def test_miss_then_hit_returns_identical_sequences(cfg, monkeypatch):
    first = prepare(cfg, progress=False)
    assert not first["cache_hit"] and first["users"] == 5 and first["events"] == 30 and first["num_items"] == 7
    monkeypatch.setattr(movielens, "load_movielens", _no_parse)
    second = prepare(cfg, progress=False)
    assert second["cache_hit"] and second["cache_path"] == first["cache_path"]
    a = load_sequences(cfg, progress=False)
    assert a.user(0).tolist() == [2, 3, 4, 5, 6, 7]  # last max_seq_len + 2 items (validation + test target)


def test_changed_source_or_options_give_new_key(cfg, tmp_path):
    base = prepare(cfg, progress=False)["cache_path"]
    cfg.max_seq_len = 5
    p_len = prepare(cfg, progress=False)
    assert not p_len["cache_hit"] and p_len["cache_path"] != base
    cfg.min_seq_len = 2
    assert prepare(cfg, progress=False)["cache_path"] not in (base, p_len["cache_path"])
    cfg.max_seq_len, cfg.min_seq_len = 4, 3
    assert prepare(cfg, progress=False)["cache_hit"]  # back to the original options
    (tmp_path / "ml" / "u.data").write_bytes(UDATA.replace(b"1\t1\t3", b"1\t2\t3", 1))  # same size, new content
    changed = prepare(cfg, progress=False)
    assert not changed["cache_hit"] and changed["cache_path"] != base


def test_tie_order_and_its_seed_are_part_of_the_key(cfg):
    paths = {}
    for order in ("random", "file", "item_id"):
        cfg.tie_order = order
        summary = prepare(cfg, progress=False)
        assert summary["tie_order"] == order and not summary["cache_hit"]
        paths[order] = summary["cache_path"]
    assert len(set(paths.values())) == 3
    cfg.seed += 1  # data.seed seeds the random tie order only
    assert prepare(cfg, progress=False)["cache_hit"]
    cfg.tie_order = "random"
    other_seed = prepare(cfg, progress=False)
    assert not other_seed["cache_hit"] and other_seed["tie_seed"] == cfg.seed
    assert other_seed["cache_path"] != paths["random"]


def test_synthetic_key_ignores_the_tie_order(tmp_path):
    syn = SyntheticConfig(num_users=20, num_items=30, num_interests=3, min_seq_len=5, max_seq_len=12)
    cfg = DataConfig(name="synthetic", cache_dir=str(tmp_path), max_seq_len=8, synthetic=syn)
    first = prepare(cfg, progress=False)
    cfg.seed, cfg.tie_order = cfg.seed + 1, "item_id"  # strictly increasing timestamps: nothing to order
    assert prepare(cfg, progress=False)["cache_path"] == first["cache_path"]


def test_parser_version_is_part_of_the_key(tmp_path, monkeypatch):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    k1 = cache_mod.cache_key([src], {"a": 1})
    monkeypatch.setattr(cache_mod, "PARSER_VERSION", cache_mod.PARSER_VERSION + 1)
    assert cache_mod.cache_key([src], {"a": 1}) != k1


def test_interrupted_write_leaves_no_file(cfg, tmp_path, monkeypatch):
    def boom(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        load_sequences(cfg, progress=False)
    assert list((tmp_path / "cache" / "sequences").iterdir()) == []
    monkeypatch.undo()
    assert not prepare(cfg, progress=False)["cache_hit"]


def test_corrupt_cache_file_is_rebuilt(cfg):
    path = prepare(cfg, progress=False)["cache_path"]
    with open(path, "wb") as f:
        f.write(b"not an npz")
    summary = prepare(cfg, progress=False)
    assert not summary["cache_hit"] and summary["users"] == 5
    assert prepare(cfg, progress=False)["cache_hit"]


def test_synthetic_is_cached_by_generator_config(tmp_path):
    syn = SyntheticConfig(num_users=30, num_items=50, num_interests=5, min_seq_len=5, max_seq_len=12)
    cfg = DataConfig(name="synthetic", cache_dir=str(tmp_path), max_seq_len=8, min_seq_len=3, synthetic=syn)
    a = prepare(cfg, progress=False)
    assert not a["cache_hit"] and a["users"] == 30 and a["source"] == "generated"
    assert prepare(cfg, progress=False)["cache_hit"]
    cfg.synthetic.seed += 1
    assert not prepare(cfg, progress=False)["cache_hit"]
    seqs = load_sequences(cfg, progress=False)
    assert seqs.lengths().max() <= 10  # max_seq_len + 2 (validation + test target)


def test_missing_data_dir_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_sequences(DataConfig(name="ml-1m", data_dir=str(tmp_path / "nope"), cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="unknown dataset"):
        load_sequences(DataConfig(name="ml-5m", data_dir=str(tmp_path), cache_dir=str(tmp_path)))
