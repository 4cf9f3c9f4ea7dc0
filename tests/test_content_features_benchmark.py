"""benchmarks/content_features.py: --smoke (tiny synthetic data) and the ML-1M path on a tiny ratings.dat +
movies.dat fixture written here (the real data is never used or committed); the JSON and its RESULTS.md section."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import content_features as bench  # noqa: E402
import summarize  # noqa: E402

ROW_KEYS = {"variant", "hr@10", "ndcg@10", "cold_hr@10", "cold_ndcg@10", "cold_num_users", "unseen_hr@10",
            "unseen_ndcg@10", "unseen_num_users", "train_seconds_per_epoch", "epochs", "best_epoch"}


def test_smoke_writes_every_variant_and_renders(tmp_path):
    payload = bench.main(["--smoke", "--out", str(tmp_path), "--run-root", str(tmp_path / "runs")])
    saved = json.loads((tmp_path / bench.RESULT_FILE).read_text())
    assert saved == payload and saved["smoke"] and {"date", "machine", "commit", "command"} <= set(saved)
    assert [r["variant"] for r in saved["variants"]] == ["ids", "ids+features", "features"]
    for r in saved["variants"]:
        assert ROW_KEYS <= set(r) and r["epochs"] == 2 and r["held_out_items"] == 4
        assert r["never_seen_items"] >= r["held_out_items"]
        assert r["unseen_num_users"] >= 1 and r["cold_num_users"] >= r["unseen_num_users"]
    ids = saved["variants"][0]
    assert ids["combine"] == "" and saved["variants"][2]["combine"] == "sum"
    text = "\n".join(summarize.content_features_section(saved))
    assert "smoke run" in text and "| ids+features |" in text and "never-seen HR@10" in text


def test_variants_run_separately_fill_one_table(tmp_path):
    common = ["--smoke", "--out", str(tmp_path), "--run-root", str(tmp_path / "runs"), "--epochs", "1"]
    bench.main(common + ["--variants", "features"])
    payload = bench.main(common + ["--variants", "ids"])
    assert [r["variant"] for r in payload["variants"]] == ["ids", "features"]  # kept, in table order
    payload = bench.main(common + ["--variants", "ids", "--seed", "2"])  # other settings: the old rows go
    assert [r["variant"] for r in payload["variants"]] == ["ids"] and payload["seed"] == 2
    assert json.loads((tmp_path / bench.RESULT_FILE).read_text()) == payload
    assert sorted(os.listdir(tmp_path)) == ["content_features.json", "runs"]  # no lock or temp file left here


def _tiny_ml1m(folder):
    """ratings.dat: 40 users x 20 ratings of items 1..60; movies.dat: items 1..60 (latin-1, genres by id)."""
    rng = np.random.default_rng(0)
    lines = []
    for uid in range(1, 41):
        items = rng.choice(np.arange(1, 61), size=20, replace=False)
        lines += [f"{uid}::{i}::4::{978_300_000 + 60 * k}" for k, i in enumerate(items)]
    folder.mkdir()
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    genres = ("Action", "Comedy", "Drama|Romance", "Children's|Animation")
    movies = [f"{i}::Movie {i} caf\xe9 ({1950 + i})::{genres[i % 4]}" for i in range(1, 61)]
    (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    return folder


def test_ml1m_path_on_a_fixture(tmp_path):
    data = _tiny_ml1m(tmp_path / "ml")
    payload = bench.main(["--data-dir", str(data), "--epochs", "1", "--variants", "ids+features", "--out",
                          str(tmp_path / "out"), "--run-root", str(tmp_path / "runs"), "--holdout", "0.1",
                          f"data.cache_dir={tmp_path / 'cache'}", "data.max_seq_len=16", "model.embedding_dim=8",
                          "model.attention_dim=8", "model.linear_dim=8", "loss.num_negatives=8",
                          "loss.compile=false", "ops.backend=pytorch", "model.item_features.combine=mlp"])
    (row,) = payload["variants"]
    assert payload["dataset"] == "ml-1m" and not payload["smoke"] and row["combine"] == "mlp"
    assert row["held_out_items"] == 6 and row["never_seen_items"] >= 6 and row["epochs"] == 1
    cfg = (tmp_path / "runs" / "ids+features" / "config.yaml").read_text()
    assert "holdout_items_frac: 0.1" in cfg and "item_groups: true" in cfg
    assert (tmp_path / "out" / bench.RESULT_FILE).is_file()


def test_ablation_of_a_trained_run(tmp_path):
    """benchmarks/content_features_ablation.py on the smoke 'features' run: as trained, then each feature removed
    from the held-out items and from every item, with the share of held-out values used by training items."""
    import content_features_ablation as ablation

    bench.main(["--smoke", "--out", str(tmp_path), "--run-root", str(tmp_path / "runs"), "--variants", "features"])
    run = tmp_path / "runs" / "features"
    payload = ablation.main([str(run), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "content_features_ablation.json").read_text())
    assert saved == payload and {"date", "machine", "commit", "command"} <= set(saved)
    rows = saved["rows"]
    features = [r["feature"] for r in rows if r["ablation"] == "held_out_without"]
    assert rows[0]["ablation"] == "as_trained" and features and len(rows) == 1 + 2 * len(features)
    assert all(0.0 <= r["shared_with_training_items"] <= 1.0 for r in rows[1:])
    assert all(r["unseen/num_users"] == rows[0]["unseen/num_users"] > 0 for r in rows)
