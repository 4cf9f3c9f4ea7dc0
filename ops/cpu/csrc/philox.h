// Counter-based Philox-4x32-10 uniforms, bit-identical to Triton's tl.rand(seed, int64 offsets) and to the PyTorch
// port ops/pytorch/norm_gating.py::philox_uniform. Shared by the seeded dropout kernels (dropout_cpu.cpp,
// norm_gating_cpu.cpp): element e (row-major int64 index) is kept iff philox_uniform(seed, e) >= p.
#pragma once

#include <cstdint>

#include "vec_math.h"

namespace hstu_cpu {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's uint_to_uniform_float scale for 32-bit ints

inline float philox_uniform(uint64_t seed, uint64_t e) {
  uint32_t c0 = static_cast<uint32_t>(e), c1 = static_cast<uint32_t>(e >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(c2) * kPhiloxRoundB, pa = static_cast<uint64_t>(c0) * kPhiloxRoundA;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0, n1 = static_cast<uint32_t>(pb);
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1, n3 = static_cast<uint32_t>(pa);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? -x - 1 : x;
  return static_cast<float>(x) * kUniformScale;
}

#ifdef HSTU_X86
__attribute__((target("avx2,fma"))) inline void philox_mulhilo(__m256i a, __m256i b, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, b), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// keep flags (all-ones lanes) of elements e0 .. e0+7; they must lie in one 2^32 block (c1 constant).
__attribute__((target("avx2,fma"))) inline __m256 philox_keep8(uint64_t seed, uint64_t e0, float p) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0 >> 32)));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i rb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int r = 0; r < 10; ++r) {
    __m256i hb, lb, ha, la;
    philox_mulhilo(c2, rb, hb, lb);
    philox_mulhilo(c0, ra, ha, la);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lb;
    c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = la;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m256i x = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));  // x < 0 ? -x - 1 : x
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
  return _mm256_cmp_ps(u, _mm256_set1_ps(p), _CMP_GE_OQ);
}

// out[i] = keep(e0 + i) ? scale : 0 for i < n (AVX2 blocks of 8 inside one 2^32 block, scalar elsewhere).
__attribute__((target("avx2,fma"))) inline void dropout_multipliers_avx2(uint64_t seed, uint64_t e0, int64_t n, float p,
                                                                         float scale, float* out) {
  int64_t i = 0;
  const __m256 sc = _mm256_set1_ps(scale);
  for (; i + 8 <= n && ((e0 + i) >> 32) == ((e0 + i + 7) >> 32); i += 8)
    _mm256_storeu_ps(out + i, _mm256_and_ps(philox_keep8(seed, e0 + i, p), sc));
  for (; i < n; ++i) out[i] = philox_uniform(seed, e0 + i) >= p ? scale : 0.0f;
}
#endif

// out[i] = keep(e0 + i) ? scale : 0 for i < n: the dropout of element e0 + i is a multiplication by out[i].
inline void dropout_multipliers(uint64_t seed, uint64_t e0, int64_t n, float p, float scale, float* out) {
#ifdef HSTU_X86
  if (has_avx2()) return dropout_multipliers_avx2(seed, e0, n, p, scale, out);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = philox_uniform(seed, e0 + i) >= p ? scale : 0.0f;
}

}  // namespace hstu_cpu
