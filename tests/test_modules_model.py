"""RetrievalModel (HSTU research/production, SASRec): causality at model level, batching invariance, API."""

import types

import pytest
import torch

from hstu.modules.model import RetrievalModel, build_model, l2_normalize
from hstu.modules.sasrec import SASRecEncoder
from hstu.trainer.config import ModelConfig, RunConfig

NUM_ITEMS, MAX_SEQ_LEN = 50, 12
ARCHS = [("hstu", "research"), ("hstu", "production"), ("sasrec", "research")]


def _model(arch, variant, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, variant=variant, embedding_dim=8, num_layers=2, num_heads=2, attention_dim=4,
                      linear_dim=4, ffn_dim=8, dropout=0.2, **kw)
    return RetrievalModel(cfg, NUM_ITEMS, MAX_SEQ_LEN).double().eval()


def _batch(lengths, seed=0, with_targets=True):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    ts = torch.cat([1_500_000_000 + torch.randint(0, 10**5, (n,), generator=g).cumsum(0) for n in lengths])
    last = torch.stack([ts[e - 1] for e in offsets[1:].tolist()])
    return types.SimpleNamespace(
        item_ids=torch.randint(1, NUM_ITEMS + 1, (T,), generator=g), timestamps=ts, offsets=offsets,
        lengths=torch.tensor(lengths), max_len=max(lengths),
        target_timestamps=last + 3600 if with_targets else None,
    )


def _replace(batch, **kw):
    d = dict(vars(batch))
    d.update(kw)
    return types.SimpleNamespace(**d)


@pytest.mark.parametrize("arch,variant", ARCHS)
def test_changing_future_items_never_changes_earlier_outputs(arch, variant):
    model = _model(arch, variant)
    batch = _batch([3, 10, 6])
    base = model.encode(batch)
    s = int(batch.offsets[1])  # sequence 1 = rows s .. s+9
    for p in (0, 4, 8):
        ids = batch.item_ids.clone()
        ids[s + p + 1 : s + 10] = (ids[s + p + 1 : s + 10] % NUM_ITEMS) + 1  # every later item changes
        out = model.encode(_replace(batch, item_ids=ids))
        torch.testing.assert_close(out[: s + p + 1], base[: s + p + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[s + 10 :], base[s + 10 :], rtol=0, atol=1e-12)  # other sequences
        assert not torch.allclose(out[s + p + 1 : s + 10], base[s + p + 1 : s + 10]), "later rows must change"


@pytest.mark.parametrize("arch,variant", ARCHS)
def test_changing_future_timestamps_never_changes_earlier_outputs(arch, variant):
    # research rab: row i uses t_{i+1}, so timestamps after position p + 1 must not affect rows <= p;
    # production: time embedding is relative to the (given) query time, so timestamps after p must not matter.
    model = _model(arch, variant)
    batch = _batch([10])
    base = model.encode(batch)
    p = 4
    first_free = p + 2 if variant == "research" and arch == "hstu" else p + 1
    ts = batch.timestamps.clone()
    ts[first_free:] += 10**6
    out = model.encode(_replace(batch, timestamps=ts))
    torch.testing.assert_close(out[: p + 1], base[: p + 1], rtol=0, atol=1e-12)
    if arch == "hstu":
        assert not torch.allclose(out[first_free:], base[first_free:])
    if arch == "hstu" and variant == "research":  # row p does see t_{p+1} (the time of the item it predicts)
        ts2 = batch.timestamps.clone()
        ts2[p + 1] += 10**6
        assert not torch.allclose(model.encode(_replace(batch, timestamps=ts2))[p], base[p])


@pytest.mark.parametrize("arch,variant", ARCHS)
def test_encoding_independent_of_batching(arch, variant):
    model = _model(arch, variant, seed=3)
    lengths = [4, 12, 1, 7]
    batch = _batch(lengths, seed=5)
    full = model.encode(batch)
    users = model.user_vectors(batch)
    for b, (s, e) in enumerate(zip(batch.offsets[:-1].tolist(), batch.offsets[1:].tolist())):
        alone = _replace(batch, item_ids=batch.item_ids[s:e], timestamps=batch.timestamps[s:e],
                         offsets=torch.tensor([0, e - s]), lengths=torch.tensor([e - s]), max_len=e - s,
                         target_timestamps=batch.target_timestamps[b : b + 1])
        torch.testing.assert_close(full[s:e], model.encode(alone), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(users[b], full[e - 1], rtol=0, atol=0)


def test_model_api_and_normalisation():
    model = _model("hstu", "research")
    ids = torch.tensor([0, 1, 7, NUM_ITEMS])
    raw = model.embed_items(ids)
    assert raw.shape == (4, 8) and torch.all(raw[0] == 0), "row 0 is padding"
    assert raw[1:].abs().max() <= 0.04 + 1e-12, "truncated normal std 0.02 cut at 2 std"
    vec = model.item_vectors(ids[1:])
    torch.testing.assert_close(vec.norm(dim=1), torch.ones(3, dtype=vec.dtype))
    batch = _batch([3, 5])
    enc = model.encode(batch)
    torch.testing.assert_close(enc.norm(dim=1), torch.ones(8, dtype=enc.dtype))
    assert model.user_vectors(batch).shape == (2, 8)
    # the dense tower holds no item table (embedding stage is swappable)
    assert not any(p.shape[0] == NUM_ITEMS + 1 for p in model.encoder.parameters())
    torch.testing.assert_close(model.encode_embeddings(model.embed_items(batch.item_ids), batch), enc)
    torch.testing.assert_close(l2_normalize(torch.zeros(1, 3)), torch.zeros(1, 3))


def test_no_l2_and_empty_sequence():
    model = _model("hstu", "production", l2_norm_output=False)
    batch = _batch([3, 4])
    b2 = _replace(batch, offsets=torch.tensor([0, 3, 3, 7]), lengths=torch.tensor([3, 0, 4]),
                  target_timestamps=torch.tensor([batch.target_timestamps[0], 0, batch.target_timestamps[1]]))
    users = model.user_vectors(b2)
    assert torch.all(users[1] == 0) and abs(users[0].norm().item() - 1.0) > 1e-3, "not normalised"
    torch.testing.assert_close(users[[0, 2]], model.user_vectors(batch))


def test_build_model_chooses_architecture():
    cfg = RunConfig()
    cfg.data.max_seq_len = 20
    cfg.model.arch = "sasrec"
    m = build_model(cfg, 30)
    assert isinstance(m.encoder, SASRecEncoder) and len(m.encoder.blocks) == cfg.model.num_layers
    assert m.encoder.position_embeddings.num_embeddings == 20
    cfg.model.arch = "hstu"
    m = build_model(cfg, 30)
    assert m.encoder.layers[0].pos_weights.numel() == 2 * 20 - 1
    assert m.encoder.layers[0].time_weights.numel() == 129
    cfg.model.arch = "bert"
    with pytest.raises(ValueError, match="arch"):
        build_model(cfg, 30)


def test_training_mode_backward_all_architectures():
    for arch, variant in ARCHS:
        model = _model(arch, variant).train()
        batch = _batch([5, 2], with_targets=False)
        model.encode(batch).pow(2).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (arch, variant, missing)
