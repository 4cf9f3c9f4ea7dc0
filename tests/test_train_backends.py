"""Training steps of the retrieval model through the trainer's own ``train_step`` with ops.backend=triton (both
fused kernels, Triton interpreter on CPU) against ops.backend=pytorch: the same losses and gradients at every
step; and with train.dtype=bfloat16 (CPU autocast): finite losses close to fp32's.

Tolerances: Triton vs PyTorch, fp32, dropout 0: losses relative 1e-5, every parameter gradient within 1e-5 of
its largest entry (summation order only; element-wise relative errors of near-zero entries are meaningless).
bf16 autocast vs fp32: every loss within 2 % relative, gradients cosine ≥ 0.98 (bf16 keeps 8 mantissa bits).

Runs under TRITON_INTERPRET=1 on CPU (see tests/_triton_interpret.py), on CUDA when there is one."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _triton_interpret import DEVICE, IN_PROCESS, run_file_in_subprocess  # noqa: E402  (sets TRITON_INTERPRET)

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hstu.trainer.config import load_config  # noqa: E402

needs_triton = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; see fallback")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.name=synthetic", "data.synthetic.num_users=48", "data.synthetic.num_items=120",
        "data.synthetic.min_seq_len=3", "data.synthetic.max_seq_len=20", "data.max_seq_len=20", "data.batch_size=8",
        "loss.num_negatives=16", "model.embedding_dim=16", "model.num_heads=2", "model.attention_dim=8",
        "model.linear_dim=8", "model.num_layers=2", "train.progress=false", f"train.device={DEVICE.type}"]


def test_subprocess_fallback():
    if IN_PROCESS:
        pytest.skip("the kernels run in this process")
    run_file_in_subprocess(__file__)


def run_steps(tmp_path, overrides, steps):
    """(losses, gradients per step) of ``steps`` train_step calls on the first batches of the train loader,
    from the same seed (same init, data order and negatives)."""
    from hstu.trainer.tasks import get_task
    from hstu.trainer.train import TrainContext, TrainState, build_optimizer, seed_everything, train_step

    cfg = load_config(os.path.join(ROOT, "configs/synthetic/hstu-small.yaml"),
                      TINY + [f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"] + overrides)
    seed_everything(cfg.train.seed)
    task = get_task(cfg)
    data = task.build_data()
    model = task.build_model(DEVICE)
    optimizer, scheduler = build_optimizer(model, cfg.optim)
    ctx = TrainContext(cfg, DEVICE, data.num_items, data.train_loader, data.eval_loader, None,
                       torch.Generator(device=DEVICE).manual_seed(1), torch.Generator().manual_seed(2), task=task)
    state = TrainState(model, optimizer, scheduler)
    losses, grads = [], []
    for batch in itertools.islice(iter(data.train_loader), steps):
        losses.append(train_step(state, ctx, batch))
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return losses, grads, model


@needs_triton
@pytest.mark.parametrize("variant", ["research", "production"])
def test_triton_backend_matches_pytorch_in_training(tmp_path, variant):
    common = [f"model.variant={variant}", "model.dropout=0.0", "train.dtype=float32"]
    ref_losses, ref_grads, _ = run_steps(tmp_path, common + ["ops.backend=pytorch"], steps=3)
    sys.modules.pop("hstu.ops.triton.hstu_attention", None)
    losses, grads, model = run_steps(tmp_path, common + ["ops.backend=triton"], steps=3)
    assert "hstu.ops.triton.hstu_attention" in sys.modules  # the Triton kernels ran
    assert model.encoder.layers[0].backend.value == "triton"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    encoder_grads = [n for n in ref_grads[0] if n.startswith("encoder.")]
    assert len(encoder_grads) >= 6, encoder_grads
    for step, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert g.keys() == ref.keys()
        for n in ref:
            assert ref[n].abs().sum() > 0 or "rab" in n, f"step {step}: no gradient reaches {n}"
            err, scale = float((g[n] - ref[n]).abs().max()), float(ref[n].abs().max())
            assert err <= 1e-5 * scale + 1e-8, f"step {step}: {n} max err {err:.3g} (largest entry {scale:.3g})"


def test_bfloat16_autocast_close_to_float32(tmp_path):
    ref_losses, ref_grads, _ = run_steps(tmp_path, ["train.dtype=float32"], steps=4)
    losses, grads, _ = run_steps(tmp_path, ["train.dtype=bfloat16"], steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses != ref_losses  # autocast really ran in bf16
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=0)
    for step, (g, ref) in enumerate(zip(grads, ref_grads)):
        for n in ref:
            if ref[n].norm() > 0:
                cos = torch.nn.functional.cosine_similarity(g[n].flatten().float(), ref[n].flatten(), dim=0)
                assert cos >= 0.98, f"step {step}: {n} gradient cosine {float(cos):.4f}"
