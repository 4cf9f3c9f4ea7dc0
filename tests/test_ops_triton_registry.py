"""torch.library custom ops (hstu.ops.registry) over both backends: fake-tensor shapes, torch.export,
torch.compile (aot_eager) forward + backward, and gradients through register_autograd == the direct functions."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _triton_interpret import DEVICE, IN_PROCESS, run_file_in_subprocess  # noqa: E402  (sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import hstu.ops.registry as registry  # noqa: E402
from hstu.ops.pytorch.hstu_attention import pytorch_jagged_hstu_attention  # noqa: E402
from hstu.ops.pytorch.norm_gating import pytorch_norm_gating  # noqa: E402

needs_triton = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see fallback")
BACKENDS = ["pytorch", pytest.param("triton", marks=needs_triton)]


def test_subprocess_fallback():
    if IN_PROCESS:
        pytest.skip("the kernels run in this process")
    run_file_in_subprocess(__file__)


def _attention_inputs(dv=12):
    g = torch.Generator().manual_seed(0)
    lengths = [3, 0, 1, 18]
    offsets = torch.tensor([0] + lengths).cumsum(0).to(DEVICE)
    T = int(offsets[-1])
    q = (torch.randn(T, 2, 8, generator=g) * 0.5).to(DEVICE).requires_grad_()
    k = (torch.randn(T, 2, 8, generator=g) * 0.5).to(DEVICE).requires_grad_()
    v = torch.randn(T, 2, dv, generator=g).to(DEVICE).requires_grad_()
    kw = dict(
        alpha=0.5, norm=18.0,
        pos_weights=(torch.randn(35, generator=g) * 0.2).to(DEVICE).requires_grad_(),
        time_weights=(torch.randn(41, generator=g) * 0.2).to(DEVICE).requires_grad_(),
        timestamps=(torch.randint(0, 10**5, (T,), generator=g).cumsum(0)).to(DEVICE),
        num_targets=torch.tensor([1, 0, 0, 4]).to(DEVICE),
    )
    return q, k, v, offsets, 18, kw


def test_fake_tensor_shapes():
    with FakeTensorMode():
        q = torch.empty(26, 3, 8)
        v = torch.empty(26, 3, 12)
        offsets = torch.empty(5, dtype=torch.int64)
        for backend in ("pytorch", "triton"):  # the fake never runs a kernel
            out = torch.ops.hstu.jagged_hstu_attention(q, q, v, offsets, 20, 1.0, 20.0, True, None, None, None,
                                                       None, 0.301, None, 0, backend)
            assert out.shape == (26, 3, 12) and out.dtype == q.dtype
            y, mean, rstd = torch.ops.hstu.norm_gating(v.view(26, 36), v.view(26, 36), None, None, 1e-6, 0.1, 3,
                                                       True, backend)
            assert y.shape == (26, 108)
        grads = torch.ops.hstu.jagged_hstu_attention_backward(
            torch.empty(26, 3, 12), q, q, v, offsets, 20, 1.0, 20.0, True, torch.empty(39), None, None, None,
            0.301, None, 0, "triton", True, True)
        assert [tuple(g.shape) for g in grads] == [(26, 3, 8), (26, 3, 8), (26, 3, 12), (39,), (0,)]


class _Block(torch.nn.Module):
    """Attention + norm gating, as in an HSTU layer (parameters: the two rab tables and the LN affine)."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.pos_weights = torch.nn.Parameter(torch.randn(39) * 0.1)
        self.time_weights = torch.nn.Parameter(torch.randn(41) * 0.1)
        self.ln_w = torch.nn.Parameter(torch.ones(24))
        self.ln_b = torch.nn.Parameter(torch.zeros(24))

    def forward(self, q, k, v, u, offsets, timestamps):
        a = registry.jagged_hstu_attention(q, k, v, offsets, 20, alpha=0.5, norm=20.0, pos_weights=self.pos_weights,
                                           time_weights=self.time_weights, timestamps=timestamps,
                                           backend=self.backend)
        a = a.reshape(a.shape[0], -1)
        return registry.norm_gating(a, u, self.ln_w, self.ln_b, dropout_p=0.1, seed=7, concat=True,
                                    backend=self.backend)


def _block_inputs():
    g = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0, 5, 5, 17]).to(DEVICE)
    q, k, v, u = (torch.randn(17, 2, 8 if i < 2 else 12, generator=g).to(DEVICE) for i in range(4))
    return q, k, v, u.reshape(17, 24), offsets, torch.arange(17).mul(1000).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export(backend):
    module = _Block(backend).to(DEVICE)
    inputs = _block_inputs()
    ep = torch.export.export(module, inputs)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "hstu.jagged_hstu_attention.default" in targets and "hstu.norm_gating.default" in targets
    torch.testing.assert_close(ep.module()(*inputs), module(*inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_forward_backward(backend):
    module = _Block(backend).to(DEVICE)
    inputs = [x.clone().requires_grad_() if x.is_floating_point() else x for x in _block_inputs()]

    def loss(m, *xs):
        return m(*xs).square().sum()

    eager = loss(module, *inputs)
    eager_grads = torch.autograd.grad(eager, [*module.parameters(), *inputs[:4]])
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(module, *inputs)
    compiled_grads = torch.autograd.grad(compiled, [*module.parameters(), *inputs[:4]])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_gradients_match_direct(backend):
    q, k, v, offsets, max_len, kw = _attention_inputs()
    leaves = [q, k, v, kw["pos_weights"], kw["time_weights"]]
    out = registry.jagged_hstu_attention(q, k, v, offsets, max_len, backend=backend, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref = pytorch_jagged_hstu_attention(q, k, v, offsets, max_len, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    g = torch.Generator().manual_seed(1)
    a = torch.randn(9, 16, generator=g).to(DEVICE).requires_grad_()
    u = torch.randn(9, 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    y = registry.norm_gating(a, u, w, None, dropout_p=0.25, seed=11, backend=backend)
    y_ref = pytorch_norm_gating(a, u, w, None, dropout_p=0.25, seed=11)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for x, r in zip(torch.autograd.grad(y.sum(), [a, u, w]), torch.autograd.grad(y_ref.sum(), [a, u, w])):
        torch.testing.assert_close(x, r, atol=1e-5, rtol=1e-5)


@needs_triton
def test_contextual_len_through_the_op():
    q, k, v, offsets, max_len, kw = _attention_inputs()
    from hstu.ops.triton.hstu_attention import triton_jagged_hstu_attention

    out = registry.jagged_hstu_attention(q, k, v, offsets, max_len, contextual_len=4, backend="triton", **kw)
    (dq,) = torch.autograd.grad(out.sum(), [q])
    direct = triton_jagged_hstu_attention(q, k, v, offsets, max_len, contextual_len=4, **kw)
    (dq_direct,) = torch.autograd.grad(direct.sum(), [q])
    torch.testing.assert_close(out, direct)
    torch.testing.assert_close(dq, dq_direct)
