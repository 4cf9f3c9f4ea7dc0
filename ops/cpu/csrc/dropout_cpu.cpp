// Seeded counter-based dropout on CPU, bit-identical masks to ops/pytorch/norm_gating.py (philox_uniform) and
// the Triton kernel: element e (row-major int64 index) is kept iff uniform(Philox-4x32-10(seed, e)) >= p; kept
// values are scaled by 1 / (1 - p). The mask is returned (uint8) for backward, so it is generated once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "vec_math.h"

namespace {

using hstu_cpu::has_avx2;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u, kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's uint_to_uniform_float scale for 32-bit ints

inline float philox_uniform(uint64_t seed, uint64_t e) {
  uint32_t c0 = static_cast<uint32_t>(e), c1 = static_cast<uint32_t>(e >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(c2) * kRoundB, pa = static_cast<uint64_t>(c0) * kRoundA;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0, n1 = static_cast<uint32_t>(pb);
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1, n3 = static_cast<uint32_t>(pa);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? -x - 1 : x;
  return static_cast<float>(x) * kUniformScale;
}

#ifdef HSTU_X86
__attribute__((target("avx2,fma"))) inline void mulhilo(__m256i a, __m256i b, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, b), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// keep flags of elements e0 .. e0+7 (same 2^32 block: c1 constant).
__attribute__((target("avx2,fma"))) inline __m256 philox_keep8(uint64_t seed, uint64_t e0, float p) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0 >> 32)));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(kRoundA)), rb = _mm256_set1_epi32(static_cast<int>(kRoundB));
  for (int r = 0; r < 10; ++r) {
    __m256i hb, lb, ha, la;
    mulhilo(c2, rb, hb, lb);
    mulhilo(c0, ra, ha, la);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lb;
    c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = la;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  const __m256i x = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));  // x < 0 ? -x - 1 : x
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
  return _mm256_cmp_ps(u, _mm256_set1_ps(p), _CMP_GE_OQ);
}

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
