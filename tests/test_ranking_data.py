"""Ranking data: users.dat parser (clear errors), ML-1M actions / labels / contextual tokens / split on tiny
fixtures, and the streaming synthetic generator."""

import numpy as np
import pytest

from hstu.trainer.config import ConfigError, load_config
from hstu.trainer.data.errors import DataError
from hstu.trainer.data.ranking import chronological_split, load_ranking_data, read_users_dat
from hstu.trainer.data.synthetic_ranking import build_world, concat_ranking, generate_ranking, iter_ranking_users
from hstu.trainer.ranking_config import SyntheticRankingConfig
from hstu.trainer.tasks import get_task

USERS = b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117-1234\n"
RATINGS = b"".join(f"{u}::{i}::{r}::{t}\n".encode() for u, i, r, t in [
    (1, 10, 5, 100), (1, 11, 3, 200), (1, 12, 4, 300), (1, 13, 1, 400), (1, 14, 5, 500),
    (2, 10, 2, 50), (2, 12, 4, 60), (2, 15, 5, 70),
    (4, 11, 4, 10), (4, 12, 4, 20), (4, 13, 4, 30)])  # user 4 is missing from users.dat


def _write(tmp_path, users=USERS, ratings=RATINGS):
    (tmp_path / "users.dat").write_bytes(users)
    (tmp_path / "ratings.dat").write_bytes(ratings)
    return tmp_path


def test_users_dat_values(tmp_path):
    users = read_users_dat(_write(tmp_path) / "users.dat")
    assert sorted(users) == [1, 2, 3]
    assert (users[2].gender, users[2].age, users[2].occupation, users[2].zip) == ("M", 56, 16, "70072")
    assert users[3].zip == "55117-1234"


BAD_USERS = [
    (b"2::M::56::16", "Zip-code", "expected 5 fields"),
    (b"2::M::56::16::70072::x", "#6 (extra)", "expected 5 fields"),
    (b"x::M::56::16::70072", "UserID", "not a positive integer"),
    (b"0::M::56::16::70072", "UserID", "not a positive integer"),
    (b"1::M::56::16::70072", "UserID", "duplicate user id"),
    (b"2::X::56::16::70072", "Gender", "must be 'M' or 'F'"),
    (b"2::M::30::16::70072", "Age", "not an ML-1M age group"),
    (b"2::M::56::21::70072", "Occupation", "not an occupation code 0..20"),
    (b"2::M::56::-1::70072", "Occupation", "not an occupation code"),
    (b"2::M::56::16::", "Zip-code", "empty or not printable"),
    (b"2::M::56::16::70\xe972", "line", "non-ASCII"),
]


@pytest.mark.parametrize("line,field,message", BAD_USERS)
def test_users_dat_errors_name_file_line_field(tmp_path, line, field, message):
    path = tmp_path / "users.dat"
    path.write_bytes(b"1::F::1::10::48067\n\n" + line + b"\n")
    with pytest.raises(DataError) as err:
        read_users_dat(path)
    text = str(err.value)
    assert str(path) in text and "line 3" in text and f"field '{field}'" in text and message in text, text
    assert err.value.line == 3 and err.value.field == field


def test_users_dat_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="users.dat next to ratings.dat"):
        read_users_dat(tmp_path / "users.dat")
    (tmp_path / "users.dat").write_bytes(b"\n")
    with pytest.raises(DataError, match="no users"):
        read_users_dat(tmp_path / "users.dat")


def _cfg(tmp_path, *extra):
    return load_config(None, ["task=ranking", "data.name=ml-1m", f"data.data_dir={tmp_path}",
                              f"data.cache_dir={tmp_path / 'cache'}", "data.max_seq_len=3", "data.min_seq_len=2",
                              "ranking.num_eval_targets=2", "ranking.zip_prefix_len=1", "train.progress=false",
                              *extra])


def test_ml1m_ranking_data_actions_labels_context_split(tmp_path):
    _write(tmp_path)
    d = load_ranking_data(_cfg(tmp_path, "ranking.regression_weight=0.5"), progress=False)
    assert d.user_ids.tolist() == [1, 2, 4] and d.task_names == ("like", "love")
    assert d.actions[:5].tolist() == [5, 3, 4, 1, 5]  # action token = rating
    assert d.labels[:5].tolist() == [[1, 1], [0, 0], [1, 0], [0, 0], [1, 1]]  # like = r >= 4, love = r == 5
    assert d.regression[:5].tolist() == [5, 3, 4, 1, 5]
    # gender F=1 M=2; age group index + 1; occupation + 1; zip prefix (1 char) numbered in sorted order: 4, 5, 7
    assert d.context.tolist() == [[1, 1, 11, 1], [2, 7, 17, 3], [0, 0, 0, 0]]  # user 4: unknown
    assert d.context_vocab == (3, 8, 22, 4)
    sp = chronological_split(d, max_seq_len=3, num_eval_targets=2)
    # user 1: 5 events -> test candidates = last 2, history = the 3 before; users 2, 4: 3 events -> 1 history event
    assert sp.hist_start.tolist() == [0, 0, 0] and sp.hist_end.tolist() == [3, 1, 1]
    assert sp.num_candidates.tolist() == [2, 2, 2]
    # validation: user 1 -> the 2 events before the test ones (events 1, 2), training window = event 0;
    # users 2, 4 -> no event left for validation (a history event must remain): training window = event 0
    assert sp.valid_candidates.tolist() == [2, 0, 0]
    assert sp.train_start.tolist() == [0, 0, 0] and sp.train_end.tolist() == [1, 1, 1]
    # feature selection
    d2 = load_ranking_data(_cfg(tmp_path, "ranking.tasks=[love]", "ranking.contextual=[age,zip]"), progress=False)
    assert d2.task_names == ("love",) and d2.labels.shape == (d.num_events, 1) and d2.context.shape == (3, 2)
    with pytest.raises(DataError, match="unknown ranking.contextual"):
        load_ranking_data(_cfg(tmp_path, "ranking.contextual=[height]"), progress=False)


def test_ranking_config_errors():
    def cfg(*o):
        return load_config(None, ["task=ranking", *o])

    for overrides, match in [
        (["model.arch=sasrec"], "task=ranking supports hstu | dlrm"),
        (["data.name=ml-20m"], "task=ranking supports"),
        (["ranking.tasks=[watch]"], "not defined for synthetic"),
        (["ranking.task_weights=[1.0]"], "1 values for 4 tasks"),
        (["ranking.regression_weight=1.0"], "no regression target"),
        (["train.stochastic_length.enabled=true"], "not supported with task=ranking"),
    ]:
        with pytest.raises(ConfigError, match=match):
            get_task(cfg(*overrides)).check_config()
    with pytest.raises(ConfigError, match="needs task=ranking"):
        get_task(load_config(None, ["model.arch=dlrm"])).check_config()
    with pytest.raises(ConfigError, match="'task'"):
        load_config(None, ["task=regression"])


def test_synthetic_stream_is_chunk_invariant_and_consistent():
    cfg = SyntheticRankingConfig(num_users=40, num_items=300, num_clusters=5, creators_per_cluster=4,
                                 min_seq_len=5, max_seq_len=30, follow_prob=0.1)
    whole = generate_ranking(cfg)
    parts = concat_ranking(list(iter_ranking_users(cfg, chunk_size=7)))
    for name in ("offsets", "item_ids", "timestamps", "actions", "labels", "context"):
        assert np.array_equal(getattr(whole, name), getattr(parts, name)), name
    assert np.array_equal(whole.side.values, parts.side.values)
    assert np.array_equal(whole.side.insert_at, parts.side.insert_at)
    # users [20, 25) alone equal the same users inside the whole set
    alone = next(iter_ranking_users(cfg, start=20, stop=25))
    lo, hi = whole.offsets[20], whole.offsets[25]
    assert np.array_equal(alone.item_ids, whole.item_ids[lo:hi]) and alone.user_ids.tolist() == [21, 22, 23, 24, 25]
    # action token = 1 + bitmask of the labels; labels imply a click; ids in range
    bits = whole.labels.astype(np.int64) @ np.array([1, 2, 4, 8])
    assert np.array_equal(whole.actions, bits + 1)
    assert np.all(whole.labels[:, 1:].max(1) <= whole.labels[:, 0])
    assert whole.item_ids.min() >= 1 and whole.item_ids.max() <= 300
    # slow series were compressed: no two consecutive equal values of a feature within a user
    s = whole.side
    for u in range(whole.num_users):
        for f in range(len(s.names)):
            sel = np.flatnonzero(s.feature[s.offsets[u]:s.offsets[u + 1]] == f) + s.offsets[u]
            vals = s.values[sel[np.argsort(s.timestamps[sel], kind="stable")]]
            assert np.all(vals[1:] != vals[:-1])


def test_synthetic_world_scales_without_per_item_state():
    cfg = SyntheticRankingConfig(num_users=10_000_000, num_items=50_000_000, num_clusters=1000,
                                 creators_per_cluster=50)
    world = build_world(cfg)  # O(clusters) state
    items = np.array([1, 2, 12_345_678, 50_000_000])
    c, k = world.cluster_of(items), world.slot_of(items) % world.slots_per_cluster
    assert np.array_equal(world.item_of(c, k), items)
    chunk = next(iter_ranking_users(cfg, start=9_999_990, chunk_size=4))  # any user range, generated alone
    assert chunk.user_ids.tolist() == [9_999_991, 9_999_992, 9_999_993, 9_999_994]
    assert chunk.item_ids.max() <= 50_000_000


def test_ranking_split_never_trains_on_validation_or_test_events():
    d = generate_ranking(SyntheticRankingConfig(num_users=60, num_items=50, num_clusters=5, creators_per_cluster=4,
                                                min_seq_len=2, max_seq_len=40, seed=4))
    for max_seq_len, k in ((8, 3), (100, 1), (5, 10)):
        sp = chronological_split(d, max_seq_len=max_seq_len, num_eval_targets=k)
        n = d.lengths()[sp.rows]
        assert (sp.hist_end + sp.num_candidates == n).all()  # test candidates = the last events
        assert (sp.train_end + sp.valid_candidates == sp.hist_end).all()  # validation right before them
        assert (sp.train_end <= sp.hist_end - sp.valid_candidates).all() and (sp.train_end >= 1).all()
        assert (sp.train_end - sp.train_start <= max_seq_len).all()
        assert (sp.hist_end - sp.hist_start <= max_seq_len).all()
        assert ((sp.valid_candidates == np.minimum(k, sp.hist_end - 1))).all()
        assert ((sp.valid_candidates > 0) == (n >= k + 2)).all()  # a test set, a validation set and >= 1 event
