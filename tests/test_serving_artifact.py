"""`hstu export` + the standalone loader (serving/export.py, serving/artifact.py): parity with the training model,
torch-only imports, atomic writes, DCP checkpoints, and precise errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import hstu.serving
from hstu.modules.model import build_model
from hstu.serving.artifact import ArtifactError
from hstu.serving.export import export_run, reference_rank_scores, reference_user_vector
from hstu.serving.retrieval import ItemTable, brute_force_topk
from hstu.trainer import run_dir as rd
from hstu.trainer.cli import main
from hstu.trainer.config import ConfigError, RunConfig, save_config

NUM_ITEMS, MAX_LEN = 500, 16
TOL = dict(rtol=1e-4, atol=1e-5)


def _run_dir(path, variant, seed):
    cfg = RunConfig()
    cfg.run_dir = str(path)
    cfg.data.max_seq_len = MAX_LEN
    m = cfg.model
    m.variant, m.embedding_dim, m.num_layers, m.num_heads, m.attention_dim, m.linear_dim = variant, 16, 2, 2, 8, 8
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_ITEMS).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weights" in name or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    save_config(cfg, os.path.join(path, rd.CONFIG_FILE))
    return cfg, model


@pytest.fixture(scope="module")
def research(tmp_path_factory):
    """fp32 artifact written by the CLI from RUN_DIR/best.pt."""
    root = tmp_path_factory.mktemp("research")
    cfg, model = _run_dir(root / "run", "research", 0)
    rd.save_state_dict(model, str(root / "run" / rd.CHECKPOINT_FILE))
    out = str(root / "art")
    assert main(["export", "--run-dir", str(root / "run"), "--out", out]) == 0
    return model, out


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """int8 artifact from a DCP checkpoint directory (no best.pt): the sharded-checkpoint hook."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("production")
    cfg, model = _run_dir(root / "run", "production", 1)
    ck = root / "run" / "checkpoints"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed ... single process": intended here
        dcp.save({"model": model.state_dict(), "meta": "{}"},
                 storage_writer=dcp.FileSystemWriter(str(ck / "step_00000007")))
    (ck / "latest").write_text("step_00000007\n")
    out = str(root / "art")
    # a DCP directory without manifest.json (another tool's): never picked by `latest`, loaded when named
    with pytest.raises(ConfigError, match="manifest.json: missing"):
        export_run(str(root / "run"), out, embedding_dtype="int8")
    export_run(str(root / "run"), out, embedding_dtype="int8", checkpoint=str(ck / "step_00000007"))
    return model, out


def _request(seed, n):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, NUM_ITEMS + 1, (n,), generator=g)
    ts = 1_650_000_000 + torch.randint(0, 50_000, (n,), generator=g).cumsum(0)
    return ids, ts, torch.randint(1, NUM_ITEMS + 1, (20,), generator=g)


def test_cli_export_writes_complete_artifact(research, capsys):
    _, out = research
    names = sorted(os.listdir(out))
    assert names == ["config.json", "config.yaml", "dense_extend.pt2", "dense_score.pt2", "item_factor.bin",
                     "item_table.bin", "manifest.json", "records.pt"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["format"] == "hstu-serving" and manifest["format_version"] == 3
    assert manifest["task"] == "retrieval"
    assert manifest["model"]["num_items"] == NUM_ITEMS and manifest["model"]["max_seq_len"] == MAX_LEN
    assert manifest["model"]["variant"] == "research" and manifest["embedding"]["dtype"] == "fp32"
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]  # no temp dir left behind
    run = os.path.join(os.path.dirname(out), "run")
    assert main(["export", "--run-dir", run, "--out", out]) == 2
    assert "--force" in capsys.readouterr().err
    marker = os.path.join(out, "stale")
    open(marker, "w").close()
    assert main(["export", "--run-dir", run, "--out", out, "--force"]) == 0  # replaced as a whole
    assert json.loads(capsys.readouterr().out)["embedding_dtype"] == "fp32"
    assert not os.path.exists(marker) and not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]


@pytest.mark.parametrize("which", ["research", "production"])
def test_loaded_model_matches_training_model(which, research, production):
    model, out = {"research": research, "production": production}[which]
    sm = hstu.serving.load(out)  # replays the recorded pairs (raises on mismatch)
    errs = sm.verify()
    assert max(errs.values()) < 1e-4
    # the training model with the artifact's (dequantised) rows = what the artifact must reproduce exactly
    table = sm.table
    ref = build_model(_cfg_of(sm), NUM_ITEMS).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.item_embeddings.table.weight.copy_(table.lookup(torch.arange(NUM_ITEMS + 1)))
    for seed, n in [(1, 1), (2, 9), (3, MAX_LEN), (4, MAX_LEN + 5)]:
        ids, ts, cand = _request(seed, n)
        qt = int(ts[-1]) + 600
        h_ids, h_ts = ids[-MAX_LEN:], ts[-MAX_LEN:]
        torch.testing.assert_close(sm.rank(ids, ts, cand, query_time=qt),
                                   reference_rank_scores(ref, h_ids, h_ts, qt, cand), **TOL)
        uv = reference_user_vector(ref, h_ids, h_ts, qt)
        top = sm.retrieve(ids, ts, 15, query_time=qt)
        truth = brute_force_topk(uv, table, 15)
        assert torch.equal(top.ids, truth.ids)
        with torch.no_grad():
            torch.testing.assert_close(top.scores, ref.item_vectors(top.ids) @ uv, **TOL)
        excl = sm.retrieve(ids, ts, 15, query_time=qt, exclude_history=True)
        assert not set(excl.ids.tolist()) & set(h_ids.tolist())
        if which == "production":  # int8 table: close to the fp32 training model too
            torch.testing.assert_close(sm.rank(ids, ts, cand, query_time=qt),
                                       reference_rank_scores(model, h_ids, h_ts, qt, cand), atol=2e-2, rtol=0)
    # incremental user state through the exported programs
    ids, ts, cand = _request(9, 12)
    state = sm.encode(ids[:5], ts[:5])
    state = sm.append(state, ids[5:6], ts[5:6])
    state = sm.append(state, ids[6:12], ts[6:12])
    torch.testing.assert_close(sm.rank_state(state, cand), reference_rank_scores(ref, ids, ts, int(ts[-1]), cand),
                               **TOL)


def test_rank_batch_equals_per_user_calls(research):
    sm = hstu.serving.load(research[1])
    reqs = [_request(s, n) for s, n in [(11, 3), (12, MAX_LEN + 2), (13, 1)]]
    cands = [reqs[0][2], reqs[1][2][:3], torch.arange(1, NUM_ITEMS + 1)]  # jagged: 20, 3, all items
    qts = [None, int(reqs[1][1][-1]) + 60, None]
    out = sm.rank_batch([(ids, ts) for ids, ts, _ in reqs], cands, query_times=qts, micro_batch=7)
    for (ids, ts, _), c, qt, got in zip(reqs, cands, qts, out):
        assert torch.equal(got, sm.rank(ids, ts, c, query_time=qt, micro_batch=7))
    with pytest.raises(ValueError, match="query_times"):
        sm.rank_batch([(ids, ts) for ids, ts, _ in reqs], cands, query_times=[None])


def _cfg_of(sm):
    cfg = RunConfig()
    cfg.data.max_seq_len = sm.max_seq_len
    for k in ("variant", "embedding_dim", "num_layers", "num_heads", "attention_dim", "linear_dim"):
        setattr(cfg.model, k, sm.config["model"][k])
    return cfg


def test_loader_needs_only_torch(research):
    _, out = research
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ("hstu.trainer", "hstu.modules", "hstu.ops", "triton", "torchrec", "fbgemm_gpu")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        import hstu.serving
        m = hstu.serving.load({out!r})
        assert m.rank([1, 2, 3], [10, 20, 30], [4, 5]).shape == (2,)
        assert m.retrieve([1, 2, 3], [10, 20, 30], 5).ids.shape == (5,)
        bad = sorted(k for k in sys.modules if k.startswith(BLOCKED))
        print("LOADED", bad)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout


def _copy(out, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(out, dst)
    return dst


def _rewrite(art, name, mutate):
    """Change one JSON file and re-record its checksum (a consistent but wrong artifact)."""
    from hstu.trainer.integrity import sha256_file as _sha256

    p = os.path.join(art, name)
    data = json.load(open(p))
    mutate(data)
    json.dump(data, open(p, "w"))
    mp = os.path.join(art, "manifest.json")
    manifest = json.load(open(mp))
    if name != "manifest.json":
        manifest["files"][name] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
        json.dump(manifest, open(mp, "w"))


def test_errors_name_the_file_and_field(research, tmp_path):
    _, out = research
    with pytest.raises(ArtifactError, match="no such artifact"):
        hstu.serving.load(str(tmp_path / "nothing"))
    art = _copy(out, tmp_path)
    os.remove(os.path.join(art, "dense_score.pt2"))
    with pytest.raises(ArtifactError, match=r"dense_score\.pt2: missing file"):
        hstu.serving.load(art)
    shutil.rmtree(art)
    art = _copy(out, tmp_path)
    _rewrite(art, "manifest.json", lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match=r"manifest\.json: field format_version = 99"):
        hstu.serving.load(art)
    _rewrite(art, "manifest.json", lambda m: (m.update(format_version=1), m.pop("task")))
    assert hstu.serving.load(art, task="retrieval").task == "retrieval"  # version 1 = retrieval, still readable
    with pytest.raises(ArtifactError, match=r"field task = 'retrieval', but a 'ranking' artifact was asked for"):
        hstu.serving.load(art, task="ranking")
    shutil.rmtree(art)
    art = _copy(out, tmp_path)
    _rewrite(art, "config.json", lambda c: c["model"].update(embedding_dim=32))
    with pytest.raises(ArtifactError, match=r"config\.json: field model\.embedding_dim = 32 does not match"):
        hstu.serving.load(art)
    shutil.rmtree(art)
    art = _copy(out, tmp_path)
    _rewrite(art, "config.json", lambda c: c["data"].update(max_seq_len=200))
    with pytest.raises(ArtifactError, match=r"data\.max_seq_len = 200"):
        hstu.serving.load(art)
    shutil.rmtree(art)
    art = _copy(out, tmp_path)
    _rewrite(art, "manifest.json", lambda m: m["model"].update(num_items=NUM_ITEMS + 1))
    with pytest.raises(ArtifactError, match=r"manifest\.json: field embedding\.rows/dim = 501/16, expected 502/16"):
        hstu.serving.load(art)
    shutil.rmtree(art)
    art = _copy(out, tmp_path)
    _rewrite(art, "manifest.json", lambda m: m["model"].pop("variant"))
    with pytest.raises(ArtifactError, match=r"missing field 'model\.variant'"):
        hstu.serving.load(art)
    shutil.rmtree(art)
    art = _copy(out, tmp_path)
    with open(os.path.join(art, "item_table.bin"), "r+b") as f:  # same size, different bytes
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ArtifactError, match=r"item_table\.bin: size or sha256 differs"):
        hstu.serving.load(art)


def test_a_recorded_output_the_model_does_not_reproduce_is_named(research, tmp_path):
    """verify(): a record whose stored output the loaded model no longer gives -> ArtifactError naming the file,
    the record and the field (values differ, or shapes differ)."""
    _, out = research
    art = _copy(out, tmp_path)
    path = os.path.join(art, "records.pt")
    records = torch.load(path, weights_only=True)
    records[1]["user_vector"] = records[1]["user_vector"] + 0.5
    torch.save(records, path)
    sm = hstu.serving.load(art, verify=False, verify_checksums=False)
    with pytest.raises(ArtifactError, match=r"records\.pt: record 1 field 'user_vector' differs .* by 0\.5"):
        sm.verify()
    records[1]["user_vector"] = records[1]["user_vector"][:-1]
    torch.save(records, path)
    sm = hstu.serving.load(art, verify=False, verify_checksums=False)
    with pytest.raises(ArtifactError, match=r"record 1 field 'user_vector' has shape"):
        sm.verify()
