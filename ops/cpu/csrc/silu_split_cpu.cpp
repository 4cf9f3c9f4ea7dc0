// Backward of SiLU followed by a column split (the HSTU projection: silu(x) split into u, v, q, k): the gradients
// of the parts are read in place (any row stride, an absent part counts as zero) and dx = g·σ(x)(1 + x(1 − σ(x)))
// is written in one pass — instead of concatenating the parts' gradients ([T, W] copy) and a second pass for the
// SiLU derivative. Elementwise, so the result does not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "vec_math.h"

namespace {

using hstu_cpu::exp_scalar;
using hstu_cpu::has_avx2;
#ifdef HSTU_X86
using hstu_cpu::exp_avx2;

// dx[j] = g[j]·σ(x[j])(1 + x[j](1 − σ(x[j]))) for j < n (g null: zeros)
__attribute__((target("avx2,fma"))) void silu_grad_avx2(const float* x, const float* g, float* dx, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t j = 0;
  if (g == nullptr) {
    for (; j < n; ++j) dx[j] = 0.0f;
    return;
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 xv = _mm256_loadu_ps(x + j);
    const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), xv))));
    const __m256 d = _mm256_mul_ps(sg, _mm256_fmadd_ps(xv, _mm256_sub_ps(one, sg), one));
    _mm256_storeu_ps(dx + j, _mm256_mul_ps(_mm256_loadu_ps(g + j), d));
  }
  for (; j < n; ++j) {
    const float sg = 1.0f / (1.0f + exp_scalar(-x[j]));
    dx[j] = g[j] * (sg * (1.0f + x[j] * (1.0f - sg)));
  }
}
#endif

void silu_grad(const float* x, const float* g, float* dx, int64_t n) {
#ifdef HSTU_X86
  if (has_avx2()) return silu_grad_avx2(x, g, dx, n);
#endif
  for (int64_t j = 0; j < n; ++j) {
    if (g == nullptr) {
      dx[j] = 0.0f;
      continue;
    }
    const float sg = 1.0f / (1.0f + exp_scalar(-x[j]));
    dx[j] = g[j] * (sg * (1.0f + x[j] * (1.0f - sg)));
  }
}

}  // namespace

// x [T, W] float32 contiguous (the SiLU input), grads: one [T, w_p] float32 tensor per part with unit column stride
// (undefined or empty = no gradient), sum of w_p = W -> dx [T, W]
at::Tensor backward(const at::Tensor& x, const std::vector<at::Tensor>& grads, const std::vector<int64_t>& widths) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "silu_split backward: x must be contiguous float32 CPU [T, W], got ", x.sizes());
  TORCH_CHECK(grads.size() == widths.size(), "silu_split backward: ", grads.size(), " gradients for ", widths.size(),
              " parts");
  const int64_t T = x.size(0), W = x.size(1);
  std::vector<const float*> gp(widths.size(), nullptr);
  std::vector<int64_t> ld(widths.size(), 0), col(widths.size(), 0);
  int64_t c = 0;
  for (size_t p = 0; p < widths.size(); ++p) {
    col[p] = c;
    c += widths[p];
    const at::Tensor& g = grads[p];
    if (!g.defined() || g.numel() == 0) continue;
    TORCH_CHECK(g.dim() == 2 && g.size(0) == T && g.size(1) == widths[p] && g.scalar_type() == at::kFloat &&
                    g.device().is_cpu() && (g.size(1) <= 1 || g.stride(1) == 1) && (T <= 1 || g.stride(0) >= g.size(1)),
                "silu_split backward: gradient of part ", p, " must be float32 CPU [", T, ", ", widths[p],
                "] with unit column stride, got ", g.sizes(), " strides ", g.strides());
    gp[p] = g.data_ptr<float>();
    ld[p] = T > 1 ? g.stride(0) : g.size(1);
  }
  TORCH_CHECK(c == W, "silu_split backward: part widths sum to ", c, ", x has ", W, " columns");
  at::Tensor dx = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (size_t p = 0; p < widths.size(); ++p)
        silu_grad(xp + t * W + col[p], gp[p] ? gp[p] + t * ld[p] : nullptr, dp + t * W + col[p], widths[p]);
  });
  return dx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("backward", &backward, "SiLU + column split backward: dx from the parts' gradients, one pass (CPU)");
}
