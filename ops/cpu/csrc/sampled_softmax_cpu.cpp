// Sampled-softmax cross-entropy on CPU, fused: logits, mask, log-sum-exp and loss in one pass forward; the logit
// gradient, dq and the item-table gradient in two passes backward (csrc of ops/cpu/sampled_softmax.py).
//
// For each row v (a valid position) with query q[v] [D] and K = R + 1 table rows idx[v] (column 0 = positive):
//     l[v, k] = q[v] . table[idx[v, k]] / temperature,  l[v, k] = -inf where k > 0 and idx[v, k] == idx[v, 0]
//     loss[v] = logsumexp_k l[v, k] - l[v, 0]
// Backward with g[v] = dL/dloss[v]:  d[v, k] = g[v] (softmax_k(l[v]) - [k == 0]) / temperature
//     dq[v] = sum_k d[v, k] table[idx[v, k]],   dtable[u] = sum_{idx[v, k] = u} d[v, k] q[v]
// dtable, small table (kSplits copies fit split_bytes): 4 fixed ranges of v each add into their own copy, summed in a
// fixed tree; large table: threads own blocks of 16 rows and add their entries in (v, k) order. Either way the
// sums do not depend on the thread count (deterministic) and no atomics are needed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

using hstu_cpu::exp_scalar;
using hstu_cpu::has_avx2;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kSplits = 4;  // fixed row ranges of the small-table gradient (see backward)

#ifdef HSTU_X86
using hstu_cpu::exp_avx2;

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
  for (; j < n; ++j) y[j] += alpha * x[j];
}

// p[k] = exp(l[k] - shift), 0 where l[k] = -inf; returns sum_k p[k].
__attribute__((target("avx2,fma"))) float exp_shift_avx2(const float* l, float shift, float* p, int64_t n) {
  const __m256 sh = _mm256_set1_ps(shift), ninf = _mm256_set1_ps(kNegInf);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 lv = _mm256_loadu_ps(l + j);
    const __m256 e = _mm256_and_ps(exp_avx2(_mm256_sub_ps(lv, sh)), _mm256_cmp_ps(lv, ninf, _CMP_NEQ_UQ));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  if (j < n) {  // tail through a padded buffer: the same vector arithmetic
    alignas(32) float lb[8], pb[8];
    for (int t = 0; t < 8; ++t) lb[t] = j + t < n ? l[j + t] : kNegInf;
    exp_shift_avx2(lb, shift, pb, 8);
    for (int64_t t = j; t < n; ++t) { p[t] = pb[t - j]; s += pb[t - j]; }
  }
  return s;
}

__attribute__((target("avx2,fma"))) inline __m256i tail_mask(int64_t D) {
  const int64_t r = D % 8 == 0 ? 8 : D % 8;
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// out[k] = q . table[iv[k]] for k < K, rows of D <= 8·NV floats: q held in registers, 8 dot products at a
// time (8 independent FMA chains), reduced together. NV is a compile-time count so nothing spills.
template <int NV>
__attribute__((target("avx2,fma"))) void row_dots_nv(const float* q, const float* table, const int64_t* iv, int64_t K,
                                                      int64_t D, float* out) {
  const __m256i tm = tail_mask(D);
  __m256 qv[NV];
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) qv[c] = c + 1 < NV ? _mm256_loadu_ps(q + 8 * c) : _mm256_maskload_ps(q + 8 * c, tm);
  for (int64_t k0 = 0; k0 < K; k0 += 8) {
    const int64_t nk = std::min<int64_t>(8, K - k0);
    const float* r[8];
    for (int64_t t = 0; t < 8; ++t) r[t] = table + iv[k0 + (t < nk ? t : 0)] * D;  // past K: a dummy row
    __m256 acc[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t)
        acc[t] = _mm256_fmadd_ps(qv[c], c + 1 < NV ? _mm256_loadu_ps(r[t] + 8 * c) : _mm256_maskload_ps(r[t] + 8 * c, tm),
                                 acc[t]);
    }
    // transpose-reduce: lane t of the result = horizontal sum of acc[t]
    const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    const __m256 dots = _mm256_add_ps(lo, hi);  // [d0 d1 d2 d3 d4 d5 d6 d7]
    if (nk == 8) {
      _mm256_storeu_ps(out + k0, dots);
    } else {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, dots);
      for (int64_t t = 0; t < nk; ++t) out[k0 + t] = lanes[t];
    }
  }
}

// l[k] /= temp for k < K, returns max_k l[k].
__attribute__((target("avx2,fma"))) float scale_max_avx2(float* l, float temp, int64_t K) {
  const __m256 tv = _mm256_set1_ps(temp);
  __m256 m = _mm256_set1_ps(kNegInf);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(l + k), tv);
    _mm256_storeu_ps(l + k, x);
    m = _mm256_max_ps(m, x);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = lanes[0];
  for (int t = 1; t < 8; ++t) r = std::max(r, lanes[t]);
  for (; k < K; ++k) {
    l[k] = l[k] / temp;
    r = std::max(r, l[k]);
  }
  return r;
}

// dq = sum_k d[k] table[iv[k]] with dq held in registers (rows of D <= 8·NV floats).
template <int NV>
__attribute__((target("avx2,fma"))) void row_weighted_sum_nv(const float* d, const float* table, const int64_t* iv,
                                                              int64_t K, int64_t D, float* dq) {
  const __m256i tm = tail_mask(D);
  __m256 acc[NV];
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (d[k] == 0.0f) continue;
    const __m256 w = _mm256_set1_ps(d[k]);
    const float* row = table + iv[k] * D;
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c)
      acc[c] = _mm256_fmadd_ps(w, c + 1 < NV ? _mm256_loadu_ps(row + 8 * c) : _mm256_maskload_ps(row + 8 * c, tm), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c + 1 < NV; ++c) _mm256_storeu_ps(dq + 8 * c, acc[c]);
  _mm256_maskstore_ps(dq + 8 * (NV - 1), tm, acc[NV - 1]);
}

// y += alpha x over D <= 8·NV floats, masked tail (no scalar remainder).
template <int NV>
__attribute__((target("avx2,fma"))) void axpy_row_nv(float alpha, const float* x, float* y, int64_t D) {
  const __m256i tm = tail_mask(D);
  const __m256 a = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    if (c + 1 < NV)
      _mm256_storeu_ps(y + 8 * c, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + 8 * c), _mm256_loadu_ps(y + 8 * c)));
    else
      _mm256_maskstore_ps(y + 8 * c, tm,
                          _mm256_fmadd_ps(a, _mm256_maskload_ps(x + 8 * c, tm), _mm256_maskload_ps(y + 8 * c, tm)));
  }
}

// The row kernels for D <= 64 (NV = 1..8 vectors of 8); nullptr beyond (callers use dot / axpy).
using RowDotsFn = void (*)(const float*, const float*, const int64_t*, int64_t, int64_t, float*);
using AxpyRowFn = void (*)(float, const float*, float*, int64_t);
struct RowKernels {
  RowDotsFn dots = nullptr, weighted_sum = nullptr;
  AxpyRowFn axpy = nullptr;
};

template <int NV>
RowKernels row_kernels_nv() {
  RowKernels k;
  k.dots = &row_dots_nv<NV>;
  k.weighted_sum = &row_weighted_sum_nv<NV>;
  k.axpy = &axpy_row_nv<NV>;
  return k;
}

RowKernels row_kernels_avx2(int64_t D) {
  switch ((D + 7) / 8) {
    case 1: return row_kernels_nv<1>();
    case 2: return row_kernels_nv<2>();
    case 3: return row_kernels_nv<3>();
    case 4: return row_kernels_nv<4>();
    case 5: return row_kernels_nv<5>();
    case 6: return row_kernels_nv<6>();
    case 7: return row_kernels_nv<7>();
    case 8: return row_kernels_nv<8>();
    default: return RowKernels();
  }
}
#endif

float dot(const float* a, const float* b, int64_t n) {
#ifdef HSTU_X86
  if (has_avx2()) return dot_avx2(a, b, n);
#endif
  float s = 0.0f;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
#ifdef HSTU_X86
  if (has_avx2()) return axpy_avx2(alpha, x, y, n);
#endif
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

float exp_shift(const float* l, float shift, float* p, int64_t n) {
#ifdef HSTU_X86
  if (has_avx2()) return exp_shift_avx2(l, shift, p, n);
#endif
  float s = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = l[j] == kNegInf ? 0.0f : exp_scalar(l[j] - shift);
    s += p[j];
  }
  return s;
}

// The row kernels of this D: AVX2 templates for D <= 64, else the generic dot / axpy loops.
struct Rows {
  int64_t D;
#ifdef HSTU_X86
  RowKernels k;
  explicit Rows(int64_t d) : D(d), k(has_avx2() && d >= 1 ? row_kernels_avx2(d) : RowKernels()) {}
#else
  explicit Rows(int64_t d) : D(d) {}
#endif

  void dots(const float* q, const float* table, const int64_t* iv, int64_t K, float* out) const {
#ifdef HSTU_X86
    if (k.dots) return k.dots(q, table, iv, K, D, out);
#endif
    for (int64_t j = 0; j < K; ++j) out[j] = dot(q, table + iv[j] * D, D);
  }

  // dq = sum_k d[k] table[iv[k]] (overwritten)
  void weighted_sum(const float* d, const float* table, const int64_t* iv, int64_t K, float* dq) const {
#ifdef HSTU_X86
    if (k.weighted_sum) return k.weighted_sum(d, table, iv, K, D, dq);
#endif
    std::fill(dq, dq + D, 0.0f);
    for (int64_t j = 0; j < K; ++j)
      if (d[j] != 0.0f) axpy(d[j], table + iv[j] * D, dq, D);
  }

  void axpy_row(float alpha, const float* x, float* y) const {
#ifdef HSTU_X86
    if (k.axpy) return k.axpy(alpha, x, y, D);
#endif
    axpy(alpha, x, y, D);
  }
};

float scale_max(float* l, float temp, int64_t K) {
#ifdef HSTU_X86
  if (has_avx2()) return scale_max_avx2(l, temp, K);
#endif
  float r = kNegInf;
  for (int64_t k = 0; k < K; ++k) {
    l[k] = l[k] / temp;
    r = std::max(r, l[k]);
  }
  return r;
}

void check(const at::Tensor& q, const at::Tensor& table, const at::Tensor& idx) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.device().is_cpu(),
              "sampled softmax (cpu): q must be contiguous float32 CPU [V, D], got ", q.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) == q.size(1) && table.scalar_type() == at::kFloat &&
                  table.is_contiguous(),
              "sampled softmax (cpu): table must be contiguous float32 [U, D=", q.size(1), "], got ", table.sizes());
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == q.size(0) && idx.size(1) >= 1 && idx.scalar_type() == at::kLong &&
                  idx.is_contiguous(),
              "sampled softmax (cpu): idx must be contiguous int64 [V, K>=1], got ", idx.sizes());
}

}  // namespace

// -> (loss [V], logits [V, K] (scaled, masked), lse [V])
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& table, const at::Tensor& idx,
                                double temperature) {
  check(q, table, idx);
  const int64_t V = q.size(0), D = q.size(1), K = idx.size(1);
  at::Tensor logits = at::empty({V, K}, q.options()), loss = at::empty({V}, q.options()),
             lse = at::empty({V}, q.options());
  const float *qp = q.data_ptr<float>(), *tp = table.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float *lp = logits.data_ptr<float>(), *lossp = loss.data_ptr<float>(), *lsep = lse.data_ptr<float>();
  const float temp = static_cast<float>(temperature);
  const Rows rows(D);
  const int64_t U = table.size(0);
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, V, 16, [&](int64_t v0, int64_t v1) {
    std::vector<float> p(K);
    bool bad = false;
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t* iv = ip + v * K;
      float* lv = lp + v * K;
      for (int64_t k = 0; k < K; ++k) bad |= static_cast<uint64_t>(iv[k]) >= static_cast<uint64_t>(U);
      if (bad) continue;
      rows.dots(qp + v * D, tp, iv, K, lv);
      // a masked column repeats the positive's row, so its logit equals l[v, 0]: the max is the same either way
      const float m = scale_max(lv, temp, K);
      for (int64_t k = 1; k < K; ++k)
        if (iv[k] == iv[0]) lv[k] = kNegInf;
      const float s = exp_shift(lv, m, p.data(), K);
      lsep[v] = m + std::log(s);
      lossp[v] = lsep[v] - lv[0];
    }
    if (bad) out_of_range = true;
  });
  TORCH_CHECK(!out_of_range, "sampled softmax (cpu): a row index is outside the table's ", U, " rows");
  return {loss, logits, lse};
}

// grad [V] = dL/dloss -> (dq [V, D] or empty, dtable [U, D] or empty)
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& table,
                                 const at::Tensor& idx, const at::Tensor& logits, const at::Tensor& lse,
                                 double temperature, bool want_dq, bool want_dtable,
                                 int64_t split_bytes) {
  const int64_t V = q.size(0), D = q.size(1), K = idx.size(1), U = table.size(0);
  TORCH_CHECK(grad.numel() == V && logits.size(0) == V && logits.size(1) == K && lse.numel() == V,
              "sampled softmax (cpu): saved tensors do not match");
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  at::Tensor d = at::empty({V, K}, q.options());
  at::Tensor dq = want_dq ? at::empty({V, D}, q.options()) : at::empty({0}, q.options());
  // small table: kSplits zeroed copies summed into dtable (every element written); large: rows added into dtable
  const bool split = U * D * kSplits * static_cast<int64_t>(sizeof(float)) <= split_bytes && V >= kSplits;
  at::Tensor dtable = !want_dtable ? at::empty({0}, q.options())
                      : split      ? at::empty({U, D}, q.options())
                                   : at::zeros({U, D}, q.options());
  const float *qp = q.data_ptr<float>(), *tp = table.data_ptr<float>(), *lp = logits.data_ptr<float>(),
              *lsep = lse.data_ptr<float>(), *gp = g.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* dp = d.data_ptr<float>();
  float* dqp = want_dq ? dq.data_ptr<float>() : nullptr;
  const float temp = static_cast<float>(temperature);
  const Rows rows(D);
  at::parallel_for(0, V, 16, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      float* dv = dp + v * K;
      exp_shift(lp + v * K, lsep[v], dv, K);  // softmax
      const float gv = gp[v] / temp;
      for (int64_t k = 0; k < K; ++k) dv[k] = gv * (k == 0 ? dv[k] - 1.0f : dv[k]);
      if (dqp) rows.weighted_sum(dv, tp, ip + v * K, K, dqp + v * D);
    }
  });
  if (want_dtable) {
    float* dtp = dtable.data_ptr<float>();
    if (split) {
      // Small table: kSplits fixed row ranges of v, each adds its entries (v, k order) into its own zeroed copy of
      // the table gradient, then the copies are summed in a fixed tree. The split does not depend on the thread
      // count (deterministic), each writer has its own lines, and the hot loop has no branch on ownership.
      at::Tensor parts = at::zeros({kSplits, U, D}, q.options());
      float* pp = parts.data_ptr<float>();
      at::parallel_for(0, kSplits, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t sp = s0; sp < s1; ++sp) {
          float* part = pp + sp * U * D;
          for (int64_t v = V * sp / kSplits; v < V * (sp + 1) / kSplits; ++v) {
            const int64_t* iv = ip + v * K;
            const float* dv = dp + v * K;
            for (int64_t k = 0; k < K; ++k)
              if (dv[k] != 0.0f) rows.axpy_row(dv[k], qp + v * D, part + iv[k] * D);
          }
        }
      });
      at::parallel_for(0, U * D, 4096, [&](int64_t e0, int64_t e1) {
        static_assert(kSplits == 4, "the reduction tree below sums 4 parts");
        const float *a0 = pp, *a1 = pp + U * D, *a2 = pp + 2 * U * D, *a3 = pp + 3 * U * D;
        for (int64_t e = e0; e < e1; ++e) dtp[e] = (a0[e] + a1[e]) + (a2[e] + a3[e]);
      });
      return {dq, dtable};
    }
    // Large table: thread p owns the row blocks (u >> 4) & (P - 1) == p (P a power of two; 16 rows are whole
    // cache lines, so no line has two writers) and adds its entries in (v, k) order: deterministic, no atomics.
    int64_t P = 1;
    while (P * 2 <= at::get_num_threads() && (P * 2) << 4 <= U) P *= 2;
    const int64_t mask = P - 1;
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part)
        for (int64_t v = 0; v < V; ++v) {
          const int64_t* iv = ip + v * K;
          const float* dv = dp + v * K;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t u = iv[k];
            if (((u >> 4) & mask) == part && dv[k] != 0.0f) rows.axpy_row(dv[k], qp + v * D, dtp + u * D);
          }
        }
    });
  }
  return {dq, dtable};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused sampled-softmax cross-entropy per row (CPU)");
  m.def("backward", &backward, "its gradients w.r.t. the queries and the table (CPU)");
}
