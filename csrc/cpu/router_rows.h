// Row kernels of the fused MoE router on CPU: scores (softmax / sigmoid), top-k and the
// backward of one row of logits. Plain C++ without torch, so they can be timed on their
// own; csrc/cpu/router.cpp runs them over the rows of a tensor.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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
namespace portable {

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
// without reassociation flags, and the same result for both clones of the portable kernels
// (the AVX2 + FMA kernels of router_rows_avx2.h may differ from them in the last bits).
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

// ex <- exp(x - max(x)), *sum <- its sum; returns max(x). softmax(x) = ex / sum.
ROUTER_CLONES
float exp_row(const float* x, int64_t E, float* ex, float* sum) {
  const float m = max_row(x, E);
  for (int64_t e = 0; e < E; ++e) ex[e] = exp_approx(x[e] - m);
  *sum = sum_row(ex, E);
  return m;
}

// acc += a * sa + b * sb (two rows' contributions to prob_sum, one pass over acc).
ROUTER_CLONES
void add_scaled2(float* acc, const float* a, float sa, const float* b, float sb, int64_t E) {
  for (int64_t e = 0; e < E; ++e) acc[e] += a[e] * sa + b[e] * sb;
}

// One token's outputs from its top-k (ti, values tv): indices to idx_out, gate weights
// w_j = s[i_j] * scale (renormalized over j if asked) and, for a valid token, counts[i_j] += 1. When the
// top-k ran on s itself (no expert bias), tv[j] is s[i_j] and nothing is gathered.
ROUTER_INLINE void emit_selection(const float* s, const float* tv, bool tv_is_s, const int64_t* ti, int64_t k,
                                  float scale, bool renormalize, bool valid, float* w, int64_t* idx_out,
                                  int64_t* counts) {
  float g = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = ti[j];
    idx_out[j] = e;
    w[j] = (tv_is_s ? tv[j] : s[e]) * scale;
    g += w[j];
    counts[e] += valid ? 1 : 0;
  }
  if (renormalize) {
    const float inv_g = 1.0f / g;
    for (int64_t j = 0; j < k; ++j) w[j] = w[j] * inv_g;
  }
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
// list of k. tv, ti: k + 1 entries (slot k is spare); cand, cval: E scratch each.
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
      for (int64_t c = 0; c < n; ++c) {
        const float x = cval[c];
        int64_t r = 0;
        for (int64_t d = 0; d < c; ++d) r += cval[d] >= x ? 1 : 0;
        for (int64_t d = c + 1; d < n; ++d) r += cval[d] > x ? 1 : 0;
        r = r < k ? r : k;  // ranks past the top-k share the spare slot k
        tv[r] = x;
        ti[r] = cand[c];
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


// topk_row of two rows (the AVX2 build interleaves them).
ROUTER_INLINE void topk_rows2(const float* const* v, int64_t E, int64_t k, float* const* tv, int64_t* const* ti,
                              int64_t* const* cand, float* const* cval) {
  for (int j = 0; j < 2; ++j) topk_row(v[j], E, k, tv[j], ti[j], cand[j], cval[j]);
}

// backward_row_softmax of two rows (arrays of 2; the AVX2 build interleaves them).
ROUTER_INLINE void backward_rows2_softmax(const float* const* x, int64_t E, int64_t k, bool renormalize,
                                          const bool* valid, bool with_z, const float* gp, const float* const* gw,
                                          const int64_t* const* idx, float gz, float* const* s, float* const* dx) {
  for (int j = 0; j < 2; ++j)
    backward_row_softmax(x[j], E, k, renormalize, valid[j], with_z, gp, gw[j], idx[j], gz, s[j], dx[j]);
}

}  // namespace portable
}  // namespace
}  // namespace trainops
