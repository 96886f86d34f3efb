// AVX2 + FMA row kernels of the fused MoE router: softmax / sigmoid scores, top-k for
// k <= 8, and the softmax backward, 8 experts per instruction with the row tail handled by
// masked loads (no scalar remainder loop). Same contracts as the portable kernels in
// router_rows.h; results may differ from them in the last bits (FMA in exp and the dot
// products) but are deterministic for a given build.
#pragma once

#include "cpu_isa.h"

// Compiled on every x86-64 build (target attribute); router.cpp calls them only on CPUs
// with AVX2 + FMA (cpu_isa::has_avx2_fma).
#if defined(TRAINOPS_X86_DISPATCH)
#define TRAINOPS_ROUTER_AVX2 1

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "router_rows.h"

TRAINOPS_TARGET_AVX2_FMA_BEGIN
namespace trainops {
namespace {
namespace avx2 {

inline __m256i lane_ids() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

// Lanes [0, rem) of a row tail.
inline __m256i tail_mask(int64_t rem) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(rem)), lane_ids()); }

// The first rem floats at p; the other lanes hold fill (the tail is never read past the row).
inline __m256 load_tail(const float* p, __m256i mask, float fill) {
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
}

// Sum, maximum and minimum of the 8 lanes, combined in a fixed order (deterministic).
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// exp(x), x = n ln2 + r with n = round(x log2e) taken from the bits of x log2e + 1.5*2^23
// (+127, the exponent bias), so 2^n is those bits shifted into the exponent field; exp(r)
// by the Cephes degree-6 polynomial with FMA; about 1 ulp. x is clamped below at -88,
// where n + 127 = 0 makes the scale 0: exp(x) = 0 below about -87.7 (exp(-inf) = 0, no
// subnormals). kClampHigh clamps at 88.3 (exp(88.3) < FLT_MAX); softmax arguments x - max
// are <= 0 and skip that. NaN stays NaN: it is the second operand of max/min.
template <bool kClampHigh>
inline __m256 exp_clamped(__m256 x) {
  __m256 xc = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  if constexpr (kClampHigh) xc = _mm256_min_ps(_mm256_set1_ps(88.3f), xc);
  const __m256 magic = _mm256_set1_ps(12583039.0f);  // 1.5 * 2^23 + 127
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  return _mm256_mul_ps(y, scale);
}

inline __m256 exp(__m256 x) { return exp_clamped<true>(x); }
// exp(x) for x <= 0 (or NaN): softmax terms exp(x - max).
inline __m256 exp_nonpositive(__m256 x) { return exp_clamped<false>(x); }

// Loads and stores of one block of 8: whole (std::true_type) or the row's tail (lanes in mask).
inline __m256 load(const float* p, __m256i, float, std::true_type) { return _mm256_loadu_ps(p); }
inline __m256 load(const float* p, __m256i mask, float fill, std::false_type) { return load_tail(p, mask, fill); }
inline void store(float* p, __m256 v, __m256i, std::true_type) { _mm256_storeu_ps(p, v); }
inline void store(float* p, __m256 v, __m256i mask, std::false_type) { _mm256_maskstore_ps(p, mask, v); }

// f(v, e, mask, whole) over a row in blocks of 8; the tail block gets lanes past the row as
// fill. whole is std::true_type for full blocks, so their loads and stores are plain.
template <typename F>
inline void for_blocks(const float* x, int64_t E, float fill, F f) {
  int64_t e = 0;
  const __m256i all = _mm256_set1_epi32(-1);
  for (; e + 8 <= E; e += 8) f(_mm256_loadu_ps(x + e), e, all, std::true_type{});
  if (e < E) {
    const __m256i m = tail_mask(E - e);
    f(load_tail(x + e, m, fill), e, m, std::false_type{});
  }
}

inline float max_row(const float* x, int64_t E) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for_blocks(x, E, -std::numeric_limits<float>::infinity(), [&](__m256 v, int64_t, __m256i, auto) { m = _mm256_max_ps(m, v); });
  return hmax(m);
}

inline float sum_row(const float* x, int64_t E) {
  __m256 a = _mm256_setzero_ps();
  for_blocks(x, E, 0.0f, [&](__m256 v, int64_t, __m256i, auto) { a = _mm256_add_ps(a, v); });
  return hsum(a);
}

// idx[0..k) (int64, k <= 8) as 8 int32 lanes; lanes >= k are 0.
inline __m256i load_indices(const int64_t* idx, int64_t k) {
  const __m256i kk = _mm256_set1_epi64x(k);
  const __m256i lo = _mm256_maskload_epi64(reinterpret_cast<const long long*>(idx),
                                           _mm256_cmpgt_epi64(kk, _mm256_setr_epi64x(0, 1, 2, 3)));
  const __m256i hi = _mm256_maskload_epi64(reinterpret_cast<const long long*>(idx + 4),
                                           _mm256_cmpgt_epi64(kk, _mm256_setr_epi64x(4, 5, 6, 7)));
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // low halves first
  return _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(lo, even), _mm256_permutevar8x32_epi32(hi, even), 0x20);
}

// v[idx[j]] * scale for j < k <= 8 (lanes >= k are 0).
inline __m256 gather_selected(const float* v, const int64_t* idx, int64_t k, float scale) {
  const __m256i km = tail_mask(k);
  const __m256 sel = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), v, load_indices(idx, k), _mm256_castsi256_ps(km), 4);
  return _mm256_mul_ps(sel, _mm256_set1_ps(scale));
}

// ex <- exp(x - max(x)), *sum <- its sum; returns max(x). softmax(x) = ex / sum.
inline float exp_row(const float* x, int64_t E, float* ex, float* sum) {
  const float m = max_row(x, E);
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for_blocks(x, E, -std::numeric_limits<float>::infinity(), [&](__m256 v, int64_t e, __m256i mask, auto whole) {
    const __m256 t = exp_nonpositive(_mm256_sub_ps(v, vm));
    acc = _mm256_add_ps(acc, t);
    store(ex + e, t, mask, whole);
  });
  *sum = hsum(acc);
  return m;
}

// softmax(x) -> s; returns logsumexp(x).
inline float softmax_row(const float* x, int64_t E, float* s) {
  float sum;
  const float m = exp_row(x, E, s, &sum);
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for_blocks(s, E, 0.0f, [&](__m256 v, int64_t e, __m256i mask, auto whole) { store(s + e, _mm256_mul_ps(v, inv), mask, whole); });
  return m + std::log(sum);
}

// scores_row of router_rows.h: s <- softmax(x) or sigmoid(x); the logsumexp when softmax
// or need_lse (tmp then holds softmax(x) for sigmoid).
inline float scores_row(const float* x, int64_t E, bool softmax, bool need_lse, float* s, float* tmp) {
  float lse = 0.0f;
  if (softmax || need_lse) lse = softmax_row(x, E, softmax ? s : tmp);
  if (!softmax) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for_blocks(x, E, 0.0f, [&](__m256 v, int64_t e, __m256i mask, auto whole) {
      const __m256 ex = avx2::exp(_mm256_sub_ps(_mm256_setzero_ps(), v));
      store(s + e, _mm256_div_ps(one, _mm256_add_ps(one, ex)), mask, whole);
    });
  }
  return lse;
}

// add_scaled2 of router_rows.h: acc += a * sa + b * sb.
inline void add_scaled2(float* acc, const float* a, float sa, const float* b, float sb, int64_t E) {
  const __m256 va = _mm256_set1_ps(sa), vb = _mm256_set1_ps(sb);
  for_blocks(a, E, 0.0f, [&](__m256 x, int64_t e, __m256i mask, auto whole) {
    const __m256 y = load(b + e, mask, 0.0f, whole);
    store(acc + e, _mm256_add_ps(load(acc + e, mask, 0.0f, whole), _mm256_fmadd_ps(y, vb, _mm256_mul_ps(x, va))), mask,
          whole);
  });
}

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

// Step 3 of topk_row: ranks of n <= 64 candidates, 8 candidates per compare; slot = rank.
// Returns false when two candidates are equal (a repeated rank).
inline bool rank_candidates(const float* cval, const int32_t* ci, int64_t n, int64_t k, float* tv, int64_t* ti) {
  alignas(32) int32_t rank[72];
  for (int64_t c = 0; c < n; c += 8) {
    const __m256 x = _mm256_loadu_ps(cval + c);
    __m256i g = _mm256_setzero_si256();
    for (int64_t d = 0; d < n; ++d)
      g = _mm256_sub_epi32(g, _mm256_castps_si256(_mm256_cmp_ps(_mm256_broadcast_ss(cval + d), x, _CMP_GT_OQ)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(rank + c), g);
  }
  // Slot = rank; ranks >= k land in slot k, which callers provide as a spare (no branch,
  // and no copy through a 64-entry buffer).
  uint64_t seen = 0;
  for (int64_t c = 0; c < n; ++c) {
    const int32_t r = rank[c];
    seen |= uint64_t{1} << r;
    const int64_t slot = r < k ? r : k;
    tv[slot] = cval[c];
    ti[slot] = ci[c];
  }
  if (seen != (n == 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1)) return false;
  return true;
}

// Top-k (k <= 8) of v, descending, equal values in ascending index order: the same result
// as topk_row of router_rows.h, which it falls back to for k > 8, short rows, NaN and ties.
//   1. bound = the k-th largest of the 16 lane maxima (16 distinct elements, so at most
//      the row's k-th largest): the smallest lane maximum with fewer than k greater ones;
//      for k <= 4 the k-th largest of 8 lane maxima.
//   2. Candidates v >= bound (about k + 4 of a random row) are left-packed 8 at a time
//      (compare, movemask, table permute), in ascending index order.
//   3. Rank of each candidate = number of candidates greater than it, counted for 8
//      candidates per compare (rank_candidates). Distinct values give distinct
//      ranks, so slot = rank; equal candidates take the exact fallback.
// The steps are short dependency chains; topk_rows2 runs each step for two rows back to
// back so the core overlaps them.
struct TopkRow {
  const float* v;
  float* tv;
  int64_t* ti;
  int64_t* cand;
  float* cval;
  __m256 bound;
  int64_t n = 0;
  bool ok = true;
};

// Step 1: the bound (ok = false for NaN lane maxima).
inline void topk_bound(TopkRow& r, int64_t E, int64_t k) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float* v = r.v;
  __m256 m0 = _mm256_loadu_ps(v), m1 = _mm256_loadu_ps(v + 8);
  int64_t e = 16;
  for (; e + 16 <= E; e += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(v + e));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(v + e + 8));
  }
  if (e < E) {  // tail of up to 15: the next (partial) 16 lanes
    const __m256i t0 = tail_mask(E - e), t1 = tail_mask(E - e - 8);
    m0 = _mm256_max_ps(m0, load_tail(v + e, t0, ninf));
    m1 = _mm256_max_ps(m1, load_tail(v + e + 8, t1, ninf));
  }
  r.ok = !_mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(m0, m0, _CMP_UNORD_Q), _mm256_cmp_ps(m1, m1, _CMP_UNORD_Q)));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256i nk = _mm256_set1_epi32(-static_cast<int32_t>(k));
  if (k <= 4) {
    // The k-th largest of 8 lane maxima (8 distinct elements): a third of the compares, and
    // for k <= 4 only ~0.6 more candidates on average than with 16 (random rows, E=64..256).
    const __m256 m = _mm256_max_ps(m0, m1);
    alignas(32) float l8[8];
    _mm256_store_ps(l8, m);
    __m256i g = _mm256_setzero_si256();
    for (int i = 0; i < 8; ++i) g = _mm256_add_epi32(g, _mm256_castps_si256(_mm256_cmp_ps(_mm256_broadcast_ss(l8 + i), m, _CMP_GT_OQ)));
    r.bound = _mm256_set1_ps(hmin(_mm256_blendv_ps(inf, m, _mm256_castsi256_ps(_mm256_cmpgt_epi32(g, nk)))));
    return;
  }
  alignas(32) float l[16];
  _mm256_store_ps(l, m0);
  _mm256_store_ps(l + 8, m1);
  __m256i g0 = _mm256_setzero_si256(), g1 = _mm256_setzero_si256();  // -(number of greater lane maxima)
  for (int i = 0; i < 16; ++i) {
    const __m256 b = _mm256_broadcast_ss(l + i);
    g0 = _mm256_add_epi32(g0, _mm256_castps_si256(_mm256_cmp_ps(b, m0, _CMP_GT_OQ)));
    g1 = _mm256_add_epi32(g1, _mm256_castps_si256(_mm256_cmp_ps(b, m1, _CMP_GT_OQ)));
  }
  const __m256 top0 = _mm256_blendv_ps(inf, m0, _mm256_castsi256_ps(_mm256_cmpgt_epi32(g0, nk)));
  const __m256 top1 = _mm256_blendv_ps(inf, m1, _mm256_castsi256_ps(_mm256_cmpgt_epi32(g1, nk)));
  r.bound = _mm256_set1_ps(hmin(_mm256_min_ps(top0, top1)));
}

// Step 2: left-pack the candidates v >= bound; cval and cand hold E + 32 entries.
inline void topk_candidates(TopkRow& r, int64_t E) {
  int32_t* ci = reinterpret_cast<int32_t*>(r.cand);
  int64_t n = 0;
  // The tail's fill (-inf) is below any bound but -inf itself, hence the lane mask there.
  for_blocks(r.v, E, -std::numeric_limits<float>::infinity(), [&](__m256 x, int64_t e0, __m256i lanes, auto whole) {
    __m256 ge = _mm256_cmp_ps(x, r.bound, _CMP_GE_OQ);
    if constexpr (!decltype(whole)::value) ge = _mm256_and_ps(ge, _mm256_castsi256_ps(lanes));
    const int m = _mm256_movemask_ps(ge);
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPack.idx[m])));
    _mm256_storeu_ps(r.cval + n, _mm256_permutevar8x32_ps(x, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ci + n), _mm256_add_epi32(perm, _mm256_set1_epi32(static_cast<int32_t>(e0))));
    n += __builtin_popcount(static_cast<unsigned>(m));
  });
  r.n = n;
}

// Step 3 and the fallback.
inline void topk_finish(TopkRow& r, int64_t E, int64_t k) {
  if (r.ok && r.n >= k && r.n <= 64 &&
      rank_candidates(r.cval, reinterpret_cast<const int32_t*>(r.cand), r.n, k, r.tv, r.ti))
    return;
  portable::topk_row(r.v, E, k, r.tv, r.ti, r.cand, r.cval);  // NaN, many ties, equal candidates
}

inline void topk_row(const float* v, int64_t E, int64_t k, float* tv, int64_t* ti, int64_t* cand, float* cval) {
  if (k > 8 || E < 16) return portable::topk_row(v, E, k, tv, ti, cand, cval);
  TopkRow r{v, tv, ti, cand, cval, _mm256_setzero_ps()};
  topk_bound(r, E, k);
  topk_candidates(r, E);
  topk_finish(r, E, k);
}

// topk_row of two rows, step by step.
inline void topk_rows2(const float* const* v, int64_t E, int64_t k, float* const* tv, int64_t* const* ti,
                       int64_t* const* cand, float* const* cval) {
  if (k > 8 || E < 16) {
    for (int j = 0; j < 2; ++j) portable::topk_row(v[j], E, k, tv[j], ti[j], cand[j], cval[j]);
    return;
  }
  TopkRow a{v[0], tv[0], ti[0], cand[0], cval[0], _mm256_setzero_ps()};
  TopkRow b{v[1], tv[1], ti[1], cand[1], cval[1], _mm256_setzero_ps()};
  topk_bound(a, E, k);
  topk_bound(b, E, k);
  topk_candidates(a, E);
  topk_candidates(b, E);
  topk_finish(a, E, k);
  topk_finish(b, E, k);
}

// backward_row_softmax of router_rows.h: dx = s * (ds - <s, ds>) + zc * s with
// ds = dL/dprob_sum (valid rows) + the gate-weight gradient at the k chosen experts.
// Passes: max, exp (stored unnormalized; its sum and <ex, gp> on the way), output;
// s = ex / sum on the fly. Two steps (backward_exp, backward_out), so that
// backward_rows2_softmax can interleave two rows.
struct SoftmaxGradRow {
  float m, sum, dot_gp;
};

// Step 1: ex = exp(x - max), its sum and <ex, gp>.
inline SoftmaxGradRow backward_exp(const float* x, int64_t E, const float* gp, float* ex) {
  const float m = max_row(x, E);
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps(), dacc = _mm256_setzero_ps();
  for_blocks(x, E, -std::numeric_limits<float>::infinity(), [&](__m256 v, int64_t e, __m256i mask, auto whole) {
    const __m256 t = exp_nonpositive(_mm256_sub_ps(v, vm));
    acc = _mm256_add_ps(acc, t);
    dacc = _mm256_fmadd_ps(t, load(gp + e, mask, 0.0f, whole), dacc);  // <exp, gp>, for valid rows
    store(ex + e, t, mask, whole);
  });
  return {m, hsum(acc), hsum(dacc)};
}

// Step 2: the k chosen experts (k <= 8 lanes) and the output pass.
inline void backward_out(const SoftmaxGradRow& r, int64_t E, int64_t k, bool renormalize, bool valid, bool with_z,
                         const float* gp, const float* gw, const int64_t* idx, float gz, const float* ex, float* dx) {
  const float inv = 1.0f / r.sum;
  // ssel = s at the chosen experts, gsel = dL/ds there.
  const __m256i km = tail_mask(k);
  const __m256 ssel = gather_selected(ex, idx, k, inv);
  const __m256 gwv = _mm256_maskload_ps(gw, km);
  __m256 gsel = gwv;
  if (renormalize) {  // w_j = s_j / g: dL/ds_j = (gw_j - <gw, w>) / g
    const __m256 inv_g = _mm256_set1_ps(1.0f / hsum(ssel));
    const float gd = hsum(_mm256_mul_ps(gwv, _mm256_mul_ps(ssel, inv_g)));
    gsel = _mm256_and_ps(_mm256_mul_ps(_mm256_sub_ps(gwv, _mm256_set1_ps(gd)), inv_g), _mm256_castsi256_ps(km));
  }
  const __m256 sg = _mm256_mul_ps(ssel, gsel);
  const float dsel = hsum(sg);
  const __m256 vinv = _mm256_set1_ps(inv);
  if (valid) {
    const float dot = r.dot_gp * inv + dsel;
    const float zc = with_z ? 2.0f * gz * (r.m + std::log(r.sum)) : 0.0f;
    const __m256 vdot = _mm256_set1_ps(dot), vzc = _mm256_set1_ps(zc);
    for_blocks(ex, E, 0.0f, [&](__m256 t, int64_t e, __m256i mask, auto whole) {
      const __m256 s = _mm256_mul_ps(t, vinv);
      const __m256 d = _mm256_add_ps(_mm256_sub_ps(load(gp + e, mask, 0.0f, whole), vdot), vzc);
      store(dx + e, _mm256_mul_ps(s, d), mask, whole);
    });
  } else {
    const __m256 nd = _mm256_set1_ps(-dsel);
    for_blocks(ex, E, 0.0f, [&](__m256 t, int64_t e, __m256i mask, auto whole) {
      store(dx + e, _mm256_mul_ps(_mm256_mul_ps(t, vinv), nd), mask, whole);
    });
  }
  alignas(32) float add[8];
  _mm256_store_ps(add, sg);
  for (int64_t j = 0; j < k; ++j) dx[idx[j]] += add[j];
}

inline void backward_row_softmax(const float* x, int64_t E, int64_t k, bool renormalize, bool valid, bool with_z,
                                 const float* gp, const float* gw, const int64_t* idx, float gz, float* ex, float* dx) {
  if (k > 8) return portable::backward_row_softmax(x, E, k, renormalize, valid, with_z, gp, gw, idx, gz, ex, dx);
  backward_out(backward_exp(x, E, gp, ex), E, k, renormalize, valid, with_z, gp, gw, idx, gz, ex, dx);
}

// backward_row_softmax of two rows (arrays of 2), step by step so the core overlaps them.
inline void backward_rows2_softmax(const float* const* x, int64_t E, int64_t k, bool renormalize, const bool* valid,
                                   bool with_z, const float* gp, const float* const* gw, const int64_t* const* idx,
                                   float gz, float* const* ex, float* const* dx) {
  if (k > 8) {
    for (int j = 0; j < 2; ++j)
      portable::backward_row_softmax(x[j], E, k, renormalize, valid[j], with_z, gp, gw[j], idx[j], gz, ex[j], dx[j]);
    return;
  }
  const SoftmaxGradRow r0 = backward_exp(x[0], E, gp, ex[0]);
  const SoftmaxGradRow r1 = backward_exp(x[1], E, gp, ex[1]);
  backward_out(r0, E, k, renormalize, valid[0], with_z, gp, gw[0], idx[0], gz, ex[0], dx[0]);
  backward_out(r1, E, k, renormalize, valid[1], with_z, gp, gw[1], idx[1], gz, ex[1], dx[1]);
}

}  // namespace avx2
}  // namespace
}  // namespace trainops
TRAINOPS_TARGET_AVX2_FMA_END

#endif  // TRAINOPS_X86_DISPATCH
