"""Raw ids in RANKING serving (issue 17 deliverable 2): `hstu export` of an own-logs task=ranking run carries the
item / user / context-column vocabularies (serving/export_ranking.py + serving/vocab.py); the loaded ranker takes
raw item ids (history and candidates) and raw context values and returns scores keyed by the raw candidate ids
(serving/ranking_artifact.py rank_raw); unknown ids -> the OOV id (counted, warned); a vocabulary that does not
fit its table is a one-line error naming the file."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from events_utils import write_table
from hstu.trainer.config import ConfigError, load_config

T0 = 1_000_000_000
TINY = ["task=ranking", "data.max_seq_len=16", "data.batch_size=8", "data.eval_batch_size=16",
        "data.tie_order=item_id", "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8",
        "model.num_heads=2", "model.num_layers=1", "ranking.num_eval_targets=3", "ranking.head_hidden_dim=8",
        "ranking.regression_weight=0.5", "train.progress=false", "train.tensorboard=false", "train.epochs=1",
        "train.eval_every_epochs=1", "train.log_every_steps=1", "train.num_threads=1",
        "eval.selection_metric=ne_mean"]
DEVICES = ["web", "android", "ios"]  # context vocabulary: ids by raw order -> android 1, ios 2, web 3


def _string_log(n=600, users=25, items=40, seed=7):
    rng = np.random.default_rng(seed)
    item = np.minimum(rng.zipf(1.4, n), items)
    return {"uid": np.array([f"u-{u:02d}" for u in rng.integers(0, users, n)], dtype=object),
            "sku": np.array([f"sku-{i}-ü" for i in item], dtype=object),
            "rating": rng.integers(1, 6, n), "ts": T0 + rng.permutation(n) * 7,
            "device": np.array([DEVICES[d] for d in rng.integers(0, 3, n)], dtype=object)}


def _events(tmp, f, *extra):
    return ["data.name=events", f"data.events.paths=[{f}]", "data.events.time_unit=s", "data.events.user_column=uid",
            "data.events.item_column=sku", "data.events.time_column=ts", "data.events.rating_column=rating",
            "data.events.context_columns=[device]", f"data.cache_dir={tmp / 'cache'}", *extra]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """prepare -> tiny ranking train -> export of a string-id log with min_count=2 (an OOV id exists)."""
    from hstu.serving.export import export_run
    from hstu.trainer.data import prepare
    from hstu.trainer.data.ranking import ranking_data_config
    from hstu.trainer.train import train

    tmp = tmp_path_factory.mktemp("rankvocab")
    log = _string_log()
    f = write_table(tmp / "log.parquet", log)
    events = _events(tmp, f, "data.events.min_count=2")
    train(load_config(None, [*TINY, *events, f"run_dir={tmp / 'run'}"]))
    manifest = export_run(str(tmp / "run"), str(tmp / "art"))
    cfg = load_config(None, [*TINY, *events])
    folder = prepare(ranking_data_config(cfg), progress=False)["dataset_dir"]  # the folder it trained on
    return tmp, log, manifest, folder, events


def _history(log, n=9):
    return [str(x) for x in log["sku"][:n]], [1 + (i % 5) for i in range(n)], [T0 + 60 * i for i in range(n)]


def test_rank_raw_equals_rank_of_the_ids_mapped_by_hand(exported):
    import hstu.serving
    from hstu.trainer.data.events_vocab import IdVocab

    tmp, log, manifest, folder, _ = exported
    voc = manifest["vocabularies"]
    assert voc["items"]["raw_type"] == "string" and voc["items"]["unknown_id"] == manifest["model"]["num_items"]
    assert voc["context0"]["column"] == "device" and voc["context0"]["num_ids"] == 3
    assert manifest["ranking"]["contextual"] == [{"name": "device", "vocab": 4, "vocabulary": "context0"}]
    model = hstu.serving.load(str(tmp / "art"), task="ranking")
    assert model.context_names == ("device",)
    items_ref = IdVocab.load(folder, "items")  # the dataset's own map (an independent reader of the Parquet)
    raw, acts, ts = _history(log)
    cands = sorted(set(str(x) for x in log["sku"]))[:6]
    got = model.rank_raw({"item_ids": raw, "actions": acts, "timestamps": ts, "context": {"device": "ios"}}, cands,
                         query_time=ts[-1] + 30)
    want = model.rank({"item_ids": items_ref.to_ids(raw), "actions": acts, "timestamps": ts,
                       "context": [sorted(DEVICES).index("ios") + 1]},
                      torch.as_tensor(items_ref.to_ids(cands)), query_time=ts[-1] + 30)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.probabilities, want.probabilities)
    assert torch.equal(got.regression, want.regression)
    scores = got.by_candidate()
    assert list(scores) == cands and set(scores[cands[0]]) == {"like", "regression"}
    assert scores[cands[2]]["like"] == pytest.approx(float(want.probabilities[2, 0]))
    # a context given as a sequence of raw values in context_names order, ints / numpy arrays of raw ids
    again = model.rank_raw((np.array(raw, dtype=object), acts, ts, ["ios"]), np.array(cands, dtype=object),
                           query_time=ts[-1] + 30)
    assert torch.equal(again.logits, got.logits) and again.candidates == cands
    # a missing context column is the null id 0, as a user without a value trained
    null = model.rank_raw({"item_ids": raw, "actions": acts, "timestamps": ts, "context": {}}, cands)
    ref = model.rank({"item_ids": items_ref.to_ids(raw), "actions": acts, "timestamps": ts, "context": [0]},
                     torch.as_tensor(items_ref.to_ids(cands)))
    assert torch.equal(null.logits, ref.logits) and not torch.equal(null.logits, got.logits)
    # incremental: append of raw new events (no context: the state's) == encode_raw of the whole history
    state = model.encode_raw({"item_ids": raw[:6], "actions": acts[:6], "timestamps": ts[:6], "context": ["ios"]})
    state = model.append(state, model.raw_history({"item_ids": raw[6:], "actions": acts[6:], "timestamps": ts[6:]}),
                         query_time=ts[-1] + 30)
    assert torch.allclose(model.rank_state(state, torch.as_tensor(items_ref.to_ids(cands))).logits, got.logits,
                          atol=1e-5)
    # users: raw user ids both ways
    names = sorted(set(log["uid"]))
    assert model.vocab["users"].to_ids(names).tolist() == list(range(1, len(names) + 1))


def test_unknown_raw_ids_map_to_the_oov_id_counted_and_warned(exported, caplog):
    import hstu.serving
    from hstu.serving.vocab import RawIdVocab

    tmp, log, _, _, _ = exported
    model = hstu.serving.load(str(tmp / "art"), task="ranking")
    oov = model.num_items
    names, counts = np.unique(log["sku"].astype(str), return_counts=True)
    known, rare = str(names[counts >= 2][0]), str(names[counts < 2][0])  # rare: below min_count, trained as OOV
    known_id = int(model.vocab["items"].to_ids([known])[0])
    model.vocab["items"].unknown_seen = 0
    hist = {"item_ids": [known, "never-seen", rare], "actions": [1, 2, 3], "timestamps": [T0, T0 + 1, T0 + 2],
            "context": {"device": "smart-fridge"}}
    with caplog.at_level(logging.WARNING, logger="hstu.serving"):
        got = model.rank_raw(hist, [known, "also-unknown"])
    assert model.vocab["items"].unknown_seen == 3  # 2 in the history + 1 candidate
    assert model.vocab["context0"].unknown_seen == 1
    text = " | ".join(r.message for r in caplog.records)
    assert "never-seen" in text and "also-unknown" in text and "smart-fridge" in text
    ref = model.rank({"item_ids": [known_id, oov, oov], "actions": [1, 2, 3], "timestamps": [T0, T0 + 1, T0 + 2],
                      "context": [0]}, torch.tensor([known_id, oov]))
    assert torch.equal(got.logits, ref.logits)
    with pytest.raises(ValueError, match="must be strings"):
        model.rank_raw(hist, [17])
    with pytest.raises(ValueError, match="unknown column"):
        model.rank_raw({**hist, "context": {"country": "fr"}}, [known])
    # item_ids=raw (identity vocabulary, no OOV id): unknown history events are left out (action and time too),
    # unknown candidates refused
    model.vocab["items"] = RawIdVocab("items", "int", oov, 0)
    ids = {"item_ids": [3, oov + 5, 4], "actions": [1, 2, 3], "timestamps": [T0, T0 + 1, T0 + 2], "context": [None]}
    got = model.rank_raw(ids, [5, 6])
    ref = model.rank({"item_ids": [3, 4], "actions": [1, 3], "timestamps": [T0, T0 + 2], "context": [0]}, [5, 6])
    assert torch.equal(got.logits, ref.logits)
    with pytest.raises(ValueError, match="not an item of this model"):
        model.rank_raw(ids, [5, oov + 1])


def test_vocabulary_that_does_not_fit_the_table_is_an_error_naming_the_file(exported, capsys):
    import hstu.serving
    from hstu.serving.artifact import ArtifactError
    from hstu.serving.export import export_run
    from hstu.trainer.cli import main
    from hstu.trainer.data import prepare
    from hstu.trainer.data.ranking import ranking_data_config

    tmp, log, _, _, events = exported
    other = prepare(ranking_data_config(load_config(None, [*TINY, *events[:-1], "data.events.min_count=1"])),
                    progress=False)["dataset_dir"]  # another item vocabulary (no rare items: another size)
    with pytest.raises(ConfigError, match=r"items\.parquet.*item ids"):
        export_run(str(tmp / "run"), str(tmp / "bad"), dataset_dir=other)
    assert main(["export", "--run-dir", str(tmp / "run"), "--out", str(tmp / "bad"), "--dataset-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and os.path.join(str(other), "vocab", "items.parquet") in err
    assert not os.path.exists(tmp / "bad")
    for field, match in (("items", r"manifest\.json.*vocabularies\.items\.num_ids"),
                         ("context0", r"manifest\.json.*vocabularies\.context0\.num_ids = 4 .*contextual table 0")):
        bad = tmp / f"art-edited-{field}"
        shutil.copytree(tmp / "art", bad)
        m = json.loads((bad / "manifest.json").read_text())
        m["vocabularies"][field]["num_ids"] += 1
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ArtifactError, match=match):
            hstu.serving.load(str(bad), task="ranking")


def test_context_column_of_another_size_is_an_export_error(exported, tmp_path):
    """A prepared dataset with the same items but another context vocabulary: the error names its file."""
    from hstu.serving.export import export_run
    from hstu.trainer.data import prepare
    from hstu.trainer.data.ranking import ranking_data_config

    tmp, log, _, _, events = exported
    edited = dict(log, device=np.where(log["device"] == "web", "tv", log["device"]).astype(object))
    edited["device"][0] = "car"  # 4 values now
    f = write_table(tmp_path / "log.parquet", edited)
    other = prepare(ranking_data_config(load_config(None, [*TINY, *_events(tmp, f, "data.events.min_count=2")])),
                    progress=False)["dataset_dir"]
    with pytest.raises(ConfigError, match=r"context-device\.parquet: 4 values of context column 'device'"):
        export_run(str(tmp / "run"), str(tmp_path / "bad"), dataset_dir=other)


def test_raw_id_ranking_needs_only_torch_and_numpy(exported):
    """The loader with vocabularies imports no trainer / modules / ops / duckdb (a serving box has none)."""
    import subprocess
    import sys
    import textwrap

    tmp, log, _, _, _ = exported
    raw, acts, ts = _history(log, 5)
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ("hstu.trainer", "hstu.modules", "hstu.ops", "triton", "torchrec", "fbgemm_gpu", "duckdb")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import hstu.serving
        m = hstu.serving.load({str(tmp / 'art')!r}, task="ranking")
        out = m.rank_raw({{"item_ids": {raw!r}, "actions": {acts!r}, "timestamps": {ts!r},
                           "context": {{"device": "web"}}}}, {raw[:3]!r})
        assert set(out.by_candidate()) == set({raw[:3]!r})
        print("LOADED", sorted(k for k in sys.modules if k.startswith(BLOCKED)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout


def test_export_finds_the_dataset_from_results_json_when_the_sources_moved(exported):
    """The ranking run records its prepared dataset (results.json data.dataset_dir): export still finds the
    vocabularies when the config's source files are gone (the cache key can no longer be computed)."""
    import hstu.serving
    from hstu.serving.export import export_run

    tmp, log, manifest, folder, _ = exported
    assert json.loads((tmp / "run" / "results.json").read_text())["data"]["dataset_dir"] == str(folder)
    run = tmp / "run-moved"
    shutil.copytree(tmp / "run", run)
    cfg = (run / "config.yaml").read_text()
    assert str(tmp / "log.parquet") in cfg
    (run / "config.yaml").write_text(cfg.replace(str(tmp / "log.parquet"), str(tmp / "moved.parquet")))
    m = export_run(str(run), str(tmp / "art-moved"))
    assert m["vocabularies"]["items"]["source"] == os.path.join(str(folder), "vocab", "items.parquet")
    assert hstu.serving.load(str(tmp / "art-moved"), task="ranking").vocab["items"].to_raw([1]) == \
        hstu.serving.load(str(tmp / "art"), task="ranking").vocab["items"].to_raw([1])


def test_contextual_names_follow_the_selection_order():
    """ranking.contextual=[age, gender] builds the tables in that order (select_features): the manifest names
    must too (before: the dataset's order, gender then age, naming each table wrongly); own logs: the columns."""
    from hstu.serving.export_ranking import ranking_spec_from_state

    def state(ctx_rows, tasks):
        s = {"tables.items.table.weight": torch.zeros(11, 4), "tables.actions.weight": torch.zeros(6, 4),
             "head.out.weight": torch.zeros(tasks, 8), "head.hidden.weight": torch.zeros(8, 4),
             "position_embeddings.weight": torch.zeros(40, 4)}
        s.update({f"tables.contextual.{i}.weight": torch.zeros(r, 4) for i, r in enumerate(ctx_rows)})
        return s

    cfg = load_config(None, ["task=ranking", "data.name=ml-1m", "ranking.contextual=[age,gender]"])
    assert ranking_spec_from_state(cfg, state([8, 3], 2))[1] == ("age", "gender")
    own = load_config(None, ["task=ranking", "data.name=events", "data.events.paths=[x.parquet]",
                             "data.events.rating_column=r", "data.events.context_columns=[device,country]"])
    assert ranking_spec_from_state(own, state([4, 9], 1))[1] == ("device", "country")
