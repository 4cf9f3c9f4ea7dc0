"""Smoke test of benchmarks/events_scale.py --smoke: generate two tiny Parquet logs, the real `hstu prepare`, the
real 2-process `hstu train` streaming from the shards (~25 s); the results file goes to a temp dir."""

import importlib.util
import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
pytestmark = pytest.mark.timeout(300)


def test_events_scale_smoke(tmp_path):
    sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location("bench_events_scale", os.path.join(BENCH, "events_scale.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real = os.path.join(BENCH, "results", "events_scale.json")
    before = os.path.getmtime(real) if os.path.exists(real) else None
    out = mod.main(["--smoke", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    saved = json.load(open(tmp_path / "out" / "events_scale.json"))
    assert saved["smoke"] and saved["commit"] and saved["machine"] and saved["command"]
    assert [r["scale"] for r in saved["runs"]] == ["small", "large"] and saved["runs"][1]["rank1_peak_rss_mib"] > 0
    for s, (scale, events) in zip(saved["detail"], (("small", 4_000), ("large", 20_000))):
        assert s["scale"] == scale
        assert s["prepare"]["counts"]["raw_events"] == events == s["generate"]["events"]
        assert s["prepare"]["num_shards"] == 2 and s["prepare"]["peak_rss_mib"] > 0
        assert {"rank0", "rank1"} <= set(s["train"]["peak_rss_mib"])
    assert set(saved["per_rank_train_rss_ratio"]) == {"rank0", "rank1"}
    assert all(math.isfinite(v) and v > 0 for v in saved["per_rank_train_rss_ratio"].values())
    assert set(saved["per_rank_rss_ratio_at_last_train_log"]) == {"rank0", "rank1"}
    assert saved["prepare_events_per_s"] > 0 and saved["shard_bytes_per_event"] > 8  # item + time int64 at least
    assert out["path"] == str(tmp_path / "out" / "events_scale.json")
    assert (os.path.getmtime(real) if os.path.exists(real) else None) == before
