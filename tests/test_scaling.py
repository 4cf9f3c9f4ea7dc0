"""benchmarks/scaling.py: the training-FLOPs formula of docs/scaling.md checked against a MEASURED count
(torch.utils.flop_counter.FlopCounterMode on one real forward+backward), a hand-computed example, the power-law
fit, and a --quick run into a tmp dir (~15 s)."""

import importlib.util
import json
import math
import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", os.path.join(BENCH, "scaling.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("variant,num_negatives,route", [("research", 32, "all_items"), ("research", 4, "gather"),
                                                         ("production", 32, "all_items"), ("research", 32, "sampled")])
def test_formula_equals_flop_counter_on_one_step(scaling, tmp_path, variant, num_negatives, route):
    """route all_items: the loss scores all items with one matmul (counted); gather / sampled (default): no matmul
    FlopCounterMode counts."""
    from hstu.modules.model import build_model
    from hstu.trainer.config import load_config
    from hstu.trainer.data import build_loaders, load_sequences

    torch.manual_seed(0)
    cfg = load_config(None, scaling.DATA + [
        f"data.cache_dir={tmp_path}", "data.synthetic.num_users=150", "data.synthetic.num_items=300",
        "data.max_seq_len=40", "data.batch_size=16", "model.embedding_dim=16", "model.num_layers=2",
        "model.num_heads=2", "model.attention_dim=8", "model.linear_dim=4", f"model.variant={variant}",
        f"loss.num_negatives={num_negatives}"])
    seqs = load_sequences(cfg.data, progress=False)
    batch = next(iter(build_loaders(cfg.data, seqs)[0]))
    lengths = batch.lengths.tolist()
    assert len(set(lengths)) > 3  # a real jagged batch
    measured = scaling.measure_step_flops(build_model(cfg, seqs.num_items), batch, seqs.num_items, num_negatives,
                                          route)
    executed = scaling.train_flops_per_batch(cfg.model, lengths, seqs.num_items, num_negatives, "executed", route)
    assert measured == pytest.approx(executed["total"], rel=1e-9), (measured, executed)
    assert (executed["loss"] > 0) == (route == "all_items")
    useful = scaling.train_flops_per_batch(cfg.model, lengths, seqs.num_items, num_negatives, "useful")
    assert useful["linear"] == executed["linear"]
    assert useful["attention"] < executed["attention"]  # causal triangle vs padded squares


def test_useful_formula_by_hand(scaling):
    from hstu.trainer.config import ModelConfig

    m = ModelConfig(embedding_dim=4, num_layers=1, num_heads=1, attention_dim=2, linear_dim=3)
    f = scaling.train_flops_per_batch(m, [3], num_items=100, num_negatives=5, mode="useful")
    # per token: uvqk 2·4·(2·3+2·2) = 80, output 2·3·4 = 24; 3 tokens; ×3 (fwd+bwd)
    assert f["linear"] == 3 * 3 * (80 + 24)
    # causal pairs 1+2+3 = 6, each 2·(2+3) FLOPs; ×3
    assert f["attention"] == 3 * 6 * 2 * (2 + 3)
    # 2 labelled positions, 2·D·(1+R) = 48 each; ×3
    assert f["loss"] == 3 * 2 * 48


def test_power_law_fit_recovers_exponent(scaling):
    xs = [1e9 * 2 ** i for i in range(8)]
    fit = scaling.fit_power_law(xs, [50.0 * x ** -0.2 for x in xs])
    assert fit["b"] == pytest.approx(-0.2) and fit["a"] == pytest.approx(50.0) and fit["r2"] == pytest.approx(1.0)
    pts = [{"train_flops": 1, "final_train_loss": 3}, {"train_flops": 2, "final_train_loss": 4},
           {"train_flops": 3, "final_train_loss": 2}]
    assert [p["train_flops"] for p in scaling.frontier(pts)] == [1, 3]


def test_quick_study_writes_json_and_plot(scaling, tmp_path):
    payload = scaling.main(["--quick", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    saved = json.load(open(tmp_path / "out" / "scaling.json"))
    for key in ("date", "machine", "commit", "command", "fit_all", "points"):
        assert saved.get(key), key
    assert len(saved["points"]) == 3 and saved["points"] == payload["points"]
    for p in saved["points"]:
        assert p["train_flops"] > 0 and math.isfinite(p["final_train_loss"]) and 0 <= p["hr@10"] <= 1
    assert (tmp_path / "out" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
