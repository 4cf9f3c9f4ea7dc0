"""The item tower (modules/item_tower.py): pooled feature embeddings against a hand-written reference, gradients,
id dropout (content-only items), its use for input tokens and scored item vectors, and the cold / never-seen
evaluation groups."""

from types import SimpleNamespace

import pytest
import torch

from hstu.modules.item_tower import ItemTower, features_from_state
from hstu.modules.model import RetrievalModel, build_model
from hstu.trainer.config import ConfigError, load_config
from hstu.trainer.evaluate import evaluate, item_groups

D = 8
# 5 items; feature "genre" (bag, width 3, 4 values), "year" (width 1, 6 buckets)
VALUES = torch.tensor([[0, 0, 0, 0],
                       [1, 2, 0, 3],
                       [3, 0, 0, 0],
                       [1, 2, 3, 5],
                       [0, 0, 0, 0],
                       [2, 0, 0, 1]])
TABLE = SimpleNamespace(names=("genre", "year"), widths=(3, 1), cardinalities=(4, 6), values=VALUES)


def tower(combine="sum", pooling="mean", use_ids=True):
    torch.manual_seed(0)
    return ItemTower(TABLE.names, TABLE.widths, TABLE.cardinalities, VALUES, D, combine, pooling, use_ids)


def reference(t, ids, id_emb, pooling):
    """Per item, loop over its non-zero values: the pooled embedding of each feature, summed with the id part."""
    rows = []
    for i, e in zip(ids.tolist(), id_emb):
        vec = e * t.id_weight[i]
        genres = [v for v in VALUES[i, :3].tolist() if v]
        if genres:
            g = sum(t.tables["genre"].weight[v] for v in genres)
            vec = vec + (g / len(genres) if pooling == "mean" else g)
        if VALUES[i, 3]:
            vec = vec + t.tables["year"].weight[VALUES[i, 3]]
        rows.append(vec * (i != 0))
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_sum_tower_matches_reference_and_padding_is_zero(pooling):
    t = tower(pooling=pooling)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 3])
    id_emb = torch.randn(ids.numel(), D)
    out = t(ids, id_emb)
    assert out.shape == (7, D)
    torch.testing.assert_close(out, reference(t, ids, id_emb, pooling))
    assert out[0].abs().sum() == 0
    torch.testing.assert_close(out[4], id_emb[4])  # no features: the id part alone


def test_gradients_reach_feature_tables_mlp_and_id_part():
    t = tower("mlp")
    ids = torch.tensor([1, 3, 5])
    id_emb = torch.randn(3, D, requires_grad=True)
    out = t(ids, id_emb)
    assert out.shape == (3, D)
    out.square().sum().backward()
    g = t.tables["genre"].weight.grad
    assert g[0].abs().sum() == 0  # padding row never learns
    assert (g[1:].abs().sum(1) > 0).all()  # genres 1, 2, 3 are used by items 1, 3, 5
    assert t.tables["year"].weight.grad[[1, 3, 5]].abs().sum(1).gt(0).all()
    assert t.tables["year"].weight.grad[[2, 4]].abs().sum() == 0  # buckets no item in the batch has
    assert id_emb.grad.abs().sum(1).gt(0).all() and all(p.grad is not None for p in t.mlp.parameters())


def test_dropped_ids_make_vectors_content_only():
    t = tower("mlp")
    t.drop_ids(torch.tensor([False, False, True, False, False, True]))
    ids = torch.tensor([1, 2, 5])
    a, b = torch.randn(3, D), torch.randn(3, D)
    out_a, out_b = t(ids, a), t(ids, b)
    torch.testing.assert_close(out_a[1:], out_b[1:])  # items 2, 5: id embedding has no influence
    assert not torch.allclose(out_a[0], out_b[0])
    torch.testing.assert_close(out_a[1:], t.combine(torch.zeros(2, D), VALUES[[2, 5]]))  # = a brand-new item
    features_only = tower(use_ids=False)
    torch.testing.assert_close(features_only(ids, a), features_only(ids, b))


def model_cfg(*overrides):
    return load_config(None, ["model.item_features.enabled=true", "model.embedding_dim=8", "model.attention_dim=8",
                              "model.linear_dim=8", "data.max_seq_len=10", *overrides])


def test_model_uses_the_tower_for_inputs_and_scored_vectors():
    cfg = model_cfg("model.l2_norm_output=false")
    torch.manual_seed(0)
    model = build_model(cfg, 5, TABLE).eval()
    ids = torch.arange(6)
    expected = model.item_tower(ids, model.item_embeddings(ids))
    torch.testing.assert_close(model.item_vectors(ids), expected)
    batch = SimpleNamespace(item_ids=torch.tensor([1, 3, 5]), timestamps=torch.tensor([1, 2, 3]),
                            offsets=torch.tensor([0, 3]), max_len=3)
    with torch.no_grad():
        model.item_tower.tables["year"].weight[5] += 1.0  # only item 3's input token changes
    enc = model.encode(batch)
    ref = model.encode_embeddings(model.item_tower(batch.item_ids, model.item_embeddings(batch.item_ids)), batch)
    torch.testing.assert_close(enc, ref)
    with pytest.raises(ValueError, match="needs the item feature table"):
        build_model(cfg, 5)
    with pytest.raises(ValueError, match="cover 5 items, the model has 4"):
        RetrievalModel(cfg.model, 4, 10, item_features=TABLE)


def test_tower_rebuilds_from_state_dict():
    cfg = model_cfg("model.item_features.combine=mlp", "model.item_features.pooling=sum")
    model = build_model(cfg, 5, TABLE)
    model.item_tower.drop_ids(torch.tensor([False, True, False, False, False, False]))
    state = model.state_dict()
    layout = features_from_state(state)
    assert layout.names == TABLE.names and layout.widths == TABLE.widths
    assert layout.cardinalities == TABLE.cardinalities
    rebuilt = build_model(cfg, 5, layout)
    rebuilt.load_state_dict(state)
    ids = torch.arange(6)
    torch.testing.assert_close(rebuilt.item_vectors(ids), model.item_vectors(ids))
    assert features_from_state({}) is None


@pytest.mark.parametrize("overrides, match", [
    (["model.item_features.combine=concat"], "model.item_features.combine"),
    (["model.item_features.pooling=max"], "model.item_features.pooling"),
    (["data.holdout_items_frac=1.0"], "data.holdout_items_frac"),
    (["model.item_features.content_only_max_events=-2"], "content_only_max_events"),
    (["data.name=amzn-books"], "has no item features"),
    (["task=ranking", "data.min_seq_len=4", "data.holdout_items_frac=0.1"], "needs task=retrieval"),
    (["task=ranking", "data.min_seq_len=4", "eval.item_groups=true"], "item_groups.*needs task=retrieval"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        model_cfg(*overrides)
    with pytest.raises(ConfigError, match="use_ids"):
        load_config(None, ["model.item_features.use_ids=false"])


class _FixedModel(torch.nn.Module):
    """User vectors and item vectors given directly: item scores = table rows, ranks known in advance."""

    def __init__(self, user_vecs, table):
        super().__init__()
        self.user_vecs, self.table = user_vecs, table

    def user_vectors(self, batch):
        return self.user_vecs

    def item_vectors(self, ids):
        return self.table[ids]


def test_evaluation_reports_cold_and_unseen_groups():
    # 4 items scored 4 > 3 > 2 > 1 for every user: rank of item i is 5 - i
    table = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    targets = torch.tensor([4, 1, 2, 3])  # ranks 1, 4, 3, 2
    batch = SimpleNamespace(target_ids=targets, item_ids=torch.zeros(0, dtype=torch.long),
                            offsets=torch.zeros(5, dtype=torch.long), to=lambda d: batch)
    counts = torch.tensor([0, 0, 3, 5, 6])  # item 1 never seen, items 1-3 cold (<= 5 training events), 4 not
    groups = item_groups(counts, 5)
    assert groups["unseen"].tolist() == [False, True, False, False, False]
    cfg = SimpleNamespace(ks=[1, 2], ndcg_ks=[2], item_chunk_size=2, remove_history=False)
    m = evaluate(_FixedModel(torch.ones(4, 1), table), [batch], 4, cfg, groups=groups)
    assert m["num_users"] == 4 and m["hr@1"] == 0.25
    assert m["cold/num_users"] == 3 and m["cold/hr@2"] == pytest.approx(1 / 3)  # ranks 4, 3, 2
    assert m["cold/mrr"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2) / 3)
    assert m["unseen/num_users"] == 1 and m["unseen/hr@2"] == 0.0 and m["unseen/mrr"] == 0.25


def test_combinations_not_supported_yet_are_refused():
    """Merged features that do not compose yet fail in the one config pass, naming the key."""
    import pytest as _pytest

    from hstu.trainer.config import ConfigError, RunConfig
    from hstu.trainer.config_checks import _check_item_features, _Checks

    cfg = RunConfig()
    cfg.data.name, cfg.data.holdout_items_frac = "events", 0.05
    with _pytest.raises(ConfigError, match="holdout_items_frac.*data.name=events"):
        _check_item_features(_Checks(cfg))  # the item-feature part of the one pass (events paths unset here)
