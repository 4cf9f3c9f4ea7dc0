"""Smoke tests of benchmarks/attention.py and benchmarks/activation_memory.py (--quick, into a tmp dir), plus an
exact, hand-derived check of the saved-activation counting (~10 s on CPU)."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
PROVENANCE_KEYS = ("date", "machine", "commit", "command")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def attention():
    return _load("attention")


@pytest.fixture(scope="module")
def activation_memory():
    return _load("activation_memory")


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------------------------ attention.py

def test_attention_quick_writes_complete_json(attention, tmp_path):
    # --time-budget-s 0 forces the capped path: padded rows timed on 1 sequence and scaled to the batch
    attention.main(["--quick", "--out", str(tmp_path), "--time-budget-s", "0"])
    with open(tmp_path / "attention.json") as f:
        payload = json.load(f)
    for key in PROVENANCE_KEYS + ("device", "dtype", "setup", "rows", "batches"):
        assert payload.get(key), key
    rows = payload["rows"]
    assert {r["max_len"] for r in rows} == {64, 128}
    assert {r["impl"] for r in rows} == set(attention.IMPLS)
    for r in rows:
        for key in ("impl", "max_len", "num_seqs", "tokens", "fwd_ms", "fwd_bwd_ms", "speedup_vs_sdpa", "status"):
            assert key in r, (key, r)
        assert _positive(r["num_seqs"]) and _positive(r["tokens"]) and r["tokens"] <= 512
        if r["impl"] == "hstu_jagged_triton" and not torch.cuda.is_available():
            assert r["status"] == "skipped: no GPU" and r["fwd_ms"] is None and r["speedup_vs_sdpa"] is None
            continue
        assert r["status"] == "ok", r
        assert _positive(r["fwd_ms"]) and _positive(r["fwd_bwd_ms"]) and _positive(r["speedup_vs_sdpa"]), r
        if r["impl"] in ("sdpa_padded", "hstu_padded") and r["num_seqs"] > 1:
            assert r["extrapolated"] and r["measured_seqs"] == 1 and "scaled" in r["note"], r
            assert r["fwd_ms"] == pytest.approx(r["measured_fwd_ms"] * r["num_seqs"], rel=1e-3, abs=1e-2)
    sdpa = [r for r in rows if r["impl"] == "sdpa_padded"]
    assert all(r["speedup_vs_sdpa"] == 1.0 for r in sdpa)
    for b in payload["batches"]:  # the first sequence is forced to max_len: padded length == max_len
        assert b["longest"] == b["padded_len"] == b["max_len"]


def test_attention_over_budget_rows_are_recorded_not_dropped(attention, tmp_path):
    attention.main(["--quick", "--out", str(tmp_path), "--mem-budget-gb", "1e-9"])
    with open(tmp_path / "attention.json") as f:
        rows = json.load(f)["rows"]
    assert len(rows) == 2 * len(attention.IMPLS)
    for r in rows:
        assert r["status"].startswith("skipped"), r
        assert r["fwd_ms"] is None and r["fwd_bwd_ms"] is None


def test_benchmarked_implementations_agree(attention):
    """hstu_padded == the dense test reference == the jagged dispatcher; sdpa_padded == naive causal softmax."""
    from hstu.ops.attention_args import AttentionArgs
    from hstu.ops.pytorch.hstu_attention_dense import padded_hstu_attention_reference

    lengths, H, d, N = [7, 3, 5], 2, 4, 7
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), H, d, generator=g, dtype=torch.float64) for _ in range(3))
    offsets = attention.offsets_of(lengths, "cpu")
    alpha, norm = 1.0 / math.sqrt(d), 11.0
    dense = padded_hstu_attention_reference(q, k, v, AttentionArgs(offsets, N, alpha=alpha, norm=norm))
    jagged = attention.hstu_jagged_pytorch(q, k, v, offsets, N, alpha, norm)
    qp, kp, vp = (attention.pad_heads(x, offsets, N) for x in (q, k, v))
    padded = attention.hstu_padded(qp, kp, vp, alpha, norm)  # [B, H, N, d]
    from hstu.ops.jagged import padded_to_jagged

    unpadded = padded_to_jagged(padded.transpose(1, 2).reshape(len(lengths), N, H * d), offsets).view(-1, H, d)
    torch.testing.assert_close(unpadded, dense)
    torch.testing.assert_close(jagged, dense)
    s = torch.einsum("bhid,bhjd->bhij", qp, kp) / math.sqrt(d)
    s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(attention.sdpa_padded(qp, kp, vp), s.softmax(-1) @ vp)


def test_sample_lengths(attention):
    a = attention.sample_lengths(1024, 5000, 1.0, 16, seed=3)
    assert a == attention.sample_lengths(1024, 5000, 1.0, 16, seed=3)  # seeded
    assert a[0] == 1024 and max(a) <= 1024 and min(a) >= 16 and sum(a) <= 5000
    b = attention.sample_lengths(1024, 5000, 1.0, 16, seed=3, force_max_len=False)
    assert sum(b) <= 5000 and min(b) >= 16


# ------------------------------------------------------------------------------------------------ activation_memory.py

def test_activation_memory_quick_writes_complete_json(activation_memory, tmp_path):
    activation_memory.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "activation_memory.json") as f:
        payload = json.load(f)
    for key in PROVENANCE_KEYS + ("setup", "rows"):
        assert payload.get(key), key
    rows = payload["rows"]
    kinds = {(r["layer"], r["attention"], r["dropout"]) for r in rows}
    for p in (0.0, 0.1):
        assert ("transformer", "sdpa_flash", p) in kinds
        for v in ("hstu_research", "hstu_production"):
            assert (v, "reference", p) in kinds and (v, "fused_standin", p) in kinds
    for r in rows:
        for key in ("bytes_per_token", "elements_per_d", "bf16_bytes_per_d", "linear_elements_per_d"):
            assert _positive(r[key]), (key, r)
        assert r["elements_per_d"] == pytest.approx(r["bytes_per_token"] / (4 * r["d"]), rel=1e-3)
        assert (r["score_bytes_per_token"] > 0) == (r["attention"] == "reference"), r
    by = {(r["layer"], r["attention"], r["dropout"]): r for r in rows}
    for v in ("hstu_research", "hstu_production"):  # the reference op saves more than a fused kernel would
        assert by[(v, "reference", 0.0)]["bytes_per_token"] > by[(v, "fused_standin", 0.0)]["bytes_per_token"]


# Hand derivation (fp32 = 4 B; T = L = 5 tokens in ONE sequence, D = 8, H = 2, d_qk = d_v = 4, so the fused
# q/k/v/u projection is 4·D = 32 wide), attention op = FusedAttentionStandIn (saves only q, k, v, rab tables,
# offsets, timestamps — like a fused kernel), parameters excluded, each storage once:
#
# production layer                                                       bytes
#   input_norm (LayerNorm) saves its input x [5, 8] + mean, rstd [5, 1]     160 + 20 + 20
#   addmm(b, LN(x), W_uvqk) saves LN(x) [5, 8]                              160
#   uvqk [5, 32]: SiLU(u) saves u and the op saves q, k, v — all views      640
#   the op saves offsets [2] int64                                          16
#   output_norm saves attn [5, 8] + mean, rstd                              160 + 20 + 20
#   u·LN(attn) saves SiLU(u) [5, 8] and LN(attn) [5, 8]                     160 + 160
#   cat → y [5, 24]; addmm(x, y, W_o) saves y                                480
#   dropout p = 0: identity on CPU (nothing saved)                          = 2016
#   p > 0 (CPU): y·noise saves the float32 noise [5, 24] (+480); addmm saves the dropped y instead of y   = 2496
# research layer
#   F.layer_norm (no affine) saves x + mean, rstd                           160 + 20 + 20
#   LN(x) @ W_uvqk saves LN(x)                                              160
#   SiLU saves its input, the pre-activation [5, 32]                        640
#   SiLU output [5, 32]: u (mul) and q, k, v (op) are views of it          640
#   the op saves offsets [2] and timestamps [5] int64 (rab tables are parameters)   16 + 40
#   F.layer_norm(attn) saves attn [5, 8] + mean, rstd                       160 + 20 + 20
#   u·LN(attn) saves LN(attn) (u already counted)                           160
#   Linear_o saves y = u·LN(attn) [5, 8]                                    160
#   dropout p = 0                                                            = 2216
#   p > 0: float32 noise [5, 8] (+160), Linear_o saves the dropped y instead = 2376
HAND_DERIVED = {("production", 0.0): 2016, ("production", 0.5): 2496,
                ("research", 0.0): 2216, ("research", 0.5): 2376}


@pytest.mark.parametrize("variant,dropout", sorted(HAND_DERIVED))
def test_saved_activation_bytes_match_hand_derivation(activation_memory, variant, dropout):
    c = activation_memory.measure_hstu(variant, [5], 8, 2, dropout, seed=0, max_seq_len=5,
                                       attention="fused_standin")
    assert c.total_bytes == HAND_DERIVED[(variant, dropout)], sorted(
        (s["nbytes"], s["dtype"], tuple(s["shape"])) for s in c.storages.values())
    assert c.param_hits > 0  # parameters were seen by the hook and excluded


def test_fused_standin_gradients_match_reference(activation_memory):
    """The stand-in op is a correct drop-in (its backward recomputes with the reference)."""
    from hstu.ops.hstu_attention import AttentionArgs, jagged_hstu_attention

    g = torch.Generator().manual_seed(1)
    lengths = [4, 2]
    T, H, d = sum(lengths), 2, 3
    q, k, v = (torch.randn(T, H, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pw = torch.randn(2 * 4 - 1, generator=g, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 4, 6])
    kw = dict(alpha=0.5, norm=4.0, causal=True)
    ref = jagged_hstu_attention(q, k, v, AttentionArgs(offsets, 4, pos_weights=pw, **kw))
    out = activation_memory.fused_standin(q, k, v, AttentionArgs(offsets, 4, pos_weights=pw, **kw))
    torch.testing.assert_close(out, ref)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((out * w).sum(), [q, k, v, pw]),
                               torch.autograd.grad((ref * w).sum(), [q, k, v, pw]))


# ------------------------------------------------------------------------------------------------ serving.py

def test_serving_ranking_model_section_quick():
    """benchmarks/serving.py ranking_model section on tiny sizes (no file written)."""
    import argparse

    serving = _load("serving")
    out = serving.ranking_model(argparse.Namespace(ranking_events=12, sizes=[4, 16], repeats=1))
    assert [r["m"] for r in out["rows"]] == [4, 16]
    assert out["summary"]["max_abs_logit_error_vs_alone"] < 1e-4
    for r in out["rows"]:
        assert _positive(r["mfalcon_total_ms"]) and _positive(r["candidates_per_s"]), r


def test_results_files_are_strict_json_and_suites_render_as_tables(tmp_path, monkeypatch):
    """write_json turns NaN/inf into null (strict JSON); RESULTS.md renders a process-comparison suite as one row
    per variant with its timing and final metrics."""
    common, summarize = _load("common"), _load("summarize")
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    path = common.write_json("x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2.5}})
    assert json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"bare {c}")) == \
        {"a": None, "b": [1.0, None], "c": {"d": 2.5}}
    suite = {"date": "D", "commit": "C", "results": {
        "plain-1": {"processes": 1, "steps": 10, "final_metrics": {"hr@10": 0.25, "ne_mean": 0.8}},
        "dmp-2": {"processes": 2, "steps": 10, "final_metrics": {"hr@10": 0.5, "ne_mean": 0.75}},
        "delta_final_hr@10": 0.25}}
    lines = summarize._distributed_section({"note": "n", "full": suite})
    assert "- delta_final_hr@10: 0.2500" in lines and "- note: n" in lines
    assert "| 1 | plain-1 | 1 | 10 | 0.2500 | 0.8000 |" in lines and "| 2 | dmp-2 | 2 | 10 | 0.5000 | 0.7500 |" in lines
    generic = summarize._generic_section("r.json", {"rows": [{"m": 1}], "cmp": suite})
    assert "### cmp" in generic and "| 2 | dmp-2 | 2 | 10 | 0.5000 | 0.7500 |" in generic


# ------------------------------------------------------------------------------------------ ranking_synthetic_scale.py

def test_ranking_synthetic_scale_smoke_writes_complete_json_elsewhere(tmp_path):
    """--smoke: a tiny 2-process streaming run through the real CLI (~10 s); the JSON goes to --out, never to
    benchmarks/results (whose file, if any, is left untouched) and RESULTS.md is not rewritten."""
    scale = _load("ranking_synthetic_scale")
    real = os.path.join(BENCH, "results", scale.RESULT_FILE)
    before = os.stat(real).st_mtime_ns if os.path.exists(real) else None
    md_before = os.stat(os.path.join(BENCH, "RESULTS.md")).st_mtime_ns
    payload = scale.main(["--smoke", "--ab-steps", "0", "--out", str(tmp_path), "--run-root", str(tmp_path / "runs")])
    assert payload["path"] == str(tmp_path / scale.RESULT_FILE)
    with open(payload["path"]) as f:
        saved = json.load(f)
    for key in PROVENANCE_KEYS + ("setup", "summary", "results"):
        assert saved.get(key), key
    assert saved["smoke"] and saved["processes"] == 2 and saved["steps"] == 6
    res = saved["results"]
    run = res["run"]
    assert run["steps"] == 6 and run["processes"] == 2
    assert set(run["peak_rss_mib"]) >= {"rank0", "rank1"} and all(_positive(v) for v in run["peak_rss_mib"].values())
    assert _positive(run["ms_per_step_median"]) and _positive(run["tokens_per_second_median"])
    for which in ("first", "last"):  # VmRSS at the first / last logged train step
        assert set(run[f"rss_mib_at_{which}_train_log"]) == {"rank0", "rank1"}
    assert [m["model"] for m in res["metrics"]] == ["hstu after 6 steps", "item_rate baseline"]
    for m in res["metrics"]:
        assert m["num_users"] == 64 and 0 < m["ne_mean"] < 2, m
        assert {"ne_click", "auc_like", "gauc_share", "auc_mean"} <= set(m), m
    assert saved["summary"]["model_minus_baseline_ne_mean"] == pytest.approx(
        res["metrics"][0]["ne_mean"] - res["metrics"][1]["ne_mean"], abs=1e-4)
    gen = res["generator"]
    assert _positive(gen["users_per_s"]) and _positive(gen["loader_users_per_s"])
    assert 20 <= gen["events_per_user"] <= 100 and gen["materialised_bytes_per_user"] > 40 * 20
    assert res["tables"]["item_table_bytes"] == 2001 * 16 * 4 and res["prefetch_ab"] == []
    lines = _load("summarize")._generic_section(scale.RESULT_FILE, saved)  # renders as tables, not a JSON dump
    assert "**results.metrics**" in lines and "```json" not in lines
    assert (os.stat(real).st_mtime_ns if os.path.exists(real) else None) == before
    assert os.stat(os.path.join(BENCH, "RESULTS.md")).st_mtime_ns == md_before


# ------------------------------------------------------------------------------------------ reproduce_ml1m.py

def _tiny_ml1m(folder):
    """An ML-1M-format ratings.dat: 40 users x 24 ratings of items 1..120, about 3 ratings per second."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for uid in range(1, 41):
        items = rng.choice(np.arange(1, 121), size=24, replace=False)
        stamps = 978_300_000 + np.sort(rng.integers(0, 8, size=24)) * 60
        lines += [f"{uid}::{i}::{int(rng.integers(1, 6))}::{t}" for i, t in zip(items, stamps)]
    folder.mkdir()
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    return folder


def test_reproduce_ml1m_smoke_multi_seed_keeps_historical(tmp_path):
    """--smoke: 2 configs x 2 seeds (+ HSTU under the item-id order), 2 epochs of a tiny model each; ml-1m.json in
    --out gets per-run rows, mean ± std per (config, tie order) and keeps the old single-seed rows labelled."""
    import statistics

    repro = _load("reproduce_ml1m")
    real = os.path.join(BENCH, "results", repro.RESULT_FILE)
    before = os.stat(real).st_mtime_ns
    old_rows = [{"model": "hstu", "hr@10": 0.33, "best_epoch": 95, "epochs": 101}]  # the pre-protocol list format
    out = tmp_path / "out"
    out.mkdir()
    (out / repro.RESULT_FILE).write_text(json.dumps(old_rows))
    common = ["--data-dir", str(_tiny_ml1m(tmp_path / "ml")), "--smoke", "--out", str(out), "--run-root",
              str(tmp_path / "runs")]
    payload = repro.main(common + ["--configs", "sasrec,hstu", "--seeds", "1,2", "train.num_threads=1"])
    saved = json.loads((out / repro.RESULT_FILE).read_text())
    assert saved["runs"] == payload["runs"]
    keys = sorted((r["config"], r["tie_order"], r["seed"]) for r in saved["runs"])
    assert keys == [("hstu", "item_id", 1), ("hstu", "item_id", 2), ("hstu", "random", 1), ("hstu", "random", 2),
                    ("sasrec", "random", 1), ("sasrec", "random", 2)]
    for r in saved["runs"]:
        assert r["select_on"] == "validation" and r["smoke"] and r["final_epoch"] == 2 and r["epochs"] == 2
        assert r["selected_epoch"] in (1, 2) and r["train_seconds"] > 0
        assert r["train_minutes"] == pytest.approx(r["train_seconds"] / 60, abs=1e-4)
        assert r["data"]["tie_order"] == r["tie_order"]
        for which in ("selected", "final"):
            assert set(repro.REPORTED) <= set(r[which]["test"]) and 0 <= r[which]["test"]["hr@10"] <= 1
        for key in PROVENANCE_KEYS:
            assert r.get(key), key
    # seeds and tie orders change the data / model: not every run gives the same figures
    assert len({r["final"]["test"]["mrr"] for r in saved["runs"]}) > 1
    summary = {(s["config"], s["tie_order"]): s for s in saved["summary"]}
    assert set(summary) == {("sasrec", "random"), ("hstu", "random"), ("hstu", "item_id")}
    for (config, tie), s in summary.items():
        runs = [r for r in saved["runs"] if r["config"] == config and r["tie_order"] == tie]
        assert s["n"] == 2 and s["seeds"] == [1, 2]
        for which in ("selected", "final"):
            vals = [r[which]["test"]["ndcg@10"] for r in runs]
            assert s[which]["ndcg@10"]["mean"] == pytest.approx(statistics.mean(vals))
            assert s[which]["ndcg@10"]["std"] == pytest.approx(statistics.stdev(vals))
    hist = saved["historical"]
    assert hist["rows"][0]["hr@10"] == 0.33 and hist["rows"][0]["tie_order"] == "item_id"
    assert hist["rows"][0]["select_on"] == "test" and "old protocol" in hist["protocol"]
    # a rerun of one seed replaces that seed's rows only; the historical rows stay
    again = repro.main(common + ["--configs", "hstu", "--seeds", "2", "--compare-configs", "", "train.num_threads=1"])
    assert len(again["runs"]) == 6 and again["historical"] == hist
    # --skip-existing: every planned run is already there -> nothing trains, nothing changes
    before_skip = (out / repro.RESULT_FILE).read_text()
    skipped = repro.main(common + ["--configs", "sasrec,hstu", "--seeds", "1,2", "--skip-existing",
                                   "train.num_threads=1"])
    assert skipped["runs"] == again["runs"] and (out / repro.RESULT_FILE).read_text() == before_skip
    # RESULTS.md rendering: the multi-seed table (smoke rows are never rendered) and the labelled historical rows
    summarize = _load("summarize")
    lines = summarize._ml1m_section(saved)
    assert any("No run under this protocol" in x for x in lines)
    shown = dict(saved, summary=[dict(s, smoke=False) for s in saved["summary"]])
    text = "\n".join(summarize._ml1m_section(shown))
    assert "| hstu | item_id | validation | 1, 2 |" in text and " ± " in text
    assert "Historical — old protocol" in text and "tie_order" in text and "must be rerun" in text
    assert os.stat(real).st_mtime_ns == before  # the real results file is untouched


# ------------------------------------------------------------------------------------------ train_throughput.py

def test_train_throughput_smoke_writes_phases_and_flops(tmp_path):
    bench = _load("train_throughput")
    payload = bench.main(["--smoke", "--out", str(tmp_path)])
    with open(tmp_path / "train_throughput.json") as f:
        assert json.load(f)["rows"][0]["config"] == payload["rows"][0]["config"] == "hstu"
    for key in PROVENANCE_KEYS + ("threads", "allocator", "matmul_peak_gflops", "rows"):
        assert payload.get(key), key
    row = payload["rows"][0]
    assert row["runs"][0]["status"] == "ok", row["runs"]
    assert _positive(row["tokens_per_s"]) and _positive(row["needed_gflops_per_s"])
    assert 0 < row["fraction_of_peak"] < 1
    assert set(row["phases_ms"]) == set(bench.PHASES) and all(v >= 0 for v in row["phases_ms"].values())
    assert row["phases_ms"]["attention"] > 0 and row["phases_ms"]["loss"] > 0
    assert "baseline" not in row and "paper_code" not in payload  # smoke: this tree only


def test_train_throughput_needed_flops_by_hand():
    bench = _load("train_throughput")
    from hstu.trainer.config import ModelConfig

    cfg = ModelConfig(arch="hstu", variant="research", embedding_dim=4, num_layers=1, num_heads=1,
                      attention_dim=2, linear_dim=3)
    f = bench.needed_flops(cfg, [2, 0, 1], num_negatives=5)
    # 3 tokens; per token 2·4·(2·3+2·2)·1 + 2·1·3·4 = 80 + 24 = 104; pairs 3 + 1 = 4 -> 2·4·(2+3) = 40
    # labelled positions 1 -> 2·4·6 = 48; everything ×3 (forward + backward)
    assert f["layers"] == 3 * 104 * 3 and f["attention"] == 3 * 40 and f["loss"] == 3 * 48
    assert f["total"] == f["layers"] + f["attention"] + f["loss"]


def test_table_scale_smoke_trains_saves_and_reshards_under_caps(tmp_path):
    """benchmarks/table_scale.py --smoke: 1 and 2 ranks, both placements, under RLIMIT_AS; each checkpoint
    reloads at the other world size with the same table and optimizer state (sums over ranks); after rank 0 is
    killed inside a save the restart resumes the last good checkpoint exactly."""
    payload = _load("table_scale").main(["--smoke", "--out", str(tmp_path)])
    with open(tmp_path / "table_scale.json") as f:
        assert json.load(f) == json.loads(json.dumps(payload))
    for key in PROVENANCE_KEYS:
        assert payload.get(key), key
    assert {(r["world_size"], r["placement"]) for r in payload["runs"]} == {
        (w, p) for w in (1, 2) for p in ("fp32_device_state", "bf16_host_state")}
    for r in payload["runs"]:
        assert r["ok"], r.get("errors")
        shards = [rk["shard"] for rk in r["ranks"]]
        assert sum(s["rows"] for s in shards) == payload["rows"]  # row-wise shards cover the table once
        for rk in r["ranks"]:
            assert rk["cap_above_base"] > 0 and set(rk["peak_rss"]) == {"init", "train", "save"}
            assert all(v >= rk["rss_base"] > 0 for v in rk["peak_rss"].values())
        assert r["checkpoint_bytes"] >= r["table_bytes_with_state"] and _positive(r["save_gb_per_s"])
    assert {(r["from_world_size"], r["to_world_size"]) for r in payload["reloads"]} == {(1, 2), (2, 1)}
    for r in payload["reloads"]:
        assert r["ok"] and r["sums_equal_saved"] and r["loaded_step"] == 5, r
        assert _positive(r["load_gb_per_s"])
    kr = payload["kill_resume"]  # rank 0 SIGKILLed inside the second save; the restart loads the first
    assert kr["killed"] and kr["ok"] and kr["resumed_from"] == "step_00000005" and kr["resumed_step"] == 5, kr
    assert kr["sums_equal_last_good_save"]
    sv = payload["serving"]  # the 2-rank fp32 checkpoint exported in 4096-row chunks and served memory-mapped
    assert sv["from_world_size"] == 2 and [r["dtype"] for r in sv["runs"]] == ["fp32", "int8"]
    rows, dim = payload["rows"], payload["dim"]
    for r, table_bytes in zip(sv["runs"], (rows * dim * 4 + rows * 4, rows * dim + 2 * rows * 4)):
        assert r["ok"], r.get("error")
        assert r["shard_chunks"] == 2 and r["byte_range_reads"]  # read from both shards by byte range
        assert r["table_files_bytes"] == table_bytes and r["artifact_bytes"] > table_bytes
        assert r["export_peak_rss"] >= r["export_rss_base"] > 0 and r["queries"] == 20
        assert all(_positive(r[k]) for k in ("export_s", "load_s", "topk_ms_p50", "topk_ms_p99", "retrieve_ms_p50"))
        assert r["topk_ms_p99"] >= r["topk_ms_p50"] and r["rss_after_load"] >= r["rss_anon_after_load"] > 0
    summarize = _load("summarize")
    lines = summarize._table_scale_section(payload)
    assert sum(line.startswith(("| fp32 | yes |", "| int8 | yes |")) for line in lines) == 2
    assert any("(**smoke size**)" in line for line in lines)
    assert sum(line.startswith("| 2 | ") for line in lines) == 2
    assert any(line.startswith("| 1 -> 2 | yes | yes |") for line in lines)


def test_table_scale_cap_is_enforced():
    """A rank whose RLIMIT_AS leaves less room than its shard fails (recorded), instead of passing unnoticed."""
    bench = _load("table_scale")
    spec = {"role": "train", "rows": 20_000, "dim": 16, "steps": 1, "ids_per_step": 8, "seed": 0,
            "weight_dtype": "float32", "state_placement": "device", "overhead_mib": -64, "ckpt_dir": ""}
    (res,) = bench.launch(spec, 1, timeout_s=120)
    assert "error" in res and res["error"].startswith("exit 1"), res
    assert "Cannot allocate memory" in res["error"]  # the table's own allocation hit the cap
    assert bench._summary([res])["ok"] is False


# ------------------------------------------------------------------------------------------ quality_parity.py

def test_quality_parity_smoke_compares_the_arms(tmp_path):
    """--smoke: both arms (shipped config vs the baseline commit's code paths) on a tiny ML-1M-format file, run in two
    invocations; the JSON merges them, reads the test metrics of each evaluated epoch from metrics.jsonl and
    compares them against the tolerance; RESULTS.md renders it."""
    parity = _load("quality_parity")
    summarize = _load("summarize")
    out = tmp_path / "out"
    common = ["--data-dir", str(_tiny_ml1m(tmp_path / "ml")), "--smoke", "--out", str(out), "--run-root",
              str(tmp_path / "runs"), "--epochs-at", "1,2,7", "train.num_threads=1"]
    parity.main(common + ["--arms", "reference"])
    one = json.loads((out / parity.RESULT_FILE).read_text())
    run = one["runs"]["hstu-random-seed1"]
    assert set(run["arms"]) == {"reference"} and run["comparison"] == [] and not run["all_within_tolerance"]
    payload = parity.main(common + ["--arms", "fast", "--tolerance", "1.0"])
    run = payload["runs"]["hstu-random-seed1"]
    assert set(run["arms"]) == {"fast", "reference"}
    ref = run["arms"]["reference"]
    assert ref["overrides"][:3] == parity.ARMS["reference"] and run["arms"]["fast"]["overrides"][0] != "ops.backend=pytorch"
    # epoch 7 was never evaluated (2 epochs): absent, not invented
    assert sorted(ref["at_epochs"]) == ["1", "2"] and [r["epoch"] for r in run["comparison"]] == [1, 2]
    metrics = [json.loads(line) for line in open(os.path.join(ref["run_dir"], "metrics.jsonl"))]
    last_test = [m for m in metrics if m["kind"] == "eval" and m["epoch"] == 2][0]
    assert ref["at_epochs"]["2"]["test"]["hr@10"] == last_test["hr@10"]
    assert ref["at_epochs"]["2"]["test"]["ndcg@10"] == ref["final"]["test"]["ndcg@10"]
    for r in run["comparison"]:
        for m in parity.COMPARED:
            assert r[m]["delta"] == pytest.approx(r[m]["fast"] - r[m]["reference"])
    assert run["all_within_tolerance"]  # tolerance 1.0: any pair of metrics in [0, 1] is within it
    strict = parity.merge(str(out / parity.RESULT_FILE), "hstu-random-seed1", ref, 0.0, {})
    diffs = [abs(r[m]["delta"]) for r in strict["runs"]["hstu-random-seed1"]["comparison"] for m in parity.COMPARED]
    assert strict["runs"]["hstu-random-seed1"]["all_within_tolerance"] == (max(diffs) == 0.0)
    assert not (out / "ml-1m.json").exists()  # smoke runs never land in the reproduction table
    text = "\n".join(summarize.quality_parity_section(payload))
    assert "| 2 |" in text and "hstu-random-seed1" in text
