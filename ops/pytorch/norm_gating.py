"""PyTorch reference of the fused "layer norm x U gating x dropout" that follows HSTU attention.

    g = U ⊙ LN(A)                  LN(A) = (A − mean) / sqrt(var + eps) [· weight + bias]   (biased var, per row)
    research variant:    y = dropout(g)                              [N, D]
    production variant:  y = dropout(cat[U, A, g], dim=-1)          [N, 3D]   (concat=True, GR's concat_ux)

Dropout is SEEDED and counter-based: element e (row-major linear index into y, int64) is kept iff
``philox_uniform(seed, e) >= p``; kept values are scaled by 1/(1 − p) (p ≥ 1 → all zero). ``philox_uniform`` is a
bit-exact PyTorch port of Triton's ``tl.rand(seed, offsets)`` (Philox-4x32, 10 rounds, int64 offsets), so the
Triton kernel (ops/triton/norm_gating.py) and this reference drop exactly the same elements for the same seed,
on any device, without storing a mask. Computation is in fp32 (fp64 for fp64 inputs); the result is cast to
A's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["philox_uniform", "dropout_keep_mask", "pytorch_norm_gating"]

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit ints


def _mulhilo(a: torch.Tensor, b: int):
    """(high, low) 32-bit halves of a * b for a: int64 tensor holding uint32 values, b: a uint32 constant.
    Done on 16-bit halves of a so that nothing overflows int64."""
    t_lo = (a & 0xFFFF) * b  # < 2^48
    t_hi = (a >> 16) * b  # < 2^48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _M32
    return hi, lo


def philox_uniform(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """float32 uniforms in [0, 1), bit-identical to Triton's ``tl.rand(seed, offsets)`` with int64 offsets.

    seed: Python int in [0, 2^63); offsets: integer tensor (any shape, values ≥ 0)."""
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    off = offsets.to(torch.int64)
    c0 = off & _M32
    c1 = (off >> 32) & _M32
    c2 = torch.zeros_like(off)
    c3 = torch.zeros_like(off)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast uint32 -> int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def dropout_keep_mask(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """bool mask of the elements a seeded dropout of rate p keeps, for a row-major tensor of `shape`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    u = philox_uniform(seed, torch.arange(numel, device=device, dtype=torch.int64))
    return (u >= torch.tensor(p, dtype=torch.float32, device=u.device)).view(tuple(shape))  # fp32 compare, as Triton


def pytorch_norm_gating(
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
    """a, u [N, D] -> [N, D] (or [N, 3D] with concat). dropout_p = 0 disables dropout (the seed is then unused).
    Autograd to a, u, weight, bias."""
    D = a.shape[-1]
    ct = torch.promote_types(a.dtype, torch.float32)  # compute dtype: fp32, fp64 for fp64 inputs
    af, uf = a.to(ct), u.to(ct)
    ln = F.layer_norm(af, (D,), None if weight is None else weight.to(ct), None if bias is None else bias.to(ct), eps)
    y = uf * ln
    if concat:
        y = torch.cat([uf, af, y], dim=-1)
    if dropout_p > 0.0:
        if dropout_p >= 1.0:
            y = y * 0.0
        else:
            keep = dropout_keep_mask(seed, y.shape, dropout_p, device=y.device)
            y = y * keep.to(y.dtype) * (1.0 / (1.0 - dropout_p))
    return y.to(a.dtype)
