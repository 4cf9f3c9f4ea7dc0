// Shared vector math of the C++ CPU kernels: exp for float (scalar and AVX2), run-time AVX2/FMA detection.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HSTU_X86 1
#endif

namespace hstu_cpu {

// exp(x) for float, ~1 ulp on [-87, 88] (Cody-Waite range reduction + degree-6 polynomial); NaN propagates.
inline float exp_scalar(float x) {
  x = std::fmin(std::fmax(x, -87.3f), 88.3f) + (x - x);  // x - x keeps NaN
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  float scale;
  const int32_t bits = e << 23;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

#ifdef HSTU_X86
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // second operand returned on NaN: NaN survives both
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

inline bool detect_avx2() {
  const char* force_scalar = std::getenv("HSTU_CPU_SCALAR");  // tests exercise the portable path with =1
  if (force_scalar && force_scalar[0] == '1') return false;
#ifdef HSTU_X86
  __builtin_cpu_init();  // static initialisers may run before libgcc's own CPU detection
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// AVX2 + FMA usable (HSTU_CPU_SCALAR=1 forces the portable code, for tests).
inline bool has_avx2() {
  static const bool yes = detect_avx2();
  return yes;
}

}  // namespace hstu_cpu
