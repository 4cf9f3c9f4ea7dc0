"""Jagged HSTU attention: reference op vs the naive dense reference, bucket values, masks, dispatcher."""

import math

import pytest
import torch
import torch.nn.functional as F

from hstu.ops.backend import Backend, resolve_backend
from hstu.ops.hstu_attention import AttentionArgs, jagged_hstu_attention
from hstu.ops.jagged import next_timestamps, positions_in_sequence
from hstu.ops.pytorch.hstu_attention import length_groups, time_bucket_ids
from hstu.ops.pytorch.hstu_attention_dense import padded_hstu_attention_reference


def _offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)


def _inputs(lengths, H=2, dqk=3, dv=4, max_pos=8, buckets=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    ts = torch.cat([torch.randint(0, 10**6, (n,), generator=g).sort()[0] for n in lengths] or [torch.zeros(0)]).long()
    return dict(
        q=mk(T, H, dqk), k=mk(T, H, dqk), v=mk(T, H, dv), pos_weights=mk(2 * max_pos - 1), time_weights=mk(buckets + 1),
        timestamps=ts, query_timestamps=torch.randint(10**6, 2 * 10**6, (len(lengths),), generator=g),
    )


CASES = {
    "no_bias": dict(use_pos=False, use_time=False, use_query=False, targets=None, causal=True),
    "rab": dict(use_pos=True, use_time=True, use_query=False, targets=None, causal=True),
    "rab_query_ts": dict(use_pos=True, use_time=True, use_query=True, targets=None, causal=True),
    "pos_only_targets": dict(use_pos=True, use_time=False, use_query=False, targets=[1, 0, 2, 0, 1, 3], causal=True),
    "non_causal_targets": dict(use_pos=False, use_time=True, use_query=True, targets=[1, 0, 2, 0, 1, 3], causal=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_jagged_matches_dense_reference_forward_and_grads(case):
    c = CASES[case]
    lengths = [5, 0, 1, 7, 2, 3]  # includes 0 and 1
    inp = _inputs(lengths)
    offsets = _offsets(lengths)
    kw = dict(alpha=0.7, norm=7.0, causal=c["causal"], time_bucket_base=0.301,
              pos_weights=inp["pos_weights"] if c["use_pos"] else None,
              time_weights=inp["time_weights"] if c["use_time"] else None,
              timestamps=inp["timestamps"] if c["use_time"] else None,
              query_timestamps=inp["query_timestamps"] if c["use_query"] else None,
              num_targets=torch.tensor(c["targets"]) if c["targets"] else None)
    params = [inp["q"], inp["k"], inp["v"], inp["pos_weights"], inp["time_weights"]]
    out = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], AttentionArgs(offsets, max(lengths), **kw))
    ref = padded_hstu_attention_reference(inp["q"], inp["k"], inp["v"], AttentionArgs(offsets, max(lengths), **kw))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g_out, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, params, g_out, allow_unused=True)
    for name, a, b in zip(["q", "k", "v", "pos", "time"], grads, grads_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            assert a is not None, name
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    if c["use_pos"]:
        assert grads[3].abs().sum() > 0
    if c["use_time"]:
        assert grads[4].abs().sum() > 0


def test_many_length_groups_match_single_padded_group(monkeypatch):
    import hstu.ops.pytorch.hstu_attention as ref_mod

    lengths = [40, 1, 0, 17, 33, 2, 9, 40, 5, 28]
    inp = _inputs(lengths, H=1, dqk=2, dv=2, max_pos=41, buckets=128, seed=3)
    offsets = _offsets(lengths)
    kw = dict(alpha=1.0, norm=41.0, pos_weights=inp["pos_weights"], time_weights=inp["time_weights"],
              timestamps=inp["timestamps"], query_timestamps=inp["query_timestamps"])
    assert len(length_groups(lengths)) >= 2
    out = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], AttentionArgs(offsets, 40, **kw))
    # everything padded into one group of length 40 must give the same numbers
    monkeypatch.setattr(ref_mod, "length_groups", lambda ls: [(max(ls), [b for b, n in enumerate(ls) if n > 0])])
    one = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], AttentionArgs(offsets, 40, **kw))
    torch.testing.assert_close(out, one, rtol=1e-10, atol=1e-12)


def test_length_groups_bound_padding_and_cover_every_sequence():
    lengths = [200, 3, 0, 3, 150, 190, 1, 64, 60, 0, 199]
    groups = length_groups(lengths)
    covered = sorted(b for _, members in groups for b in members)
    assert covered == [b for b, n in enumerate(lengths) if n > 0]
    for L, members in groups:
        real = sum(lengths[b] ** 2 for b in members)
        assert L == max(lengths[b] for b in members)
        assert len(members) * L * L - real <= 0.25 * real + 4096
    assert not any(L == 200 and 1 in m for L, m in groups), "short sequence padded to the batch max"


@pytest.mark.parametrize(
    "delta,expected",
    [(0, 0), (1, 0), (-1, 0), (2, 2), (3, 3), (3600, 27), (-3600, 27), (86400, 37), (10**17, 128), (-(10**17), 128)],
)
def test_time_bucket_values(delta, expected):
    # hand-computed: floor(ln 2 / .301) = floor(2.303) = 2; ln 3 / .301 = 3.65; ln 3600 / .301 = 27.2;
    # ln 86400 / .301 = 37.76; ln 1e17 / .301 = 130.0 -> clamp 128
    assert time_bucket_ids(torch.tensor([delta]), 0.301, 128).item() == expected


def test_time_bias_uses_next_timestamp_and_query_timestamp():
    # one sequence t = [0, 2, 3602]; row i uses t_{i+1}; last row uses the query time (or its own time)
    ts = torch.tensor([0, 2, 3602])
    offsets = torch.tensor([0, 3])
    assert next_timestamps(ts, offsets).tolist() == [2, 3602, 3602]
    assert next_timestamps(ts, offsets, torch.tensor([90000])).tolist() == [2, 3602, 90000]
    tw = torch.arange(129, dtype=torch.float64)  # bias = bucket id
    q = torch.zeros(3, 1, 1, dtype=torch.float64)
    v = torch.eye(3, dtype=torch.float64).view(3, 1, 3)  # out_i[j] = weight(i, j)
    args = AttentionArgs(offsets, 3, alpha=1.0, norm=1.0, time_weights=tw, timestamps=ts,
                         query_timestamps=torch.tensor([90000]))
    out = jagged_hstu_attention(q, q, v, args)[:, 0]
    b = lambda d: int(math.floor(math.log(max(abs(d), 1)) / 0.301))  # noqa: E731
    expected_buckets = [[b(2 - 0), None, None], [b(3602 - 0), b(3602 - 2), None],
                        [b(90000 - 0), b(90000 - 2), b(90000 - 3602)]]
    for i in range(3):
        for j in range(3):
            want = 0.0 if expected_buckets[i][j] is None else F.silu(torch.tensor(float(expected_buckets[i][j]))).item()
            assert out[i, j].item() == pytest.approx(want), (i, j)


def _mask_from_outputs(lengths, num_targets, causal):
    """With q = k = 0, pos bias = 1 and v = one-hot rows, out[i, j] = SiLU(1) · valid(i, j)."""
    T = sum(lengths)
    offsets = _offsets(lengths)
    z = torch.zeros(T, 1, 1, dtype=torch.float64)
    v = torch.eye(T, dtype=torch.float64).view(T, 1, T)
    args = AttentionArgs(offsets, max(lengths), alpha=1.0, norm=1.0, causal=causal,
                         pos_weights=torch.ones(2 * max(lengths) - 1, dtype=torch.float64), num_targets=num_targets)
    out = jagged_hstu_attention(z, z, v, args)
    return (out[:, 0] / F.silu(torch.tensor(1.0, dtype=torch.float64))).round().long()


def test_target_candidate_mask():
    # seq0: 3 history + 2 candidates; seq1: 2 history + 0 candidates
    m = _mask_from_outputs([5, 2], torch.tensor([2, 0]), causal=True)
    expected = torch.zeros(7, 7, dtype=torch.long)
    for i in range(3):
        expected[i, : i + 1] = 1  # history: causal
    expected[3, [0, 1, 2, 3]] = 1  # candidate 3: history + itself
    expected[4, [0, 1, 2, 4]] = 1  # candidate 4: history + itself, NOT candidate 3
    expected[5, 5] = 1
    expected[6, [5, 6]] = 1
    assert torch.equal(m, expected)


def test_causal_and_non_causal_mask():
    m = _mask_from_outputs([3, 1], None, causal=True)
    assert torch.equal(m, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]))
    m = _mask_from_outputs([3, 1], torch.tensor([1, 0]), causal=False)
    assert torch.equal(m, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]]))


def test_empty_batch_and_positions():
    q = torch.zeros(0, 2, 3, requires_grad=True)
    out = jagged_hstu_attention(q, q, q, AttentionArgs(torch.tensor([0, 0, 0]), 0, alpha=1.0, norm=1.0))
    assert out.shape == (0, 2, 3)
    assert positions_in_sequence(torch.tensor([0, 2, 2, 5])).tolist() == [0, 1, 0, 1, 2]


def test_backend_resolution_and_triton_hook():
    class Ops:
        backend = "triton"

    class Run:
        ops = Ops()

    assert resolve_backend(None) is Backend.PYTORCH
    assert resolve_backend("PyTorch") is Backend.PYTORCH
    assert resolve_backend(Run()) is Backend.TRITON
    with pytest.raises(ValueError, match="unknown ops backend"):
        resolve_backend("cuda")


def test_input_validation():
    q = torch.randn(3, 1, 2)
    with pytest.raises(ValueError, match="offsets"):
        jagged_hstu_attention(q, q, q, AttentionArgs(torch.tensor([0.0, 3.0]), 3, alpha=1.0, norm=1.0))
    with pytest.raises(ValueError, match="timestamps"):
        jagged_hstu_attention(q, q, q, AttentionArgs(torch.tensor([0, 3]), 3, alpha=1.0, norm=1.0,
                                                     time_weights=torch.zeros(5)))


def test_nothing_gpu_only_imported_at_load():
    import subprocess
    import sys

    code = ("import sys, hstu.ops.hstu_attention, hstu.modules.model; "
            "bad = [m for m in ('triton', 'hstu.ops.triton.hstu_attention') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_int32_offsets_accepted():
    inp = _inputs([2, 3])
    out64 = jagged_hstu_attention(inp["q"], inp["k"], inp["v"], AttentionArgs(_offsets([2, 3]), 3, alpha=1.0, norm=3.0))
    out32 = jagged_hstu_attention(inp["q"], inp["k"], inp["v"],
                                  AttentionArgs(_offsets([2, 3]).int(), 3, alpha=1.0, norm=3.0))
    torch.testing.assert_close(out32, out64)


def test_shared_attention_plan_equals_per_call_plan_and_rab_gradients():
    # a stack of layers shares one attention_plan per batch: output and rab-table gradients must equal the
    # op planning by itself, and the rab tables' gradients must equal a plain index + autograd reference
    from hstu.ops.pytorch.hstu_attention import attention_plan, pytorch_jagged_hstu_attention

    g = torch.Generator().manual_seed(11)
    offsets = torch.tensor([0, 5, 5, 12, 14])
    T, H, d = 14, 2, 4
    q, k, v = (torch.randn(T, H, d, generator=g) for _ in range(3))
    ts = torch.cumsum(torch.randint(0, 5000, (T,), generator=g), 0)
    pos_w, time_w = torch.randn(2 * 16 - 1, generator=g), torch.randn(9, generator=g)
    kw = dict(alpha=0.7, norm=16.0, causal=True, timestamps=ts, time_bucket_base=0.301)

    def run(plan):
        pw, tw = pos_w.clone().requires_grad_(True), time_w.clone().requires_grad_(True)
        args = AttentionArgs(offsets, 7, pos_weights=pw, time_weights=tw, **kw)
        out = pytorch_jagged_hstu_attention(q, k, v, args, plan=plan)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), pw.grad, tw.grad

    plan = attention_plan(offsets, norm=16.0, causal=True, pos_table_size=pos_w.numel(),
                          time_table_size=time_w.numel(), timestamps=ts, time_bucket_base=0.301)
    own, shared = run(None), run(plan)
    for a, b in zip(own, shared):
        assert torch.equal(a, b)
    # independent reference: the bias built with plain indexing (index_put_ backward), dense per sequence
    pw, tw = pos_w.clone().requires_grad_(True), time_w.clone().requires_grad_(True)
    outs = []
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        n = e - s
        if n == 0:
            continue
        i = torch.arange(n)
        t_next = torch.cat([ts[s + 1:e], ts[e - 1:e]])
        delta = (t_next.view(-1, 1) - ts[s:e].view(1, -1)).abs().clamp(min=1).float()
        tb = torch.floor(torch.log(delta) / 0.301).clamp(0, 8).long()
        bias = pw[(i.view(1, -1) - i.view(-1, 1) + 15).clamp(0, 30)] + tw[tb]
        sc = torch.einsum("ihd,jhd->hij", q[s:e] * 0.7, k[s:e]) + bias
        a = torch.nn.functional.silu(sc) * (i.view(-1, 1) >= i.view(1, -1)) / 16.0
        outs.append(torch.einsum("hij,jhd->ihd", a, v[s:e]))
    ref = torch.cat(outs)
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    assert torch.allclose(shared[0], ref, atol=1e-5)
    assert torch.allclose(shared[1], pw.grad, atol=1e-5) and torch.allclose(shared[2], tw.grad, atol=1e-5)
