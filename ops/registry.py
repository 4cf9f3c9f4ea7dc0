"""``torch.library`` custom ops wrapping BOTH backends, for ``torch.compile`` / ``torch.export``.

    torch.ops.hstu.jagged_hstu_attention(q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights,
        timestamps, query_timestamps, time_bucket_base, num_targets, contextual_len, backend) -> out [T, H, dv]
    torch.ops.hstu.jagged_hstu_attention_backward(dout, <same inputs>, need_pos_grad, need_time_grad)
        -> (dq, dk, dv, d_pos_weights, d_time_weights)          (an absent table gets an empty [0] gradient)
    torch.ops.hstu.norm_gating(a, u, weight, bias, eps, dropout_p, seed, concat, backend) -> (y, mean, rstd)
    torch.ops.hstu.norm_gating_backward(dy, a, u, weight, bias, mean, rstd, eps, dropout_p, seed, concat, backend)
        -> (da, du, dweight, dbias)

Each op has a fake (meta) implementation (shapes only, so FakeTensor tracing never touches data) and an autograd
formula (``torch.library.register_autograd``) that calls the backward op. To the compiler the ops are opaque: the
Triton kernels are launched by the eager implementation; the PyTorch backend's backward is the reference's own
autograd, run on a worker thread (``_autograd_in_fresh_thread``: autograd records nothing inside a custom op).

Use the Python wrappers below (same keywords as the dispatchers in ops/hstu_attention.py, ops/norm_gating.py).
Importing this module registers the ops; it never imports triton (the Triton modules load on the first call
with backend "triton"). The data-dependent reference (it reads the offsets on the host) cannot be traced by
``torch.export`` itself — this op is how a model that uses it gets exported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from hstu.ops.backend import Backend, BackendLike, resolve_backend

__all__ = ["jagged_hstu_attention", "norm_gating"]


def _empty_grad(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _autograd_in_fresh_thread(fn, primals, cotangent):
    """Gradients of fn(*primals) (None for unused inputs) by plain autograd, for the PyTorch backend's
    backward op. Inside a custom op's implementation autograd records nothing on this thread (torch.library
    runs it below the Autograd dispatch key), and torch.func.vjp refuses the reference's autograd.Functions
    (no setup_context); a new thread starts with the default dispatch state, so autograd works there.
    The caller's CUDA device and stream are carried over (both are per-thread)."""
    device = next((p.device for p in primals if p.is_cuda), None)

    def run():
        with contextlib.ExitStack() as stack:
            if device is not None:
                stack.enter_context(torch.cuda.device(device))
                stack.enter_context(torch.cuda.stream(stream))
            stack.enter_context(torch.enable_grad())
            leaves = [p.detach().requires_grad_() for p in primals]
            out = fn(*leaves)
            return torch.autograd.grad(out, leaves, cotangent, allow_unused=True)

    stream = torch.cuda.current_stream(device) if device is not None else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


# ----------------------------------------------------------------------------------------------------------------
# jagged HSTU attention
# ----------------------------------------------------------------------------------------------------------------


def _reference_attention(q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
                         query_timestamps, time_bucket_base, num_targets, contextual_len):
    from hstu.ops.pytorch.hstu_attention import pytorch_jagged_hstu_attention

    return pytorch_jagged_hstu_attention(
        q, k, v, offsets, max_len, alpha=alpha, norm=norm, causal=causal, pos_weights=pos_weights,
        time_weights=time_weights, timestamps=timestamps, query_timestamps=query_timestamps,
        time_bucket_base=time_bucket_base, num_targets=num_targets, contextual_len=contextual_len,
    )


@torch.library.custom_op("hstu::jagged_hstu_attention", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_len: int, alpha: float, norm: float, causal: bool,
    pos_weights: Optional[Tensor], time_weights: Optional[Tensor], timestamps: Optional[Tensor],
    query_timestamps: Optional[Tensor], time_bucket_base: float, num_targets: Optional[Tensor],
    contextual_len: int, backend: str,
) -> Tensor:
    args = (q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps, query_timestamps,
            time_bucket_base, num_targets, contextual_len)
    if resolve_backend(backend) == Backend.TRITON:
        from hstu.ops.triton.hstu_attention import hstu_attention_fwd

        return hstu_attention_fwd(*args)
    return _reference_attention(*args)


@_attention_op.register_fake
def _attention_fake(q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
                    query_timestamps, time_bucket_base, num_targets, contextual_len, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("hstu::jagged_hstu_attention_backward", mutates_args=())
def _attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_len: int, alpha: float, norm: float,
    causal: bool, pos_weights: Optional[Tensor], time_weights: Optional[Tensor], timestamps: Optional[Tensor],
    query_timestamps: Optional[Tensor], time_bucket_base: float, num_targets: Optional[Tensor],
    contextual_len: int, backend: str, need_pos_grad: bool, need_time_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if resolve_backend(backend) == Backend.TRITON:
        from hstu.ops.triton.hstu_attention import hstu_attention_bwd

        dq, dk, dv, dpos, dtime = hstu_attention_bwd(
            dout, q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
            query_timestamps, time_bucket_base, num_targets, contextual_len,
            need_pos_grad=need_pos_grad, need_time_grad=need_time_grad,
        )
    else:
        use_pos = pos_weights is not None and need_pos_grad
        use_time = time_weights is not None and need_time_grad

        def f(q_, k_, v_, pw_, tw_):
            return _reference_attention(
                q_, k_, v_, offsets, max_len, alpha, norm, causal, pw_ if use_pos else pos_weights,
                tw_ if use_time else time_weights, timestamps, query_timestamps, time_bucket_base, num_targets,
                contextual_len,
            )

        pw = pos_weights if use_pos else q.new_zeros(0)
        tw = time_weights if use_time else q.new_zeros(0)
        grads = _autograd_in_fresh_thread(f, (q, k, v, pw, tw), dout)
        # clone: a gradient may be a view of dout, and custom ops must not return views of their inputs
        dq, dk, dv, dpos, dtime = (g.clone() if g is not None else None for g in grads)
        dq, dk, dv = (g if g is not None else torch.zeros_like(x) for g, x in ((dq, q), (dk, k), (dv, v)))
        dpos = dpos if use_pos else None
        dtime = dtime if use_time else None
    dpos = dpos if dpos is not None else _empty_grad(q)
    dtime = dtime if dtime is not None else _empty_grad(q)
    return dq, dk, dv, dpos, dtime


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights,
                             timestamps, query_timestamps, time_bucket_base, num_targets, contextual_len, backend,
                             need_pos_grad, need_time_grad):
    dpos = torch.empty_like(pos_weights) if (pos_weights is not None and need_pos_grad) else _empty_grad(q)
    dtime = torch.empty_like(time_weights) if (time_weights is not None and need_time_grad) else _empty_grad(q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpos, dtime


_ATTN_NAMES = ("q", "k", "v", "offsets", "max_len", "alpha", "norm", "causal", "pos_weights", "time_weights",
               "timestamps", "query_timestamps", "time_bucket_base", "num_targets", "contextual_len", "backend")


def _attention_setup_context(ctx, inputs, output):
    (q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps, query_timestamps,
     time_bucket_base, num_targets, contextual_len, backend) = inputs
    ctx.save_for_backward(q, k, v, offsets, pos_weights, time_weights, timestamps, query_timestamps, num_targets)
    ctx.scalars = (max_len, alpha, norm, causal, time_bucket_base, contextual_len, backend)
    ctx.has_pos, ctx.has_time = pos_weights is not None, time_weights is not None


def _attention_backward(ctx, dout):
    q, k, v, offsets, pos_weights, time_weights, timestamps, query_timestamps, num_targets = ctx.saved_tensors
    max_len, alpha, norm, causal, base, contextual_len, backend = ctx.scalars
    need_pos = ctx.has_pos and ctx.needs_input_grad[8]
    need_time = ctx.has_time and ctx.needs_input_grad[9]
    dq, dk, dv, dpos, dtime = _attention_backward_op(
        dout.contiguous(), q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
        query_timestamps, base, num_targets, contextual_len, backend, need_pos, need_time,
    )
    grads = [None] * len(_ATTN_NAMES)
    grads[0], grads[1], grads[2] = dq, dk, dv
    grads[8] = dpos if need_pos else None
    grads[9] = dtime if need_time else None
    return tuple(grads)


torch.library.register_autograd("hstu::jagged_hstu_attention", _attention_backward,
                                setup_context=_attention_setup_context)


def jagged_hstu_attention(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_len: int, *, alpha: float, norm: float,
    causal: bool = True, pos_weights: Optional[Tensor] = None, time_weights: Optional[Tensor] = None,
    timestamps: Optional[Tensor] = None, query_timestamps: Optional[Tensor] = None, time_bucket_base: float = 0.301,
    num_targets: Optional[Tensor] = None, contextual_len: int = 0, backend: BackendLike = Backend.PYTORCH,
) -> Tensor:
    """``torch.ops.hstu.jagged_hstu_attention`` with the dispatcher's keywords (+ contextual_len)."""
    return torch.ops.hstu.jagged_hstu_attention(
        q, k, v, offsets, int(max_len), float(alpha), float(norm), bool(causal), pos_weights, time_weights,
        timestamps, query_timestamps, float(time_bucket_base), num_targets, int(contextual_len),
        resolve_backend(backend).value,
    )


# ----------------------------------------------------------------------------------------------------------------
# norm gating
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("hstu::norm_gating", mutates_args=())
def _norm_gating_op(a: Tensor, u: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    dropout_p: float, seed: int, concat: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if resolve_backend(backend) == Backend.TRITON:
        from hstu.ops.triton.norm_gating import norm_gating_fwd

        return norm_gating_fwd(a, u, weight, bias, eps, dropout_p, seed, concat)
    from hstu.ops.pytorch.norm_gating import pytorch_norm_gating

    y = pytorch_norm_gating(a, u, weight, bias, eps=eps, dropout_p=dropout_p, seed=seed, concat=concat)
    return y, a.new_empty(0, dtype=torch.float32), a.new_empty(0, dtype=torch.float32)


@_norm_gating_op.register_fake
def _norm_gating_fake(a, u, weight, bias, eps, dropout_p, seed, concat, backend):
    N, D = a.shape
    stats = N if resolve_backend(backend) == Backend.TRITON else 0
    return (a.new_empty(N, 3 * D if concat else D), a.new_empty(stats, dtype=torch.float32),
            a.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("hstu::norm_gating_backward", mutates_args=())
def _norm_gating_backward_op(dy: Tensor, a: Tensor, u: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             mean: Tensor, rstd: Tensor, eps: float, dropout_p: float, seed: int, concat: bool,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if resolve_backend(backend) == Backend.TRITON:
        from hstu.ops.triton.norm_gating import norm_gating_bwd

        da, du, dw, db = norm_gating_bwd(dy, a, u, weight, bias, mean, rstd, dropout_p, seed, concat)
    else:
        from hstu.ops.pytorch.norm_gating import pytorch_norm_gating

        def f(a_, u_, w_, b_):
            return pytorch_norm_gating(a_, u_, w_ if weight is not None else None, b_ if bias is not None else None,
                                       eps=eps, dropout_p=dropout_p, seed=seed, concat=concat)

        w = weight if weight is not None else a.new_zeros(0)
        b = bias if bias is not None else a.new_zeros(0)
        grads = _autograd_in_fresh_thread(f, (a, u, w, b), dy)
        da, du, dw, db = (g.clone() if g is not None else None for g in grads)  # (may be views of dy)
        da, du = (g if g is not None else torch.zeros_like(x) for g, x in ((da, a), (du, u)))
        dw = dw if weight is not None else None
        db = db if bias is not None else None
    dw = dw if dw is not None else _empty_grad(a)
    db = db if db is not None else _empty_grad(a)
    return da, du, dw, db


@_norm_gating_backward_op.register_fake
def _norm_gating_backward_fake(dy, a, u, weight, bias, mean, rstd, eps, dropout_p, seed, concat, backend):
    dw = torch.empty_like(weight) if weight is not None else _empty_grad(a)
    db = torch.empty_like(bias) if bias is not None else _empty_grad(a)
    return torch.empty_like(a), torch.empty_like(u), dw, db


def _norm_gating_setup_context(ctx, inputs, output):
    a, u, weight, bias, eps, dropout_p, seed, concat, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(a, u, weight, bias, mean, rstd)
    ctx.scalars = (eps, dropout_p, seed, concat, backend)
    ctx.has_w, ctx.has_b = weight is not None, bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _norm_gating_backward(ctx, dy, _dmean, _drstd):
    a, u, weight, bias, mean, rstd = ctx.saved_tensors
    eps, dropout_p, seed, concat, backend = ctx.scalars
    da, du, dw, db = _norm_gating_backward_op(dy.contiguous(), a, u, weight, bias, mean, rstd, eps, dropout_p, seed,
                                              concat, backend)
    return (da, du, dw if ctx.has_w else None, db if ctx.has_b else None, None, None, None, None, None)


torch.library.register_autograd("hstu::norm_gating", _norm_gating_backward, setup_context=_norm_gating_setup_context)


def norm_gating(
    a: Tensor, u: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *, eps: float = 1e-6,
    dropout_p: float = 0.0, training: bool = True, seed: Optional[int] = None, concat: bool = False,
    backend: BackendLike = Backend.PYTORCH,
) -> Tensor:
    """``torch.ops.hstu.norm_gating`` with the dispatcher's keywords; a, u [..., D] -> [..., D] or [..., 3D].

    Under torch.compile / export pass an explicit ``seed`` (a drawn seed would be baked into the graph)."""
    from hstu.ops.norm_gating import draw_seed

    D = a.shape[-1]
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed()
    seed = 0 if seed is None else int(seed)
    y, _, _ = torch.ops.hstu.norm_gating(a.reshape(-1, D), u.reshape(-1, D), weight, bias, float(eps), p, seed,
                                         bool(concat), resolve_backend(backend).value)
    return y.reshape(*a.shape[:-1], y.shape[-1])
