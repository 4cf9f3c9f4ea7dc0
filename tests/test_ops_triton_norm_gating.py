"""Fused layer norm x U gating x seeded dropout: Triton vs the PyTorch reference (outputs, gradients of a, u,
weight, bias, the exact dropout mask), and the reference's Philox port vs Triton's tl.rand bit for bit.

Runs under TRITON_INTERPRET=1 on CPU (see tests/_triton_interpret.py), on CUDA when there is one."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _triton_interpret import DEVICE, IN_PROCESS, run_file_in_subprocess  # noqa: E402  (sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hstu.ops.norm_gating import norm_gating  # noqa: E402
from hstu.ops.pytorch.norm_gating import dropout_keep_mask, philox_uniform, pytorch_norm_gating  # noqa: E402

needs_triton = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see fallback")


def test_subprocess_fallback():
    if IN_PROCESS:
        pytest.skip("the kernels run in this process")
    run_file_in_subprocess(__file__)


@needs_triton
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**40 + 17])
def test_philox_port_is_bit_exact(seed):
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out, offsets, seed, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        off = tl.load(offsets + i, mask=i < n, other=0)
        tl.store(out + i, tl.rand(seed, off), mask=i < n)

    g = torch.Generator().manual_seed(seed % 1000)
    offsets = torch.cat([torch.arange(300), torch.randint(0, 2**62, (300,), generator=g)]).to(DEVICE)
    out = torch.empty(offsets.numel(), device=DEVICE)
    rand_kernel[(triton.cdiv(offsets.numel(), 128),)](out, offsets, seed, offsets.numel(), BLOCK=128)
    assert torch.equal(out, philox_uniform(seed, offsets))


def test_dropout_mask_statistics_and_seeding():
    m = dropout_keep_mask(7, (200, 100), 0.3)
    assert abs(m.float().mean().item() - 0.7) < 0.01
    assert torch.equal(m, dropout_keep_mask(7, (200, 100), 0.3))
    assert not torch.equal(m, dropout_keep_mask(8, (200, 100), 0.3))
    u = philox_uniform(3, torch.arange(10000))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_reference_matches_plain_torch_without_dropout():
    a, u = torch.randn(6, 10), torch.randn(6, 10)
    w, b = torch.randn(10), torch.randn(10)
    ln = F.layer_norm(a, (10,), w, b, 1e-6)
    torch.testing.assert_close(pytorch_norm_gating(a, u, w, b), u * ln)
    torch.testing.assert_close(pytorch_norm_gating(a, u, w, b, concat=True), torch.cat([u, a, u * ln], -1))
    y = pytorch_norm_gating(a, u, w, b, concat=True, dropout_p=0.5, seed=3)
    keep = dropout_keep_mask(3, (6, 30), 0.5)
    torch.testing.assert_close(y, torch.cat([u, a, u * ln], -1) * keep * 2.0)


def _run(fn, a, u, w, b, dy, **kw):
    leaves = [x for x in (a, u, w, b) if x is not None]
    y = fn(a, u, w, b, **kw)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return y, grads


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("concat", [False, True], ids=["gated", "concat"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_reference(p, affine, concat, dtype):
    from hstu.ops.triton.norm_gating import triton_norm_gating

    g = torch.Generator().manual_seed(0)
    N, D = 37, 24  # N not a multiple of the row block, D not a power of two
    a = (torch.randn(N, D, generator=g) * 2 + 1).to(DEVICE, dtype).requires_grad_()
    u = torch.randn(N, D, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(D, generator=g)).to(DEVICE).requires_grad_() if affine else None
    b = (0.2 * torch.randn(D, generator=g)).to(DEVICE).requires_grad_() if affine else None
    dy = torch.randn(N, 3 * D if concat else D, generator=g).to(DEVICE)
    kw = dict(dropout_p=p, seed=1234, concat=concat, eps=1e-6)
    y, grads = _run(triton_norm_gating, a, u, w, b, dy, **kw)
    y_ref, grads_ref = _run(pytorch_norm_gating, a, u, w, b, dy, **kw)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert torch.equal(y == 0, y_ref == 0)  # the same elements dropped
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(y, y_ref, **tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.float(), want.float(), **tol)


@needs_triton
def test_dispatcher_leading_dims_eval_mode_and_edge_rates():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 5, 16, generator=g).to(DEVICE)
    u = torch.randn(3, 5, 16, generator=g).to(DEVICE)
    for kw in (dict(dropout_p=0.2, seed=9), dict(dropout_p=0.2, seed=9, concat=True), dict(dropout_p=1.0, seed=2)):
        y = norm_gating(a, u, backend="triton", **kw)
        torch.testing.assert_close(y, norm_gating(a, u, backend="pytorch", **kw), atol=1e-5, rtol=1e-5)
        assert y.shape[:2] == (3, 5)
    assert norm_gating(a, u, dropout_p=1.0, seed=2, backend="triton").abs().max() == 0
    # eval: no dropout whatever the rate
    torch.testing.assert_close(norm_gating(a, u, dropout_p=0.5, training=False, backend="triton"),
                               norm_gating(a, u, backend="pytorch"), atol=1e-5, rtol=1e-5)
    # no seed: drawn from torch's generator -> reproducible under manual_seed
    torch.manual_seed(5)
    y1 = norm_gating(a, u, dropout_p=0.5, backend="triton")
    torch.manual_seed(5)
    torch.testing.assert_close(y1, norm_gating(a, u, dropout_p=0.5, backend="pytorch"), atol=1e-5, rtol=1e-5)


@needs_triton
def test_empty_rows():
    from hstu.ops.triton.norm_gating import triton_norm_gating

    a = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = triton_norm_gating(a, a, w, None, concat=True)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() == 0
