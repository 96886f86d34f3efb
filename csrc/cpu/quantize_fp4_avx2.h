// AVX2 encoder for the FP4 formats (E3M0, E2M1) with round-to-nearest: 16 values per
// step into 8 packed bytes (low nibble = even element). The same arithmetic as
// quant::encode<F, false> (IEEE division by the scale, the same 7 mid-point compares,
// ties to the even code), so the bytes equal the scalar kernel's and the reference's.
// It replaces two auto-vectorized loops (encode into bytes, then pack pairs) whose
// strided packing loop the compiler leaves mostly scalar.
#pragma once

#include "cpu_isa.h"

// Compiled on every x86-64 build (target attribute); quantize.cpp calls it only on CPUs
// with AVX2 (cpu_isa::has_avx2_fma).
#if defined(TRAINOPS_X86_DISPATCH)
#define TRAINOPS_QUANTIZE_FP4_AVX2 1

#include <immintrin.h>

#include <cstdint>

TRAINOPS_TARGET_AVX2_FMA_BEGIN
namespace trainops {
namespace quant_avx2 {

// Codes (int32 lanes, 0..15) of 8 values: magnitude index on the grid whose mid-points
// are mids (y > mids[0], y >= mids[1], ... as fp4_index_nearest), sign bit 3 unless 0.
inline __m256i fp4_codes8(__m256 x, __m256 scale, const __m256* mids) {
  const __m256 y = _mm256_div_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), scale);
  __m256i neg_idx = _mm256_castps_si256(_mm256_cmp_ps(y, mids[0], _CMP_GT_OQ));  // -index
  neg_idx = _mm256_add_epi32(neg_idx, _mm256_castps_si256(_mm256_cmp_ps(y, mids[1], _CMP_GE_OQ)));
  neg_idx = _mm256_add_epi32(neg_idx, _mm256_castps_si256(_mm256_cmp_ps(y, mids[2], _CMP_GT_OQ)));
  neg_idx = _mm256_add_epi32(neg_idx, _mm256_castps_si256(_mm256_cmp_ps(y, mids[3], _CMP_GE_OQ)));
  neg_idx = _mm256_add_epi32(neg_idx, _mm256_castps_si256(_mm256_cmp_ps(y, mids[4], _CMP_GT_OQ)));
  neg_idx = _mm256_add_epi32(neg_idx, _mm256_castps_si256(_mm256_cmp_ps(y, mids[5], _CMP_GE_OQ)));
  neg_idx = _mm256_add_epi32(neg_idx, _mm256_castps_si256(_mm256_cmp_ps(y, mids[6], _CMP_GT_OQ)));
  const __m256i idx = _mm256_sub_epi32(_mm256_setzero_si256(), neg_idx);
  const __m256i sign = _mm256_srli_epi32(_mm256_castps_si256(x), 31);
  const __m256i nonzero = _mm256_cmpgt_epi32(idx, _mm256_setzero_si256());
  return _mm256_or_si256(idx, _mm256_slli_epi32(_mm256_and_si256(sign, nonzero), 3));
}

// Packs 16 codes (a: elements 0..7, b: 8..15) into 8 bytes, element 2j in the low nibble.
inline void store_nibbles16(__m256i a, __m256i b, uint8_t* out) {
  const __m256i even_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  a = _mm256_permutevar8x32_epi32(a, even_odd);
  b = _mm256_permutevar8x32_epi32(b, even_odd);
  const __m128i pa = _mm_or_si128(_mm256_castsi256_si128(a), _mm_slli_epi32(_mm256_extracti128_si256(a, 1), 4));
  const __m128i pb = _mm_or_si128(_mm256_castsi256_si128(b), _mm_slli_epi32(_mm256_extracti128_si256(b, 1), 4));
  const __m128i words = _mm_packus_epi32(pa, pb);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(words, words));
}

// Decoded values (code magnitude from the 8-entry table, sign from bit 3) of 8 codes,
// exactly quant::decode: a code with bit 3 set decodes to the negated magnitude.
inline __m256 fp4_decode8(__m256i codes, __m256 magnitudes) {
  const __m256 mag = _mm256_permutevar8x32_ps(magnitudes, _mm256_and_si256(codes, _mm256_set1_epi32(7)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(8)), 28);
  return _mm256_xor_ps(mag, _mm256_castsi256_ps(sign));
}

// Encodes values[0, n16) (n16 a multiple of 16) into out[0, n16 / 2). With a residual
// (error-feedback quantization), also error[i] = values[i] - decode(code_i) * scale:
// the product rounded, then the difference, as the scalar loop computes it (the build
// disables FMA contraction), so the residual is bit-identical to it. Computing it here,
// while the codes are still in registers, replaces a scalar pass that unpacks each
// nibble and looks it up again.
template <bool kResidual>
inline void encode_fp4_nearest(const float* values, int64_t n16, float scale, const float* mid_table,
                               const float* magnitudes, uint8_t* out, float* error) {
  __m256 mids[7];
  for (int j = 0; j < 7; ++j) mids[j] = _mm256_set1_ps(mid_table[j]);
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256 mags = _mm256_loadu_ps(magnitudes);
  for (int64_t i = 0; i < n16; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(values + i);
    const __m256 x1 = _mm256_loadu_ps(values + i + 8);
    const __m256i a = fp4_codes8(x0, vs, mids);
    const __m256i b = fp4_codes8(x1, vs, mids);
    store_nibbles16(a, b, out + i / 2);
    if constexpr (kResidual) {
      _mm256_storeu_ps(error + i, _mm256_sub_ps(x0, _mm256_mul_ps(fp4_decode8(a, mags), vs)));
      _mm256_storeu_ps(error + i + 8, _mm256_sub_ps(x1, _mm256_mul_ps(fp4_decode8(b, mags), vs)));
    }
  }
}

}  // namespace quant_avx2
}  // namespace trainops
TRAINOPS_TARGET_AVX2_FMA_END

#endif  // TRAINOPS_X86_DISPATCH
