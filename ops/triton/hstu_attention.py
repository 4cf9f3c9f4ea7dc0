"""Fused jagged HSTU attention in Triton: forward and backward, with the research rab computed in-kernel.

    out_i = sum_j valid(i, j) * SiLU(alpha * q_i . k_j + rab_ij) / norm * v_j            (per head)
    rab_ij = pos_weights[clamp(j - i + P - 1, 0, 2P - 2)]                                 (P = max_pos)
           + time_weights[clamp(floor(ln(max(|t_next(i) - t_j|, 1)) / base), 0, num_buckets)]

valid(i, j) (positions local to the sequence, L = its length, nt = clamp(num_targets[b], 0, L), H = L - nt,
C = min(contextual_len, H)):
    base = (j <= i) if causal else True
    if num_targets is given: base &= not (i >= H and j >= H and i != j)   # candidates: history + themselves
    valid = base or (j < C)                                  # contextual prefix: visible to every query
t_next(i) = t_{i+1} inside the sequence; the last row uses query_timestamps[b] when given, else t_i.

Layout: q, k [T, H, dqk], v [T, H, dv] (last dim contiguous), offsets [B+1] (int64), jagged, never padded.

Kernels (see ops/README.md, "Triton kernels"):
  _hstu_fwd_kernel       grid (B*H, cdiv(max_len, BLOCK_M)): one query block of one head of one sequence;
                         query blocks past the sequence's end exit at once; key blocks above the causal diagonal
                         (and between the history and a candidate block) are never visited.
  _hstu_bwd_dq_kernel    same grid and key ranges as the forward; accumulates dq in registers.
  _hstu_bwd_dkdv_kernel  grid (B*H, cdiv(max_len, BLOCK_N)): one key block; loops over the query blocks that can
                         see it; accumulates dk, dv in registers, and atomically adds dS into the fp32 gradients of
                         the position and time tables.
No O(L^2) tensor is ever written: S and P are recomputed in the backward (FlashAttention-style), and SiLU
attention needs no softmax statistics.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from hstu.ops.attention_args import AttentionArgs

__all__ = [
    "triton_jagged_hstu_attention",
    "hstu_attention_fwd",
    "hstu_attention_bwd",
    "KernelConfig",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _seq_info(seq_offsets, num_targets, b, contextual_len, HAS_TARGETS: tl.constexpr):
    """(start token, length, history length, contextual length) of sequence b."""
    seq_start = tl.load(seq_offsets + b).to(tl.int64)
    seq_len = (tl.load(seq_offsets + b + 1).to(tl.int64) - seq_start).to(tl.int32)
    hist_len = seq_len
    if HAS_TARGETS:
        n_targets = tl.load(num_targets + b).to(tl.int32)
        n_targets = tl.minimum(tl.maximum(n_targets, 0), seq_len)
        hist_len = seq_len - n_targets
    ctx_len = tl.minimum(hist_len, contextual_len)
    return seq_start, seq_len, hist_len, ctx_len


@triton.jit
def _query_times(ts_seq, query_timestamps, b, offs_m, seq_len, HAS_QTS: tl.constexpr):
    """t_next(i): the timestamp of the next event of the sequence; the last row uses query_timestamps[b] if given."""
    nxt = offs_m + 1
    t_next = tl.load(ts_seq + nxt, mask=nxt < seq_len, other=0)
    if HAS_QTS:
        t_last = tl.load(query_timestamps + b).to(tl.int64)
    else:
        t_last = tl.load(ts_seq + offs_m, mask=offs_m < seq_len, other=0)
    return tl.where(nxt < seq_len, t_next, t_last).to(tl.int64)


@triton.jit
def _valid_mask(offs_m, offs_n, hi_n, seq_len, hist_len, ctx_len,
                CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CTX: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the (query i, key j) pairs that attend (see the module docstring)."""
    i = offs_m[:, None]
    j = offs_n[None, :]
    in_range = (i < seq_len) & (j < hi_n)
    if CAUSAL:
        rule = j <= i
    else:
        rule = (i >= 0) & (j >= 0)
    if HAS_TARGETS:  # no candidate sees another candidate
        rule = rule & ((i < hist_len) | (j < hist_len) | (i == j))
    if HAS_CTX:
        rule = rule | (j < ctx_len)
    return in_range & rule


@triton.jit
def _key_ranges(start_m, seq_len, hist_len, ctx_len, BLOCK_M: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr):
    """Key ranges a query block [start_m, start_m + BLOCK_M) must visit: [0, hi_1) and [lo_2, hi_2) (disjoint;
    the second is the candidate diagonal, used only with num_targets). Key blocks outside are skipped."""
    if CAUSAL:
        hi_1 = tl.maximum(tl.minimum(start_m + BLOCK_M, hist_len), ctx_len)
    else:
        # history rows see every key; a block made only of candidates sees the history (+ its diagonal)
        hi_1 = tl.where(start_m < hist_len, seq_len, hist_len)
    lo_2 = tl.maximum(tl.maximum(start_m, hist_len), hi_1)
    hi_2 = tl.minimum(start_m + BLOCK_M, seq_len)
    return hi_1, lo_2, hi_2


@triton.jit
def _pos_index(offs_m, offs_n, max_pos):
    """Index into the Toeplitz position table [2*max_pos - 1]: j - i + max_pos - 1, clamped to the table."""
    rel = offs_n[None, :] - offs_m[:, None] + (max_pos - 1)
    return tl.minimum(tl.maximum(rel, 0), 2 * max_pos - 2)


@triton.jit
def _time_bucket(t_q, t_k, time_base, num_buckets):
    """clamp(floor(ln(max(|t_q - t_k|, 1)) / base), 0, num_buckets), computed in fp32 like the reference."""
    dt = t_q[:, None] - t_k[None, :]
    dt = tl.where(dt < 0, -dt, dt)
    dt = tl.maximum(dt, 1)
    bucket = tl.floor(tl.log(dt.to(tl.float32)) / time_base).to(tl.int32)
    return tl.minimum(tl.maximum(bucket, 0), num_buckets)


@triton.jit
def _scores(q, k, alpha, pos_w, pos_idx, time_w, bucket, valid,
            HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr):
    """S = alpha * Q K^T + rab, fp32 [BLOCK_M, BLOCK_N]."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * alpha
    if HAS_POS:
        s += tl.load(pos_w + pos_idx, mask=valid, other=0.0).to(tl.float32)
    if HAS_TIME:
        s += tl.load(time_w + bucket, mask=valid, other=0.0).to(tl.float32)
    return s


@triton.jit
def _load_rows(base, offs, stride, offs_d, hi, D: tl.constexpr):
    """Load rows offs (< hi) of a [*, D] slab whose rows are `stride` elements apart; zeros elsewhere."""
    mask = (offs[:, None] < hi) & (offs_d[None, :] < D)
    return tl.load(base + offs[:, None].to(tl.int64) * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, val, offs, stride, offs_d, hi, D: tl.constexpr):
    mask = (offs[:, None] < hi) & (offs_d[None, :] < D)
    tl.store(base + offs[:, None].to(tl.int64) * stride + offs_d[None, :], val, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_range(acc, q, offs_m, t_q, lo_n, hi_n, b,
               K_seq, V_seq, ts_seq, pos_w, time_w,
               stride_kt, stride_vt, seq_len, hist_len, ctx_len,
               alpha, norm, max_pos, num_buckets, time_base,
               DQK: tl.constexpr, DV: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CTX: tl.constexpr,
               HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr):
    """acc += sum over key blocks in [lo_n, hi_n) of SiLU(S)/norm * V."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo_n, hi_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_seq, offs_n, stride_kt, offs_dqk, hi_n, DQK)
        v = _load_rows(V_seq, offs_n, stride_vt, offs_dv, hi_n, DV)
        valid = _valid_mask(offs_m, offs_n, hi_n, seq_len, hist_len, ctx_len, CAUSAL, HAS_TARGETS, HAS_CTX)
        pos_idx = 0
        bucket = 0
        if HAS_POS:
            pos_idx = _pos_index(offs_m, offs_n, max_pos)
        if HAS_TIME:
            t_k = tl.load(ts_seq + offs_n, mask=offs_n < seq_len, other=0).to(tl.int64)
            bucket = _time_bucket(t_q, t_k, time_base, num_buckets)
        s = _scores(q, k, alpha, pos_w, pos_idx, time_w, bucket, valid, HAS_POS, HAS_TIME, PRECISION)
        p = tl.where(valid, s * tl.sigmoid(s) / norm, 0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc


@triton.jit
def _hstu_fwd_kernel(
    Q, K, V, Out, seq_offsets, num_targets, timestamps, query_timestamps, pos_w, time_w,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_heads, alpha, norm, contextual_len, max_pos, num_buckets, time_base,
    DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CTX: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_QTS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start, seq_len, hist_len, ctx_len = _seq_info(seq_offsets, num_targets, b, contextual_len, HAS_TARGETS)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:  # padding block: no work
        return

    Q_seq = Q + seq_start * stride_qt + h * stride_qh
    K_seq = K + seq_start * stride_kt + h * stride_kh
    V_seq = V + seq_start * stride_vt + h * stride_vh
    O_seq = Out + seq_start * stride_ot + h * stride_oh
    ts_seq = timestamps + seq_start
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q_seq, offs_m, stride_qt, offs_dqk, seq_len, DQK)
    t_q = 0
    if HAS_TIME:
        t_q = _query_times(ts_seq, query_timestamps, b, offs_m, seq_len, HAS_QTS)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    hi_1, lo_2, hi_2 = _key_ranges(start_m, seq_len, hist_len, ctx_len, BLOCK_M, CAUSAL, HAS_TARGETS)
    # Range 1 [0, hi_1): history keys up to the causal diagonal + the contextual prefix (non-causal: all keys a
    # history row sees).
    acc = _fwd_range(acc, q, offs_m, t_q, 0, hi_1, b, K_seq, V_seq, ts_seq, pos_w, time_w,
                     stride_kt, stride_vt, seq_len, hist_len, ctx_len,
                     alpha, norm, max_pos, num_buckets, time_base,
                     DQK, DV, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                     CAUSAL, HAS_TARGETS, HAS_CTX, HAS_POS, HAS_TIME, PRECISION)
    # Range 2 [lo_2, hi_2): the candidate keys on this block's diagonal (a candidate sees itself, no other one).
    if HAS_TARGETS:
        acc = _fwd_range(acc, q, offs_m, t_q, lo_2, hi_2, b, K_seq, V_seq, ts_seq, pos_w, time_w,
                         stride_kt, stride_vt, seq_len, hist_len, ctx_len,
                         alpha, norm, max_pos, num_buckets, time_base,
                         DQK, DV, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                         CAUSAL, HAS_TARGETS, HAS_CTX, HAS_POS, HAS_TIME, PRECISION)
    _store_rows(O_seq, acc.to(Out.dtype.element_ty), offs_m, stride_ot, offs_dv, seq_len, DV)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dq_range(dq, q, do, offs_m, t_q, lo_n, hi_n,
                  K_seq, V_seq, ts_seq, pos_w, time_w,
                  stride_kt, stride_vt, seq_len, hist_len, ctx_len,
                  alpha, norm, max_pos, num_buckets, time_base,
                  DQK: tl.constexpr, DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CTX: tl.constexpr,
                  HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr):
    """dq += sum over key blocks in [lo_n, hi_n) of dS K (alpha applied by the caller)."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo_n, hi_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_seq, offs_n, stride_kt, offs_dqk, hi_n, DQK)
        v = _load_rows(V_seq, offs_n, stride_vt, offs_dv, hi_n, DV)
        valid = _valid_mask(offs_m, offs_n, hi_n, seq_len, hist_len, ctx_len, CAUSAL, HAS_TARGETS, HAS_CTX)
        pos_idx = 0
        bucket = 0
        if HAS_POS:
            pos_idx = _pos_index(offs_m, offs_n, max_pos)
        if HAS_TIME:
            t_k = tl.load(ts_seq + offs_n, mask=offs_n < seq_len, other=0).to(tl.int64)
            bucket = _time_bucket(t_q, t_k, time_base, num_buckets)
        s = _scores(q, k, alpha, pos_w, pos_idx, time_w, bucket, valid, HAS_POS, HAS_TIME, PRECISION)
        sig = tl.sigmoid(s)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where(valid, dp * (sig * (1.0 + s * (1.0 - sig))) / norm, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _hstu_bwd_dq_kernel(
    Q, K, V, DO, DQ, seq_offsets, num_targets, timestamps, query_timestamps, pos_w, time_w,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    num_heads, alpha, norm, contextual_len, max_pos, num_buckets, time_base,
    DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CTX: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_QTS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start, seq_len, hist_len, ctx_len = _seq_info(seq_offsets, num_targets, b, contextual_len, HAS_TARGETS)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return

    Q_seq = Q + seq_start * stride_qt + h * stride_qh
    K_seq = K + seq_start * stride_kt + h * stride_kh
    V_seq = V + seq_start * stride_vt + h * stride_vh
    DO_seq = DO + seq_start * stride_dot + h * stride_doh
    DQ_seq = DQ + seq_start * stride_dqt + h * stride_dqh
    ts_seq = timestamps + seq_start
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q_seq, offs_m, stride_qt, offs_dqk, seq_len, DQK)
    do = _load_rows(DO_seq, offs_m, stride_dot, offs_dv, seq_len, DV)
    t_q = 0
    if HAS_TIME:
        t_q = _query_times(ts_seq, query_timestamps, b, offs_m, seq_len, HAS_QTS)

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    hi_1, lo_2, hi_2 = _key_ranges(start_m, seq_len, hist_len, ctx_len, BLOCK_M, CAUSAL, HAS_TARGETS)
    dq = _bwd_dq_range(dq, q, do, offs_m, t_q, 0, hi_1, K_seq, V_seq, ts_seq, pos_w, time_w,
                       stride_kt, stride_vt, seq_len, hist_len, ctx_len,
                       alpha, norm, max_pos, num_buckets, time_base,
                       DQK, DV, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                       CAUSAL, HAS_TARGETS, HAS_CTX, HAS_POS, HAS_TIME, PRECISION)
    if HAS_TARGETS:
        dq = _bwd_dq_range(dq, q, do, offs_m, t_q, lo_2, hi_2, K_seq, V_seq, ts_seq, pos_w, time_w,
                           stride_kt, stride_vt, seq_len, hist_len, ctx_len,
                           alpha, norm, max_pos, num_buckets, time_base,
                           DQK, DV, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                           CAUSAL, HAS_TARGETS, HAS_CTX, HAS_POS, HAS_TIME, PRECISION)
    _store_rows(DQ_seq, (dq * alpha).to(DQ.dtype.element_ty), offs_m, stride_dqt, offs_dqk, seq_len, DQK)


@triton.jit
def _hstu_bwd_dkdv_kernel(
    Q, K, V, DO, DK_OUT, DV_OUT, D_POS_W, D_TIME_W,
    seq_offsets, num_targets, timestamps, query_timestamps, pos_w, time_w,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_heads, alpha, norm, contextual_len, max_pos, num_buckets, time_base,
    DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CTX: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_QTS: tl.constexpr, PRECISION: tl.constexpr,
    POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start, seq_len, hist_len, ctx_len = _seq_info(seq_offsets, num_targets, b, contextual_len, HAS_TARGETS)
    start_n = pid_n * BLOCK_N
    if start_n >= seq_len:
        return

    Q_seq = Q + seq_start * stride_qt + h * stride_qh
    K_seq = K + seq_start * stride_kt + h * stride_kh
    V_seq = V + seq_start * stride_vt + h * stride_vh
    DO_seq = DO + seq_start * stride_dot + h * stride_doh
    DK_seq = DK_OUT + seq_start * stride_dkt + h * stride_dkh
    DV_seq = DV_OUT + seq_start * stride_dvt + h * stride_dvh
    ts_seq = timestamps + seq_start
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K_seq, offs_n, stride_kt, offs_dqk, seq_len, DQK)
    v = _load_rows(V_seq, offs_n, stride_vt, offs_dv, seq_len, DV)
    t_k = 0
    if HAS_TIME:
        t_k = tl.load(ts_seq + offs_n, mask=offs_n < seq_len, other=0).to(tl.int64)

    # The queries that can see this key block: all of them for contextual keys; i >= start_n under causality;
    # only the diagonal for a block made only of candidates.
    # (Non-causal + candidates: a candidate-only key block visits the rows [0, its end); the candidate rows below
    # it are masked, not skipped.)
    lo_m = 0
    hi_m = seq_len
    if CAUSAL:
        lo_m = tl.where(start_n >= ctx_len, start_n, 0)
    if HAS_TARGETS:
        only_candidates = start_n >= hist_len
        if CAUSAL:
            lo_m = tl.where(only_candidates, start_n, lo_m)
        hi_m = tl.where(only_candidates, tl.minimum(start_n + BLOCK_N, seq_len), hi_m)

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start_m in range(lo_m, hi_m, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q_seq, offs_m, stride_qt, offs_dqk, hi_m, DQK)
        do = _load_rows(DO_seq, offs_m, stride_dot, offs_dv, hi_m, DV)
        valid = _valid_mask(offs_m, offs_n, seq_len, hi_m, hist_len, ctx_len, CAUSAL, HAS_TARGETS, HAS_CTX)
        pos_idx = 0
        bucket = 0
        if HAS_POS:
            pos_idx = _pos_index(offs_m, offs_n, max_pos)
        if HAS_TIME:
            t_q = _query_times(ts_seq, query_timestamps, b, offs_m, seq_len, HAS_QTS)
            bucket = _time_bucket(t_q, t_k, time_base, num_buckets)
        s = _scores(q, k, alpha, pos_w, pos_idx, time_w, bucket, valid, HAS_POS, HAS_TIME, PRECISION)
        sig = tl.sigmoid(s)
        p = tl.where(valid, s * sig / norm, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where(valid, dp * (sig * (1.0 + s * (1.0 - sig))) / norm, 0.0)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        # rab gradients: d rab_ij = dS_ij, scattered into the (tiny) tables, summed over heads by the atomics.
        if POS_GRAD:
            tl.atomic_add(D_POS_W + pos_idx, ds, mask=valid, sem="relaxed")
        if TIME_GRAD:
            tl.atomic_add(D_TIME_W + bucket, ds, mask=valid, sem="relaxed")
    _store_rows(DK_seq, (dk * alpha).to(DK_OUT.dtype.element_ty), offs_n, stride_dkt, offs_dqk, seq_len, DQK)
    _store_rows(DV_seq, dv.to(DV_OUT.dtype.element_ty), offs_n, stride_dvt, offs_dv, seq_len, DV)


# ----------------------------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------------------------


class KernelConfig:
    """Launch parameters (one config: @triton.autotune with several configs does not run in the interpreter).

    GPU defaults are a reasonable H100 starting point, not tuned (no GPU was available when this was written)."""

    gpu_block_m = 64
    gpu_block_n = 64
    gpu_num_warps = 4
    gpu_num_stages = 2
    interpret_block_m = 32
    interpret_block_n = 32
    # fp32 inputs: "ieee" (exact, matches the reference) or "tf32" (faster tensor cores on GPU).
    fp32_precision = "ieee"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class _Prepared:
    """Validated, contiguous kernel arguments shared by the forward and the backward."""

    def __init__(self, q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
                 query_timestamps, time_bucket_base, num_targets, contextual_len, block_m, block_n):
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            raise ValueError("q, k, v must be [T, H, d]")
        if q.shape != k.shape or v.shape[:2] != q.shape[:2]:
            raise ValueError(f"shape mismatch q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError("q, k, v must share a dtype")
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"unsupported dtype {q.dtype}")
        if q.dtype == torch.bfloat16 and _interpreting():
            raise NotImplementedError("bf16 tl.dot is wrong in the Triton interpreter; use fp32/fp16 on CPU")
        if time_weights is not None and timestamps is None:
            raise ValueError("time_weights needs timestamps")
        if contextual_len < 0:
            raise ValueError("contextual_len must be >= 0")
        self.q, self.k, self.v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        self.offsets = offsets.to(torch.int64).contiguous()
        self.max_len = int(max_len)
        self.alpha, self.norm, self.causal = float(alpha), float(norm), bool(causal)
        dev = q.device
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        self.pos_weights = pos_weights.contiguous() if pos_weights is not None else None
        self.time_weights = time_weights.contiguous() if time_weights is not None else None
        self.pos_arg = self.pos_weights if pos_weights is not None else dummy
        self.time_arg = self.time_weights if time_weights is not None else dummy
        self.max_pos = (pos_weights.numel() + 1) // 2 if pos_weights is not None else 1
        self.num_buckets = time_weights.numel() - 1 if time_weights is not None else 0
        use_ts = time_weights is not None
        self.timestamps = timestamps.to(torch.int64).contiguous() if use_ts else torch.zeros(1, dtype=torch.int64, device=dev)
        self.has_qts = use_ts and query_timestamps is not None
        self.qts = (query_timestamps.to(torch.int64).contiguous() if self.has_qts
                    else torch.zeros(1, dtype=torch.int64, device=dev))
        self.has_targets = num_targets is not None
        self.num_targets = (num_targets.to(torch.int32).contiguous() if self.has_targets
                            else torch.zeros(1, dtype=torch.int32, device=dev))
        self.time_base = float(time_bucket_base)
        self.contextual_len = int(contextual_len)
        self.B = self.offsets.numel() - 1
        self.T, self.H, self.DQK = q.shape
        self.DV = v.shape[2]
        interp = _interpreting() or dev.type != "cuda"
        self.block_m = block_m or (KernelConfig.interpret_block_m if interp else KernelConfig.gpu_block_m)
        self.block_n = block_n or (KernelConfig.interpret_block_n if interp else KernelConfig.gpu_block_n)
        self.launch = {} if interp else {"num_warps": KernelConfig.gpu_num_warps,
                                         "num_stages": KernelConfig.gpu_num_stages}
        # input_precision only matters for fp32 operands; None = the backend's default for fp16 / bf16
        self.precision = KernelConfig.fp32_precision if q.dtype == torch.float32 else None

    def empty(self) -> bool:
        return self.B <= 0 or self.T == 0 or self.max_len <= 0

    def common_args(self):
        return (self.H, self.alpha, self.norm, self.contextual_len, self.max_pos, self.num_buckets, self.time_base)

    def constexprs(self):
        return dict(
            DQK=self.DQK, DV=self.DV, BLOCK_M=self.block_m, BLOCK_N=self.block_n,
            BLOCK_DQK=_block_d(self.DQK), BLOCK_DV=_block_d(self.DV),
            CAUSAL=self.causal, HAS_TARGETS=self.has_targets, HAS_CTX=self.contextual_len > 0,
            HAS_POS=self.pos_weights is not None, HAS_TIME=self.time_weights is not None,
            HAS_QTS=self.has_qts, PRECISION=self.precision, **self.launch,
        )


def _prepare(q, k, v, offsets, max_len, alpha, norm, causal=True, pos_weights=None, time_weights=None,
             timestamps=None, query_timestamps=None, time_bucket_base=0.301, num_targets=None, contextual_len=0,
             block_m=None, block_n=None) -> _Prepared:
    return _Prepared(q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
                     query_timestamps, time_bucket_base, num_targets, contextual_len, block_m, block_n)


def hstu_attention_fwd(q, k, v, offsets, max_len, alpha, norm, causal=True, pos_weights=None, time_weights=None,
                       timestamps=None, query_timestamps=None, time_bucket_base=0.301, num_targets=None,
                       contextual_len=0, block_m=None, block_n=None) -> torch.Tensor:
    """Forward only (no autograd): returns out [T, H, dv] in q's dtype."""
    a = _prepare(q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
                 query_timestamps, time_bucket_base, num_targets, contextual_len, block_m, block_n)
    out = torch.zeros(a.T, a.H, a.DV, dtype=q.dtype, device=q.device)
    if a.empty():
        return out
    grid = (a.B * a.H, triton.cdiv(a.max_len, a.block_m))
    _hstu_fwd_kernel[grid](
        a.q, a.k, a.v, out, a.offsets, a.num_targets, a.timestamps, a.qts, a.pos_arg, a.time_arg,
        a.q.stride(0), a.q.stride(1), a.k.stride(0), a.k.stride(1), a.v.stride(0), a.v.stride(1),
        out.stride(0), out.stride(1),
        *a.common_args(), **a.constexprs(),
    )
    return out


def hstu_attention_bwd(dout, q, k, v, offsets, max_len, alpha, norm, causal=True, pos_weights=None,
                       time_weights=None, timestamps=None, query_timestamps=None, time_bucket_base=0.301,
                       num_targets=None, contextual_len=0, block_m=None, block_n=None,
                       need_pos_grad=True, need_time_grad=True,
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward: (dq, dk, dv, d_pos_weights | None, d_time_weights | None)."""
    a = _prepare(q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
                 query_timestamps, time_bucket_base, num_targets, contextual_len, block_m, block_n)
    dout = dout.contiguous()
    dq = torch.zeros_like(a.q)
    dk = torch.zeros_like(a.k)
    dv = torch.zeros_like(a.v)
    pos_grad = pos_weights is not None and need_pos_grad
    time_grad = time_weights is not None and need_time_grad
    d_pos = torch.zeros(pos_weights.numel(), dtype=torch.float32, device=q.device) if pos_grad else None
    d_time = torch.zeros(time_weights.numel(), dtype=torch.float32, device=q.device) if time_grad else None
    if not a.empty():
        kw = a.constexprs()
        _hstu_bwd_dq_kernel[(a.B * a.H, triton.cdiv(a.max_len, a.block_m))](
            a.q, a.k, a.v, dout, dq, a.offsets, a.num_targets, a.timestamps, a.qts, a.pos_arg, a.time_arg,
            a.q.stride(0), a.q.stride(1), a.k.stride(0), a.k.stride(1), a.v.stride(0), a.v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            *a.common_args(), **kw,
        )
        dummy = torch.empty(1, dtype=torch.float32, device=q.device)
        _hstu_bwd_dkdv_kernel[(a.B * a.H, triton.cdiv(a.max_len, a.block_n))](
            a.q, a.k, a.v, dout, dk, dv,
            d_pos if pos_grad else dummy, d_time if time_grad else dummy,
            a.offsets, a.num_targets, a.timestamps, a.qts, a.pos_arg, a.time_arg,
            a.q.stride(0), a.q.stride(1), a.k.stride(0), a.k.stride(1), a.v.stride(0), a.v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            *a.common_args(), POS_GRAD=pos_grad, TIME_GRAD=time_grad, **kw,
        )
    if d_pos is not None:
        d_pos = d_pos.to(pos_weights.dtype).view_as(pos_weights)
    if d_time is not None:
        d_time = d_time.to(time_weights.dtype).view_as(time_weights)
    return dq, dk, dv, d_pos, d_time


class _JaggedHSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
                query_timestamps, time_bucket_base, num_targets, contextual_len, block_m, block_n):
        out = hstu_attention_fwd(q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights,
                                 timestamps, query_timestamps, time_bucket_base, num_targets, contextual_len,
                                 block_m, block_n)
        ctx.save_for_backward(q, k, v, offsets, pos_weights, time_weights, timestamps, query_timestamps,
                              num_targets)
        ctx.args = (max_len, alpha, norm, causal, time_bucket_base, contextual_len, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, offsets, pos_weights, time_weights, timestamps, query_timestamps, num_targets = ctx.saved_tensors
        max_len, alpha, norm, causal, base, contextual_len, block_m, block_n = ctx.args
        dq, dk, dv, d_pos, d_time = hstu_attention_bwd(
            dout, q, k, v, offsets, max_len, alpha, norm, causal, pos_weights, time_weights, timestamps,
            query_timestamps, base, num_targets, contextual_len, block_m, block_n,
            need_pos_grad=ctx.needs_input_grad[8], need_time_grad=ctx.needs_input_grad[9],
        )
        return (dq, dk, dv, None, None, None, None, None, d_pos, d_time) + (None,) * 7


def triton_jagged_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs, *,
                                 block_m: Optional[int] = None, block_n: Optional[int] = None) -> torch.Tensor:
    """Fused jagged HSTU attention (Triton), differentiable in q, k, v, args.pos_weights and args.time_weights.

    Same semantics as hstu.ops.pytorch.hstu_attention (module docstring above). args.max_len must be >= every
    sequence length (rows past max_len are left zero). block_m / block_n override the tile sizes (tests).
    The autograd.Function below is the flat boundary."""
    a = args
    return _JaggedHSTUAttention.apply(q, k, v, a.offsets, a.max_len, a.alpha, a.norm, a.causal, a.pos_weights,
                                      a.time_weights, a.timestamps, a.query_timestamps, a.time_bucket_base,
                                      a.num_targets, a.contextual_len, block_m, block_n)
