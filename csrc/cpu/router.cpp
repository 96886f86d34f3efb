// CPU kernels of the fused MoE router (trainops::router_topk, router_topk_backward).
//
// Forward, per token t (one pass over the row of logits x_t, fp32 math):
//   s = softmax(x) or sigmoid(x);  top-k of s + b (b: DeepSeek-V3 aux-loss-free bias,
//   ties -> lower expert index);  w_j = s[i_j] (/ sum_j s[i_j] if renormalize);
//   valid tokens add to counts[i_j], prob_sum += p (p = s for softmax, s / sum(s) for
//   sigmoid) and z_sum += logsumexp(x)^2 (router z-loss, ST-MoE arXiv 2202.08906).
// Backward recomputes s from the logits (nothing of size T x E is saved) and, in one
// pass per row, adds the gate-weight gradient and the load-balancing-loss gradient
// (dL/dP_i is a per-expert constant, coeff*N_E*f_i/T; "Demons in the Detail",
// arXiv 2501.11873) before applying the Jacobian of the score function.
//
// Determinism: rows are processed in fixed chunks of kChunk rows whatever the thread
// count; each chunk writes its own partial sums, added in chunk order at the end.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The float compares in the row loops may then be if-converted, so the loops vectorize.
// Values are unchanged (no reassociation or contraction); only FP exception flags differ.
#pragma GCC optimize("no-trapping-math")
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// AVX2 copy of the row loops chosen at load time; the default copy runs anywhere.
#define ROUTER_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ROUTER_CLONES
#endif

namespace trainops {
namespace {

constexpr int64_t kChunk = 64;

// Helpers are always inlined: GCC does not inline across the optimize/target attributes
// of the clones above (std::max itself would become a call).
#define ROUTER_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 88 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial,
// about 1 ulp); 0 below -87.3. Branch-free selects so the row loops vectorize.
ROUTER_INLINE float exp_approx(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.3f ? 88.3f : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  const float keep = x < -87.3f ? 0.0f : 1.0f;
  return y * __builtin_bit_cast(float, bits) * keep;
}

ROUTER_INLINE float fmax2(float a, float b) { return a > b ? a : b; }

// Reductions over a row in 8 interleaved lanes combined in a fixed order: vectorizable
// without reassociation flags, and the same result for the AVX2 and default builds.
ROUTER_INLINE float sum_row(const float* v, int64_t n) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int j = 0; j < 8; ++j) acc[j] += v[e + j];
  for (int j = 0; e < n; ++e, ++j) acc[j] += v[e];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

ROUTER_INLINE float dot_row(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[e + j] * b[e + j];
  for (int j = 0; e < n; ++e, ++j) acc[j] += a[e] * b[e];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

ROUTER_INLINE float max_row(const float* v, int64_t n) {
#if defined(__AVX2__)
  // The same 8 lanes with vmaxps (max(a, b) = a > b ? a : b, as fmax2); GCC leaves the
  // scalar loop below unvectorized.
  if (n >= 8) {
    __m256 a = _mm256_loadu_ps(v);
    int64_t e = 8;
    for (; e + 8 <= n; e += 8) a = _mm256_max_ps(a, _mm256_loadu_ps(v + e));
    alignas(32) float acc[8];
    _mm256_store_ps(acc, a);
    for (int j = 0; e < n; ++e, ++j) acc[j] = fmax2(acc[j], v[e]);
    return fmax2(fmax2(fmax2(acc[0], acc[1]), fmax2(acc[2], acc[3])), fmax2(fmax2(acc[4], acc[5]), fmax2(acc[6], acc[7])));
  }
#endif
  const float lo = -std::numeric_limits<float>::infinity();
  float acc[8] = {lo, lo, lo, lo, lo, lo, lo, lo};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int j = 0; j < 8; ++j) acc[j] = fmax2(acc[j], v[e + j]);
  for (int j = 0; e < n; ++e, ++j) acc[j] = fmax2(acc[j], v[e]);
  return fmax2(fmax2(fmax2(acc[0], acc[1]), fmax2(acc[2], acc[3])), fmax2(fmax2(acc[4], acc[5]), fmax2(acc[6], acc[7])));
}

// s <- scores of x; returns logsumexp(x) when softmax or need_lse (else 0).
// tmp: scratch of E floats; holds softmax(x) afterwards for sigmoid with need_lse.
ROUTER_CLONES
float scores_row(const float* x, int64_t E, bool softmax, bool need_lse, float* s, float* tmp) {
  float lse = 0.0f;
  if (softmax || need_lse) {
    const float m = max_row(x, E);
    float* ex = softmax ? s : tmp;
    for (int64_t e = 0; e < E; ++e) ex[e] = exp_approx(x[e] - m);
    const float sum = sum_row(ex, E);
    lse = m + std::log(sum);
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < E; ++e) ex[e] = ex[e] * inv;
  }
  if (!softmax) {
    for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + exp_approx(-x[e]));
  }
  return lse;
}

// dL/dx of one row (fp32). gp: dL/dprob_sum (used when valid), gw/idx: the row's gate
// weight gradients and experts, gz: dL/dz_sum. s/p/ds: scratch of E floats.
ROUTER_CLONES
void backward_row(const float* x, int64_t E, int64_t k, bool softmax, bool renormalize, bool valid, bool with_z,
                  const float* gp, const float* gw, const int64_t* idx, float gz, float* s, float* p, float* ds,
                  float* dx) {
  const float lse = scores_row(x, E, softmax, with_z && valid, s, p);
  // dL/ds from the load-balancing term (valid rows only) ...
  if (!valid) {
    for (int64_t e = 0; e < E; ++e) ds[e] = 0.0f;
  } else if (softmax) {
    for (int64_t e = 0; e < E; ++e) ds[e] = gp[e];
  } else {
    const float inv = 1.0f / sum_row(s, E);
    const float dot = dot_row(gp, s, E) * inv;
    for (int64_t e = 0; e < E; ++e) ds[e] = (gp[e] - dot) * inv;
  }
  // ... plus the gate weights' gradient, scattered to the chosen experts.
  if (renormalize) {
    float g = 0.0f;
    for (int64_t j = 0; j < k; ++j) g += s[idx[j]];
    float dot = 0.0f;
    for (int64_t j = 0; j < k; ++j) dot += gw[j] * (s[idx[j]] / g);
    for (int64_t j = 0; j < k; ++j) ds[idx[j]] += (gw[j] - dot) / g;
  } else {
    for (int64_t j = 0; j < k; ++j) ds[idx[j]] += gw[j];
  }
  const float zc = (with_z && valid) ? 2.0f * gz * lse : 0.0f;
  if (softmax) {
    const float dot = dot_row(s, ds, E);
    for (int64_t e = 0; e < E; ++e) dx[e] = s[e] * (ds[e] - dot) + zc * s[e];
  } else if (zc != 0.0f) {
    for (int64_t e = 0; e < E; ++e) dx[e] = ds[e] * s[e] * (1.0f - s[e]) + zc * p[e];
  } else {
    for (int64_t e = 0; e < E; ++e) dx[e] = ds[e] * s[e] * (1.0f - s[e]);
  }
}

// backward_row for softmax scores in fewer passes over the row: the softmax Jacobian
// dx = s * (ds - <s, ds>) with ds = dL/dprob_sum + the gate-weight gradient, whose k
// nonzero entries are added after the dense pass (<s, ds> is split the same way).
// dx may alias nothing; s: scratch of E floats.
ROUTER_CLONES
void backward_row_softmax(const float* x, int64_t E, int64_t k, bool renormalize, bool valid, bool with_z,
                          const float* gp, const float* gw, const int64_t* idx, float gz, float* s, float* dx) {
  const float m = max_row(x, E);
  for (int64_t e = 0; e < E; ++e) s[e] = exp_approx(x[e] - m);
  const float sum = sum_row(s, E);
  const float inv = 1.0f / sum;
  for (int64_t e = 0; e < E; ++e) s[e] = s[e] * inv;
  // Gate weights: dL/ds at the chosen experts.
  float gsel[64];
  float g = 0.0f;
  for (int64_t j = 0; j < k; ++j) g += s[idx[j]];
  if (renormalize) {
    float gd = 0.0f;
    for (int64_t j = 0; j < k; ++j) gd += gw[j] * (s[idx[j]] / g);
    for (int64_t j = 0; j < k; ++j) gsel[j] = (gw[j] - gd) / g;
  } else {
    for (int64_t j = 0; j < k; ++j) gsel[j] = gw[j];
  }
  float dsel = 0.0f;
  for (int64_t j = 0; j < k; ++j) dsel += s[idx[j]] * gsel[j];
  if (valid) {
    const float dot = dot_row(s, gp, E) + dsel;
    const float zc = with_z ? 2.0f * gz * (m + std::log(sum)) : 0.0f;
    for (int64_t e = 0; e < E; ++e) dx[e] = s[e] * (gp[e] - dot) + zc * s[e];
  } else {
    for (int64_t e = 0; e < E; ++e) dx[e] = s[e] * -dsel;
  }
  for (int64_t j = 0; j < k; ++j) dx[idx[j]] += s[idx[j]] * gsel[j];
}

// Indices of the k largest of v, descending; equal values keep ascending index order.
// For k <= 8 a lower bound L of the k-th largest (the k-th largest of the 8 interleaved
// lane maxima, which are 8 distinct elements) keeps only the candidates v >= L (about
// 2k of them for random rows), gathered branch-free. Each candidate's rank is then
// counted against the others (earlier equal values rank ahead) and it is written to slot
// min(rank, k): no data-dependent branches. Other cases use an insertion into a sorted
// list of k. cand, cval: E scratch each.
ROUTER_CLONES
void topk_row(const float* v, int64_t E, int64_t k, float* tv, int64_t* ti, int64_t* cand, float* cval) {
  int64_t n = 0;
  if (k <= 8 && E >= 16) {
    const float lo = -std::numeric_limits<float>::infinity();
    float lm[8] = {lo, lo, lo, lo, lo, lo, lo, lo};
    int64_t e = 0;
    for (; e + 8 <= E; e += 8)
      for (int j = 0; j < 8; ++j) lm[j] = fmax2(lm[j], v[e + j]);
    for (int j = 0; e < E; ++e, ++j) lm[j] = fmax2(lm[j], v[e]);
    // Sort the 8 lane maxima, descending: 19-comparator network of max/min (branch-free).
#define ROUTER_CE(i, j)                               \
  do {                                                \
    const float hi = fmax2(lm[i], lm[j]);             \
    const float lo_ = lm[i] > lm[j] ? lm[j] : lm[i];  \
    lm[i] = hi;                                       \
    lm[j] = lo_;                                      \
  } while (0)
    ROUTER_CE(0, 2); ROUTER_CE(1, 3); ROUTER_CE(4, 6); ROUTER_CE(5, 7);
    ROUTER_CE(0, 4); ROUTER_CE(1, 5); ROUTER_CE(2, 6); ROUTER_CE(3, 7);
    ROUTER_CE(0, 1); ROUTER_CE(2, 3); ROUTER_CE(4, 5); ROUTER_CE(6, 7);
    ROUTER_CE(2, 4); ROUTER_CE(3, 5); ROUTER_CE(1, 4); ROUTER_CE(3, 6);
    ROUTER_CE(1, 2); ROUTER_CE(3, 4); ROUTER_CE(5, 6);
#undef ROUTER_CE
    const float bound = lm[k - 1];
    for (e = 0; e < E; ++e) {  // one store per element: the loop runs at store throughput
      cand[n] = e;
      n += v[e] >= bound ? 1 : 0;
    }
    for (int64_t c = 0; c < n; ++c) cval[c] = v[cand[c]];
    if (n >= k && n <= 64) {
      float ov[9];
      int64_t oi[9];
      for (int64_t c = 0; c < n; ++c) {
        const float x = cval[c];
        int64_t r = 0;
        for (int64_t d = 0; d < c; ++d) r += cval[d] >= x ? 1 : 0;
        for (int64_t d = c + 1; d < n; ++d) r += cval[d] > x ? 1 : 0;
        r = r < k ? r : k;
        ov[r] = x;
        oi[r] = cand[c];
      }
      for (int64_t j = 0; j < k; ++j) {
        tv[j] = ov[j];
        ti[j] = oi[j];
      }
      return;
    }
  }
  if (n < k || n > 64) {  // k > 8, tiny rows, NaN in the row, or many ties
    for (int64_t e = 0; e < E; ++e) cand[e] = e;
    n = E;
  }
  int64_t filled = 0;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t e = cand[c];
    const float x = v[e];
    int64_t pos;
    if (filled < k) {
      pos = filled++;
    } else if (x > tv[k - 1]) {
      pos = k - 1;
    } else {
      continue;
    }
    while (pos > 0 && tv[pos - 1] < x) {
      tv[pos] = tv[pos - 1];
      ti[pos] = ti[pos - 1];
      --pos;
    }
    tv[pos] = x;
    ti[pos] = e;
  }
}

#if defined(__AVX2__)
// Left-pack table: for each 8-bit mask, the positions of its set bits, in order.
struct PackTable {
  alignas(64) uint8_t idx[256][8];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int j = 0; j < 8; ++j)
        if (m & (1 << j)) idx[m][n++] = static_cast<uint8_t>(j);
      for (; n < 8; ++n) idx[m][n] = 0;
    }
  }
};
const PackTable kPack;

// topk_row for k <= 8 with AVX2; the same indices as topk_row. The bound is the k-th
// largest of 16 lane maxima (16 distinct elements, so at most the k-th largest of the
// row): about k + 4 candidates v >= bound for random rows instead of about 2k with 8
// lanes. Candidates are left-packed 8 at a time (compare, movemask, table permute), and
// each candidate's rank (greater ones, plus equal ones at a lower index) is counted 8
// candidates per compare; ranks are distinct, so slot = rank needs no branch.
// Falls back to topk_row for k > 8, short rows, NaN lane maxima, or many ties.
void topk_row_avx2(const float* v, int64_t E, int64_t k, float* tv, int64_t* ti, int64_t* cand, float* cval) {
  if (k > 8 || E < 16) return topk_row(v, E, k, tv, ti, cand, cval);
  __m256 m0 = _mm256_loadu_ps(v), m1 = _mm256_loadu_ps(v + 8);
  int64_t e = 16;
  for (; e + 16 <= E; e += 16) {  // max(lm, v) = lm > v ? lm : v, as fmax2
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(v + e));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(v + e + 8));
  }
  alignas(32) float l[16];
  _mm256_store_ps(l, m0);
  _mm256_store_ps(l + 8, m1);
  for (int j = 0; e < E; ++e, ++j) l[j] = fmax2(l[j], v[e]);
  m0 = _mm256_load_ps(l);
  m1 = _mm256_load_ps(l + 8);
  if (_mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(m0, m0, _CMP_UNORD_Q), _mm256_cmp_ps(m1, m1, _CMP_UNORD_Q))))
    return topk_row(v, E, k, tv, ti, cand, cval);
  // bound = the lane maximum of rank k-1 (ranks: greater ones, plus equal ones in a lower lane).
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lane8 = _mm256_add_epi32(lane, _mm256_set1_epi32(8));
  float bound = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < 16; ++i) {
    const __m256 x = _mm256_set1_ps(l[i]);
    const __m256i vi = _mm256_set1_epi32(i);
    const __m256 b0 = _mm256_or_ps(_mm256_cmp_ps(m0, x, _CMP_GT_OQ),
                                   _mm256_and_ps(_mm256_cmp_ps(m0, x, _CMP_EQ_OQ), _mm256_castsi256_ps(_mm256_cmpgt_epi32(vi, lane))));
    const __m256 b1 = _mm256_or_ps(_mm256_cmp_ps(m1, x, _CMP_GT_OQ),
                                   _mm256_and_ps(_mm256_cmp_ps(m1, x, _CMP_EQ_OQ), _mm256_castsi256_ps(_mm256_cmpgt_epi32(vi, lane8))));
    const int r = __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(b0) | (_mm256_movemask_ps(b1) << 8)));
    bound = r == k - 1 ? l[i] : bound;
  }
  // Left-pack the candidates (ascending index); cval and cand hold E + 8 entries.
  int32_t* ci = reinterpret_cast<int32_t*>(cand);
  const __m256 vb = _mm256_set1_ps(bound);
  int64_t n = 0;
  for (e = 0; e + 8 <= E; e += 8) {
    const __m256 x = _mm256_loadu_ps(v + e);
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(x, vb, _CMP_GE_OQ));
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPack.idx[m])));
    _mm256_storeu_ps(cval + n, _mm256_permutevar8x32_ps(x, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ci + n),
                        _mm256_add_epi32(perm, _mm256_set1_epi32(static_cast<int32_t>(e))));
    n += __builtin_popcount(static_cast<unsigned>(m));
  }
  for (; e < E; ++e) {
    cval[n] = v[e];
    ci[n] = static_cast<int32_t>(e);
    n += v[e] >= bound ? 1 : 0;
  }
  if (n < k || n > 64) return topk_row(v, E, k, tv, ti, cand, cval);  // many ties
  // Rank of candidate c: candidates greater than it, plus equal ones before it (lower index).
  alignas(32) float ov[64];
  alignas(32) int64_t oi[64];
  const __m256i vn = _mm256_set1_epi32(static_cast<int32_t>(n));
  for (int64_t c = 0; c < n; ++c) {
    const float xc = cval[c];
    const __m256 vx = _mm256_set1_ps(xc);
    const __m256i vc = _mm256_set1_epi32(static_cast<int32_t>(c));
    int r = 0;
    for (int64_t d = 0; d < n; d += 8) {
      const __m256 y = _mm256_loadu_ps(cval + d);
      const __m256i di = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(d)));
      const __m256 gt = _mm256_and_ps(_mm256_cmp_ps(y, vx, _CMP_GT_OQ), _mm256_castsi256_ps(_mm256_cmpgt_epi32(vn, di)));
      const __m256 eq = _mm256_and_ps(_mm256_cmp_ps(y, vx, _CMP_EQ_OQ), _mm256_castsi256_ps(_mm256_cmpgt_epi32(vc, di)));
      r += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_or_ps(gt, eq))));
    }
    ov[r] = xc;
    oi[r] = ci[c];
  }
  // Store the first k slots with masked stores (no variable-length copy).
  const __m256i kk = _mm256_set1_epi32(static_cast<int32_t>(k));
  const __m256i mk32 = _mm256_cmpgt_epi32(kk, lane);
  _mm256_maskstore_ps(tv, mk32, _mm256_load_ps(ov));
  const __m256i kk64 = _mm256_set1_epi64x(k);
  const __m256i mlo = _mm256_cmpgt_epi64(kk64, _mm256_setr_epi64x(0, 1, 2, 3));
  const __m256i mhi = _mm256_cmpgt_epi64(kk64, _mm256_setr_epi64x(4, 5, 6, 7));
  _mm256_maskstore_epi64(reinterpret_cast<long long*>(ti), mlo, _mm256_load_si256(reinterpret_cast<const __m256i*>(oi)));
  _mm256_maskstore_epi64(reinterpret_cast<long long*>(ti + 4), mhi,
                         _mm256_load_si256(reinterpret_cast<const __m256i*>(oi + 4)));
}
#define ROUTER_TOPK topk_row_avx2
#else
#define ROUTER_TOPK topk_row
#endif

template <typename scalar_t>
void load_row(const scalar_t* src, int64_t E, float* dst) {
  for (int64_t e = 0; e < E; ++e) dst[e] = static_cast<float>(src[e]);
}

void check_common(const at::Tensor& logits, int64_t k, const std::string& score, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "trainops: 'logits' must be 2-D [tokens, experts], got ", logits.dim(), "-D");
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                       logits.scalar_type() == at::kHalf,
                   "trainops: 'logits' must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(k >= 1 && k <= logits.size(1), "trainops: 'k' must be in [1, experts=", logits.size(1), "], got ", k);
  TORCH_CHECK_VALUE(score == "softmax" || score == "sigmoid", "trainops: 'score' must be softmax or sigmoid, got ", score);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "trainops: 'mask' must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == logits.size(0), "trainops: 'mask' must have shape [",
                      logits.size(0), "], got ", mask->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> router_topk_cpu(
    const at::Tensor& logits_in, int64_t k, c10::string_view score_sv, bool renormalize,
    const c10::optional<at::Tensor>& expert_bias, const c10::optional<at::Tensor>& mask_in, bool with_z) {
  const std::string score(score_sv);
  check_common(logits_in, k, score, mask_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor bias;
  if (expert_bias.has_value()) {
    TORCH_CHECK_VALUE(expert_bias->dim() == 1 && expert_bias->size(0) == E, "trainops: 'expert_bias' must have shape [",
                      E, "], got ", expert_bias->sizes());
    bias = expert_bias->to(at::kFloat).contiguous();
  }
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor weights = at::empty({T, k}, f32);
  at::Tensor indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  std::vector<float> part_p(static_cast<size_t>(chunks * E), 0.0f);
  std::vector<int64_t> part_c(static_cast<size_t>(chunks * E), 0);
  std::vector<float> part_z(static_cast<size_t>(chunks), 0.0f);
  const bool softmax = score == "softmax";
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const bool* mk = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  float* w_out = weights.data_ptr<float>();
  int64_t* i_out = indices.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "trainops_router_topk", [&] {
    const scalar_t* X = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> x(E), s(E), tmp(E), sel(E), tv(k);
      std::vector<int64_t> cand(E + 8);
      std::vector<float> cval(E + 8);
      for (int64_t c = c0; c < c1; ++c) {
        float* acc = part_p.data() + c * E;
        int64_t* cnt = part_c.data() + c * E;
        float z = 0.0f;
        for (int64_t t = c * kChunk; t < std::min(T, (c + 1) * kChunk); ++t) {
          const bool valid = mk == nullptr || mk[t];
          const float* xr = x.data();
          if constexpr (std::is_same_v<scalar_t, float>) {
            xr = reinterpret_cast<const float*>(X + t * E);  // fp32 rows are read in place
          } else {
            load_row(X + t * E, E, x.data());
          }
          const float lse = scores_row(xr, E, softmax, with_z && valid, s.data(), tmp.data());
          const float* pick = s.data();
          if (b != nullptr) {
            for (int64_t e = 0; e < E; ++e) sel[e] = s[e] + b[e];
            pick = sel.data();
          }
          int64_t* idx = i_out + t * k;
          float* w = w_out + t * k;
          ROUTER_TOPK(pick, E, k, tv.data(), idx, cand.data(), cval.data());
          float g = 0.0f;
          for (int64_t j = 0; j < k; ++j) {
            w[j] = s[idx[j]];
            g += w[j];
          }
          if (renormalize) {
            for (int64_t j = 0; j < k; ++j) w[j] = w[j] / g;
          }
          if (!valid) continue;
          for (int64_t j = 0; j < k; ++j) cnt[idx[j]] += 1;
          if (softmax) {
            for (int64_t e = 0; e < E; ++e) acc[e] += s[e];
          } else {
            const float inv = 1.0f / sum_row(s.data(), E);
            for (int64_t e = 0; e < E; ++e) acc[e] += s[e] * inv;
          }
          if (with_z) z += lse * lse;
        }
        part_z[c] = z;
      }
    });
  });

  at::Tensor counts = at::zeros({E}, logits.options().dtype(at::kLong));
  at::Tensor prob_sum = at::zeros({E}, f32);
  at::Tensor z_sum = at::zeros({}, f32);
  int64_t* cp = counts.data_ptr<int64_t>();
  float* pp = prob_sum.data_ptr<float>();
  float zs = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {  // chunk order: the same sum for any thread count
    for (int64_t e = 0; e < E; ++e) {
      cp[e] += part_c[c * E + e];
      pp[e] += part_p[c * E + e];
    }
    zs += part_z[c];
  }
  z_sum.fill_(zs);
  return {weights, indices, counts, prob_sum, z_sum};
}

at::Tensor router_topk_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& grad_prob_sum_in,
                                    const at::Tensor& grad_z_sum, const at::Tensor& logits_in,
                                    const at::Tensor& indices_in, const c10::optional<at::Tensor>& mask_in,
                                    c10::string_view score_sv, bool renormalize, bool with_z) {
  const std::string score(score_sv);
  TORCH_CHECK_VALUE(indices_in.dim() == 2 && indices_in.size(0) == logits_in.size(0),
                    "trainops: 'indices' must be [tokens, k]");
  const int64_t k = indices_in.size(1);
  check_common(logits_in, k, score, mask_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(grad_weights_in.sizes() == indices_in.sizes(), "trainops: 'grad_weights' must be [tokens, k]");
  TORCH_CHECK_VALUE(grad_prob_sum_in.numel() == E, "trainops: 'grad_prob_sum' must have ", E, " elements");
  const at::Tensor gw_t = grad_weights_in.to(at::kFloat).contiguous();
  const at::Tensor gp_t = grad_prob_sum_in.to(at::kFloat).contiguous();
  const at::Tensor idx_t = indices_in.to(at::kLong).contiguous();
  const float gz = with_z ? grad_z_sum.to(at::kFloat).item<float>() : 0.0f;
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor grad = at::empty_like(logits);
  const bool softmax = score == "softmax";
  const float* GW = gw_t.const_data_ptr<float>();
  const float* GP = gp_t.const_data_ptr<float>();
  const int64_t* IDX = idx_t.const_data_ptr<int64_t>();
  const bool* mk = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "trainops_router_topk_backward", [&] {
    const scalar_t* X = logits.const_data_ptr<scalar_t>();
    scalar_t* G = grad.data_ptr<scalar_t>();
    at::parallel_for(0, T, kChunk, [&](int64_t t0, int64_t t1) {
      std::vector<float> x(E), s(E), p(E), ds(E), dx(E);
      for (int64_t t = t0; t < t1; ++t) {
        const bool valid = mk == nullptr || mk[t];
        if (softmax && k <= 64) {  // fp32 rows are read and written in place, no staging copy
          const float* xr = x.data();
          float* dr = dx.data();
          if constexpr (std::is_same_v<scalar_t, float>) {
            xr = reinterpret_cast<const float*>(X + t * E);
            dr = reinterpret_cast<float*>(G + t * E);
          } else {
            load_row(X + t * E, E, x.data());
          }
          backward_row_softmax(xr, E, k, renormalize, valid, with_z, GP, GW + t * k, IDX + t * k, gz, s.data(), dr);
          if constexpr (!std::is_same_v<scalar_t, float>) {
            scalar_t* out = G + t * E;
            for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(dx[e]);
          }
          continue;
        }
        load_row(X + t * E, E, x.data());
        backward_row(x.data(), E, k, softmax, renormalize, valid, with_z, GP, GW + t * k, IDX + t * k, gz, s.data(),
                     p.data(), ds.data(), dx.data());
        scalar_t* out = G + t * E;
        for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(dx[e]);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(trainops, CPU, m) {
  m.impl("router_topk", &router_topk_cpu);
  m.impl("router_topk_backward", &router_topk_backward_cpu);
}

}  // namespace trainops
