"""Own event logs (issue 17): out-of-core prepare (vocabularies, shards, manifest, atomicity, memory-bounded
partitions), the leave-one-out and time-cutoff splits, the streaming sharded loader and its resumable position,
and parity with the built-in ML-1M parser (same sequences, same fixed-seed metrics). Small generated files."""

import dataclasses
import json
import os

import numpy as np
import pytest

from events_utils import ml1m_like, write_table
from hstu.trainer.config import load_config
from hstu.trainer.data import build_loaders, load_sequences, prepare
from hstu.trainer.data import events_prepare
from hstu.trainer.data.download import sha256_file
from hstu.trainer.data.events_loader import ShardedTrainLoader, load_events
from hstu.trainer.data.sequences import build_user_sequences
from hstu.trainer.metrics_log import read_metrics

T0 = 1_000_000_000


def _cfg(tmp_path, paths, *extra, task_extra=()):
    return load_config(None, ["data.name=events", f"data.events.paths=[{paths}]", "data.events.time_unit=s",
                              f"data.cache_dir={tmp_path / 'cache'}", *extra, *task_extra])


def _string_log(rng, n=600, users=30, items=40):
    user = rng.integers(0, users, n)
    item = np.minimum(rng.zipf(1.3, n), items)
    return {"uid": np.array([f"u{u:03d}" for u in user], dtype=object),
            "sku": np.array([f"sku-{i}" for i in item], dtype=object), "ts": T0 + rng.integers(0, 5000, n)}


def test_prepare_vocab_shards_manifest_match_an_independent_reference(tmp_path):
    rng = np.random.default_rng(3)
    log = _string_log(rng)
    f = write_table(tmp_path / "log.parquet", log)
    cfg = _cfg(tmp_path, f, "data.events.user_column=uid", "data.events.item_column=sku",
               "data.events.time_column=ts", "data.events.min_count=3", "data.events.num_shards=3",
               "data.tie_order=item_id", "data.max_seq_len=8").data
    summary = prepare(cfg, progress=False)
    folder = summary["dataset_dir"]
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["num_shards"] == 3 and summary["raw_events"] == 600 and not summary["cache_hit"]
    for rec in manifest["shards"] + list(manifest["vocab"].values()):
        assert sha256_file(os.path.join(folder, rec["file"])) == rec["sha256"]
    # reference: vocabularies by raw order, items seen < 3 times -> OOV = kept + 1
    users = {u: i + 1 for i, u in enumerate(sorted(set(log["uid"])))}
    names, counts = np.unique(log["sku"], return_counts=True)
    kept = [s for s, c in zip(names, counts) if c >= 3]
    oov = len(kept) + 1
    items = {s: (kept.index(s) + 1 if s in kept else oov) for s in names}
    uid = np.array([users[u] for u in log["uid"]])
    iid = np.array([items[s] for s in log["sku"]])
    want = build_user_sequences(uid, iid, log["ts"], None, 8, cfg.min_seq_len, num_items=oov, tie_order="item_id")
    got = load_sequences(cfg, progress=False)
    for k in ("user_ids", "offsets", "item_ids", "timestamps"):
        assert np.array_equal(getattr(got, k), getattr(want, k)), k
    assert got.num_items == oov == summary["num_items"] and summary["oov_events"] == int(counts[counts < 3].sum())
    for shard, rec in enumerate(manifest["shards"]):  # users hashed to shards by uid % num_shards
        z = np.load(os.path.join(folder, rec["file"]))
        assert np.all(z["user_ids"] % 3 == shard) and rec["users"] == z["user_ids"].size
    import duckdb

    vocab = dict(duckdb.connect().execute(f"SELECT raw, id FROM '{folder}/vocab/items.parquet'").fetchall())
    assert {k: (v if v is not None else oov) for k, v in vocab.items()} == items
    assert prepare(cfg, progress=False)["cache_hit"]


def test_csv_and_parquet_of_the_same_log_prepare_the_same(tmp_path):
    ev = ml1m_like(num_users=20)
    a = load_sequences(_cfg(tmp_path, write_table(tmp_path / "a.parquet", ev), "data.tie_order=file").data, False)
    b = load_sequences(_cfg(tmp_path, write_table(tmp_path / "a.csv", ev, "csv"), "data.tie_order=file",
                            "data.events.item_type=int", "data.events.user_type=int").data, False)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("user_ids", "offsets", "item_ids", "timestamps"))


def test_memory_setting_bounds_the_partitions(tmp_path):
    n = 250_000  # WORK_BYTES_PER_EVENT x n > half of 32 MiB -> several partitions
    rng = np.random.default_rng(0)
    f = write_table(tmp_path / "big.parquet", {"user_id": rng.integers(1, 5000, n), "item_id": rng.integers(1, 900, n),
                                               "timestamp": T0 + rng.integers(0, 10**7, n)})
    cfg = _cfg(tmp_path, f, "data.events.prepare_memory_mb=64", "data.events.prepare_threads=1").data
    summary = prepare(cfg, progress=False)
    budget_events = 64 * (1 << 20) / 2 / events_prepare.WORK_BYTES_PER_EVENT
    assert summary["num_shards"] == int(np.ceil(n / budget_events)) >= 2
    shard_events = [s["events"] for s in json.load(open(summary["dataset_dir"] + "/manifest.json"))["shards"]]
    assert max(shard_events) < budget_events
    cfg = _cfg(tmp_path, f, "data.events.shard_events=40000", "data.events.prepare_threads=1").data
    assert prepare(cfg, progress=False)["num_shards"] == int(np.ceil(n / 40000))  # the loader's bound


def test_failed_prepare_leaves_nothing(tmp_path, monkeypatch):
    f = write_table(tmp_path / "a.parquet", ml1m_like(num_users=10))
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(events_prepare, "_write_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(_cfg(tmp_path, f, "data.events.num_shards=2").data, progress=False)
    assert calls and os.listdir(tmp_path / "cache" / "events") == []


def test_time_cutoff_split(tmp_path):
    # user 1: 5 events before the cutoff, 2 after; user 2: all before; user 3: 1 before, 3 after
    rows = [(1, i, T0 + i) for i in range(1, 8)] + [(2, 10 + i, T0 + i) for i in range(4)]
    rows += [(3, 20, T0 + 1)] + [(3, 21 + i, T0 + 10 + i) for i in range(3)]
    user, item, ts = (np.array(c) for c in zip(*rows))
    f = write_table(tmp_path / "a.parquet", {"user_id": user, "item_id": item, "timestamp": ts})
    cutoff = T0 + 6  # items 1..5 of user 1 are before it
    cfg = _cfg(tmp_path, f, "data.events.split=time", f"data.events.time_cutoff={cutoff}",
               "data.events.item_ids=raw", "data.max_seq_len=3").data
    train, validation, test = build_loaders(cfg, load_sequences(cfg, progress=False))
    (t,) = list(test)
    assert t.user_ids.tolist() == [1, 3] and t.target_ids.tolist() == [6, 21]  # first event >= cutoff
    assert t.item_ids.tolist() == [3, 4, 5, 20]  # histories: the last max_seq_len events before the cutoff
    (v,) = list(validation)
    assert v.user_ids.tolist() == [1, 2] and v.target_ids.tolist() == [5, 13]
    seen = sorted(x for b in train for x in b.item_ids.tolist())
    assert seen == [2, 3, 4, 10, 11, 12]  # training ends before the validation item, nothing >= the cutoff
    streamed = dataclasses.replace(cfg, events=dataclasses.replace(cfg.events, stream=True, num_shards=2))
    train, validation, test = build_loaders(streamed, load_sequences(streamed, progress=False))
    assert sorted(x for b in train for x in b.item_ids.tolist()) == seen
    assert [b.target_ids.tolist() for b in test] == [[6, 21]] and [b.target_ids.tolist() for b in validation] == [[5, 13]]


def _stream_setup(tmp_path, shards=4, users=60):
    f = write_table(tmp_path / "a.parquet", ml1m_like(num_users=users))
    cfg = _cfg(tmp_path, f, f"data.events.num_shards={shards}", "data.events.stream=true", "data.batch_size=8",
               "data.max_seq_len=10")
    return cfg, load_events(cfg.data, progress=False).events


def test_streaming_loader_reads_only_its_shards_and_balances_steps(tmp_path):
    cfg, events = _stream_setup(tmp_path)
    loaders = [ShardedTrainLoader(events, 8, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) > 0
    for r, loader in enumerate(loaders):
        users = np.concatenate([b.user_ids.numpy() for b in loader])
        assert set((users % 4).tolist()) <= {r, r + 2} and users.size == np.unique(users).size
        assert all(b.user_ids.numel() <= 4 for b in loader)
    one = ShardedTrainLoader(events, 8, seed=5)
    epoch0 = np.concatenate([b.user_ids.numpy() for b in one])
    epoch1 = np.concatenate([b.user_ids.numpy() for b in one])
    assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)  # every user, reshuffled
    assert epoch0.size == sum(s["train_users"] for s in events.shards)


def test_streaming_loader_position_resumes_exactly(tmp_path):
    cfg, events = _stream_setup(tmp_path)
    ref = ShardedTrainLoader(events, 8, seed=1, rank=1, world_size=2)
    want = [b.item_ids.tolist() for _ in range(2) for b in ref]
    run = ShardedTrainLoader(events, 8, seed=1, rank=1, world_size=2)
    it = iter(run)
    got = [next(it).item_ids.tolist() for _ in range(3)]
    state = json.loads(json.dumps(run.state_dict()))  # what the checkpoint meta holds
    shard, offset = state["shard"], state["offset"]
    assert state["batches_consumed"] == 3 and shard % 2 == 1 and state["permutation_seed"] == 1
    resumed = ShardedTrainLoader(events, 8, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got += [b.item_ids.tolist() for b in resumed] + [b.item_ids.tolist() for b in resumed]
    assert got == want
    other = ShardedTrainLoader(events, 8, seed=1, rank=0, world_size=1)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(state)


TINY = ["data.max_seq_len=12", "data.batch_size=8", "data.eval_batch_size=32", "data.tie_order=item_id",
        "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2",
        "loss.num_negatives=16", "train.progress=false", "train.tensorboard=false", "train.epochs=2",
        "train.eval_every_epochs=1", "train.log_every_steps=1", "train.num_threads=1", "eval.ks=[1,10]",
        "eval.ndcg_ks=[10]", "eval.selection_metric=ndcg@10"]


def _train(run_dir, *overrides):
    from hstu.trainer.train import train

    return train(load_config(None, [*TINY, f"run_dir={run_dir}", *overrides]))


def test_parity_with_the_ml1m_parser_sequences_and_metrics(tmp_path):
    """The tiny ML-1M-format ratings.dat of the benchmark smoke tests (many same-second ties), exported to Parquet."""
    from hstu.trainer.data.movielens import read_movielens_events
    from test_benchmarks_smoke import _tiny_ml1m

    raw = read_movielens_events("ml-1m", _tiny_ml1m(tmp_path / "ml") / "ratings.dat", progress=False)
    f = write_table(tmp_path / "ml.parquet", {"user_id": raw.user, "item_id": raw.item, "rating": raw.rating,
                                              "timestamp": raw.timestamp})
    events = ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s", "data.events.item_ids=raw",
              "data.events.rating_column=rating", "data.events.num_shards=1", f"data.cache_dir={tmp_path / 'c'}"]
    builtin = ["data.name=ml-1m", f"data.data_dir={tmp_path / 'ml'}", f"data.cache_dir={tmp_path / 'c'}"]
    for tie in ("item_id", "file"):
        a = load_sequences(load_config(None, [*TINY, *events, f"data.tie_order={tie}"]).data, progress=False)
        b = load_sequences(load_config(None, [*TINY, *builtin, f"data.tie_order={tie}"]).data, progress=False)
        for k in ("user_ids", "offsets", "item_ids", "timestamps", "ratings", "num_items"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), (tie, k)
    ref = _train(tmp_path / "builtin", *builtin)
    got = _train(tmp_path / "events", *events)
    streamed = _train(tmp_path / "stream", *events, "data.events.stream=true")
    assert ref.final_metrics == got.final_metrics == streamed.final_metrics
    losses = [[r["loss"] for r in read_metrics(str(tmp_path / d / "metrics.jsonl"), kind="train")]
              for d in ("builtin", "events", "stream")]
    assert losses[0] == losses[1] == losses[2] and len(losses[0]) > 5


class _Killed(BaseException):
    """Stands in for SIGKILL: raised inside a train step, nothing of the step is saved."""


def test_streamed_run_resumes_bit_identically(tmp_path, monkeypatch):
    import hstu.trainer.train as train_mod

    f = write_table(tmp_path / "a.parquet", ml1m_like(num_users=60, seed=2))
    events = ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s", "data.events.num_shards=3",
              "data.events.stream=true", f"data.cache_dir={tmp_path / 'c'}", "checkpoint.every_steps=4",
              "eval.popularity_baseline=false", "train.max_steps=14"]
    _train(tmp_path / "ref", *events)
    real, calls = train_mod.train_step, []

    def dies_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # mid-epoch, 3 steps after the step-4 checkpoint
            raise _Killed()
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", dies_at_step_7)
    with pytest.raises(_Killed):
        _train(tmp_path / "cut", *events)
    monkeypatch.setattr(train_mod, "train_step", real)
    _train(tmp_path / "cut", *events)  # resumes from the step-4 checkpoint
    want = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "ref" / "metrics.jsonl"), kind="train")}
    got = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "cut" / "metrics.jsonl"), kind="train")}
    assert max(want) == 14 and got == want


def test_a_killed_prepare_leaves_a_folder_the_next_one_removes(tmp_path):
    import fcntl
    import time

    f = write_table(tmp_path / "a.parquet", ml1m_like(num_users=10))
    root = tmp_path / "cache" / "events"
    stale, live, young = (root / f".events-{n}.tmp-x" for n in ("stale", "live", "young"))
    for d in (stale, live, young):
        (d / "shards").mkdir(parents=True)
        (d / ".lock").write_bytes(b"")
    old = time.time() - 3600
    for d in (stale, live):
        os.utime(d, (old, old))
    with open(live / ".lock", "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a build in progress (another process)
        summary = prepare(_cfg(tmp_path, f).data, progress=False)
    assert not stale.exists() and live.exists() and young.exists()  # only the old, unlocked one goes
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        os.path.basename(summary["dataset_dir"])]


@pytest.mark.parametrize("split", ["leave_one_out", "time"])
def test_train_view_is_the_split_train_part(tmp_path, split):
    from hstu.trainer.data.events_split import load_shard, split_shard, train_view

    extra = ["data.events.split=time", f"data.events.time_cutoff={956703932 + 40_000_000}"] if split == "time" else []
    cfg = _cfg(tmp_path, write_table(tmp_path / "a.parquet", ml1m_like(num_users=40)), "data.max_seq_len=6", *extra)
    events = load_events(cfg.data, progress=False)
    seqs, num_pre = load_shard(events.events.folder, events.events.shards[0])
    want, got = split_shard(seqs, num_pre, 6).train, train_view(seqs, num_pre, 6)
    assert all(np.array_equal(getattr(want, k), getattr(got, k)) for k in ("user_ids", "offsets", "item_ids"))
    assert got.num_users > 0


def test_streamed_eval_has_the_same_users_on_every_rank(tmp_path):
    from hstu.trainer.data.events_loader import build_events_loaders, eval_user_counts

    cfg, events = _stream_setup(tmp_path, shards=3, users=70)  # ranks hold shards {0, 2} and {1}: unequal
    per_rank = [sum(events.shards[s]["test_users"] for s in events.rank_shards(r, 2)) for r in range(2)]
    assert per_rank[0] > per_rank[1]
    source = load_events(cfg.data, progress=False)
    for cap, want in ((0, min(per_rank)), (7, 7)):
        data_cfg = dataclasses.replace(cfg.data, events=dataclasses.replace(cfg.data.events, eval_users=cap))
        assert eval_user_counts(events, 2, cap)[1] == want
        for rank in range(2):
            _, validation, test = build_events_loaders(data_cfg, source, rank, 2)
            users = np.concatenate([b.user_ids.numpy() for b in test])
            assert users.size == want and set((users % 3).tolist()) <= set(events.rank_shards(rank, 2))


def test_vocabularies_map_raw_ids_both_ways(tmp_path):
    from hstu.trainer.data.events_vocab import IdVocab

    log = _string_log(np.random.default_rng(5))
    f = write_table(tmp_path / "log.parquet", log)
    cfg = _cfg(tmp_path, f, "data.events.user_column=uid", "data.events.item_column=sku", "data.events.time_column=ts",
               "data.events.min_count=3").data
    folder = prepare(cfg, progress=False)["dataset_dir"]
    items, users = IdVocab.load(folder, "items"), IdVocab.load(folder, "users")
    names, counts = np.unique(log["sku"].astype(str), return_counts=True)
    kept = names[counts >= 3]
    oov = kept.size + 1
    assert items.to_ids(list(kept)).tolist() == list(range(1, oov))  # raw-id order
    assert items.to_ids(["never-seen", names[counts < 3][0]]).tolist() == [oov, oov]
    assert items.to_raw([1, oov]) == [kept[0], None]
    assert users.to_ids(sorted(set(log["uid"]))).tolist() == list(range(1, len(set(log["uid"])) + 1))
    assert users.to_ids(["nobody"]).tolist() == [0]


@pytest.mark.parametrize("tie", ["item_id", "random", "file"])
def test_shard_content_does_not_depend_on_the_scan_order(tmp_path, tie):
    """DuckDB returns a partition's rows in any order (parallel scan): the shard must not change with it, even for
    events equal in (user, time, item) that differ in rating."""
    cfg = load_config(None, ["data.name=events", "data.events.paths=[x.parquet]", f"data.tie_order={tie}",
                             "data.events.rating_column=rating"]).data
    n = 60
    rows = {"uid": np.repeat([1, 2], n // 2), "iid": np.tile([3, 3, 4], n // 3), "t": np.tile([5, 5, 5, 6], n // 4),
            "f": np.zeros(n, dtype=np.int32), "r": np.arange(n), "rating": (np.arange(n) % 5).astype(np.int8)}
    shards = []
    for seed in (0, 1):
        perm = np.random.default_rng(seed).permutation(n)
        folder = tmp_path / str(seed)
        folder.mkdir()
        events_prepare._write_shard({k: v[perm] for k, v in rows.items()}, 0, cfg, 4, folder,
                                    {"duplicates": 0, "dropped_duplicates": 0, "short_users": 0})
        z = np.load(folder / "shard-00000.npz")
        shards.append({k: z[k] for k in z.files})
    assert all(np.array_equal(shards[0][k], shards[1][k]) for k in shards[0])


def test_weights_and_context_columns_stored_per_event_and_windowed(tmp_path):
    """Weights and context ids follow their events through sorting, truncation and the time window."""
    from hstu.trainer.data.events_split import load_shard

    n = 30
    user = np.repeat([1, 2], n // 2)
    ts = T0 + np.tile(np.arange(n // 2)[::-1], 2)  # listed newest first: the sort must carry the extras along
    ev = {"user_id": user, "item_id": np.arange(n) % 7 + 1, "timestamp": ts, "w": ts.astype(np.float64) - T0 + 0.5,
          "device": np.array([["ios", "web", None][i % 3] for i in range(n)], dtype=object)}
    f = write_table(tmp_path / "a.parquet", ev)
    for extra in ([], ["data.events.split=time", f"data.events.time_cutoff={T0 + 10}"]):
        cfg = _cfg(tmp_path, f, "data.events.weight_column=w", "data.events.context_columns=[device]",
                   "data.max_seq_len=5", *extra).data
        events = load_events(dataclasses.replace(cfg, events=dataclasses.replace(cfg.events, stream=True)), False)
        folder, manifest = events.events.folder, events.events.manifest
        z = np.load(folder / manifest["shards"][0]["file"])
        seqs, _ = load_shard(folder, manifest["shards"][0])
        assert np.array_equal(z["weights"], (seqs.timestamps - T0 + 0.5).astype(np.float32))  # aligned events
        by_time = {int(t): d for t, d in zip(ev["timestamp"], ev["device"])}  # same device for both users' time t
        vocab = {None: 0, "ios": 1, "web": 2}
        assert z["context_0"].tolist() == [vocab[by_time[int(t)]] for t in seqs.timestamps]
        assert seqs.lengths().tolist() == [7, 7]  # max_seq_len + 2 | 6 before the cutoff + the first after
        assert manifest["per_event_arrays"] == ["weights", "context_0"]
        assert manifest["contexts"][0]["vocab_size"] == 2
