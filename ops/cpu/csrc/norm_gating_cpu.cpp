// Fused layer norm x U gating x seeded dropout on CPU (ops/cpu/norm_gating.py), semantics of
// ops/pytorch/norm_gating.py:
//   g = U * LN(A)   (LN over the last dim, biased variance, optional affine weight / bias)
//   research: y = dropout(g) [N, D];  production (concat): y = dropout(cat[U, A, g]) [N, 3D]
// Dropout: element e (row-major index into y) is kept iff philox_uniform(seed, e) >= p (philox.h, the masks of the
// PyTorch reference and the Triton kernel), kept values * 1/(1 - p); p >= 1 -> all multiplied by 0. The mask is
// never stored: backward regenerates it from the seed. Forward saves mean / rstd per row.
// Rows go in fixed blocks of kRowBlock (the parallel unit, at::parallel_for): every row is computed by one thread,
// and the dweight / dbias partial sums are per block and added in block order, so no result depends on the
// thread count. AVX2/FMA at run time; HSTU_CPU_SCALAR=1 forces the portable path.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "philox.h"
#include "vec_math.h"

namespace {

using hstu_cpu::has_avx2;

constexpr int64_t kRowBlock = 32;

struct Args {
  int64_t N = 0, D = 0, W = 0;  // rows, width of a / u, width of y (D or 3D)
  const float* a = nullptr;
  const float* u = nullptr;
  const float* w = nullptr;  // LN weight [D] or null
  const float* b = nullptr;  // LN bias [D] or null
  float eps = 0.0f;
  bool concat = false;
  bool dropout = false;  // p > 0
  bool drop_all = false;  // p >= 1
  uint64_t seed = 0;
  float p = 0.0f, scale = 1.0f;
};

// Dropout multipliers of y's rows r0 .. r1-1 (a contiguous range of y's elements) into m [(r1 - r0) * W].
void block_multipliers(const Args& s, int64_t r0, int64_t r1, std::vector<float>& m) {
  const int64_t n = (r1 - r0) * s.W;
  m.resize(static_cast<size_t>(n));
  if (s.drop_all) {
    std::fill(m.begin(), m.end(), 0.0f);
    return;
  }
  hstu_cpu::dropout_multipliers(s.seed, static_cast<uint64_t>(r0 * s.W), n, s.p, s.scale, m.data());
}

// ---------------------------------------------------------------- portable row kernels
void forward_row_scalar(const Args& s, int64_t r, const float* m, float* y, float* mean_out, float* rstd_out) {
  const int64_t D = s.D;
  const float* a = s.a + r * D;
  const float* u = s.u + r * D;
  float sum = 0.0f;
  for (int64_t j = 0; j < D; ++j) sum += a[j];
  const float mean = sum / static_cast<float>(D);
  float var = 0.0f;
  for (int64_t j = 0; j < D; ++j) var += (a[j] - mean) * (a[j] - mean);
  const float rstd = 1.0f / std::sqrt(var / static_cast<float>(D) + s.eps);
  float* yg = s.concat ? y + 2 * D : y;
  const float* mg = m ? (s.concat ? m + 2 * D : m) : nullptr;
  for (int64_t j = 0; j < D; ++j) {
    float ln = (a[j] - mean) * rstd;
    if (s.w) ln *= s.w[j];
    if (s.b) ln += s.b[j];
    const float g = u[j] * ln;
    yg[j] = mg ? g * mg[j] : g;
  }
  if (s.concat) {
    for (int64_t j = 0; j < D; ++j) {
      y[j] = m ? u[j] * m[j] : u[j];
      y[D + j] = m ? a[j] * m[D + j] : a[j];
    }
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

// dy, m: y's row; writes da, du; adds dln * xhat to dw, dln to db (when non-null). tmp: [D] scratch.
void backward_row_scalar(const Args& s, int64_t r, float mean, float rstd, const float* dy, const float* m,
                         float* da, float* du, float* dw, float* db, float* tmp) {
  const int64_t D = s.D;
  const float* a = s.a + r * D;
  const float* u = s.u + r * D;
  const float* dyg = s.concat ? dy + 2 * D : dy;
  const float* mg = m ? (s.concat ? m + 2 * D : m) : nullptr;
  float c1 = 0.0f, c2 = 0.0f;
  for (int64_t j = 0; j < D; ++j) {
    const float xhat = (a[j] - mean) * rstd;
    const float w = s.w ? s.w[j] : 1.0f;
    const float ln = xhat * w + (s.b ? s.b[j] : 0.0f);
    const float dg = mg ? dyg[j] * mg[j] : dyg[j];
    float dug = dg * ln;
    if (s.concat) dug += m ? dy[j] * m[j] : dy[j];
    du[j] = dug;
    const float dln = dg * u[j];
    const float dxhat = dln * w;
    tmp[j] = dxhat;
    c1 += dxhat;
    c2 += dxhat * xhat;
    if (dw) dw[j] += dln * xhat;
    if (db) db[j] += dln;
  }
  c1 /= static_cast<float>(D);
  c2 /= static_cast<float>(D);
  for (int64_t j = 0; j < D; ++j) {
    const float xhat = (a[j] - mean) * rstd;
    float v = (tmp[j] - c1 - xhat * c2) * rstd;
    if (s.concat) v += m ? dy[D + j] * m[D + j] : dy[D + j];
    da[j] = v;
  }
}

// ---------------------------------------------------------------- AVX2 row kernels
#ifdef HSTU_X86
#define HSTU_AVX2 __attribute__((target("avx2,fma")))

HSTU_AVX2 inline __m256i lanes_below(int64_t n) {  // lane i all-ones iff i < n
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
HSTU_AVX2 inline __m256 load(const float* p, int64_t n) {  // n >= 8: a full vector; else n lanes, zeros after
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes_below(n));
}
HSTU_AVX2 inline void store(float* p, __m256 v, int64_t n) {
  if (n >= 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, lanes_below(n), v);
}
HSTU_AVX2 inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
// v * m[j..] (dropout) or v (no dropout)
HSTU_AVX2 inline __m256 drop(__m256 v, const float* m, int64_t j, int64_t n) {
  return m ? _mm256_mul_ps(v, load(m + j, n)) : v;
}

HSTU_AVX2 void forward_row_avx2(const Args& s, int64_t r, const float* m, float* y, float* mean_out, float* rstd_out) {
  const int64_t D = s.D;
  const float* a = s.a + r * D;
  const float* u = s.u + r * D;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) acc = _mm256_add_ps(acc, load(a + j, D - j));
  const float mean = hsum(acc) / static_cast<float>(D);
  const __m256 mv = _mm256_set1_ps(mean);
  acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) {
    __m256 xc = _mm256_sub_ps(load(a + j, D - j), mv);
    if (D - j < 8) xc = _mm256_and_ps(xc, _mm256_castsi256_ps(lanes_below(D - j)));
    acc = _mm256_fmadd_ps(xc, xc, acc);
  }
  const float rstd = 1.0f / std::sqrt(hsum(acc) / static_cast<float>(D) + s.eps);
  const __m256 rv = _mm256_set1_ps(rstd);
  float* yg = s.concat ? y + 2 * D : y;
  const float* mg = m ? (s.concat ? m + 2 * D : m) : nullptr;
  for (int64_t j = 0; j < D; j += 8) {
    const int64_t n = D - j;
    const __m256 av = load(a + j, n), uv = load(u + j, n);
    __m256 ln = _mm256_mul_ps(_mm256_sub_ps(av, mv), rv);
    if (s.w) ln = _mm256_mul_ps(ln, load(s.w + j, n));
    if (s.b) ln = _mm256_add_ps(ln, load(s.b + j, n));
    store(yg + j, drop(_mm256_mul_ps(uv, ln), mg, j, n), n);
    if (s.concat) {
      store(y + j, drop(uv, m, j, n), n);
      store(y + D + j, drop(av, m ? m + D : nullptr, j, n), n);
    }
  }
  *mean_out = mean;
  *rstd_out = rstd;
}

HSTU_AVX2 void backward_row_avx2(const Args& s, int64_t r, float mean, float rstd, const float* dy, const float* m,
                                 float* da, float* du, float* dw, float* db, float* tmp) {
  const int64_t D = s.D;
  const float* a = s.a + r * D;
  const float* u = s.u + r * D;
  const float* dyg = s.concat ? dy + 2 * D : dy;
  const float* mg = m ? (s.concat ? m + 2 * D : m) : nullptr;
  const __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(rstd), one = _mm256_set1_ps(1.0f);
  __m256 c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) {
    const int64_t n = D - j;
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load(a + j, n), mv), rv);  // tail lanes: finite, dln = 0 there
    const __m256 w = s.w ? load(s.w + j, n) : one;
    __m256 ln = _mm256_mul_ps(xhat, w);
    if (s.b) ln = _mm256_add_ps(ln, load(s.b + j, n));
    const __m256 dg = drop(load(dyg + j, n), mg, j, n);
    __m256 dug = _mm256_mul_ps(dg, ln);
    if (s.concat) dug = _mm256_add_ps(dug, drop(load(dy + j, n), m, j, n));
    store(du + j, dug, n);
    const __m256 dln = _mm256_mul_ps(dg, load(u + j, n));
    const __m256 dxhat = _mm256_mul_ps(dln, w);
    store(tmp + j, dxhat, n);
    c1 = _mm256_add_ps(c1, dxhat);
    c2 = _mm256_fmadd_ps(dxhat, xhat, c2);
    if (dw) store(dw + j, _mm256_fmadd_ps(dln, xhat, load(dw + j, n)), n);
    if (db) store(db + j, _mm256_add_ps(dln, load(db + j, n)), n);
  }
  const __m256 c1v = _mm256_set1_ps(hsum(c1) / static_cast<float>(D));
  const __m256 c2v = _mm256_set1_ps(hsum(c2) / static_cast<float>(D));
  for (int64_t j = 0; j < D; j += 8) {
    const int64_t n = D - j;
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load(a + j, n), mv), rv);
    __m256 v = _mm256_mul_ps(_mm256_fnmadd_ps(xhat, c2v, _mm256_sub_ps(load(tmp + j, n), c1v)), rv);
    if (s.concat) v = _mm256_add_ps(v, drop(load(dy + D + j, n), m ? m + D : nullptr, j, n));
    store(da + j, v, n);
  }
}
#endif

Args make_args(const at::Tensor& a, const at::Tensor& u, const at::Tensor& weight, const at::Tensor& bias, double eps,
               double p, int64_t seed, bool concat) {
  TORCH_CHECK(a.dim() == 2 && u.sizes() == a.sizes(), "norm_gating (cpu): a and u must both be [N, D]");
  for (const at::Tensor* t : {&a, &u})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "norm_gating (cpu): a and u must be contiguous float32 CPU tensors");
  for (const at::Tensor* t : {&weight, &bias})
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 &&
                                    t->size(0) == a.size(1)),
                "norm_gating (cpu): weight / bias must be contiguous float32 [D] (or empty)");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "norm_gating (cpu): dropout p must be in [0, 1], got ", p);
  TORCH_CHECK(seed >= 0, "norm_gating (cpu): seed must be in [0, 2^63), got ", seed);
  Args s;
  s.N = a.size(0);
  s.D = a.size(1);
  s.W = concat ? 3 * s.D : s.D;
  s.a = a.data_ptr<float>();
  s.u = u.data_ptr<float>();
  s.w = weight.numel() ? weight.data_ptr<float>() : nullptr;
  s.b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  s.eps = static_cast<float>(eps);
  s.concat = concat;
  s.dropout = p > 0.0;
  s.drop_all = p >= 1.0;
  s.seed = static_cast<uint64_t>(seed);
  s.p = static_cast<float>(p);  // fp32 compare, as the reference and Triton
  s.scale = s.drop_all ? 0.0f : static_cast<float>(1.0 / (1.0 - p));
  return s;
}

int64_t num_blocks(int64_t N) { return (N + kRowBlock - 1) / kRowBlock; }

}  // namespace

// a, u [N, D], weight / bias [D] or empty -> (y [N, D | 3D], mean [N], rstd [N])
std::vector<at::Tensor> forward(const at::Tensor& a, const at::Tensor& u, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, double p, int64_t seed, bool concat) {
  const Args s = make_args(a, u, weight, bias, eps, p, seed, concat);
  TORCH_CHECK(s.D > 0, "norm_gating (cpu): D must be positive");
  at::Tensor y = at::empty({s.N, s.W}, a.options());
  at::Tensor mean = at::empty({s.N}, a.options()), rstd = at::empty({s.N}, a.options());
  float* yp = y.data_ptr<float>();
  float* meanp = mean.data_ptr<float>();
  float* rstdp = rstd.data_ptr<float>();
  at::parallel_for(0, num_blocks(s.N), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> mult;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, r1 = std::min(s.N, r0 + kRowBlock);
      if (s.dropout) block_multipliers(s, r0, r1, mult);
      for (int64_t r = r0; r < r1; ++r) {
        const float* m = s.dropout ? mult.data() + (r - r0) * s.W : nullptr;
#ifdef HSTU_X86
        if (has_avx2()) {
          forward_row_avx2(s, r, m, yp + r * s.W, meanp + r, rstdp + r);
          continue;
        }
#endif
        forward_row_scalar(s, r, m, yp + r * s.W, meanp + r, rstdp + r);
      }
    }
  });
  return {y, mean, rstd};
}

// dy [N, D | 3D] -> (da, du, dweight [D] | empty, dbias [D] | empty); want_dw / want_db: compute those sums.
std::vector<at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& a, const at::Tensor& u,
                                 const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                                 const at::Tensor& rstd, double p, int64_t seed, bool concat, bool want_dw,
                                 bool want_db) {
  const Args s = make_args(a, u, weight, bias, 0.0, p, seed, concat);
  const at::Tensor dy = dy_in.to(at::kFloat).contiguous();
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == s.N && dy.size(1) == s.W, "norm_gating (cpu): dy must be [N, ", s.W,
              "]");
  TORCH_CHECK(mean.numel() == s.N && rstd.numel() == s.N, "norm_gating (cpu): mean / rstd must be [N]");
  at::Tensor da = at::empty_like(a), du = at::empty_like(u);
  const int64_t nb = num_blocks(s.N);
  want_dw = want_dw && s.w != nullptr;
  want_db = want_db && s.b != nullptr;
  // per-block partial sums [nb, D] (row block = parallel unit), added in block order below
  at::Tensor dw_part = at::zeros({want_dw ? nb : 0, s.D}, a.options());
  at::Tensor db_part = at::zeros({want_db ? nb : 0, s.D}, a.options());
  const float* dyp = dy.data_ptr<float>();
  const float* meanp = mean.data_ptr<float>();
  const float* rstdp = rstd.data_ptr<float>();
  float* dap = da.data_ptr<float>();
  float* dup = du.data_ptr<float>();
  float* dwp = want_dw ? dw_part.data_ptr<float>() : nullptr;
  float* dbp = want_db ? db_part.data_ptr<float>() : nullptr;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> mult, tmp(static_cast<size_t>(s.D));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, r1 = std::min(s.N, r0 + kRowBlock);
      if (s.dropout) block_multipliers(s, r0, r1, mult);
      float* dw = dwp ? dwp + blk * s.D : nullptr;
      float* db = dbp ? dbp + blk * s.D : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const float* m = s.dropout ? mult.data() + (r - r0) * s.W : nullptr;
#ifdef HSTU_X86
        if (has_avx2()) {
          backward_row_avx2(s, r, meanp[r], rstdp[r], dyp + r * s.W, m, dap + r * s.D, dup + r * s.D, dw, db,
                            tmp.data());
          continue;
        }
#endif
        backward_row_scalar(s, r, meanp[r], rstdp[r], dyp + r * s.W, m, dap + r * s.D, dup + r * s.D, dw, db,
                            tmp.data());
      }
    }
  });
  auto block_sum = [&](const float* part, bool want) {
    if (!want) return at::empty({0}, a.options());
    std::vector<double> acc(static_cast<size_t>(s.D), 0.0);
    for (int64_t blk = 0; blk < nb; ++blk)
      for (int64_t j = 0; j < s.D; ++j) acc[j] += part[blk * s.D + j];
    at::Tensor out = at::empty({s.D}, a.options());
    for (int64_t j = 0; j < s.D; ++j) out.data_ptr<float>()[j] = static_cast<float>(acc[j]);
    return out;
  };
  return {da, du, block_sum(dwp, want_dw), block_sum(dbp, want_db)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused LN x U gating x seeded dropout (CPU): (y, mean, rstd)");
  m.def("backward", &backward, "its backward: (da, du, dweight, dbias)");
}
