// Jagged HSTU attention on CPU, fused per length group (sequences padded to L, every tensor per head
// [G, H, L, d]): for each sequence g, head h and block of rb query rows r0 .. r1-1 (rows past the sequence's
// length are padding and skipped; the block multiplies only the key columns 0 .. c-1 its rows can see, c = their
// largest row_end, so the causal upper triangle is mostly skipped):
//
// Forward:  S = (alpha q) kᵀ [R, c] (gemm into a per-thread tile that stays in cache)
//           z = S + (bias2d[i, j] + time_w[time_idx[g, i, j]])      (each bias optional; rab shared by heads)
//           a = z·σ(z)·w[g|0, i, j]     (SiLU times mask / norm; a = 0 for j >= row_end[i])
//           out rows = a v                                         (gemm)
// Backward: z and a recomputed from q, k the same way (nothing but q, k, v is saved), then
//           dv += aᵀ g,  da = g vᵀ,  ds = da·w·σ(z)(1 + z(1 − σ(z))),  dq = ds k,  dk += dsᵀ (alpha q)
//           plus the rab gradients dbias2d[i, j] = Σ_{g,h} ds, dtime_w[b] = Σ_{time_idx = b} ds, per fixed lane.
// Neither pass depends on the thread count for its result (forward: independent units; backward: fixed lanes).
// GEMMs: the BLAS `sgemm_` that libtorch exports (MKL on x86 wheels), a plain loop where there is none.
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
// One row for j < n: z = s + (b2d + tw[ti]) in place (b2d / tw+ti may be null), a = z·σ(z)·w, and when f is not
// null the backward factor f = w·σ(z)·(1 + z(1 − σ(z))) (ds = da·f).
__attribute__((target("avx2,fma"))) void fwd_row_avx2(float* z, const float* b2d, const float* tw, const int16_t* ti,
                                                       const float* w, float* a, float* f, int64_t n) {
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
    const __m256 wv = _mm256_loadu_ps(w + j);
    _mm256_storeu_ps(a + j, _mm256_mul_ps(_mm256_div_ps(zv, den), wv));
    if (f) {
      const __m256 sg = _mm256_div_ps(one, den);
      _mm256_storeu_ps(f + j, _mm256_mul_ps(_mm256_mul_ps(wv, sg), _mm256_fmadd_ps(zv, _mm256_sub_ps(one, sg), one)));
    }
  }
  if (j < n) {  // tail through padded buffers: the same vector arithmetic for every element
    alignas(32) float zb[8] = {0}, bb[8] = {0}, tb[8] = {0}, wb[8] = {0}, ab[8], fb[8];
    for (int64_t t = j; t < n; ++t) {
      zb[t - j] = z[t];
      wb[t - j] = w[t];
      if (b2d) bb[t - j] = b2d[t];
      if (tw) tb[t - j] = tw[ti[t]];
    }
    // tw gathered already: pass it as a second 2-D bias row (b2d + tw, the same sum order as above)
    if (b2d && tw)
      for (int t = 0; t < 8; ++t) bb[t] = bb[t] + tb[t];
    fwd_row_avx2(zb, (b2d || tw) ? (b2d ? bb : tb) : nullptr, nullptr, nullptr, wb, ab, f ? fb : nullptr, 8);
    for (int64_t t = j; t < n; ++t) {
      z[t] = zb[t - j];
      a[t] = ab[t - j];
      if (f) f[t] = fb[t - j];
    }
  }
}
#endif

void fwd_row(float* z, const float* b2d, const float* tw, const int16_t* ti, const float* w, float* a, float* f,
             int64_t n) {
#ifdef HSTU_X86
  if (has_avx2()) return fwd_row_avx2(z, b2d, tw, ti, w, a, f, n);
#endif
  for (int64_t j = 0; j < n; ++j) {
    if (b2d || tw) z[j] += b2d ? (tw ? b2d[j] + tw[ti[j]] : b2d[j]) : tw[ti[j]];
    const float den = 1.0f + exp_scalar(-z[j]);
    a[j] = z[j] / den * w[j];
    if (f) {
      const float sg = 1.0f / den;
      f[j] = w[j] * sg * (1.0f + z[j] * (1.0f - sg));
    }
  }
}

// ---- small row-major GEMM: MKL / BLAS `sgemm_` of the libtorch this module is linked with, a plain loop otherwise
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

bool use_blas() {  // HSTU_CPU_SCALAR=1 (tests) takes the portable loop too
  static const bool yes = [] {
    const char* force_scalar = std::getenv("HSTU_CPU_SCALAR");
    return sgemm_ != nullptr && !(force_scalar && force_scalar[0] == '1');
  }();
  return yes;
}

// C [m, n] = alpha·op(A) op(B) + beta·C, row-major with row strides lda, ldb, ldc; op(A) [m, k] (A stored [k, m]
// when ta), op(B) [k, n] (B stored [n, k] when tb). beta = 0: C is not read.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (use_blas() && k > 0) {  // column-major view: Cᵀ [n, m] = op(B)ᵀ op(A)ᵀ
    const char cb = tb ? 'T' : 'N', ca = ta ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LA = static_cast<int>(ldb), LB = static_cast<int>(lda), LC = static_cast<int>(ldc);
    sgemm_(&cb, &ca, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
    return;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (int64_t p = 0; p < k; ++p) acc += (ta ? A[p * lda + i] : A[i * lda + p]) * (tb ? B[j * ldb + p] : B[p * ldb + j]);
      C[i * ldc + j] = beta == 0.0f ? alpha * acc : alpha * acc + beta * C[i * ldc + j];
    }
}

// 64-byte aligned float scratch (MKL may pick another code path, and round differently, for other alignments)
struct Scratch {
  float* p = nullptr;
  explicit Scratch(int64_t n) { p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64)); }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// One length group of a jagged batch: q, k [T, H, dqk], v [T, H, dv] read in place with row strides lq, lk, lv
// (views of a wider projection output need no copy), out [T, H, dv] contiguous; sequence g's token i is row
// starts[g] + i, so a (sequence, head) is a matrix with that row stride. See the file comment.
struct Group {
  int64_t G, H, L, dqk, dv, Gw, rb, lq, lk, lv;
  float alpha;
  const float *q, *k, *v;
  const float* b2d;       // [L, L] position bias or null
  const float* tw;        // [NB] time-bias table or null
  const int16_t* ti;      // [G, L, L] its bucket indices (with tw)
  const float* w;         // [Gw, L, L] mask / norm
  const int32_t* rend;    // [Gw, L] 1 + last column with w != 0
  const int32_t* lens;    // [G] tokens of each sequence
  const int64_t* starts;  // [G] its first row in the jagged batch

  int64_t ends(int64_t g, int64_t i) const { return rend[(Gw == 1 ? 0 : g) * L + i]; }
  const float* wrow(int64_t g, int64_t i) const { return w + ((Gw == 1 ? 0 : g) * L + i) * L; }
  const int16_t* trow(int64_t g, int64_t i) const { return ti ? ti + (g * L + i) * L : nullptr; }
  int64_t len(int64_t g) const { return lens[g]; }
  int64_t q_at(int64_t g, int64_t h, int64_t i) const { return (starts[g] + i) * lq + h * dqk; }
  int64_t k_at(int64_t g, int64_t h, int64_t i) const { return (starts[g] + i) * lk + h * dqk; }
  int64_t v_at(int64_t g, int64_t h, int64_t i) const { return (starts[g] + i) * lv + h * dv; }
  int64_t out_at(int64_t g, int64_t h, int64_t i, int64_t d) const { return ((starts[g] + i) * H + h) * d; }
  // columns block rows r0..r1-1 of sequence g can see (their largest row end; never past the sequence)
  int64_t cols(int64_t g, int64_t r0, int64_t r1) const {
    int64_t c = 0;
    for (int64_t i = r0; i < r1; ++i) c = std::max<int64_t>(c, ends(g, i));
    return std::min<int64_t>(c, len(g));
  }
  int64_t row_cols(int64_t g, int64_t i, int64_t c) const { return std::min<int64_t>(std::max<int64_t>(ends(g, i), 0), c); }
  // S [R, c] = alpha q kᵀ of rows r0.. -> z = s + rab in place, A = z·σ(z)·w (A may be S), F (or null) the
  // backward factor; A and F zero past each row end
  void scores(int64_t g, int64_t h, int64_t r0, int64_t R, int64_t c, float* S, float* A, float* F) const {
    gemm(false, true, R, c, dqk, alpha, q + q_at(g, h, r0), lq, k + k_at(g, h, 0), lk, 0.0f, S, c);
    for (int64_t ii = 0; ii < R; ++ii) {
      const int64_t i = r0 + ii, n = row_cols(g, i, c);
      fwd_row(S + ii * c, b2d ? b2d + i * L : nullptr, tw, trow(g, i), wrow(g, i), A + ii * c, F ? F + ii * c : nullptr, n);
      std::memset(A + ii * c + n, 0, sizeof(float) * (c - n));
      if (F) std::memset(F + ii * c + n, 0, sizeof(float) * (c - n));
    }
  }
};

bool f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(); }

// [T, H, d] float32 CPU whose (H, d) part of a row is contiguous (any row stride)
bool rows_f32(const at::Tensor& t) {
  return t.dim() == 3 && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.stride(2) == 1 &&
         (t.size(1) == 1 || t.stride(1) == t.size(2)) && (t.size(0) <= 1 || t.stride(0) >= t.size(1) * t.size(2));
}

Group make_group(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double alpha, const at::Tensor& bias2d,
                 const at::Tensor& time_w, const at::Tensor& time_idx, const at::Tensor& w, const at::Tensor& row_end,
                 const at::Tensor& lens, const at::Tensor& starts, int64_t row_block) {
  TORCH_CHECK(rows_f32(q) && rows_f32(k) && rows_f32(v) && k.sizes() == q.sizes() && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "hstu cpu attention: q, k [T, H, dqk] and v [T, H, dv] must be float32 CPU with contiguous rows, got ",
              q.sizes(), " ", k.sizes(), " ", v.sizes());
  TORCH_CHECK(w.dim() == 3 && w.size(1) == w.size(2) && f32(w),
              "hstu cpu attention: weights must be contiguous float32 [1|G, L, L], got ", w.sizes());
  const int64_t L = w.size(1), T = q.size(0);
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == at::kInt && lens.is_contiguous() &&
                  starts.sizes() == lens.sizes() && starts.scalar_type() == at::kLong && starts.is_contiguous(),
              "hstu cpu attention: lens (int32) and starts (int64) must be contiguous [G], got ", lens.sizes(), " ",
              starts.sizes());
  const int64_t G = lens.size(0);
  TORCH_CHECK(w.size(0) == 1 || w.size(0) == G, "hstu cpu attention: weights [", w.size(0), ", L, L] for ", G,
              " sequences");
  TORCH_CHECK(row_end.dim() == 2 && row_end.size(0) == w.size(0) && row_end.size(1) == L &&
                  row_end.scalar_type() == at::kInt && row_end.is_contiguous(),
              "hstu cpu attention: row_end must be contiguous int32 [1|G, L], got ", row_end.sizes());
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(lp[g] >= 0 && lp[g] <= L && sp[g] >= 0 && sp[g] + lp[g] <= T, "hstu cpu attention: sequence ", g,
                " (rows ", sp[g], " + ", lp[g], ") outside the batch's ", T, " rows or its group's L = ", L);
  TORCH_CHECK(row_block > 0, "hstu cpu attention: row_block must be positive, got ", row_block);
  const bool has_b2d = bias2d.numel() > 0, has_time = time_w.numel() > 0;
  if (has_b2d)
    TORCH_CHECK(bias2d.dim() == 2 && bias2d.size(0) == L && bias2d.size(1) == L && f32(bias2d),
                "hstu cpu attention: bias2d must be contiguous float32 [L, L]");
  if (has_time)  // index range: checked once per batch by the caller (group_kernel_inputs)
    TORCH_CHECK(f32(time_w) && time_idx.dim() == 3 && time_idx.size(0) == G && time_idx.size(1) == L &&
                    time_idx.size(2) == L && time_idx.scalar_type() == at::kShort && time_idx.is_contiguous(),
                "hstu cpu attention: time_idx must be contiguous int16 [G, L, L], got ", time_idx.sizes());
  const int64_t H = q.size(1), dqk = q.size(2), dv = v.size(2);
  auto ld = [H](const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : H * t.size(2); };
  return {G, H, L, dqk, dv, w.size(0), row_block, ld(q), ld(k), ld(v), static_cast<float>(alpha),
          q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
          has_b2d ? bias2d.data_ptr<float>() : nullptr, has_time ? time_w.data_ptr<float>() : nullptr,
          has_time ? time_idx.data_ptr<int16_t>() : nullptr, w.data_ptr<float>(), row_end.data_ptr<int32_t>(), lp, sp};
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {  // contiguous, like's shape
  TORCH_CHECK(f32(t) && t.sizes() == like.sizes(), "hstu cpu attention: ", name, " must be contiguous float32 ",
              like.sizes(), ", got ", t.sizes());
}

constexpr int64_t kLanes = 8;  // backward: (g, h) units split into at most this many fixed lanes (not per thread)

}  // namespace

// Writes the group's rows of out [T, H, dv]: per (g, h) and row block, (SiLU(alpha q kᵀ + rab) · w) v.
// Work units (g, h, row block) are independent: no reduction, the result does not depend on the thread count.
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double alpha, const at::Tensor& bias2d,
             const at::Tensor& time_w, const at::Tensor& time_idx, const at::Tensor& w, const at::Tensor& row_end,
             const at::Tensor& lens, const at::Tensor& starts, int64_t row_block, at::Tensor out) {
  const Group gr = make_group(q, k, v, alpha, bias2d, time_w, time_idx, w, row_end, lens, starts, row_block);
  check_like(out, v, "out");
  std::vector<std::pair<int64_t, int64_t>> units;  // (g·H + h, r0)
  for (int64_t g = 0; g < gr.G; ++g)
    for (int64_t h = 0; h < gr.H; ++h)
      for (int64_t r0 = 0; r0 < gr.len(g); r0 += gr.rb) units.emplace_back(g * gr.H + h, r0);
  float* op = out.data_ptr<float>();
  const int64_t dv = gr.dv, ld = gr.H * dv;
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    Scratch S(gr.rb * gr.L);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = units[u].first / gr.H, h = units[u].first % gr.H, r0 = units[u].second;
      const int64_t r1 = std::min(r0 + gr.rb, gr.len(g)), R = r1 - r0, c = gr.cols(g, r0, r1);
      float* o = op + gr.out_at(g, h, r0, dv);
      if (c == 0) {
        for (int64_t ii = 0; ii < R; ++ii) std::memset(o + ii * ld, 0, sizeof(float) * dv);
        continue;
      }
      gr.scores(g, h, r0, R, c, S.p, S.p, nullptr);
      gemm(false, false, R, dv, c, 1.0f, S.p, c, gr.v + gr.v_at(g, h, 0), gr.lv, 0.0f, o, ld);
    }
  });
}

// Backward of one group: writes its rows of dq, dk [T, H, dqk] and dv [T, H, dv]; returns (dbias2d [L, L] or empty,
// dtime_w [NB] or empty). Scores are recomputed per row block (nothing saved but q, k, v). Units (g, h) go in at
// most kLanes fixed lanes, each with its own rab-gradient buffers, summed lane by lane at the end: the result does
// not depend on the thread count.
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 double alpha, const at::Tensor& bias2d, const at::Tensor& time_w,
                                 const at::Tensor& time_idx, const at::Tensor& w, const at::Tensor& row_end,
                                 const at::Tensor& lens, const at::Tensor& starts, int64_t row_block,
                                 int64_t num_buckets, bool want_bias2d, at::Tensor dq, at::Tensor dk, at::Tensor dv) {
  const Group gr = make_group(q, k, v, alpha, bias2d, time_w, time_idx, w, row_end, lens, starts, row_block);
  check_like(grad, v, "grad");
  check_like(dq, q, "dq");
  check_like(dk, k, "dk");
  check_like(dv, v, "dv");
  const bool want_time = num_buckets > 0 && gr.ti != nullptr;
  const int64_t L = gr.L, H = gr.H, dqk = gr.dqk, dvd = gr.dv, lq = H * dqk, lv = H * dvd, units = gr.G * H;
  // lq, lv: row strides of grad and the (contiguous) gradients; gr.lq, gr.lk, gr.lv: those of q, k, v
  const int64_t lanes = std::max<int64_t>(1, std::min(kLanes, units));
  const float a = gr.alpha;
  at::Tensor pos = at::zeros({want_bias2d ? lanes : 0, L, L}, q.options());
  at::Tensor hist = at::zeros({want_time ? lanes : 0, std::max<int64_t>(num_buckets, 0)}, q.options());
  const float* gp = grad.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  float* posp = want_bias2d ? pos.data_ptr<float>() : nullptr;
  float* histp = want_time ? hist.data_ptr<float>() : nullptr;
  at::parallel_for(0, lanes, 1, [&](int64_t l0, int64_t l1) {
    Scratch S(gr.rb * L), A(gr.rb * L), F(gr.rb * L);
    for (int64_t lane = l0; lane < l1; ++lane) {
      float* lpos = posp ? posp + lane * L * L : nullptr;
      float* lhist = histp ? histp + lane * num_buckets : nullptr;
      for (int64_t gh = lane * units / lanes; gh < (lane + 1) * units / lanes; ++gh) {
        const int64_t g = gh / H, h = gh % H, n = gr.len(g);
        const float *qg = gr.q + gr.q_at(g, h, 0), *kg = gr.k + gr.k_at(g, h, 0), *vg = gr.v + gr.v_at(g, h, 0);
        const float* gog = gp + gr.out_at(g, h, 0, dvd);
        float *dqg = dqp + gr.out_at(g, h, 0, dqk), *dkg = dkp + gr.out_at(g, h, 0, dqk);
        float* dvg = dvp + gr.out_at(g, h, 0, dvd);
        for (int64_t i = 0; i < n; ++i) {
          std::memset(dkg + i * lq, 0, sizeof(float) * dqk);
          std::memset(dvg + i * lv, 0, sizeof(float) * dvd);
        }
        for (int64_t r0 = 0; r0 < n; r0 += gr.rb) {
          const int64_t r1 = std::min(r0 + gr.rb, n), R = r1 - r0, c = gr.cols(g, r0, r1);
          if (c == 0) {
            for (int64_t ii = 0; ii < R; ++ii) std::memset(dqg + (r0 + ii) * lq, 0, sizeof(float) * dqk);
            continue;
          }
          gr.scores(g, h, r0, R, c, S.p, A.p, F.p);                                              // a, factor f
          gemm(true, false, c, dvd, R, 1.0f, A.p, c, gog + r0 * lv, lv, 1.0f, dvg, lv);          // dv += aᵀ g
          gemm(false, true, R, c, dvd, 1.0f, gog + r0 * lv, lv, vg, gr.lv, 0.0f, S.p, c);        // da = g vᵀ
          for (int64_t ii = 0; ii < R; ++ii) {                                                   // ds = da·f
            const int64_t i = r0 + ii, m = gr.row_cols(g, i, c);
            float* ds = S.p + ii * c;
            const float* f = F.p + ii * c;
            for (int64_t j = 0; j < m; ++j) ds[j] *= f[j];
            std::memset(ds + m, 0, sizeof(float) * (c - m));
            if (lpos)
              for (int64_t j = 0; j < m; ++j) lpos[i * L + j] += ds[j];
            if (lhist && m > 0) {  // runs of equal buckets are common (times sorted): one add per run
              const int16_t* ti = gr.trow(g, i);
              int64_t cur = ti[0];
              float acc = 0.0f;
              for (int64_t j = 0; j < m; ++j) {
                if (ti[j] != cur) { lhist[cur] += acc; acc = 0.0f; cur = ti[j]; }
                acc += ds[j];
              }
              lhist[cur] += acc;
            }
          }
          gemm(false, false, R, dqk, c, a, S.p, c, kg, gr.lk, 0.0f, dqg + r0 * lq, lq);         // dq = alpha ds k
          gemm(true, false, c, dqk, R, a, S.p, c, qg + r0 * gr.lq, gr.lq, 1.0f, dkg, lq);       // dk += alpha dsᵀ q
        }
      }
    }
  });
  // lanes summed in a fixed order (lane 0 + lane 1 + ...), element ranges in parallel
  auto reduce = [lanes](at::Tensor& t) -> at::Tensor {
    const int64_t m = t.numel() / lanes;
    float* p = t.data_ptr<float>();
    at::parallel_for(0, m, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t lane = 1; lane < lanes; ++lane)
        for (int64_t e = e0; e < e1; ++e) p[e] += p[lane * m + e];
    });
    return t[0];
  };
  at::Tensor db2d = want_bias2d ? reduce(pos) : at::empty({0}, q.options());
  at::Tensor dtw = want_time ? reduce(hist) : at::empty({0}, q.options());
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
  m.def("forward", &forward, "HSTU attention of one length group, written into out (CPU)");
  m.def("backward", &backward, "its backward: dq, dk, dv written, rab gradients returned");
}
