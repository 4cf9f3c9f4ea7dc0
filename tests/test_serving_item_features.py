"""Serving a model with item features: the export carries the item tower; a never-seen item (held out of every
training sequence) becomes retrievable after ``add_items`` with its features alone, without retraining."""

import numpy as np
import pytest
import torch

import hstu.serving
from hstu.serving.export import export_run, reference_user_vector
from hstu.trainer.config import load_config
from hstu.trainer.data import build_loaders, load_sequences
from hstu.trainer.data.holdout import holdout_items
from hstu.trainer.data.item_features import synthetic_table
from hstu.trainer.train import train

OVERRIDES = ["data.synthetic.num_users=300", "data.synthetic.num_items=60", "data.synthetic.num_interests=3",
             "data.synthetic.interest_focus=0.95", "data.synthetic.drift=0.0", "data.synthetic.min_seq_len=8",
             "data.synthetic.max_seq_len=16", "data.max_seq_len=16", "data.batch_size=32",
             "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_layers=1",
             "model.dropout=0.0", "loss.num_negatives=16", "model.item_features.enabled=true",
             "data.holdout_items_frac=0.1", "train.epochs=4", "train.eval_every_epochs=4", "train.progress=false",
             "train.tensorboard=false", "train.num_threads=1", "eval.popularity_baseline=false",
             "optim.lr=0.005"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    cfg = load_config(None, OVERRIDES + [f"run_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}"])
    train(cfg)
    out = str(root / "art")
    manifest = export_run(str(root / "run"), out)
    seqs = load_sequences(cfg.data, progress=False)
    held = holdout_items(seqs, cfg.data.holdout_items_frac, cfg.data.seed)
    train_loader, _, test_loader = build_loaders(cfg.data, seqs)
    return cfg, manifest, out, seqs, held, train_loader, test_loader


def test_export_carries_the_item_tower(served):
    cfg, manifest, out, *_ = served
    tower = manifest["item_tower"]
    assert tower["program"] in manifest["files"] and tower["values_file"] in manifest["files"]
    assert [f["name"] for f in tower["features"]] == ["cluster"] and tower["features"][0]["cardinality"] == 4
    model = hstu.serving.load(out)  # the records (tower outputs in the table) replay
    assert model.item_tower is not None and model.num_items == 60


def test_never_seen_item_becomes_retrievable_from_its_features(served):
    cfg, _, out, seqs, held, train_loader, _ = served
    assert held.size == 6 and not np.isin(train_loader.seqs.item_ids, held).any()
    model = hstu.serving.load(out)
    clusters = synthetic_table(cfg.data, 60).values[:, 0]
    h = int(held[0])
    c = int(clusters[h])
    # a user whose history is items of h's cluster (the trained ones), and one of another cluster
    mine = [i for i in range(1, 61) if clusters[i] == c and i not in held][:8]
    other = [i for i in range(1, 61) if clusters[i] != c and i not in held][:8]
    ts = torch.arange(8) * 600 + 1_600_000_000
    before = model.retrieve(mine, ts, k=60)
    assert 61 not in before.ids.tolist()
    with pytest.raises(ValueError, match="item ids must lie in 1..60"):
        model.retrieve([61], ts[:1], k=5)
    new = model.add_items([{"cluster": [c]}])
    assert new.tolist() == [61] and model.num_items == 61
    # the new item's vector is exactly the held-out item's (content only: it never had a training event)
    torch.testing.assert_close(model.table.vectors(torch.tensor([61])), model.table.vectors(torch.tensor([h])))
    top_mine = model.retrieve(mine, ts, k=61)
    top_other = model.retrieve(other, ts, k=61)
    rank_mine = top_mine.ids.tolist().index(61)
    rank_other = top_other.ids.tolist().index(61)
    assert rank_mine < rank_other  # its features carry its cluster: users of that cluster rank it higher
    assert rank_mine < 30  # in the upper half of the catalog (20 items per cluster)
    k = rank_mine + 1
    assert 61 in model.retrieve(mine, ts, k=k).ids.tolist()  # retrievable at the top-k cut-off it earns
    # and usable in a history (its input token is the same tower output)
    assert model.retrieve(mine + [61], torch.cat([ts, ts[-1:] + 600]), k=5).ids.numel() == 5
    with pytest.raises(ValueError, match="feature 'cluster' = \\[9\\] must be at most 1 values in 1..3"):
        model.add_items([{"cluster": [9]}])
    with pytest.raises(ValueError, match="unknown feature 'genre'"):
        model.add_items([{"genre": [1]}])


def test_served_new_item_matches_the_training_model(served):
    cfg, _, out, seqs, held, *_ = served
    from hstu.modules.model import build_model
    from hstu.trainer.plain_weights import read_plain_state

    _, state = read_plain_state(f"{cfg.run_dir}/best.pt", "test", verify=False)
    from hstu.modules.item_tower import features_from_state

    trained = build_model(cfg, 60, features_from_state(state)).eval()
    trained.load_state_dict(state)
    served_model = hstu.serving.load(out)
    ids = served_model.add_items([{"cluster": [1]}, {"cluster": [3]}, {}])
    packed = torch.tensor([[1], [3], [0]])
    with torch.no_grad():
        ref = trained.item_tower.combine(torch.zeros(3, 16), packed)
        ref = ref / ref.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    torch.testing.assert_close(served_model.table.vectors(ids), ref, rtol=1e-5, atol=1e-6)
    hist, ts = [1, 2, 3], torch.tensor([10, 20, 30]) + 1_600_000_000
    uv = reference_user_vector(trained, torch.tensor(hist), ts, int(ts[-1]))
    torch.testing.assert_close(served_model.user_vector(hist, ts), uv, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [("fp32", 0.0), ("bf16", 1e-2), ("int8", 1e-2)])
def test_item_table_append_matches_a_table_built_with_the_rows(dtype, tol):
    from hstu.serving.retrieval import ItemTable, brute_force_topk, topk_inner_product

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 6, generator=g)
    grown = ItemTable.quantize(rows[:9], dtype)
    assert grown.append(rows[9:]).tolist() == [9, 10, 11] and grown.num_rows == 12
    whole = ItemTable.quantize(rows, dtype)
    ids = torch.arange(1, 12)
    torch.testing.assert_close(grown.vectors(ids), whole.vectors(ids), rtol=0, atol=0)  # rowwise: same storage
    torch.testing.assert_close(grown.vectors(ids), rows[1:] / rows[1:].norm(dim=1, keepdim=True), rtol=tol,
                               atol=tol)
    q = torch.randn(3, 6, generator=g)
    assert torch.equal(topk_inner_product(q, grown, 11, chunk_size=4).ids, brute_force_topk(q, whole, 11).ids)


def test_verify_replays_the_item_tower_check(served, tmp_path):
    import shutil

    from hstu.serving.artifact import ArtifactError

    _, _, out, *_ = served
    assert "item_tower" in hstu.serving.load(out).verify()
    art = tmp_path / "art"
    shutil.copytree(out, art)
    state = torch.load(art / "item_features.pt", weights_only=True)
    state["check_vectors"] = state["check_vectors"] + 0.01  # the program no longer reproduces them
    torch.save(state, art / "item_features.pt")
    with pytest.raises(ArtifactError, match="item_features.pt: record 0 field 'item_tower' differs"):
        hstu.serving.load(str(art), verify_checksums=False)


def test_add_items_needs_only_torch(served):
    from import_blocker import run_torch_only

    _, _, out, *_ = served
    stdout = run_torch_only(f"""
        import hstu.serving
        m = hstu.serving.load({out!r})
        new = m.add_items([{{"cluster": [2]}}])
        assert new.tolist() == [61] and 61 in m.retrieve([1, 2, 3], [10, 20, 30], 61).ids.tolist()
    """)
    assert "LOADED []" in stdout
