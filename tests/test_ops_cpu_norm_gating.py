"""ops.backend=cpu norm_gating: the fused C++ kernel against the PyTorch reference (forward, dA, dU, dweight, dbias;
research and concat variants, with and without LN affine and dropout: the same dropped elements), odd widths and
one row, thread-count independence, NaN propagation, the reference fallback for other dtypes, the portable path."""

import pytest
import torch

from cpu_kernel_utils import vector_and_scalar_results
from hstu.ops.norm_gating import norm_gating
from hstu.ops.pytorch.norm_gating import dropout_keep_mask


def _inputs(N, D, affine, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(N, D, generator=g) * 2 + 0.5).to(dtype).requires_grad_()
    u = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype).requires_grad_() if affine else None
    b = (0.1 * torch.randn(D, generator=g)).to(dtype).requires_grad_() if affine else None
    return a, u, w, b


def _run(backend, a, u, w, b, p, concat, seed=1234, grad_seed=5):
    """(y, da, du[, dw, db]) of one forward + backward with a fixed random upstream gradient."""
    leaves = [t for t in (a, u, w, b) if t is not None]
    for t in leaves:
        t.grad = None
    y = norm_gating(a, u, w, b, eps=1e-6, dropout_p=p, seed=seed, concat=concat, backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
    y.backward(dy)
    return [y.detach()] + [t.grad.clone() for t in leaves]


CASES = [  # (N, D, affine, p, concat)
    (300, 50, False, 0.0, False),
    (300, 50, False, 0.2, False),  # the ML-1M research layer
    (300, 50, True, 0.2, True),  # production: concat + LN affine
    (257, 37, True, 0.0, True),  # odd D, rows not a multiple of the row block
    (100, 7, False, 0.5, True),  # D < one AVX2 vector
    (1, 50, True, 0.3, False),  # one row
    (1, 1, True, 0.0, True),  # one element: x̂ = 0
    (64, 64, True, 1.0, True),  # p = 1: everything dropped
    (70, 200, False, 0.1, False),
]


@pytest.mark.parametrize("N,D,affine,p,concat", CASES)
def test_cpu_kernel_matches_reference(N, D, affine, p, concat):
    ref = _run("pytorch", *_inputs(N, D, affine), p, concat)
    got = _run("cpu", *_inputs(N, D, affine), p, concat)
    y = norm_gating(*_inputs(N, D, affine), dropout_p=p, concat=concat, backend="cpu")
    fn = y.grad_fn.next_functions[0][0]  # under the dispatcher's reshape view
    assert "CpuNormGating" in type(fn).__name__  # the C++ kernel ran, not the reference
    assert got[0].shape == (N, 3 * D if concat else D)
    if p > 0:
        assert torch.equal(got[0] == 0, ref[0] == 0)  # the same Philox mask: the same elements dropped
        keep = dropout_keep_mask(1234, got[0].shape, p)
        assert torch.equal(got[0] == 0, ~keep)
    for name, x, r in zip(["y", "da", "du", "dweight", "dbias"], got, ref):
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5 if name != "dweight" else 1e-4, msg=name)


def test_affine_weight_without_bias_and_partial_grads():
    a, u, w, _ = _inputs(90, 50, True)
    b = None
    ref = _run("pytorch", a, u, w, b, 0.2, True)
    got = _run("cpu", a, u, w, b, 0.2, True)
    for x, r in zip(got, ref):
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-4)
    a2, u2, w2, b2 = _inputs(90, 50, True)
    w2.requires_grad_(False)  # no dweight wanted: None, the others unchanged
    y = norm_gating(a2, u2, w2, b2, dropout_p=0.2, seed=1234, concat=True, backend="cpu")
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    assert w2.grad is None
    torch.testing.assert_close(a2.grad, ref[1], rtol=1e-5, atol=1e-5)


def test_leading_dims_eval_mode_and_non_contiguous_inputs():
    a, u, w, b = _inputs(60, 48, True)
    a3 = a.detach().view(4, 15, 48)
    u3 = torch.cat([u.detach(), torch.zeros(60, 48)], dim=1)[:, :48].view(4, 15, 48)  # a strided view (row stride 96)
    assert not u3.is_contiguous()
    ref = norm_gating(a3, u3, w, b, dropout_p=0.4, training=False, concat=True, backend="pytorch")
    got = norm_gating(a3, u3, w, b, dropout_p=0.4, training=False, concat=True, backend="cpu")
    assert got.shape == (4, 15, 144)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_seeded_reproducibility_and_seed_draw():
    a, u, _, _ = _inputs(40, 50, False)
    y1 = norm_gating(a, u, dropout_p=0.3, seed=7, backend="cpu")
    y2 = norm_gating(a, u, dropout_p=0.3, seed=7, backend="cpu")
    y3 = norm_gating(a, u, dropout_p=0.3, seed=8, backend="cpu")
    assert torch.equal(y1, y2) and not torch.equal(y1 == 0, y3 == 0)
    torch.manual_seed(3)  # seed=None: drawn from torch's generator, as the reference does
    y_cpu = norm_gating(a, u, dropout_p=0.3, backend="cpu")
    torch.manual_seed(3)
    y_ref = norm_gating(a, u, dropout_p=0.3, backend="pytorch")
    assert torch.equal(y_cpu == 0, y_ref == 0)


def test_thread_count_independent():
    threads = torch.get_num_threads()
    try:
        res = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            res.append(_run("cpu", *_inputs(1000, 50, True), 0.2, True))
    finally:
        torch.set_num_threads(threads)
    for other in res[1:]:
        for x, y in zip(res[0], other):
            assert torch.equal(x, y)  # row-owned outputs, per-block dweight / dbias sums added in block order


def test_nan_propagates_like_the_reference():
    outs = []
    for backend in ("pytorch", "cpu"):
        a, u, w, b = _inputs(40, 50, True)
        with torch.no_grad():
            a[3, 7] = float("nan")  # row 3's LN is NaN everywhere; the other rows stay finite
            u[9, 0] = float("nan")  # one gated element (and its concat copy) of row 9
        outs.append(_run(backend, a, u, w, b, 0.2, True))
    for x, r in zip(*outs):
        assert torch.equal(torch.isnan(x), torch.isnan(r))
    y = outs[1][0]
    assert torch.isnan(y[3, 100:]).all() and torch.isfinite(y[3, :100]).sum() >= 99
    assert torch.isfinite(y[:3]).all() and torch.isfinite(y[10:]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_run_the_reference(dtype):
    ref = _run("pytorch", *_inputs(30, 50, True, dtype=dtype), 0.2, True)
    got = _run("cpu", *_inputs(30, 50, True, dtype=dtype), 0.2, True)
    assert got[0].dtype == dtype
    for x, r in zip(got, ref):
        assert torch.equal(x, r)


def test_cpu_layer_gating_fuses_the_dropout_it_applied_after_the_op():
    """modules/hstu.py gate_and_dropout on ops.backend=cpu: one fused op, the same seed and dropped elements as its
    earlier path (the op without dropout, then the C++ seeded dropout) under the same torch seed."""
    from hstu.modules.hstu import LN_EPS, gate_and_dropout
    from hstu.ops.backend import Backend
    from hstu.ops.cpu.dropout import cpu_seeded_dropout

    a, u, w, b = _inputs(200, 50, True)
    torch.manual_seed(11)
    y = gate_and_dropout(a, u, w, b, dropout=0.2, training=True, concat=True, backend=Backend.CPU)
    torch.manual_seed(11)
    old = cpu_seeded_dropout(norm_gating(a, u, w, b, eps=LN_EPS, concat=True, backend="pytorch"), 0.2)
    assert "CpuNormGating" in type(y.grad_fn.next_functions[0][0]).__name__  # no separate dropout node
    assert torch.equal(y == 0, old == 0) and 0.15 < float((y == 0).float().mean()) < 0.25
    torch.testing.assert_close(y, old, rtol=1e-5, atol=1e-5)
    y_eval = gate_and_dropout(a, u, w, b, dropout=0.2, training=False, concat=True, backend=Backend.CPU)
    torch.testing.assert_close(y_eval, norm_gating(a, u, w, b, eps=LN_EPS, concat=True), rtol=1e-5, atol=1e-5)


def test_empty_rows():
    a = torch.zeros(0, 50, requires_grad=True)
    y = norm_gating(a, torch.zeros(0, 50), dropout_p=0.2, concat=True, backend="cpu")
    assert y.shape == (0, 150)


def test_portable_path_without_avx2_matches(tmp_path):
    """HSTU_CPU_SCALAR=1 selects the scalar code of the same build (CPUs without AVX2/FMA)."""
    vec, sca = vector_and_scalar_results(
        "from test_ops_cpu_norm_gating import _inputs, _run\n"
        "out = _run('cpu', *_inputs(257, 37, True), 0.2, True) + _run('cpu', *_inputs(65, 50, False), 0.3, False)\n"
        "torch.save(out, OUT)\n", tmp_path)
    for x, y in zip(vec, sca):
        assert torch.equal(x == 0, y == 0)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["research", "production"])
def test_cpu_encoder_matches_pytorch_encoder(variant):
    """The HSTU encoder with ops.backend=cpu (C++ attention and norm gating) gives the forward and gradients of
    ops.backend=pytorch (dropout 0; production: a non-trivial LN affine, so dweight / dbias matter)."""
    from hstu.modules.hstu import HSTUEncoder
    from hstu.trainer.config import ModelConfig, OpsConfig

    cfg = ModelConfig(variant=variant, embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, linear_dim=8,
                      dropout=0.0, num_time_buckets=64, use_rab_position=True, use_rab_time=True)
    torch.manual_seed(0)
    ref_model = HSTUEncoder(cfg, 12, OpsConfig(backend="pytorch")).train()
    cpu_model = HSTUEncoder(cfg, 12, OpsConfig(backend="cpu")).train()
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    cpu_model.load_state_dict(ref_model.state_dict())
    lengths = [5, 0, 12, 1, 7]
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = torch.randn(sum(lengths), cfg.embedding_dim, generator=g)
    ts = 1_600_000_000 + torch.randint(0, 10**5, (sum(lengths),), generator=g).cumsum(0)
    qts = ts[offsets[1:] - 1] + 3600
    dy = torch.randn(x.shape, generator=g)
    results = []
    for model in (ref_model, cpu_model):
        xi = x.clone().requires_grad_()
        out = model(xi, offsets, max(lengths), ts, qts)
        out.backward(dy)
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_gx, ref_gp), (out, gx, gp) = results
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    for n, gr in ref_gp.items():
        assert gr is not None and gr.abs().sum() > 0, f"no gradient reaches {n}"
        torch.testing.assert_close(gp[n], gr, rtol=1e-4, atol=1e-5, msg=n)


def test_cpu_seeded_dropout_shares_the_philox_masks():
    """ops/cpu/dropout.py (csrc/dropout_cpu.cpp, its Philox now from the shared csrc/philox.h) drops exactly the
    elements of the reference mask and scales the others by 1/(1 - p)."""
    from hstu.ops.cpu.dropout import cpu_seeded_dropout

    x = torch.randn(1001, 37)
    y = cpu_seeded_dropout(x, 0.3, seed=77)
    keep = dropout_keep_mask(77, x.shape, 0.3)
    assert torch.equal(y != 0, keep)
    torch.testing.assert_close(y[keep], x[keep] / 0.7)


def test_benchmark_quick_writes_rows(tmp_path):
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "norm_gating.py")
    spec = importlib.util.spec_from_file_location("bench_norm_gating", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        mod.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "norm_gating.json").read_text())
    assert all(k in data for k in ("date", "machine", "commit", "command"))
    assert [(r["case"], r["impl"]) for r in data["rows"]] == \
        [(c, i) for c in ("research", "production_concat") for i in mod.IMPLS]
    for r in data["rows"]:
        assert r["same_dropped_elements"] and r["max_abs_diff_vs_reference"] < 1e-4 and r["fwd_bwd_median_ms"] > 0
