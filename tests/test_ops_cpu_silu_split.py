"""ops.backend=cpu silu_split (the HSTU research projection's SiLU + split into u, v, q, k): the one-pass backward
against the PyTorch reference (F.silu + torch.split, autograd) in float64, parts without a gradient, strided part
gradients, one row, thread-count independence, NaN propagation, the portable path, and the dispatcher's fallbacks."""

import pytest
import torch

from cpu_kernel_utils import vector_and_scalar_results
from hstu.ops.silu_split import silu_split, silu_split_reference

WIDTHS = [50, 50, 50, 53]  # the research layer's u, v, q, k (one part of odd width: the vector tail)


def _x(T, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, W, generator=g, dtype=torch.float64) * 3  # SiLU's whole range, negative and positive


def _grads(T, widths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, w, generator=g, dtype=torch.float64) for w in widths]


def _run(backend, x64, grads, used=None, dtype=torch.float32):
    """(outputs, dx) of silu_split with the upstream gradients of the parts in ``used`` (default: all)."""
    x = x64.detach().clone().to(dtype).requires_grad_()
    parts = silu_split(x, WIDTHS if x.shape[1] == sum(WIDTHS) else [x.shape[1]], backend)
    used = range(len(parts)) if used is None else used
    sum((parts[p] * grads[p].to(dtype)).sum() for p in used).backward()
    return [p.detach() for p in parts], x.grad


@pytest.mark.parametrize("T", [1, 7, 333])
def test_forward_and_backward_match_the_float64_reference(T):
    x, grads = _x(T, sum(WIDTHS)), _grads(T, WIDTHS)
    out, dx = _run("cpu", x, grads)
    ref_out, ref_dx = _run("pytorch", x, grads, dtype=torch.float64)
    assert len(out) == 4 and [p.shape[1] for p in out] == WIDTHS
    for a, b in zip(out, ref_out):
        assert torch.allclose(a.double(), b, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dx.double(), ref_dx, rtol=1e-5, atol=1e-6)
    assert ref_dx.abs().max() > 0.1


def test_parts_without_gradient_count_as_zero():
    x, grads = _x(64, sum(WIDTHS)), _grads(64, WIDTHS)
    _, dx = _run("cpu", x, grads, used=[1, 3])
    _, ref = _run("pytorch", x, grads, used=[1, 3], dtype=torch.float64)
    assert torch.allclose(dx.double(), ref, rtol=1e-5, atol=1e-6)
    assert dx[:, :50].abs().max() == 0 and dx[:, 100:150].abs().max() == 0 and dx[:, 50:100].abs().max() > 0


def test_strided_part_gradients_are_read_in_place():
    # the parts' gradients as column slices of a wider tensor (row stride != width): same result as contiguous ones
    T = 40
    x = _x(T, sum(WIDTHS)).float().requires_grad_()
    wide = _grads(T, [300])[0].float()
    grads = [wide[:, 0:50], wide[:, 60:110], wide[:, 120:170], wide[:, 200:253]]
    torch.autograd.backward(silu_split(x, WIDTHS, "cpu"), grads)
    strided = x.grad.clone()
    x.grad = None
    torch.autograd.backward(silu_split(x, WIDTHS, "cpu"), [g.contiguous() for g in grads])
    assert torch.equal(strided, x.grad)


def test_result_does_not_depend_on_the_thread_count():
    x, grads = _x(999, sum(WIDTHS)), _grads(999, WIDTHS)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run("cpu", x, grads)[1])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_nan_propagates():
    x, grads = _x(8, sum(WIDTHS)), _grads(8, WIDTHS)
    x[3, 60] = float("nan")
    _, dx = _run("cpu", x, grads)
    assert torch.isnan(dx[3, 60]) and torch.isfinite(dx[2]).all()


def test_dispatcher_falls_back_to_the_reference():
    # no gradient needed, another dtype: the reference path (no custom autograd node)
    x = _x(5, sum(WIDTHS))
    with torch.no_grad():
        parts = silu_split(x.float(), WIDTHS, "cpu")
    assert all(p.grad_fn is None for p in parts)
    x64 = x.clone().requires_grad_()
    parts = silu_split(x64, WIDTHS, "cpu")
    assert parts[0].dtype == torch.float64 and "SplitWithSizes" in type(parts[0].grad_fn).__name__
    for a, b in zip(parts, silu_split_reference(x, WIDTHS)):
        assert torch.equal(a.detach(), b)
    with pytest.raises(ValueError, match="do not sum"):
        from hstu.ops.cpu.silu_split import cpu_silu_split

        cpu_silu_split(x.float(), [50, 50])


def test_portable_path_matches_the_vector_path(tmp_path):
    body = (
        "from test_ops_cpu_silu_split import _x, _grads, _run, WIDTHS\n"
        "x, g = _x(77, sum(WIDTHS)), _grads(77, WIDTHS)\n"
        "out, dx = _run('cpu', x, g)\n"
        "torch.save([dx], OUT)\n")
    vec, scalar = vector_and_scalar_results(body, tmp_path)
    assert torch.allclose(vec[0], scalar[0], rtol=1e-5, atol=1e-6)
