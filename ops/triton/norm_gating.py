"""Fused layer norm x U gating x seeded dropout in Triton (forward + backward).

    g = U ⊙ LN(A),  y = dropout(g)  or  y = dropout(cat[U, A, g])      (semantics: ops/pytorch/norm_gating.py)

One program normalises BLOCK_R rows at once (a whole row, D ≤ BLOCK_D, lives in registers). The dropout mask is
never stored: both passes regenerate it with tl.rand(seed, linear index into y), which the PyTorch reference
reproduces bit for bit (hstu.ops.pytorch.norm_gating.philox_uniform). The forward saves only mean and rstd [N]
(fp32). The backward recomputes x̂, LN and the mask, writes dA and dU, and reduces dweight / dbias per program
into an fp32 [programs, D] buffer that torch sums (no atomics: deterministic).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["triton_norm_gating", "norm_gating_fwd", "norm_gating_bwd"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dropout(x, seed, offs, p, scale, DROPOUT: tl.constexpr):
    """x kept where tl.rand(seed, offs) >= p (scaled by 1/(1-p)), else 0. offs: int64 linear indices into y."""
    if DROPOUT:
        keep = tl.rand(seed, offs) >= p
        x = tl.where(keep, x * scale, 0.0)
    return x


@triton.jit
def _layer_norm_rows(A, W, B, rows, cols, mask, N, D: tl.constexpr, stride_a, eps,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(a, x̂, LN(a), mean, rstd) for a [BLOCK_R, BLOCK_D] tile, fp32."""
    a = tl.load(A + rows[:, None].to(tl.int64) * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(a, axis=1) / D
    xc = tl.where(mask, a - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = xc * rstd[:, None]
    ln = xhat
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        ln = ln * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)
        ln = ln + b[None, :]
    return a, xhat, ln, mean, rstd


@triton.jit
def _norm_gating_fwd_kernel(
    A, U, W, B, Y, Mean, Rstd,
    N, stride_a, stride_u, stride_y, eps, seed, p, scale,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CONCAT: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    a, xhat, ln, mean, rstd = _layer_norm_rows(A, W, B, rows, cols, mask, N, D, stride_a, eps, HAS_WEIGHT, HAS_BIAS)
    u = tl.load(U + rows[:, None].to(tl.int64) * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = u * ln
    y_row = rows[:, None].to(tl.int64) * stride_y  # y is contiguous: its linear index = row * stride_y + col
    y_ptr = Y + y_row + cols[None, :]
    if CONCAT:
        tl.store(y_ptr, _dropout(u, seed, y_row + cols[None, :], p, scale, DROPOUT).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_ptr + D, _dropout(a, seed, y_row + D + cols[None, :], p, scale, DROPOUT).to(Y.dtype.element_ty),
                 mask=mask)
        tl.store(y_ptr + 2 * D,
                 _dropout(g, seed, y_row + 2 * D + cols[None, :], p, scale, DROPOUT).to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr, _dropout(g, seed, y_row + cols[None, :], p, scale, DROPOUT).to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rows < N)
    tl.store(Rstd + rows, rstd, mask=rows < N)


@triton.jit
def _norm_gating_bwd_kernel(
    A, U, W, B, DY, Mean, Rstd, DA, DU, DW_PART, DB_PART,
    N, num_programs, stride_a, stride_u, stride_dy, stride_da, stride_du, seed, p, scale,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CONCAT: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.full([BLOCK_D], 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], tl.float32)
    db_acc = tl.zeros([BLOCK_D], tl.float32)
    num_tiles = tl.cdiv(N, BLOCK_R)
    for tile in range(pid, num_tiles, num_programs):  # grid-stride loop over row tiles
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        row64 = rows[:, None].to(tl.int64)
        mask = (rows[:, None] < N) & col_ok[None, :]
        mean = tl.load(Mean + rows, mask=rows < N, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rows < N, other=0.0)
        a = tl.load(A + row64 * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (a - mean[:, None]) * rstd[:, None], 0.0)
        ln = xhat * w[None, :] + b[None, :]
        y_row = row64 * stride_dy  # dy is contiguous, like y
        dy_ptr = DY + y_row + cols[None, :]
        if CONCAT:
            dg = tl.load(dy_ptr + 2 * D, mask=mask, other=0.0).to(tl.float32)
            dg = _dropout(dg, seed, y_row + 2 * D + cols[None, :], p, scale, DROPOUT)
            du_direct = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
            du_direct = _dropout(du_direct, seed, y_row + cols[None, :], p, scale, DROPOUT)
            da_direct = tl.load(dy_ptr + D, mask=mask, other=0.0).to(tl.float32)
            da_direct = _dropout(da_direct, seed, y_row + D + cols[None, :], p, scale, DROPOUT)
        else:
            dg = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
            dg = _dropout(dg, seed, y_row + cols[None, :], p, scale, DROPOUT)
            du_direct = 0.0
            da_direct = 0.0
        du = dg * ln + du_direct
        dln = tl.where(mask, dg * u, 0.0)
        dxhat = dln * w[None, :]
        c1 = tl.sum(dxhat, axis=1) / D
        c2 = tl.sum(dxhat * xhat, axis=1) / D
        da = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None] + da_direct
        tl.store(DA + row64 * stride_da + cols[None, :], da.to(DA.dtype.element_ty), mask=mask)
        tl.store(DU + row64 * stride_du + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dln * xhat, axis=0)
        db_acc += tl.sum(dln, axis=0)
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * D + cols, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * D + cols, db_acc, mask=col_ok)


class NormGatingConfig:
    """Launch parameters (single config). BLOCK_R rows per program; BLOCK_D = next power of 2 >= D."""

    gpu_block_r = 8
    gpu_num_warps = 4
    gpu_max_bwd_programs = 1024  # backward grid-stride programs (== partial dweight rows)
    interpret_block_r = 16


def _block_r(device: torch.device) -> int:
    return NormGatingConfig.interpret_block_r if (_interpreting() or device.type != "cuda") \
        else NormGatingConfig.gpu_block_r


def _launch_kw(device: torch.device) -> dict:
    return {} if (_interpreting() or device.type != "cuda") else {"num_warps": NormGatingConfig.gpu_num_warps}


def _check(a, u, weight, bias, dropout_p, seed):
    if a.dim() != 2 or u.shape != a.shape:
        raise ValueError(f"a and u must both be [N, D], got {tuple(a.shape)} and {tuple(u.shape)}")
    D = a.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (D,):
            raise ValueError(f"{name} must be [{D}], got {tuple(t.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")


def _dropout_args(dropout_p: float):
    dropout = dropout_p > 0.0
    scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return dropout, float(dropout_p), scale


def norm_gating_fwd(a, u, weight=None, bias=None, eps=1e-6, dropout_p=0.0, seed=0, concat=False):
    """Forward only: (y, mean [N] fp32, rstd [N] fp32)."""
    _check(a, u, weight, bias, dropout_p, seed)
    a, u = a.contiguous(), u.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    N, D = a.shape
    y = torch.empty(N, 3 * D if concat else D, dtype=a.dtype, device=a.device)
    mean = torch.empty(N, dtype=torch.float32, device=a.device)
    rstd = torch.empty(N, dtype=torch.float32, device=a.device)
    if N == 0 or D == 0:
        return y.zero_(), mean, rstd
    dropout, p, scale = _dropout_args(dropout_p)
    dummy = torch.empty(1, dtype=torch.float32, device=a.device)
    block_r = _block_r(a.device)
    _norm_gating_fwd_kernel[(triton.cdiv(N, block_r),)](
        a, u, weight if weight is not None else dummy, bias if bias is not None else dummy, y, mean, rstd,
        N, a.stride(0), u.stride(0), y.stride(0), float(eps), int(seed), p, scale,
        D=D, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(D),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, CONCAT=bool(concat), DROPOUT=dropout,
        **_launch_kw(a.device),
    )
    return y, mean, rstd


def norm_gating_bwd(dy, a, u, weight, bias, mean, rstd, dropout_p=0.0, seed=0, concat=False):
    """Backward: (da, du, dweight | None, dbias | None)."""
    a, u, dy = a.contiguous(), u.contiguous(), dy.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    N, D = a.shape
    da = torch.empty_like(a)
    du = torch.empty_like(u)
    if N == 0 or D == 0:
        dw = torch.zeros_like(weight) if weight is not None else None
        db = torch.zeros_like(bias) if bias is not None else None
        return da.zero_(), du.zero_(), dw, db
    dropout, p, scale = _dropout_args(dropout_p)
    block_r = _block_r(a.device)
    tiles = triton.cdiv(N, block_r)
    programs = tiles if (_interpreting() or a.device.type != "cuda") else min(tiles, NormGatingConfig.gpu_max_bwd_programs)
    dw_part = torch.empty(programs, D, dtype=torch.float32, device=a.device) if weight is not None else None
    db_part = torch.empty(programs, D, dtype=torch.float32, device=a.device) if bias is not None else None
    dummy = torch.empty(1, dtype=torch.float32, device=a.device)
    _norm_gating_bwd_kernel[(programs,)](
        a, u, weight if weight is not None else dummy, bias if bias is not None else dummy, dy, mean, rstd, da, du,
        dw_part if dw_part is not None else dummy, db_part if db_part is not None else dummy,
        N, programs, a.stride(0), u.stride(0), dy.stride(0), da.stride(0), du.stride(0), int(seed), p, scale,
        D=D, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(D),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, CONCAT=bool(concat), DROPOUT=dropout,
        **_launch_kw(a.device),
    )
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return da, du, dw, db


class _NormGating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, u, weight, bias, eps, dropout_p, seed, concat):
        y, mean, rstd = norm_gating_fwd(a, u, weight, bias, eps, dropout_p, seed, concat)
        ctx.save_for_backward(a, u, weight, bias, mean, rstd)
        ctx.args = (dropout_p, seed, concat)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, u, weight, bias, mean, rstd = ctx.saved_tensors
        dropout_p, seed, concat = ctx.args
        da, du, dw, db = norm_gating_bwd(dy, a, u, weight, bias, mean, rstd, dropout_p, seed, concat)
        return da, du, dw, db, None, None, None, None


def triton_norm_gating(
    a: torch.Tensor,
    u: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    seed: int = 0,
    concat: bool = False,
) -> torch.Tensor:
    """Same contract as hstu.ops.pytorch.norm_gating.pytorch_norm_gating (a, u [N, D]); autograd to a, u, weight,
    bias."""
    return _NormGating.apply(a, u, weight, bias, eps, dropout_p, seed, concat)
