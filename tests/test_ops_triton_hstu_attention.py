"""Triton jagged HSTU attention vs the PyTorch reference: outputs and gradients (q, k, v, position table, time
table), fp32 and fp16, random jagged lengths including 0 and 1, every mask option, with and without rab.

Runs under TRITON_INTERPRET=1 on CPU (see tests/_triton_interpret.py), on CUDA when there is one."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _triton_interpret import DEVICE, IN_PROCESS, run_file_in_subprocess  # noqa: E402  (sets TRITON_INTERPRET)

from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hstu.ops.attention_args import AttentionArgs  # noqa: E402
from hstu.ops.pytorch.hstu_attention import (  # noqa: E402
    pytorch_jagged_hstu_attention,
    relative_position_ids,
    time_bucket_ids,
)

needs_triton = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see fallback")


def test_subprocess_fallback():
    if IN_PROCESS:
        pytest.skip("the kernels run in this process")
    run_file_in_subprocess(__file__)


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------


def dense_reference(q, k, v, offsets, max_len, *, alpha, norm, causal=True, pos_weights=None, time_weights=None,
                    timestamps=None, query_timestamps=None, time_bucket_base=0.301, num_targets=None,
                    contextual_len=0):
    """Per-sequence dense version of ops/README.md's formula + the contextual prefix (valid |= j < C,
    C = min(contextual_len, n - num_targets)). Used where the project reference lacks contextual_len."""
    outs = []
    for b in range(offsets.numel() - 1):
        s0, s1 = int(offsets[b]), int(offsets[b + 1])
        n = s1 - s0
        if n == 0:
            continue
        i = torch.arange(n, device=q.device).view(n, 1)
        j = torch.arange(n, device=q.device).view(1, n)
        s = alpha * torch.einsum("ihd,jhd->hij", q[s0:s1], k[s0:s1])
        if pos_weights is not None:
            s = s + pos_weights[relative_position_ids(i, j, (pos_weights.numel() + 1) // 2)]
        if time_weights is not None:
            ts = timestamps[s0:s1].long()
            last = query_timestamps[b:b + 1].long() if query_timestamps is not None else ts[-1:]
            t_next = torch.cat([ts[1:], last])
            s = s + time_weights[time_bucket_ids(t_next.view(n, 1) - ts.view(1, n), time_bucket_base,
                                                 time_weights.numel() - 1)]
        valid = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool, device=q.device)
        hist = n
        if num_targets is not None:
            hist = n - min(max(int(num_targets[b]), 0), n)
            valid = valid & ~((i >= hist) & (j >= hist) & (i != j))
        valid = valid | (j < min(contextual_len, hist))
        outs.append(torch.einsum("hij,jhd->ihd", F.silu(s) / norm * valid, v[s0:s1]))
    return torch.cat(outs) if outs else v.new_zeros(0, *v.shape[1:])


def reference(q, k, v, offsets, max_len, **kw):
    """The project reference on a test case's flat dict."""
    return pytorch_jagged_hstu_attention(q, k, v, AttentionArgs(offsets, max_len, **kw))


# ----------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------

LENGTHS = [0, 1, 2, 17, 33, 40, 0, 5]  # multi-block (block 16) + empty and single-row sequences


def make_case(dtype, *, lengths=LENGTHS, heads=2, dqk=12, dv=20, rab=True, targets=False, qts=False, max_pos=None,
              seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + list(lengths)).cumsum(0)
    T, B, N = int(offsets[-1]), len(lengths), max(max(lengths), 1)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    case = dict(
        q=rnd(T, heads, dqk, scale=0.5).to(dtype).requires_grad_(),
        k=rnd(T, heads, dqk, scale=0.5).to(dtype).requires_grad_(),
        v=rnd(T, heads, dv).to(dtype).requires_grad_(),
        offsets=offsets.to(DEVICE),
        max_len=N,
        alpha=0.7,
        norm=float(N),
    )
    if rab:
        P = max_pos or N
        # timestamps: increasing within a sequence, gaps spanning many log buckets
        gaps = torch.randint(0, 10**6, (T,), generator=g) * (torch.rand(T, generator=g) < 0.8)
        case.update(
            pos_weights=rnd(2 * P - 1, scale=0.3).requires_grad_(),
            time_weights=rnd(41, scale=0.3).requires_grad_(),  # 40 buckets
            timestamps=(1_600_000_000 + gaps.cumsum(0)).to(DEVICE),
        )
        if qts:
            case["query_timestamps"] = (1_700_000_000 + torch.randint(0, 10**7, (B,), generator=g)).to(DEVICE)
    if targets:
        nt = torch.randint(0, 6, (B,), generator=g)
        if list(lengths) == LENGTHS:
            nt[3] = 17  # a sequence made only of candidates
            nt[5] = 100  # more targets than rows: clamped
        case["num_targets"] = nt.to(DEVICE)
    return case


def run_both(case, contextual_len=0, block_m=16, block_n=16):
    """(out, grads) from Triton and from the fp32 reference on the same inputs (upcast for fp16)."""
    from hstu.ops.triton.hstu_attention import triton_jagged_hstu_attention

    leaves = [n for n in ("q", "k", "v", "pos_weights", "time_weights") if n in case]
    kw = {n: x for n, x in case.items() if n not in ("offsets", "max_len")}
    args = AttentionArgs(case["offsets"], case["max_len"], **{n: x for n, x in kw.items() if n not in ("q", "k", "v")},
                         contextual_len=contextual_len)
    out = triton_jagged_hstu_attention(case["q"], case["k"], case["v"], args, block_m=block_m, block_n=block_n)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(out, [case[n] for n in leaves], dout.to(out.dtype), allow_unused=True)

    ref_in = {n: (x.detach().float().requires_grad_() if n in leaves else x) for n, x in case.items()}
    ref = reference(contextual_len=contextual_len, **ref_in)
    ref_grads = torch.autograd.grad(ref, [ref_in[n] for n in leaves], dout, allow_unused=True)
    return out, dict(zip(leaves, grads)), ref, dict(zip(leaves, ref_grads))


def assert_close(name, got, want, dtype):
    assert got is not None, name
    got, want = got.float(), want.float()
    scale = max(want.abs().max().item(), 1e-3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale + tol * 0.1, f"{name}: max err {err:.3g} (scale {scale:.3g}, dtype {dtype})"


def check(case, dtype, **kw):
    out, grads, ref, ref_grads = run_both(case, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close("out", out, ref, dtype)
    for n in ref_grads:
        assert_close("d" + n, grads[n], ref_grads[n], dtype)


MASKS = {
    "causal": dict(causal=True),
    "causal_targets": dict(causal=True, targets=True),
    "causal_context": dict(causal=True, contextual_len=7),
    "causal_targets_context": dict(causal=True, targets=True, contextual_len=20),
    "noncausal": dict(causal=False),
    "noncausal_targets_context": dict(causal=False, targets=True, contextual_len=3),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rab", [False, True], ids=["norab", "rab"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_matches_reference(mask, rab, dtype):
    opts = dict(MASKS[mask])
    causal = opts.pop("causal")
    ctx = opts.pop("contextual_len", 0)
    case = make_case(dtype, rab=rab, targets=opts.get("targets", False), qts=rab and ctx > 0)
    case["causal"] = causal
    check(case, dtype, contextual_len=ctx)


@needs_triton
@pytest.mark.parametrize("seed", [7, 13, 26, 30])
def test_random_lengths_and_options(seed):
    """Random jagged lengths (always including a 0 and a 1) and table size; the seed's bits pick
    fp16 / rab / num_targets / causal / contextual prefix."""
    g = torch.Generator().manual_seed(seed)
    lengths = [0, 1] + torch.randint(0, 45, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=g).tolist()]
    flags = [bool((seed >> bit) & 1) for bit in range(5)]
    dtype = torch.float16 if flags[0] else torch.float32
    case = make_case(dtype, lengths=lengths, rab=bool(flags[1]), targets=bool(flags[2]), qts=bool(flags[1]),
                     seed=seed, max_pos=int(torch.randint(5, 50, (1,), generator=g)))
    case["causal"] = bool(flags[3])
    ctx = int(torch.randint(1, 10, (1,), generator=g)) if flags[4] else 0
    check(case, dtype, contextual_len=ctx)


@needs_triton
@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
def test_uneven_blocks_targets_context(block_m, block_n):
    """Query and key tiles of different sizes: the key-range / diagonal logic must not double count."""
    case = make_case(torch.float32, targets=True, qts=True)
    check(case, torch.float32, contextual_len=5, block_m=block_m, block_n=block_n)


@needs_triton
def test_position_table_clamped():
    """Sequences longer than max_pos reuse the edge values of the Toeplitz table (index clamped)."""
    case = make_case(torch.float32, max_pos=9, lengths=[30, 3, 12])
    check(case, torch.float32)


@needs_triton
def test_only_one_table_and_frozen_table():
    from hstu.ops.triton.hstu_attention import triton_jagged_hstu_attention

    case = make_case(torch.float32, lengths=[9, 20])
    case.pop("time_weights")
    check(case, torch.float32)
    # a table that does not require grad gets none (and the others are unaffected)
    case = make_case(torch.float32, lengths=[9, 20])
    case["pos_weights"].requires_grad_(False)
    args = AttentionArgs(case["offsets"], case["max_len"], alpha=1.0, norm=20.0, pos_weights=case["pos_weights"],
                         time_weights=case["time_weights"], timestamps=case["timestamps"])
    out = triton_jagged_hstu_attention(case["q"], case["k"], case["v"], args)
    out.sum().backward()
    assert case["pos_weights"].grad is None and case["time_weights"].grad is not None


@needs_triton
def test_strided_views_of_fused_projection():
    """q, k, v sliced from one [T, H, 3d] projection (row strides != d): no copy needed, same result."""
    from hstu.ops.triton.hstu_attention import triton_jagged_hstu_attention

    offsets = torch.tensor([0, 7, 7, 25]).to(DEVICE)
    qkv = torch.randn(25, 2, 24, device=DEVICE, requires_grad=True)
    q, k, v = qkv[..., :8], qkv[..., 8:16], qkv[..., 16:]
    args = AttentionArgs(offsets, 18, alpha=0.5, norm=18.0)
    out = triton_jagged_hstu_attention(q, k, v, args, block_m=16, block_n=16)
    (g,) = torch.autograd.grad(out.square().sum(), qkv)
    qkv2 = qkv.detach().clone().requires_grad_()
    ref = pytorch_jagged_hstu_attention(qkv2[..., :8], qkv2[..., 8:16], qkv2[..., 16:],
                                        AttentionArgs(offsets, 18, alpha=0.5, norm=18.0))
    (g_ref,) = torch.autograd.grad(ref.square().sum(), qkv2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@needs_triton
def test_empty_inputs():
    from hstu.ops.triton.hstu_attention import triton_jagged_hstu_attention

    for lengths in ([], [0, 0]):
        offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(DEVICE)
        q = torch.zeros(0, 2, 8, device=DEVICE, requires_grad=True)
        out = triton_jagged_hstu_attention(q, q, q, AttentionArgs(offsets, 0, alpha=1.0, norm=1.0))
        assert out.shape == (0, 2, 8)
        out.sum().backward()
        assert q.grad.shape == q.shape


@needs_triton
def test_dispatcher_triton_backend():
    from hstu.ops.hstu_attention import jagged_hstu_attention

    case = make_case(torch.float32, lengths=[4, 0, 19], targets=True)
    kw = {n: x for n, x in case.items() if n not in ("q", "k", "v", "offsets", "max_len")}
    args = AttentionArgs(case["offsets"], case["max_len"], **kw)
    out = jagged_hstu_attention(case["q"], case["k"], case["v"], args, backend="triton")
    ref = pytorch_jagged_hstu_attention(case["q"], case["k"], case["v"], args)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dense_reference_agrees_with_project_reference():
    """The test-local reference (used for contextual_len) equals the project reference without the prefix."""
    case = make_case(torch.float32, targets=True, qts=True)
    kw = {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in case.items()}
    torch.testing.assert_close(dense_reference(**kw), reference(**kw), atol=1e-5, rtol=1e-5)
    kw["causal"] = False
    torch.testing.assert_close(dense_reference(**kw), reference(**kw), atol=1e-5, rtol=1e-5)


def test_import_hstu_ops_does_not_import_triton():
    import subprocess

    code = ("import sys, hstu.ops, hstu.ops.hstu_attention, hstu.ops.norm_gating, hstu.modules.hstu, "
            "hstu.ops.pytorch.norm_gating; assert 'triton' not in sys.modules, 'triton imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
