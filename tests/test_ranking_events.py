"""task=ranking on own logs (issue 17; trainer/data/events_ranking.py): labels from the declared rating / action
column, the chronological (leave_one_out) and time-cutoff splits, parity with the built-in ML-1M ranking path,
and the refused combinations. Small generated Parquet logs."""

import json
import math

import numpy as np
import pytest

from events_utils import ml1m_like, write_table
from hstu.trainer.config import ConfigError, load_config

TINY = ["task=ranking", "data.max_seq_len=16", "data.batch_size=8", "data.eval_batch_size=16", "data.tie_order=item_id",
        "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2",
        "model.num_layers=1", "ranking.num_eval_targets=3", "ranking.head_hidden_dim=8", "train.progress=false",
        "train.tensorboard=false", "train.epochs=2", "train.eval_every_epochs=1", "train.log_every_steps=1",
        "train.num_threads=1", "eval.selection_metric=ne_mean"]
CUTOFF = 956703932 + 1000  # ml1m_like times span about 2000 s


def _events(tmp_path, f, *extra):
    return ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s",
            "data.events.rating_column=rating", f"data.cache_dir={tmp_path / 'cache'}", *extra]


def _train(run_dir, *overrides):
    from hstu.trainer.train import train

    return train(load_config(None, [*TINY, f"run_dir={run_dir}", *overrides]))


def test_labels_and_actions_come_from_the_declared_columns(tmp_path):
    from hstu.trainer.data.ranking import load_ranking_data

    log = ml1m_like(num_users=30, seed=1)
    log["kind"] = (log["rating"] * 7) % 4  # an action type 0..3
    f = write_table(tmp_path / "log.parquet", log)
    cfg = load_config(None, [*TINY, *_events(tmp_path, f, "data.events.action_column=kind", "data.events.labels=["
                                             "'good=rating>=4', 'share=action in 2,3', 'top=rating==5']")])
    data = load_ranking_data(cfg, progress=False)
    assert data.task_names == ("good", "share", "top") and data.regression_name == "rating"
    # an independent reference: each event's (rating, kind) from the log, matched on (user, item, time)
    key = {(int(u), int(i), int(t)): (int(r), int(k)) for u, i, t, r, k in
           zip(log["user_id"], log["item_id"], log["timestamp"], log["rating"], log["kind"])}
    from hstu.trainer.data.events_vocab import IdVocab
    from hstu.trainer.data.ranking import ranking_data_config
    from hstu.trainer.data import prepare

    folder = prepare(ranking_data_config(cfg), progress=False)["dataset_dir"]  # the folder it read (cache hit)
    users, items = IdVocab.load(folder, "users"), IdVocab.load(folder, "items")
    raw_user = users.to_raw(np.repeat(data.user_ids, data.lengths()))
    raw_item = items.to_raw(data.item_ids)
    got = [key[(u, i, int(t))] for u, i, t in zip(raw_user, raw_item, data.timestamps)]
    r, k = np.array([g[0] for g in got]), np.array([g[1] for g in got])
    assert np.array_equal(data.labels, np.stack([r >= 4, np.isin(k, [2, 3]), r == 5], 1).astype(np.float32))
    assert np.array_equal(data.actions, k + 1) and data.num_actions == 4  # action types 0..3 -> tokens 1..4
    assert np.array_equal(data.regression, r.astype(np.float32))


def test_ranking_trains_and_evaluates_on_own_logs_both_splits(tmp_path):
    f = write_table(tmp_path / "log.parquet", ml1m_like(num_users=40, seed=2))
    loo = _train(tmp_path / "loo", *_events(tmp_path, f))
    time = _train(tmp_path / "time", *_events(tmp_path, f, "data.events.split=time",
                                              f"data.events.time_cutoff={CUTOFF}"))
    for res in (loo, time):
        m = res.final_metrics
        assert math.isfinite(m["ne_like"]) and 0.0 <= m["auc_like"] <= 1.0 and m["num_impressions"] > 0
    assert loo.final_metrics["num_impressions"] == 40 * 3  # every user: the last K = 3 events
    data = json.load(open(tmp_path / "time" / "results.json"))["data"]
    assert "time cutoff" in data["split"]
    # the ranking export of an own-logs run loads and replays its recorded requests (no contextual tables)
    import hstu.serving
    from hstu.serving.export import export_run

    export_run(str(tmp_path / "loo"), str(tmp_path / "art"))
    model = hstu.serving.load(str(tmp_path / "art"), task="ranking")
    assert model.manifest["ranking"]["task_names"] == ["like"]


def test_time_cutoff_windows_never_train_on_events_after_it(tmp_path):
    from hstu.trainer.data.ranking import chronological_split, load_ranking_data

    log = ml1m_like(num_users=40, seed=3)
    f = write_table(tmp_path / "log.parquet", log)
    cfg = load_config(None, [*TINY, *_events(tmp_path, f, "data.events.split=time",
                                             f"data.events.time_cutoff={CUTOFF}")])
    data = load_ranking_data(cfg, progress=False)
    s = chronological_split(data, cfg.data.max_seq_len, 3)
    base = data.offsets[s.rows]
    ts = data.timestamps
    # reference per user from the raw log: events before / at-or-after the cutoff
    per_user_after = {}
    for u, t in zip(log["user_id"], log["timestamp"]):
        per_user_after.setdefault(int(u), [0, 0])[int(t >= CUTOFF)] += 1
    with_after = sum(1 for pre, post in per_user_after.values() if pre >= 1 and post >= 1)
    assert int((s.num_candidates > 0).sum()) == with_after
    for j in range(s.rows.size):
        train = ts[base[j] + s.train_start[j]: base[j] + s.train_end[j]]
        valid = ts[base[j] + s.train_end[j]: base[j] + s.train_end[j] + s.valid_candidates[j]]
        test = ts[base[j] + s.hist_end[j]: base[j] + s.hist_end[j] + s.num_candidates[j]]
        assert train.size >= 1 and (train < CUTOFF).all() and (valid < CUTOFF).all() and (test >= CUTOFF).all()
        assert s.hist_end[j] - s.hist_start[j] <= cfg.data.max_seq_len
    from hstu.trainer.data import prepare
    from hstu.trainer.data.events_vocab import IdVocab
    from hstu.trainer.data.ranking import ranking_data_config

    folder = prepare(ranking_data_config(cfg), progress=False)["dataset_dir"]
    raw_users = IdVocab.load(folder, "users").to_raw(data.user_ids[s.rows])
    posts = [per_user_after[int(r)][1] for r in raw_users]
    assert s.num_candidates.tolist() == [min(3, p) for p in posts]  # the first K events at/after the cutoff


def test_parity_with_the_builtin_ml1m_ranking_path(tmp_path):
    """The tiny ML-1M ratings.dat exported to Parquet: same ranking data, same fixed-seed metrics as task=ranking
    on data.name=ml-1m (without its users.dat contextual features, which own logs do not have)."""
    from hstu.trainer.data.movielens import read_movielens_events
    from test_benchmarks_smoke import _tiny_ml1m

    ml = _tiny_ml1m(tmp_path / "ml")
    (ml / "users.dat").write_text("".join(f"{u}::M::25::3::1234{u % 10}\n" for u in range(1, 41)))
    raw = read_movielens_events("ml-1m", ml / "ratings.dat", progress=False)
    f = write_table(tmp_path / "ml.parquet", {"user_id": raw.user, "item_id": raw.item, "rating": raw.rating,
                                              "timestamp": raw.timestamp})
    events = _events(tmp_path, f, "data.events.item_ids=raw", "data.events.num_shards=1",
                     "data.events.labels=['like=rating>=4', 'love=rating==5']")
    builtin = ["data.name=ml-1m", f"data.data_dir={ml}", f"data.cache_dir={tmp_path / 'c'}", "ranking.contextual=[]"]
    from hstu.trainer.data.ranking import load_ranking_data

    a = load_ranking_data(load_config(None, [*TINY, *events]), progress=False)
    b = load_ranking_data(load_config(None, [*TINY, *builtin]), progress=False)
    for k in ("user_ids", "offsets", "item_ids", "timestamps", "actions", "labels", "regression", "context"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert (a.task_names, a.num_items, a.num_actions) == (b.task_names, b.num_items, b.num_actions)
    extra = ["ranking.regression_weight=0.5"]
    got, ref = _train(tmp_path / "events", *events, *extra), _train(tmp_path / "builtin", *builtin, *extra)
    assert got.final_metrics == ref.final_metrics and got.best_metrics == ref.best_metrics


@pytest.mark.parametrize("extra,match", [
    (["data.events.stream=true"], "data.events.stream"),
    (["data.events.rating_column=''"], "rating_column"),
    (["data.events.labels=['like=rating>>4']"], r"labels\[0\]"),
    (["data.events.labels=['like=action==1']"], "action_column"),
    (["data.events.labels=['x=rating>=4', 'x=rating==5']"], "no other label"),
])
def test_refused_combinations_are_config_errors(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*TINY, *_events(tmp_path, tmp_path / "x.parquet"), *extra])


def test_hstu_prepare_of_a_ranking_config(tmp_path, capsys):
    from hstu.trainer.cli import main

    f = write_table(tmp_path / "log.parquet", ml1m_like(num_users=40, seed=4))
    assert main(["prepare", *TINY, *_events(tmp_path, f, "data.events.split=time",
                                            f"data.events.time_cutoff={CUTOFF}")]) == 0
    out = capsys.readouterr().out
    assert "ranking_users" in out and "like" in out


def test_context_columns_become_per_user_contextual_tokens(tmp_path):
    """Each user's contextual id = its device at the last event of its training window (reference: the raw log,
    sorted and windowed by hand); the ranker trains with the contextual table."""
    from hstu.trainer.data.ranking import load_ranking_data

    log = ml1m_like(num_users=30, seed=5, ties=False)  # distinct times: the order is the time order
    rng = np.random.default_rng(5)
    devices = np.array(["android", "ios", "web"], dtype=object)
    log["device"] = devices[rng.integers(0, 3, log["user_id"].size)]
    f = write_table(tmp_path / "log.parquet", log)
    events = _events(tmp_path, f, "data.events.context_columns=[device]")
    cfg = load_config(None, [*TINY, *events])
    data = load_ranking_data(cfg, progress=False)
    assert data.context_names == ("device",) and data.context_vocab == (4,)  # android, ios, web (+ 0)
    K, keep = 3, cfg.data.max_seq_len + 2 * 3  # the ranking window: max_seq_len + 2K events per user
    for row, uid in enumerate(data.user_ids):  # raw user ids are 1..U: the vocab keeps them in order
        mine = np.flatnonzero(log["user_id"] == uid)
        dev = log["device"][mine[np.argsort(log["timestamp"][mine])]][-keep:]
        n = dev.size
        end = n - min(K, n - 1)
        train_end = end - min(K, end - 1)
        assert data.context[row, 0] == 1 + list(devices).index(dev[train_end - 1]), uid
    # split=time: the training window ends K events before the cutoff
    cut = int(np.median(log["timestamp"]))
    timed = load_ranking_data(load_config(None, [*TINY, *events, "data.events.split=time",
                                                 f"data.events.time_cutoff={cut}"]), progress=False)
    checked = 0
    for row, uid in enumerate(timed.user_ids):
        mine = np.flatnonzero((log["user_id"] == uid) & (log["timestamp"] < cut))
        pre = mine.size  # the window keeps more than max_seq_len + K events before the cutoff: all of these
        dev = log["device"][mine[np.argsort(log["timestamp"][mine])]]
        if pre <= keep - 1:
            train_end = pre - min(K, pre - 1)
            assert timed.context[row, 0] == 1 + list(devices).index(dev[train_end - 1]), uid
            checked += 1
    assert checked > 10
    res = _train(tmp_path / "run", *events)
    assert math.isfinite(res.final_metrics["ne_like"])
