"""`hstu export` of RANKING runs + the standalone loader's ``rank`` (serving/export_ranking.py,
serving/ranking_artifact.py): parity with the training model on recorded pairs and on fresh requests (the trainer's
batch format), batch calls, torch-only imports, precise errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import hstu.serving
from hstu.modules.ranking import HSTURankingModel, RankingSpec
from hstu.serving.artifact import ArtifactError
from hstu.serving.export import export_run
from hstu.serving.export_ranking import reference_rank_outputs
from hstu.serving.ranking import RankingHistory, RankingMFalcon
from hstu.trainer import run_dir as rd
from hstu.trainer.cli import main
from hstu.trainer.config import RunConfig, save_config
from hstu.trainer.data.synthetic_ranking import generate_ranking
from hstu.trainer.ranking_config import SyntheticRankingConfig
from test_serving_ranking import MAX_LEN, MAX_SIDE, history_of, make_model, training_batch

TOL = dict(rtol=1e-4, atol=1e-5)
ML1M_SPEC = RankingSpec(num_items=80, num_actions=5, contextual_vocab=(3, 8, 22, 30), side_vocab=(),
                        task_names=("like", "love"), regression=True, max_tokens=4 + 2 * MAX_LEN + 1)


@pytest.fixture(scope="module")
def data():
    return generate_ranking(SyntheticRankingConfig(num_users=5, num_items=60, num_clusters=3, creators_per_cluster=2,
                                                   min_seq_len=14, max_seq_len=18, follow_prob=0.4, seed=3))


def _config(path, dataset, variant, arch="hstu"):
    cfg = RunConfig()
    cfg.task, cfg.run_dir, cfg.data.name, cfg.data.max_seq_len = "ranking", str(path), dataset, MAX_LEN
    cfg.ranking.max_side_tokens, cfg.ranking.regression_weight = MAX_SIDE, 0.5
    m = cfg.model
    m.arch, m.variant, m.embedding_dim, m.num_layers, m.num_heads, m.attention_dim, m.linear_dim = \
        arch, variant, 16, 2, 2, 8, 8
    os.makedirs(path, exist_ok=True)
    save_config(cfg, os.path.join(path, rd.CONFIG_FILE))
    return cfg


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, data):
    """research, side series, fp32, written by the CLI from RUN_DIR/best.pt."""
    root = tmp_path_factory.mktemp("rank-syn")
    _config(root / "run", "synthetic", "research")
    model = make_model(data, "research")
    rd.save_state_dict(model, str(root / "run" / rd.CHECKPOINT_FILE))
    out = str(root / "art")
    assert main(["export", "--run-dir", str(root / "run"), "--out", out]) == 0
    return model, out


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory):
    """production, 4 contextual features, no side series, regression head, int8, from a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("rank-ml1m")
    cfg = _config(root / "run", "ml-1m", "production")
    torch.manual_seed(5)
    model = HSTURankingModel(cfg.model, ML1M_SPEC).eval()
    ck = root / "run" / "checkpoints"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "meta": "{}"}, storage_writer=dcp.FileSystemWriter(str(ck / "step_3")))
    (ck / "latest").write_text("step_3\n")
    out = str(root / "art")
    # a bare DCP directory (no manifest.json, unlike trainer/checkpoint.py's): loaded when named explicitly
    export_run(str(root / "run"), out, embedding_dtype="int8", checkpoint=str(ck / "step_3"))
    return model, out


def test_artifact_files_and_metadata(synthetic, ml1m):
    out = synthetic[1]
    assert sorted(os.listdir(out)) == ["config.json", "config.yaml", "dense_extend.pt2", "dense_score.pt2",
                                       "manifest.json", "records.pt", "tables.pt"]
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["format_version"] == 3 and man["task"] == "ranking" and man["model"]["max_seq_len"] == MAX_LEN
    r = man["ranking"]
    assert r["task_names"] == ["click", "like", "share", "complete"] and r["regression"]
    assert [c["name"] for c in r["contextual"]] == ["country", "age_group"]
    assert [c["name"] for c in r["side"]] == ["creator", "region"] and r["actions"]["vocab"] == 17
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]
    man = json.load(open(os.path.join(ml1m[1], "manifest.json")))
    assert [c["name"] for c in man["ranking"]["contextual"]] == ["gender", "age", "occupation", "zip"]
    assert man["embedding"]["dtype"] == "int8" and man["ranking"]["regression_name"] == "rating"
    assert man["source"]["checkpoint"].endswith("step_3") and man["quantization_max_abs_logit_error"] < 0.05


def test_synthetic_artifact_matches_training_model(synthetic, data):
    model, out = synthetic
    sm = hstu.serving.load(out, task="ranking")  # replays the recorded pairs
    assert max(sm.verify().values()) < 1e-4
    g = np.random.default_rng(1)
    for u, e in [(0, 2), (2, 11), (4, 14)]:
        hist = history_of(data, u, e)
        qt = int(hist.timestamps[-1]) + 300
        cand = g.integers(1, data.num_items + 1, 9)
        got = sm.rank({"item_ids": hist.item_ids, "actions": hist.actions, "timestamps": hist.timestamps,
                       "context": hist.context, "side": hist.side}, cand, query_time=qt, micro_batch=4)
        with torch.no_grad():
            logits, reg = model(training_batch(data, u, e, cand, np.full(9, qt), alone=True))
        torch.testing.assert_close(got.logits, logits, **TOL)
        torch.testing.assert_close(got.regression, reg, **TOL)
        torch.testing.assert_close(got.probabilities, torch.sigmoid(logits), **TOL)
    hists = [history_of(data, u, e) for u, e in [(1, 4), (3, 16)]]
    cands = [np.array([4, 8]), np.arange(1, 41)]
    for h, c, got in zip(hists, cands, sm.rank_batch(hists, cands)):
        assert torch.equal(got.logits, sm.rank(h, c).logits)


def test_int8_dcp_artifact_matches_training_model(ml1m):
    model, out = ml1m
    sm = hstu.serving.load(out)
    eng = RankingMFalcon.from_model(model, max_seq_len=MAX_LEN, max_side_tokens=0)
    ref = RankingMFalcon.from_model(model, max_seq_len=MAX_LEN, max_side_tokens=0)
    for t, mine in zip(ref.tables.named().values(), sm.engine.tables.named().values()):
        t.weight = mine.lookup(torch.arange(mine.num_rows))  # the artifact's dequantised rows
    g = torch.Generator().manual_seed(3)
    for n in (1, 6, MAX_LEN + 4):
        h = RankingHistory(torch.randint(1, 81, (n,), generator=g), torch.randint(1, 6, (n,), generator=g),
                           1_000_000 + torch.randint(0, 9_999, (n,), generator=g).cumsum(0), [1, 0, 21, 29])
        cand, qt = torch.randint(1, 81, (12,), generator=g), int(h.timestamps[-1]) + 86_400
        cts = qt + torch.arange(12) * 1000  # production: per-candidate impression times
        got = sm.rank(h, cand, query_time=qt, candidate_timestamps=cts)
        torch.testing.assert_close(got.logits, ref.rank(ref.encode(h, qt), cand, cts).logits, **TOL)
        torch.testing.assert_close(got.logits, eng.rank(eng.encode(h, qt), cand, cts).logits, atol=0.05, rtol=0)
        assert got.regression.shape == (12,) and got.probabilities.shape == (12, 2)
        with torch.no_grad():  # and the training model's forward (candidates at qt)
            logits, _ = reference_rank_outputs(model, eng, h, cand, qt)
        torch.testing.assert_close(sm.rank(h, cand, query_time=qt).logits, logits, atol=0.05, rtol=0)


def _same_state(a, b, tol):
    for name in ("ids", "kinds", "features", "paired", "timestamps", "positions", "gaps"):
        assert torch.equal(getattr(a.layout, name), getattr(b.layout, name)), name
    assert a.query_time == b.query_time and a.recomputed == b.recomputed
    torch.testing.assert_close(a.k, b.k, **tol)
    torch.testing.assert_close(a.v, b.v, **tol)


def test_artifact_append(synthetic, ml1m, data):
    """The artifact's ``append`` (exported programs) equals the in-process one and its own full encode."""
    model, out = synthetic
    sm = hstu.serving.load(out, task="ranking", verify=False)
    eng = RankingMFalcon.from_model(model, max_seq_len=MAX_LEN, max_side_tokens=MAX_SIDE, side_names=data.side.names)
    h = history_of(data, 2, 16)
    cand = np.arange(1, 20)
    for n, k in [(3, 1), (4, 3), (7, 4)]:  # no side token in the gap / side tokens merged in / window shift
        new = {"item_ids": h.item_ids[n:n + k], "actions": h.actions[n:n + k], "timestamps": h.timestamps[n:n + k]}
        first = RankingHistory(h.item_ids[:n], h.actions[:n], h.timestamps[:n], h.context, h.side)
        got, mine = sm.append(sm.encode(first), new), eng.append(eng.encode(first), new)
        whole = RankingHistory(h.item_ids[:n + k], h.actions[:n + k], h.timestamps[:n + k], h.context, h.side)
        _same_state(got, mine, TOL)
        torch.testing.assert_close(sm.rank_state(got, cand).logits, sm.rank(whole, cand).logits, **TOL)
        torch.testing.assert_close(sm.rank_state(got, cand).logits, eng.rank(mine, cand).logits, **TOL)
        if n + k <= MAX_LEN and n == 3:
            assert got.recomputed == 2 * k + 1  # research: + the old last row
        if n + k > MAX_LEN:
            assert got.recomputed == got.length
    model, out = ml1m  # production, 4 contextual features, int8 tables
    sm = hstu.serving.load(out, verify=False)
    g = torch.Generator().manual_seed(4)
    ids, acts = torch.randint(1, 81, (9,), generator=g), torch.randint(1, 6, (9,), generator=g)
    ts = 1_000_000 + torch.randint(1, 9_999, (9,), generator=g).cumsum(0)
    st = sm.encode(RankingHistory(ids[:5], acts[:5], ts[:5], [1, 0, 21, 29]))
    st = sm.append(st, (ids[5:6], acts[5:6], ts[5:6]))
    assert st.recomputed == 2
    st = sm.append(st, {"item_ids": ids[6:8], "actions": acts[6:8], "timestamps": ts[6:8]}, query_time=int(ts[7]) + 60)
    assert st.recomputed == 4  # production: no layer reads the query time
    ref = sm.encode(RankingHistory(ids[:8], acts[:8], ts[:8], [1, 0, 21, 29]), int(ts[7]) + 60)
    _same_state(sm.append(ref, (ids[8:], acts[8:], ts[8:])), sm.encode(RankingHistory(ids, acts, ts, [1, 0, 21, 29])),
                TOL)  # the 9th event shifts the window (MAX_LEN = 8): re-encoded
    _same_state(dataclasses.replace(st, recomputed=ref.recomputed), ref, TOL)
    torch.testing.assert_close(sm.rank_state(st, cand).logits, sm.rank_state(ref, cand).logits, **TOL)


def test_ranking_loader_needs_only_torch(synthetic):
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ("hstu.trainer", "hstu.modules", "hstu.ops", "triton", "torchrec", "fbgemm_gpu")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import hstu.serving
        m = hstu.serving.load({synthetic[1]!r})
        h = dict(item_ids=[1, 2, 3], actions=[1, 4, 2], timestamps=[10, 20, 30], context=[1, 2],
                 side={{"creator": ([2, 2, 3], [5, 15, 25])}})
        assert m.rank(h, [4, 5]).probabilities.shape == (2, 4)
        assert len(m.rank_batch([h, h], [[1], [2, 3]])) == 2
        st = m.append(m.encode(h), dict(item_ids=[7], actions=[3], timestamps=[40]))
        assert st.recomputed == 3 and m.rank_state(st, [4]).logits.shape == (1, 4)
        print("LOADED", sorted(k for k in sys.modules if k.startswith(BLOCKED)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout


def test_ranking_errors(synthetic, tmp_path, capsys):
    out = synthetic[1]
    with pytest.raises(ArtifactError, match=r"field task = 'ranking', but a 'retrieval' artifact was asked for"):
        hstu.serving.load(out, task="retrieval")
    sm = hstu.serving.load(out, verify=False)
    with pytest.raises(ArtifactError, match="a ranking artifact has no catalog retrieval"):
        sm.retrieve([1], [1], 5)
    art = str(tmp_path / "copy")
    shutil.copytree(out, art)
    os.remove(os.path.join(art, "tables.pt"))
    with pytest.raises(ArtifactError, match=r"tables\.pt: missing file"):
        hstu.serving.load(art)
    shutil.rmtree(art)
    shutil.copytree(out, art)
    mp = os.path.join(art, "manifest.json")
    man = json.load(open(mp))
    man["embedding"]["tables"]["actions"] = [5, 16]
    json.dump(man, open(mp, "w"))
    with pytest.raises(ArtifactError, match=r"tables\.pt: field actions\.weight is torch\.float32 \(17, 16\)"):
        hstu.serving.load(art)
    man["format_version"] = 7
    json.dump(man, open(mp, "w"))
    with pytest.raises(ArtifactError, match="format_version = 7"):
        hstu.serving.load(art)
    run = tmp_path / "dlrm"
    _config(run, "synthetic", "production", arch="dlrm")
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "model.arch 'dlrm'" in capsys.readouterr().err
