// Fused elementwise part of jagged HSTU attention on CPU (one row block of a length group padded to L: rows
// row0 .. row0+R-1 against columns 0 .. C-1; a causal group splits into blocks so the upper triangle is skipped).
//
// Forward, per row (g, h, i) of scores s [G, H, L, L] (already alpha * q k^T), for columns j < row_end[i]:
//     z = s + (bias2d[i, j] + time_w[time_idx[g, i, j]])      (each bias optional; rab shared by heads)
//     a = z * sig(z) * w[g|0, i, j]                            (SiLU, times mask / norm)
// columns j >= row_end (w is zero there) get a = 0. s is overwritten with z (saved for backward).
// Backward: da -> ds = da * w * sig * (1 + z * (1 - sig)) in place (sig recomputed from z), plus the rab gradients
//     dbias2d[i, j] = sum_{g,h} ds,   dtime_w[b] = sum_{time_idx = b} ds
// accumulated per row pair without atomics (deterministic for any thread count).
// Work is split over row pairs {t, R-1-t} so causal rows (cost ~ i) balance across threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

namespace {

using hstu_cpu::exp_scalar;
using hstu_cpu::has_avx2;
#ifdef HSTU_X86
using hstu_cpu::exp_avx2;
#endif

#ifdef HSTU_X86
// One row of the forward for j < n: z = s + (b2d + tw[ti]) in place (b2d / tw+ti may be null), a = z·σ(z)·w.
__attribute__((target("avx2,fma"))) void fwd_row_avx2(float* z, const float* b2d, const float* tw, const int16_t* ti,
                                                       const float* w, float* a, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 zv = _mm256_loadu_ps(z + j);
    if (b2d || tw) {
      __m256 b = b2d ? _mm256_loadu_ps(b2d + j) : _mm256_setzero_ps();
      if (tw) {
        const __m256i idx = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ti + j)));
        b = b2d ? _mm256_add_ps(b, _mm256_i32gather_ps(tw, idx, 4)) : _mm256_i32gather_ps(tw, idx, 4);
      }
      zv = _mm256_add_ps(zv, b);
      _mm256_storeu_ps(z + j, zv);
    }
    const __m256 den = _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), zv)));
    _mm256_storeu_ps(a + j, _mm256_mul_ps(_mm256_div_ps(zv, den), _mm256_loadu_ps(w + j)));
  }
  if (j < n) {  // tail through padded buffers: the same vector arithmetic for every element
    alignas(32) float zb[8] = {0}, bb[8] = {0}, tb[8] = {0}, wb[8] = {0}, ab[8];
    alignas(32) int16_t ib[8] = {0};
    for (int64_t t = j; t < n; ++t) {
      zb[t - j] = z[t];
      wb[t - j] = w[t];
      if (b2d) bb[t - j] = b2d[t];
      if (tw) tb[t - j] = tw[ti[t]];
    }
    // tw gathered already: pass it as a second 2-D bias row (b2d + tw, the same sum order as above)
    if (b2d && tw)
      for (int t = 0; t < 8; ++t) bb[t] = bb[t] + tb[t];
    fwd_row_avx2(zb, (b2d || tw) ? (b2d ? bb : tb) : nullptr, nullptr, nullptr, wb, ab, 8);
    for (int64_t t = j; t < n; ++t) { z[t] = zb[t - j]; a[t] = ab[t - j]; }
  }
}

// da -> ds = da·w·σ(z)·(1 + z(1 − σ(z))) for j < n.
__attribute__((target("avx2,fma"))) void bwd_row_avx2(float* da, const float* z, const float* w, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 zv = _mm256_loadu_ps(z + j);
    const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), zv))));
    const __m256 d = _mm256_fmadd_ps(zv, _mm256_sub_ps(one, sg), one);
    const __m256 g = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(da + j), _mm256_loadu_ps(w + j)), sg);
    _mm256_storeu_ps(da + j, _mm256_mul_ps(g, d));
  }
  if (j < n) {
    alignas(32) float db[8] = {0}, zb[8] = {0}, wb[8] = {0};
    for (int64_t t = j; t < n; ++t) { db[t - j] = da[t]; zb[t - j] = z[t]; wb[t - j] = w[t]; }
    bwd_row_avx2(db, zb, wb, 8);
    for (int64_t t = j; t < n; ++t) da[t] = db[t - j];
  }
}


#endif

void fwd_row(float* z, const float* b2d, const float* tw, const int16_t* ti, const float* w, float* a, int64_t n) {
#ifdef HSTU_X86
  if (has_avx2()) return fwd_row_avx2(z, b2d, tw, ti, w, a, n);
#endif
  for (int64_t j = 0; j < n; ++j) {
    if (b2d || tw) z[j] += b2d ? (tw ? b2d[j] + tw[ti[j]] : b2d[j]) : tw[ti[j]];
    a[j] = z[j] / (1.0f + exp_scalar(-z[j])) * w[j];
  }
}

void bwd_row(float* da, const float* z, const float* w, int64_t n) {
#ifdef HSTU_X86
  if (has_avx2()) return bwd_row_avx2(da, z, w, n);
#endif
  for (int64_t j = 0; j < n; ++j) {
    const float sg = 1.0f / (1.0f + exp_scalar(-z[j]));
    da[j] = da[j] * w[j] * sg * (1.0f + z[j] * (1.0f - sg));
  }
}

struct Shapes {
  int64_t G, H, R, C, L, Gw;
};

// s [G, H, R, C]: rows row0 .. row0 + R - 1, columns 0 .. C - 1 of a group padded to L (w.size(1)).
Shapes check(const at::Tensor& s, const at::Tensor& w, const at::Tensor& row_end, int64_t row0) {
  TORCH_CHECK(s.dim() == 4 && s.scalar_type() == at::kFloat && s.is_contiguous() && s.device().is_cpu(),
              "hstu cpu attention: scores must be contiguous float32 CPU [G, H, R, C], got ", s.sizes());
  const int64_t G = s.size(0), H = s.size(1), R = s.size(2), C = s.size(3);
  TORCH_CHECK(w.dim() == 3 && (w.size(0) == 1 || w.size(0) == G) && w.size(1) == w.size(2) &&
                  w.scalar_type() == at::kFloat && w.is_contiguous(),
              "hstu cpu attention: weights must be contiguous float32 [1|G, L, L], got ", w.sizes());
  const int64_t L = w.size(1);
  TORCH_CHECK(row0 >= 0 && row0 + R <= L && C <= L, "hstu cpu attention: block rows [", row0, ", ", row0 + R,
              ") x columns [0, ", C, ") outside the group's ", L, " rows");
  TORCH_CHECK(row_end.dim() == 2 && row_end.size(0) == w.size(0) && row_end.size(1) == L &&
                  row_end.scalar_type() == at::kInt && row_end.is_contiguous(),
              "hstu cpu attention: row_end must be contiguous int32 [1|G, L], got ", row_end.sizes());
  return {G, H, R, C, L, w.size(0)};
}

void check_time(const at::Tensor& time_idx, const Shapes& d) {
  TORCH_CHECK(time_idx.dim() == 3 && time_idx.size(0) == d.G && time_idx.size(1) == d.L && time_idx.size(2) == d.L &&
                  time_idx.scalar_type() == at::kShort && time_idx.is_contiguous(),
              "hstu cpu attention: time_idx must be contiguous int16 [G, L, L], got ", time_idx.sizes());
}

// Calls f(ii) for block rows ii of the pair t: t and R-1-t.
template <typename F>
inline void for_pair(int64_t t, int64_t R, const F& f) {
  f(t);
  if (R - 1 - t != t) f(R - 1 - t);
}

}  // namespace

// s [G,H,R,C] (rows row0.., see check) -> z in place; returns a. bias2d [L,L] / time_w [NB] + time_idx [G,L,L]
// int16: optional (numel 0).
at::Tensor forward(at::Tensor s, const at::Tensor& bias2d, const at::Tensor& time_w, const at::Tensor& time_idx,
                   const at::Tensor& w, const at::Tensor& row_end, int64_t row0) {
  const Shapes d = check(s, w, row_end, row0);
  const bool has_b2d = bias2d.numel() > 0, has_time = time_w.numel() > 0;
  if (has_b2d)
    TORCH_CHECK(bias2d.dim() == 2 && bias2d.size(0) == d.L && bias2d.size(1) == d.L && bias2d.is_contiguous() &&
                    bias2d.scalar_type() == at::kFloat,
                "hstu cpu attention: bias2d must be contiguous float32 [L, L]");
  const at::Tensor tw = has_time ? time_w.to(at::kFloat).contiguous() : time_w;
  if (has_time) check_time(time_idx, d);  // index range: checked once per batch by the caller (group_kernel_inputs)
  at::Tensor a = at::empty_like(s);
  float *zp = s.data_ptr<float>(), *ap = a.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = has_b2d ? bias2d.data_ptr<float>() : nullptr;
  const float* twp = has_time ? tw.data_ptr<float>() : nullptr;
  const int16_t* tip = has_time ? time_idx.data_ptr<int16_t>() : nullptr;
  const int32_t* rep = row_end.data_ptr<int32_t>();
  const int64_t G = d.G, H = d.H, R = d.R, C = d.C, L = d.L, Gw = d.Gw;
  at::parallel_for(0, (R + 1) / 2, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for_pair(t, R, [&](int64_t ii) {
        const int64_t i = row0 + ii;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t gw = Gw == 1 ? 0 : g;
          const int64_t n = std::min<int64_t>(std::max<int32_t>(rep[gw * L + i], 0), C);
          for (int64_t h = 0; h < H; ++h) {
            const int64_t row = ((g * H + h) * R + ii) * C;
            fwd_row(zp + row, bp ? bp + i * L : nullptr, twp, tip ? tip + (g * L + i) * L : nullptr,
                    wp + (gw * L + i) * L, ap + row, n);
            std::memset(ap + row + n, 0, sizeof(float) * (C - n));
          }
        }
      });
    }
  });
  return a;
}

// da [G,H,R,C] -> ds in place; returns (dbias2d [R,C] or empty, dtime_w [NB] or empty).
std::vector<at::Tensor> backward(at::Tensor da, const at::Tensor& z, const at::Tensor& w, const at::Tensor& row_end,
                                 const at::Tensor& time_idx, int64_t num_buckets, bool want_bias2d, int64_t row0) {
  const Shapes d = check(da, w, row_end, row0);
  TORCH_CHECK(z.sizes() == da.sizes() && z.is_contiguous(), "hstu cpu attention: z must match the gradient's shape");
  const bool has_time = num_buckets > 0;
  if (has_time) check_time(time_idx, d);
  const int64_t G = d.G, H = d.H, R = d.R, C = d.C, L = d.L, Gw = d.Gw, NP = (R + 1) / 2;
  at::Tensor db2d = want_bias2d ? at::zeros({R, C}, da.options()) : at::empty({0}, da.options());
  at::Tensor partial = at::zeros({has_time ? NP : 0, std::max<int64_t>(num_buckets, 0)}, da.options());
  float* dp = da.data_ptr<float>();
  const float *zp = z.data_ptr<float>(), *wp = w.data_ptr<float>();
  const int16_t* tip = has_time ? time_idx.data_ptr<int16_t>() : nullptr;
  const int32_t* rep = row_end.data_ptr<int32_t>();
  float* bp = want_bias2d ? db2d.data_ptr<float>() : nullptr;
  float* pp = has_time ? partial.data_ptr<float>() : nullptr;
  at::parallel_for(0, NP, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* hist = has_time ? pp + t * num_buckets : nullptr;
      for_pair(t, R, [&](int64_t ii) {
        const int64_t i = row0 + ii;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t gw = Gw == 1 ? 0 : g;
          const int64_t n = std::min<int64_t>(std::max<int32_t>(rep[gw * L + i], 0), C);
          const int16_t* ti = has_time ? tip + (g * L + i) * L : nullptr;
          for (int64_t h = 0; h < H; ++h) {
            const int64_t row = ((g * H + h) * R + ii) * C;
            float* ds = dp + row;
            bwd_row(ds, zp + row, wp + (gw * L + i) * L, n);
            std::memset(ds + n, 0, sizeof(float) * (C - n));
            if (bp)
              for (int64_t j = 0; j < n; ++j) bp[ii * C + j] += ds[j];
            if (hist && n > 0) {  // runs of equal buckets are common (times sorted): one add per run
              int64_t cur = ti[0];
              float acc = 0.0f;
              for (int64_t j = 0; j < n; ++j) {
                if (ti[j] != cur) { hist[cur] += acc; acc = 0.0f; cur = ti[j]; }
                acc += ds[j];
              }
              hist[cur] += acc;
            }
          }
        }
      });
    }
  });
  at::Tensor dtw = has_time ? partial.sum(0) : at::empty({0}, da.options());
  return {db2d, dtw};
}

// t_next [G, L], t [G, L] int64 -> [G, L, L] int16: clamp(floor(log(max(|t_next[i] - t[j]|, 1)) / base), 0, nb),
// float32 arithmetic as the PyTorch reference (time_bucket_ids).
at::Tensor time_buckets(const at::Tensor& t_next, const at::Tensor& t, double base, int64_t num_buckets) {
  TORCH_CHECK(t_next.dim() == 2 && t.sizes() == t_next.sizes() && t.scalar_type() == at::kLong &&
                  t_next.scalar_type() == at::kLong,
              "hstu cpu attention: time_buckets needs int64 [G, L] t_next and t");
  TORCH_CHECK(num_buckets >= 0 && num_buckets <= 32767, "hstu cpu attention: num_buckets ", num_buckets,
              " outside [0, 32767]");
  const at::Tensor tn = t_next.contiguous(), tt = t.contiguous();
  const int64_t G = tn.size(0), L = tn.size(1);
  at::Tensor out = at::empty({G, L, L}, tn.options().dtype(at::kShort));
  const int64_t *np = tn.data_ptr<int64_t>(), *tp = tt.data_ptr<int64_t>();
  int16_t* op = out.data_ptr<int16_t>();
  const float b = static_cast<float>(base);
  const float top = static_cast<float>(num_buckets);
  at::parallel_for(0, G * L, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = r / L, tn_i = np[r];
      const int64_t* trow = tp + g * L;
      int16_t* orow = op + r * L;
      for (int64_t j = 0; j < L; ++j) {
        const int64_t d = tn_i - trow[j];
        const int64_t mag = std::max<int64_t>(d < 0 ? -d : d, 1);
        const float q = std::floor(std::log(static_cast<float>(mag)) / b);
        orow[j] = static_cast<int16_t>(std::min(std::max(q, 0.0f), top));
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("time_buckets", &time_buckets, "pairwise log time-bucket indices (int16) of one length group");
  m.def("forward", &forward, "fused bias + SiLU + mask of one HSTU attention group (CPU)");
  m.def("backward", &backward, "its backward: ds in place, rab gradients");
}
