"""Raw ids in serving (issue 17 deliverable 2): `hstu export` of an own-logs run carries the item / user
vocabularies (serving/vocab.py); the loaded model takes raw item ids and returns raw item ids, unknown ids map to
the OOV id (counted, warned), a vocabulary that does not fit the table is an error naming the file."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from events_utils import write_table
from hstu.trainer.config import ConfigError, load_config
from hstu.trainer.data import prepare
from hstu.trainer.data.events_vocab import IdVocab

T0 = 1_000_000_000
TINY = ["data.max_seq_len=12", "data.batch_size=8", "data.eval_batch_size=32", "data.tie_order=item_id",
        "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_heads=2",
        "loss.num_negatives=16", "train.progress=false", "train.tensorboard=false", "train.epochs=1",
        "train.eval_every_epochs=1", "train.log_every_steps=1", "train.num_threads=1", "eval.ks=[1,10]",
        "eval.ndcg_ks=[10]", "eval.selection_metric=ndcg@10"]


def _string_log(n=700, users=30, items=50, seed=3):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    item = np.minimum(rng.zipf(1.3, n), items)
    return {"uid": np.array([f"user-{u:03d}" for u in user], dtype=object),
            "sku": np.array([f"sku-{i}-é" for i in item], dtype=object), "ts": T0 + rng.integers(0, 50_000, n)}


def _events(tmp_path, f, *extra):
    return ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s", "data.events.user_column=uid",
            "data.events.item_column=sku", "data.events.time_column=ts", f"data.cache_dir={tmp_path / 'cache'}",
            *extra]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """prepare -> train (1 tiny epoch) -> export of a string-id log with min_count=2 (an OOV id exists)."""
    from hstu.serving.export import export_run
    from hstu.trainer.train import train

    tmp = tmp_path_factory.mktemp("vocab")
    log = _string_log()
    f = write_table(tmp / "log.parquet", log)
    events = _events(tmp, f, "data.events.min_count=2")
    train(load_config(None, [*TINY, *events, f"run_dir={tmp / 'run'}"]))
    manifest = export_run(str(tmp / "run"), str(tmp / "art"))
    folder = prepare(load_config(None, [*TINY, *events]).data, progress=False)["dataset_dir"]
    return tmp, log, manifest, folder, events


def test_export_carries_vocabularies_and_serving_maps_raw_ids(exported):
    import hstu.serving

    tmp, log, manifest, folder, _ = exported
    items_ref = IdVocab.load(folder, "items")  # the dataset's own map (an independent reader of the Parquet)
    assert manifest["vocabularies"]["items"]["raw_type"] == "string"
    assert manifest["vocabularies"]["items"]["unknown_id"] == manifest["model"]["num_items"]  # the OOV id
    model = hstu.serving.load(str(tmp / "art"))
    oov = model.num_items
    raw_hist = [str(x) for x in log["sku"][:9]]
    ts = list(range(T0, T0 + 9 * 60, 60))
    encoded = items_ref.to_ids(raw_hist)
    assert model.vocab["items"].to_ids(raw_hist).tolist() == encoded.tolist()
    # retrieval: raw in, raw out == encoded retrieval mapped by hand (the OOV id is never returned)
    raw_top, raw_scores = model.retrieve_raw(raw_hist, ts, k=5)
    top = model.retrieve(torch.as_tensor(encoded), torch.as_tensor(ts), k=6)
    keep = [(int(i), float(s)) for i, s in zip(top.ids, top.scores) if int(i) != oov][:5]
    assert raw_top == items_ref.to_raw([i for i, _ in keep])
    assert all(isinstance(r, str) and r.startswith("sku-") for r in raw_top)
    assert torch.allclose(raw_scores, torch.tensor([s for _, s in keep]))
    # ranking: raw candidates score as their ids
    cands = sorted(set(raw_hist))[:4]
    got = model.rank_raw(raw_hist, ts, cands)
    want = model.rank(torch.as_tensor(encoded), torch.as_tensor(ts), torch.as_tensor(items_ref.to_ids(cands)))
    assert torch.allclose(got, want)
    # users: raw user ids both ways, unknown -> 0
    users = model.vocab["users"]
    names = sorted(set(log["uid"]))
    assert users.to_ids(names).tolist() == list(range(1, len(names) + 1))
    assert users.to_raw([1, len(names)]) == [names[0], names[-1]] and users.to_ids(["nobody"]).tolist() == [0]


def test_unknown_raw_ids_map_to_the_oov_id_counted_and_warned(exported, caplog):
    import hstu.serving

    tmp, log, manifest, folder, _ = exported
    model = hstu.serving.load(str(tmp / "art"))
    oov = model.num_items
    names, counts = np.unique(log["sku"].astype(str), return_counts=True)
    rare = str(names[counts < 2][0])  # seen once: below min_count, trained as the OOV id
    hist = [str(names[counts >= 2][0]), "never-seen-item", rare]
    ts = [T0, T0 + 1, T0 + 2]
    with caplog.at_level(logging.WARNING, logger="hstu.serving"):
        ids, _ = model.history_ids(hist, ts)
    assert ids.tolist()[1:] == [oov, oov] and ids[0] != oov
    assert model.vocab["items"].unknown_seen == 2
    assert any("not in the vocabulary" in r.message and "never-seen-item" in r.message for r in caplog.records)
    raw_top, _ = model.retrieve_raw(hist, ts, k=3)
    ref = model.retrieve(torch.as_tensor(ids), torch.as_tensor(ts), k=4)
    assert raw_top == model.vocab["items"].to_raw([i for i in ref.ids.tolist() if i != oov][:3])
    with pytest.raises(ValueError, match="must be strings"):
        model.vocab["items"].to_ids([17])


def test_vocabulary_that_does_not_fit_the_table_is_an_error_naming_the_file(exported, capsys):
    import hstu.serving
    from hstu.serving.artifact import ArtifactError
    from hstu.serving.export import export_run

    tmp, log, manifest, folder, events = exported
    other = prepare(load_config(None, [*TINY, *events[:-1], "data.events.min_count=1"]).data,
                    progress=False)["dataset_dir"]  # another item vocabulary (no rare items: another size)
    with pytest.raises(ConfigError, match=r"items\.parquet.*item ids"):
        export_run(str(tmp / "run"), str(tmp / "bad"), dataset_dir=other)
    from hstu.trainer.cli import main  # the real CLI: one line naming the file, exit status 2, nothing written

    assert main(["export", "--run-dir", str(tmp / "run"), "--out", str(tmp / "bad"), "--dataset-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and os.path.join(str(other), "vocab", "items.parquet") in err
    assert not os.path.exists(tmp / "bad")
    bad = tmp / "art-edited"
    import shutil

    shutil.copytree(tmp / "art", bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["vocabularies"]["items"]["num_ids"] += 1
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"manifest\.json.*vocabularies\.items\.num_ids"):
        hstu.serving.load(str(bad))


def test_integer_raw_ids_and_md5_collisions(tmp_path):
    """item_type=int with item_ids=vocab (sparse int64 raw ids), written by the export writer and read back; and
    two raw ids forced onto the same lookup key are told apart by their bytes."""
    from hstu.serving.vocab import RawIdVocab, export_vocabularies, load_vocabularies

    rng = np.random.default_rng(0)
    n = 400
    raw_items = rng.choice(np.array([10**12 + 7, -5, 3, 2**40, 999]), n)
    f = write_table(tmp_path / "log.parquet", {"user_id": rng.integers(0, 20, n), "item_id": raw_items,
                                               "timestamp": T0 + rng.integers(0, 9000, n)})
    cfg = load_config(None, ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s",
                             f"data.cache_dir={tmp_path / 'c'}", "data.max_seq_len=12"])
    folder = Path(prepare(cfg.data, progress=False)["dataset_dir"])
    num_items = json.loads((folder / "manifest.json").read_text())["num_items"]
    meta, files = export_vocabularies(cfg, {"dataset_dir": str(folder)}, num_items)
    out = tmp_path / "art"
    out.mkdir()
    for name, write in files.items():
        write(str(out / name))
    vocab = load_vocabularies(str(out), {"vocabularies": meta, "model": {"num_items": num_items}})
    items = vocab["items"]
    order = np.sort(np.unique(raw_items))
    assert items.to_ids(order.tolist() + [12345]).tolist() == list(range(1, order.size + 1)) + [num_items]
    assert items.to_raw(range(num_items + 1)) == [None] + order.tolist() + [None]
    with pytest.raises(ValueError, match="must be integers"):
        items.to_ids(["x"])
    # a forced collision: both raw ids share key 7; each still finds its own id
    data = np.frombuffer(b"aaab", dtype=np.uint8)
    v = RawIdVocab("items", "string", 3, 3, np.array([7, 7], dtype=np.uint64), np.array([1, 2]),
                   (np.array([0, 0, 3, 4, 4]), data))
    import hstu.serving.vocab as sv

    real = sv._md5_key
    sv._md5_key = lambda raw: 7
    try:
        assert v.to_ids(["aaa", "b", "c"]).tolist() == [1, 2, 3]
    finally:
        sv._md5_key = real
    assert v.to_raw([0, 1, 2, 3]) == [None, "aaa", "b", None]


def test_raw_id_serving_needs_only_torch_and_numpy_and_maps_the_files(exported):
    """The loader with vocabularies still imports no trainer / modules / ops / duckdb, and the lookup arrays are
    memory-mapped (not read into the process)."""
    import subprocess
    import sys
    import textwrap

    tmp, log, _, _, _ = exported
    hist = [str(x) for x in log["sku"][:5]]
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ("hstu.trainer", "hstu.modules", "hstu.ops", "triton", "torchrec", "fbgemm_gpu", "duckdb")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        import hstu.serving
        m = hstu.serving.load({str(tmp / 'art')!r})
        raw, scores = m.retrieve_raw({hist!r}, list(range(5)), k=3)
        assert len(raw) == 3 and all(isinstance(r, str) for r in raw)
        v = m.vocab["items"]
        assert all(isinstance(a, np.memmap) for a in (v.keys, v.ids) + tuple(v.by_id))
        print("LOADED", sorted(k for k in sys.modules if k.startswith(BLOCKED)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout


def test_export_finds_the_dataset_without_results_json(exported):
    """A run stopped before results.json (only checkpoints): the dataset is found by its cache key."""
    import shutil

    import hstu.serving
    from hstu.serving.export import export_run

    tmp, log, manifest, folder, _ = exported
    run = tmp / "run-no-results"
    shutil.copytree(tmp / "run", run)
    os.remove(run / "results.json")
    m2 = export_run(str(run), str(tmp / "art2"))
    assert m2["vocabularies"]["items"]["source"] == os.path.join(str(folder), "vocab", "items.parquet")
    assert hstu.serving.load(str(tmp / "art2")).vocab["items"].to_raw([1]) == \
        IdVocab.load(folder, "items").to_raw([1])


def test_vocab_scale_benchmark_smoke(tmp_path):
    """benchmarks/vocab_scale.py --smoke runs end to end and writes its JSON to --out (never the real results)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "vocab_scale.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "vocab_scale.json").read_text())
    assert got["ids"] > 19_000 and got["serve"]["unknown_seen"] == 2000
    assert got["export"]["artifact_bytes_per_id"] > 0 and got["serve"]["history_200_to_ids_ms_median"] > 0


def test_raw_item_ids_dataset_is_an_identity_vocabulary(tmp_path):
    """item_ids=raw: the artifact stores no item files (id = raw id); ids outside 1..num_items have no id and are
    left out of a history, counted."""
    from hstu.serving.vocab import RawIdServing, RawIdVocab, export_vocabularies

    rng = np.random.default_rng(1)
    n = 300
    f = write_table(tmp_path / "log.parquet", {"user_id": rng.integers(0, 15, n), "item_id": rng.integers(1, 40, n),
                                               "timestamp": T0 + rng.integers(0, 9000, n)})
    cfg = load_config(None, ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s",
                             "data.events.item_ids=raw", f"data.cache_dir={tmp_path / 'c'}"])
    folder = Path(prepare(cfg.data, progress=False)["dataset_dir"])
    num_items = json.loads((folder / "manifest.json").read_text())["num_items"]
    meta, files = export_vocabularies(cfg, {"dataset_dir": str(folder)}, num_items)
    assert meta["items"]["identity"] and "files" not in meta["items"]
    assert list(files) == ["vocab_users.keys.npy"]  # only the users get files
    serving = RawIdServing()
    serving.vocab, serving.path = {"items": RawIdVocab("items", "int", num_items, 0)}, "x"
    ids, ts = serving.history_ids([3, num_items + 5, 0, 7], [1, 2, 3, 4])
    assert ids.tolist() == [3, 7] and ts.tolist() == [1, 4]
    assert serving.vocab["items"].unknown_seen == 2 and serving.vocab["items"].to_raw([0, 3]) == [None, 3]
