"""The HSTU encoder with ops.backend=triton (both fused ops in the model: jagged attention and norm gating) gives
the same forward and gradients as ops.backend=pytorch, both variants, dropout 0.

Runs under TRITON_INTERPRET=1 on CPU (see tests/_triton_interpret.py), on CUDA when there is one."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _triton_interpret import DEVICE, IN_PROCESS, run_file_in_subprocess  # noqa: E402  (sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402

from hstu.modules.hstu import HSTUEncoder  # noqa: E402
from hstu.trainer.config import ModelConfig, OpsConfig  # noqa: E402

needs_triton = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see fallback")
MAX_SEQ_LEN = 12


def test_subprocess_fallback():
    if IN_PROCESS:
        pytest.skip("the kernels run in this process")
    run_file_in_subprocess(__file__)


def _batch(lengths, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    T = sum(lengths)
    x = torch.randn(T, D, generator=g)
    ts = 1_600_000_000 + torch.randint(0, 10**5, (T,), generator=g).cumsum(0)
    qts = ts[offsets[1:] - 1].clamp(min=0) + 3600
    return x.to(DEVICE), offsets.to(DEVICE), ts.to(DEVICE), qts.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("variant", ["research", "production"])
def test_triton_model_matches_pytorch_model(variant):
    cfg = ModelConfig(variant=variant, embedding_dim=16, num_layers=2, num_heads=2, attention_dim=8, linear_dim=8,
                      dropout=0.0, num_time_buckets=64, use_rab_position=True, use_rab_time=True)
    torch.manual_seed(0)
    ref_model = HSTUEncoder(cfg, MAX_SEQ_LEN, OpsConfig(backend="pytorch")).to(DEVICE).train()
    tri_model = HSTUEncoder(cfg, MAX_SEQ_LEN, OpsConfig(backend="triton")).to(DEVICE).train()
    with torch.no_grad():  # non-trivial LN affine (production) so the fused op's weight/bias gradients matter
        for n, p in ref_model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    tri_model.load_state_dict(ref_model.state_dict())
    lengths = [5, 0, 12, 1, 7]
    x, offsets, ts, qts = _batch(lengths, cfg.embedding_dim)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    sys.modules.pop("hstu.ops.triton.norm_gating", None)
    results = []
    for model in (ref_model, tri_model):
        xi = x.clone().requires_grad_()
        out = model(xi, offsets, max(lengths), ts, qts)
        out.backward(dy)
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    assert "hstu.ops.triton.norm_gating" in sys.modules  # the Triton backend ran the fused gating kernel
    (ref, ref_gx, ref_gp), (out, gx, gp) = results
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    for n, g in ref_gp.items():
        assert g is not None and g.abs().sum() > 0, f"no gradient reaches {n}"
        torch.testing.assert_close(gp[n], g, rtol=1e-4, atol=1e-5, msg=n)
