// Seeded counter-based dropout on CPU, bit-identical masks to ops/pytorch/norm_gating.py (philox_uniform) and
// the Triton kernel: element e (row-major int64 index) is kept iff uniform(Philox-4x32-10(seed, e)) >= p; kept
// values are scaled by 1 / (1 - p). The mask is returned (uint8) for backward, so it is generated once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "philox.h"
#include "vec_math.h"

namespace {

using hstu_cpu::has_avx2;
using hstu_cpu::philox_keep8;
using hstu_cpu::philox_uniform;

#ifdef HSTU_X86
__attribute__((target("avx2,fma"))) void dropout_range_avx2(const float* x, float* y, uint8_t* m, int64_t b, int64_t e,
                                                             uint64_t seed, float p, float scale) {
  int64_t i = b;
  const __m256 sc = _mm256_set1_ps(scale);
  for (; i + 8 <= e && (static_cast<uint64_t>(i) >> 32) == (static_cast<uint64_t>(i + 7) >> 32); i += 8) {
    const __m256 keep = philox_keep8(seed, static_cast<uint64_t>(i), p);
    _mm256_storeu_ps(y + i, _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), sc), keep));
    const int bits = _mm256_movemask_ps(keep);
    for (int t = 0; t < 8; ++t) m[i + t] = (bits >> t) & 1;
  }
  for (; i < e; ++i) {
    m[i] = philox_uniform(seed, static_cast<uint64_t>(i)) >= p;
    y[i] = m[i] ? x[i] * scale : 0.0f;
  }
}
#endif

}  // namespace

// x (any shape, float32 contiguous) -> (y, keep mask uint8)
std::vector<at::Tensor> forward(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "seeded dropout (cpu): x must be contiguous float32 on CPU");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "seeded dropout (cpu): p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "seeded dropout (cpu): seed must be in [0, 2^63), got ", seed);
  at::Tensor y = at::empty_like(x), mask = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  uint8_t* mp = mask.data_ptr<uint8_t>();
  const float pf = static_cast<float>(p), scale = static_cast<float>(1.0 / (1.0 - p));
  const uint64_t s = static_cast<uint64_t>(seed);
  at::parallel_for(0, x.numel(), 4096, [&](int64_t b, int64_t e) {
#ifdef HSTU_X86
    if (has_avx2()) return dropout_range_avx2(xp, yp, mp, b, e, s, pf, scale);
#endif
    for (int64_t i = b; i < e; ++i) {
      mp[i] = philox_uniform(s, static_cast<uint64_t>(i)) >= pf;
      yp[i] = mp[i] ? xp[i] * scale : 0.0f;
    }
  });
  return {y, mask};
}

// grad * mask * scale
at::Tensor backward(const at::Tensor& grad, const at::Tensor& mask, double p) {
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(g.numel() == mask.numel(), "seeded dropout (cpu): gradient and mask sizes differ");
  at::Tensor out = at::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  at::parallel_for(0, g.numel(), 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) op[i] = mp[i] ? gp[i] * scale : 0.0f;
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "seeded Philox dropout (CPU): (y, keep mask)");
  m.def("backward", &backward, "its backward: grad * mask / (1 - p)");
}
