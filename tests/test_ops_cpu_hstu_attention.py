"""ops.backend=cpu: the C++ fused attention kernel against the PyTorch reference (forward, every gradient, every
mask / bias option), its time buckets against the reference's, the portable (non-AVX2) path, NaN propagation."""

import pytest
import torch

from cpu_kernel_utils import vector_and_scalar_results
from hstu.ops.backend import Backend
from hstu.ops.cpu.hstu_attention import cpu_attention_plan, cpu_time_buckets
from hstu.ops.hstu_attention import AttentionArgs, jagged_hstu_attention
from hstu.ops.pytorch.hstu_attention import attention_plan, pairwise_time_buckets

LENGTHS = [37, 0, 1, 9, 16, 23, 2, 40, 8, 31]  # empty, single, vector-width multiples and tails, several groups


def _offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)


def _inputs(lengths, H, dqk=5, dv=6, max_pos=41, buckets=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    mk = lambda *s: (0.5 * torch.randn(*s, generator=g)).requires_grad_()  # noqa: E731
    ts = torch.cat([torch.randint(0, 10**7, (n,), generator=g).sort()[0] for n in lengths]).long()
    return dict(q=mk(T, H, dqk), k=mk(T, H, dqk), v=mk(T, H, dv), pos_weights=mk(2 * max_pos - 1),
                time_weights=mk(buckets + 1), timestamps=ts,
                query_timestamps=torch.randint(10**7, 2 * 10**7, (len(lengths),), generator=g))


CASES = {
    "no_bias": dict(pos=False, time=False, query=False, targets=None, causal=True, ctx=0),
    "rab": dict(pos=True, time=True, query=False, targets=None, causal=True, ctx=0),
    "rab_query_ts_two_heads": dict(pos=True, time=True, query=True, targets=None, causal=True, ctx=0, H=2),
    "pos_only_targets_contextual": dict(pos=True, time=False, query=False, targets=True, causal=True, ctx=3),
    "time_only_non_causal_targets": dict(pos=False, time=True, query=True, targets=True, causal=False, ctx=0),
}


def _args(c, inp, lengths):
    targets = torch.tensor([min(n, 3) for n in lengths]) if c["targets"] else None
    return AttentionArgs(_offsets(lengths), max(lengths), alpha=0.8, norm=40.0, causal=c["causal"],
                         pos_weights=inp["pos_weights"] if c["pos"] else None,
                         time_weights=inp["time_weights"] if c["time"] else None,
                         timestamps=inp["timestamps"] if c["time"] else None,
                         query_timestamps=inp["query_timestamps"] if c["query"] else None,
                         num_targets=targets, contextual_len=c["ctx"])


@pytest.mark.parametrize("row_block", [64, 7])  # 7: several row blocks per sequence (causal columns skipped)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_kernel_matches_pytorch_reference(case, row_block, monkeypatch):
    monkeypatch.setattr("hstu.ops.cpu.hstu_attention.ROW_BLOCK", row_block)
    c = CASES[case]
    inp = _inputs(LENGTHS, H=c.get("H", 1))
    args = _args(c, inp, LENGTHS)
    params = [inp[n] for n in ("q", "k", "v", "pos_weights", "time_weights")]
    out = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], args, backend=Backend.CPU)
    # reference in float64 (the kernel computes in float32: compare both to the exact value)
    p64 = [p.detach().double().requires_grad_() for p in params]
    args64 = AttentionArgs(**{**args.__dict__, "pos_weights": p64[3] if c["pos"] else None,
                              "time_weights": p64[4] if c["time"] else None})
    ref = jagged_hstu_attention(p64[0], p64[1], p64[2], args64, backend=Backend.PYTORCH)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g_out, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, p64, g_out.double(), allow_unused=True)
    for name, a, b in zip(["q", "k", "v", "pos", "time"], grads, grads_ref):
        if b is None or not b.abs().sum():
            assert a is None or not a.abs().sum(), name
            continue
        assert a is not None, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)
    if c["pos"]:
        assert grads[3].abs().sum() > 0
    if c["time"]:
        assert grads[4].abs().sum() > 0


def test_result_does_not_depend_on_the_thread_count(monkeypatch):
    """Forward units are independent and the backward sums its rab gradients in fixed lanes: 1, 2 and 3 threads
    give bit-identical outputs and gradients (several groups, padding rows, two heads, every bias)."""
    monkeypatch.setattr("hstu.ops.cpu.hstu_attention.ROW_BLOCK", 8)
    lengths = LENGTHS * 3 + [64, 61, 50]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            inp = _inputs(lengths, H=2)
            args = _args(CASES["rab_query_ts_two_heads"], inp, lengths)
            out = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], args, backend=Backend.CPU)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
            results.append([out.detach()] + [inp[n].grad for n in ("q", "k", "v", "pos_weights", "time_weights")])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_views_of_a_projection_output_are_read_in_place_with_the_same_result():
    """q, k, v as column slices of one [T, 3·H·d] tensor (what the layer's split gives): read with their row stride,
    not copied — same output and gradients as contiguous copies, bit for bit."""
    inp = _inputs(LENGTHS, H=2, dqk=5, dv=5)
    args = _args(CASES["rab"], inp, LENGTHS)
    T = sum(LENGTHS)
    qkv = torch.cat([inp[n].detach().reshape(T, 10) for n in ("q", "k", "v")], dim=1).requires_grad_()
    q, k, v = (x.reshape(T, 2, 5) for x in qkv.split(10, dim=1))
    assert q.stride(0) == 30 and not q.is_contiguous()
    out = jagged_hstu_attention(q, k, v, args, backend=Backend.CPU)
    ref = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], args, backend=Backend.CPU)
    assert torch.equal(out, ref)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    dq, dk, dv = torch.autograd.grad(ref, [inp["q"], inp["k"], inp["v"]], g)
    assert torch.equal(dqkv, torch.cat([x.reshape(T, 10) for x in (dq, dk, dv)], dim=1))


def test_time_buckets_equal_the_reference_exactly():
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.randint(0, 2**40, (64, 50), generator=g), torch.randint(0, 3000, (64, 50), generator=g)])
    t_next = torch.cat([torch.randint(0, 2**40, (64, 50), generator=g), torch.randint(0, 3000, (64, 50), generator=g)])
    t[0, :10] = t_next[0, 0]  # Δ = 0 and ±1
    t[0, 10:12] = t_next[0, 0] + torch.tensor([1, -1])
    for base, nb in ((0.301, 128), (1.0, 20), (0.05, 1000)):
        got = cpu_time_buckets(t_next, t, base, nb)
        assert got.dtype == torch.int16
        assert torch.equal(got.long(), pairwise_time_buckets(t_next, t, base, nb)), (base, nb)
    # every |Δ| up to 2^21 and Δ around each power of two up to 2^62, both signs (G = n groups of L = 1)
    d = torch.arange(-(2**21), 2**21 + 1)
    powers = torch.tensor([2**e + o for e in range(22, 63) for o in (-1, 0, 1)])
    d = torch.cat([d, powers, -powers]).view(-1, 1)
    got = cpu_time_buckets(d, torch.zeros_like(d), 0.301, 128)
    assert torch.equal(got.long(), pairwise_time_buckets(d, torch.zeros_like(d), 0.301, 128))


def test_cpu_plan_shared_by_layers_equals_per_call_plan():
    inp = _inputs(LENGTHS, H=1)
    args = _args(CASES["rab_query_ts_two_heads"] | {"H": 1}, inp, LENGTHS)
    plan = cpu_attention_plan(args.offsets, norm=args.norm, pos_table_size=inp["pos_weights"].numel(),
                              time_table_size=inp["time_weights"].numel(), timestamps=inp["timestamps"],
                              query_timestamps=inp["query_timestamps"], num_tokens=sum(LENGTHS))
    ref_plan = attention_plan(args.offsets, norm=args.norm, pos_table_size=inp["pos_weights"].numel(),
                              time_table_size=inp["time_weights"].numel(), timestamps=inp["timestamps"],
                              query_timestamps=inp["query_timestamps"], num_tokens=sum(LENGTHS))
    for g, r in zip(plan.groups, ref_plan.groups):
        assert torch.equal(g.time_idx.long(), r.time_idx)
    a = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], args, backend="cpu", plan=plan)
    b = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], args, backend="cpu", plan=plan)  # cached group inputs
    c = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], args, backend="cpu")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_nan_input_propagates_and_float64_is_refused():
    inp = _inputs([12, 5], H=1)
    args = _args(CASES["rab"], inp, [12, 5])
    k = inp["k"].detach().clone()
    k[3] = float("nan")  # key 3 of sequence 0: every later query of that sequence sees it
    out = jagged_hstu_attention(inp["q"], k, inp["v"], args, backend="cpu")
    ref = jagged_hstu_attention(inp["q"], k, inp["v"], args, backend="pytorch")
    assert torch.isnan(out[3:12]).all() and torch.isfinite(out[12:]).all() and torch.isfinite(out[:3]).all()
    # the reference also turns masked entries into NaN (SiLU(NaN)·0); the kernel skips masked keys entirely
    assert (torch.isnan(ref) | ~torch.isnan(out)).all()
    with pytest.raises(ValueError, match="ops.backend=cpu needs float32"):
        jagged_hstu_attention(inp["q"].double(), inp["k"].double(), inp["v"].double(), args, backend="cpu")


def test_portable_path_without_avx2_matches(tmp_path):
    """HSTU_CPU_SCALAR=1 selects the scalar code of the same build (CPUs without AVX2/FMA, e.g. aarch64)."""
    vec, sca = vector_and_scalar_results(
        "from test_ops_cpu_hstu_attention import CASES, LENGTHS, _args, _inputs\n"
        "from hstu.ops.hstu_attention import jagged_hstu_attention\n"
        "inp = _inputs(LENGTHS, H=2)\n"
        "args = _args(CASES['rab'], inp, LENGTHS)\n"
        "out = jagged_hstu_attention(inp['q'], inp['k'], inp['v'], args, backend='cpu')\n"
        "out.sum().backward()\n"
        "torch.save([out.detach(), inp['q'].grad, inp['time_weights'].grad], OUT)\n", tmp_path)
    for a, b in zip(vec, sca):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
