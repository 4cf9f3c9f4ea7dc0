"""HSTU layers/encoder: jagged layer == straightforward padded dense layer (forward + grads), both variants;
batching invariance; production input time buckets."""

import math

import pytest
import torch
import torch.nn.functional as F

from hstu.modules.hstu import HSTUEncoder, ProductionHSTULayer, ResearchHSTULayer, input_time_bucket_ids
from hstu.ops.hstu_attention import AttentionArgs, jagged_hstu_attention
from hstu.trainer.config import ModelConfig

MAX_SEQ_LEN = 9


def _cfg(variant, **kw):
    base = dict(variant=variant, embedding_dim=8, num_layers=2, num_heads=2, attention_dim=3, linear_dim=4,
                dropout=0.0, num_time_buckets=128)
    base.update(kw)
    return ModelConfig(**base)


def _jagged(lengths, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    T = sum(lengths)
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    gaps = torch.randint(0, 10**5, (T,), generator=g)
    ts = torch.cat([1_600_000_000 + gaps[s:e].cumsum(0) for s, e in zip(offsets[:-1], offsets[1:])])
    qts = torch.stack([ts[e - 1] + 7200 if e > s else torch.tensor(1_600_000_000)
                       for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    return x, offsets, ts, qts


def _pad(x, offsets, N):
    return torch.stack([F.pad(x[s:e], (0, 0, 0, N - (e - s))) for s, e in zip(offsets[:-1], offsets[1:])])


def _unpad(xp, offsets):
    return torch.cat([xp[b, : e - s] for b, (s, e) in enumerate(zip(offsets[:-1], offsets[1:]))])


def _dense_attention(q, k, v, lengths, rab, alpha, norm):
    """q, k [B, N, H, dqk], v [B, N, H, dv], rab [B, N, N] -> [B, N, H*dv] (causal, padded keys masked)."""
    B, N = q.shape[:2]
    s = alpha * torch.einsum("bihd,bjhd->bhij", q, k) + rab.unsqueeze(1)
    mask = torch.ones(N, N).tril().bool().unsqueeze(0) & (torch.arange(N).view(1, 1, N) < lengths.view(B, 1, 1))
    a = F.silu(s) / norm * mask.unsqueeze(1)
    return torch.einsum("bhij,bjhd->bihd", a, v).reshape(B, N, -1)


def dense_research_layer(layer, x, offsets, ts, qts):
    """GR research SequentialTransductionUnitJagged written out on padded tensors (GR's ext-timestamp trick)."""
    lengths = offsets[1:] - offsets[:-1]
    B, N, D = len(lengths), int(lengths.max()), x.shape[1]
    H, dqk, dv = layer.num_heads, layer.attention_dim, layer.linear_dim
    xp = _pad(x, offsets, N)
    uvqk = F.silu(F.layer_norm(xp, [D], eps=1e-6) @ layer.uvqk)
    u, v, q, k = torch.split(uvqk, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
    rab = torch.zeros(B, N, N, dtype=x.dtype)
    if layer.pos_weights is not None:
        P = layer.max_seq_len
        rab = rab + layer.pos_weights[torch.arange(N).view(1, N) - torch.arange(N).view(N, 1) + P - 1]
    if layer.time_weights is not None:
        ext = torch.zeros(B, N + 1, dtype=torch.long)
        for b, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            ext[b, : e - s] = ts[s:e]
            ext[b, e - s] = qts[b] if qts is not None else ts[e - 1]
        delta = ext[:, 1:].unsqueeze(2) - ext[:, :-1].unsqueeze(1)
        bucket = (torch.log(delta.abs().clamp(min=1).float()) / 0.301).long().clamp(0, 128)
        rab = rab + layer.time_weights[bucket]
    av = _dense_attention(q.reshape(B, N, H, dqk), k.reshape(B, N, H, dqk), v.reshape(B, N, H, dv), lengths, rab,
                          1.0, MAX_SEQ_LEN)
    out = layer.output(u * F.layer_norm(av, [H * dv], eps=1e-6)) + xp
    return _unpad(out, offsets)


def dense_production_layer(layer, x, offsets):
    """GR STULayer (pytorch path) written out on padded tensors."""
    lengths = offsets[1:] - offsets[:-1]
    B, N = len(lengths), int(lengths.max())
    H, dqk, dv = layer.num_heads, layer.attention_dim, layer.linear_dim
    xp = _pad(x, offsets, N)
    uvqk = layer.input_norm(xp) @ layer.uvqk_weight + layer.uvqk_bias
    u, v, q, k = torch.split(uvqk, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
    u = F.silu(u)
    av = _dense_attention(q.reshape(B, N, H, dqk), k.reshape(B, N, H, dqk), v.reshape(B, N, H, dv), lengths,
                          torch.zeros(B, N, N, dtype=x.dtype), 1 / math.sqrt(dqk), MAX_SEQ_LEN)
    y = torch.cat([u, av, u * layer.output_norm(av)], dim=-1)
    return _unpad(y @ layer.output_weight + xp, offsets)


@pytest.mark.parametrize("variant,rab_pos,rab_time,use_query", [
    ("research", True, True, False), ("research", True, True, True), ("research", False, True, True),
    ("research", True, False, False), ("production", False, False, False),
])
def test_layer_matches_dense_padded_layer(variant, rab_pos, rab_time, use_query):
    torch.manual_seed(0)
    cfg = _cfg(variant, use_rab_position=rab_pos, use_rab_time=rab_time)
    layer_cls = ResearchHSTULayer if variant == "research" else ProductionHSTULayer
    layer = layer_cls(cfg, MAX_SEQ_LEN).double()
    with torch.no_grad():  # non-trivial affine LN params for the production variant
        for n, p in layer.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    lengths = [4, 1, 7, 3]
    x, offsets, ts, qts = _jagged(lengths)
    qts = qts if use_query else None
    out = layer(x, offsets, max(lengths), ts, qts)
    if variant == "research":
        ref = dense_research_layer(layer, x, offsets, ts, qts)
    else:
        ref = dense_production_layer(layer, x, offsets)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    params = [x] + [p for _, p in layer.named_parameters()]
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g)
    grads_ref = torch.autograd.grad(ref, params, g)
    for n, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=n)
        assert a.abs().sum() > 0, f"no gradient reaches {n}"


@pytest.mark.parametrize("variant", ["research", "production"])
def test_encoder_output_independent_of_batching(variant):
    torch.manual_seed(1)
    enc = HSTUEncoder(_cfg(variant, dropout=0.3), MAX_SEQ_LEN).double().eval()
    lengths = [5, 9, 1, 3]
    x, offsets, ts, qts = _jagged(lengths, seed=2)
    for q in (None, qts):
        batched = enc(x, offsets, max(lengths), ts, q)
        for b, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            alone = enc(x[s:e], torch.tensor([0, e - s]), e - s, ts[s:e], None if q is None else q[b : b + 1])
            torch.testing.assert_close(batched[s:e], alone, rtol=1e-10, atol=1e-12)


def test_production_input_time_buckets():
    d = torch.tensor([0, 59, 60, 239, 240, 3600, -500, 60 * 2048**2 * 4])
    assert input_time_bucket_ids(d, 2048, "sqrt").tolist() == [0, 0, 1, 1, 2, 7, 0, 2048]
    d = torch.tensor([0, 60, 163, 3600, 60 * 10**6])  # ln(163/60) = 0.999 -> 0; ln(60) = 4.09; ln(1e6) = 13.8
    assert input_time_bucket_ids(d, 10, "log").tolist() == [0, 0, 0, 4, 10]


def test_production_time_embedding_uses_query_time():
    torch.manual_seed(0)
    enc = HSTUEncoder(_cfg("production", num_layers=1), MAX_SEQ_LEN).double().eval()
    x, offsets, ts, qts = _jagged([4])
    a = enc(x, offsets, 4, ts, qts)
    b = enc(x, offsets, 4, ts, qts + 10**7)
    assert not torch.allclose(a[0], b[0]), "query time must reach every position in the production variant"
    torch.testing.assert_close(enc(x, offsets, 4, ts, None), enc(x, offsets, 4, ts, ts[3:4]))


def test_hstu_rejects_attention_dropout_and_bad_variant():
    with pytest.raises(ValueError, match="attn_dropout"):
        HSTUEncoder(_cfg("research", attn_dropout=0.1), MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="variant"):
        HSTUEncoder(_cfg("fancy"), MAX_SEQ_LEN)


def frozen_layer_forward(layer, variant, x, offsets, max_len, ts, qts):
    """The HSTU layers' math as it was before the gating went through ops/norm_gating.py (F.layer_norm + U gating
    + torch F.dropout written out), the reference for `test_gating_through_dispatcher_keeps_layer_math`."""
    T, D = x.shape
    H, dqk, dv = layer.num_heads, layer.attention_dim, layer.linear_dim
    split = [H * dv, H * dv, H * dqk, H * dqk]
    if variant == "research":
        u, v, q, k = torch.split(F.silu(F.layer_norm(x, [D], eps=1e-6) @ layer.uvqk), split, dim=1)
        extra = dict(alpha=1.0, pos_weights=layer.pos_weights, time_weights=layer.time_weights, timestamps=ts,
                     query_timestamps=qts, time_bucket_base=layer.time_bucket_base)
    else:
        ln_x = F.layer_norm(x, [D], layer.input_norm.weight, layer.input_norm.bias, 1e-6)
        u, v, q, k = torch.split(torch.addmm(layer.uvqk_bias, ln_x, layer.uvqk_weight), split, dim=1)
        u = F.silu(u)
        extra = dict(alpha=1.0 / math.sqrt(dqk))
    args = AttentionArgs(offsets, max_len, norm=float(layer.max_seq_len), causal=True, **extra)
    attn = jagged_hstu_attention(q.reshape(T, H, dqk), k.reshape(T, H, dqk), v.reshape(T, H, dv), args)
    attn = attn.reshape(T, H * dv)
    if variant == "research":
        y = u * F.layer_norm(attn, [H * dv], eps=1e-6)
        return layer.output(F.dropout(y, p=layer.dropout, training=True)) + x
    y = torch.cat([u, attn, u * F.layer_norm(attn, [H * dv], layer.output_norm.weight, layer.output_norm.bias,
                                             1e-6)], dim=1)
    return torch.addmm(x, F.dropout(y, p=layer.dropout, training=True), layer.output_weight)


@pytest.mark.parametrize("variant", ["research", "production"])
def test_gating_through_dispatcher_keeps_layer_math(variant):
    """PyTorch backend, training, dropout 0.3, fp32: the layer (gating via the norm_gating dispatcher, torch
    dropout) gives bit-identical outputs and gradients to the frozen pre-dispatcher math under the same seed."""
    torch.manual_seed(0)
    layer = (ResearchHSTULayer if variant == "research" else ProductionHSTULayer)(
        _cfg(variant, dropout=0.3, use_rab_position=True, use_rab_time=True), MAX_SEQ_LEN).train()
    x, offsets, ts, qts = _jagged([3, 0, 5, 1], seed=3)
    x = x.detach().float()
    max_len = 5
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    results = []
    for fn in (lambda xi: layer(xi, offsets, max_len, ts, qts),
               lambda xi: frozen_layer_forward(layer, variant, xi, offsets, max_len, ts, qts)):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(1234)
        out = fn(xi)
        out.backward(dy)
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (out, gx, gp), (ref, ref_gx, ref_gp) = results
    assert (out != 0).any() and (ref == 0).sum() < ref.numel()
    assert torch.equal(out, ref) and torch.equal(gx, ref_gx)
    assert gp.keys() == ref_gp.keys() and all(torch.equal(gp[n], ref_gp[n]) for n in gp)
