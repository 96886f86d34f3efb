// AVX2 decode of blockwise-quantized codes into fp32, 16 elements per step, for
// dequantize and dequantize_accumulate with an fp32 output.
//
// Every decoded value equals quant::decode(F, code) bit for bit, so with the same
// operations in the same order (value * scale, then one IEEE add per chunk, chunks in
// order; no FMA) the sums equal the portable kernel's and the reference's:
//   4-bit formats: the upper 16 bits of the value from two pshufb byte tables (a
//     table look-up in registers instead of 16 scalar loads; see Nibble_table);
//   int8: sign-extend and convert (the code's int8 value is exact in fp32);
//   fp8_e4m3: normals by moving the 7 exponent+mantissa bits into an fp32 and adding
//     120 to its exponent (2^(e-7) (1 + m/8)); subnormals (e = 0) as m * 2^-9 from an
//     integer convert, so no fp32 denormal is formed (a process with DAZ set still gets
//     the table's values); the sign bit OR-ed in (-v of the table, -0.0 included).
#pragma once

#include "cpu_isa.h"

// Compiled on every x86-64 build (target attribute); quantize.cpp calls it only on CPUs
// with AVX2 (cpu_isa::has_avx2_fma).
#if defined(TRAINOPS_X86_DISPATCH)
#define TRAINOPS_DEQUANTIZE_AVX2 1

#include <immintrin.h>

#include <cstdint>

#include "../common/quant_format.h"

TRAINOPS_TARGET_AVX2_FMA_BEGIN
namespace trainops {
namespace quant_avx2 {

// The 16 signed values of a 4-bit format as byte tables for pshufb. Every value of the
// three 4-bit formats (0, +-2^-6 .. +-1; 0, +-0.5 .. +-6; -8 .. 7) has at most 7
// significant bits, so the low 16 bits of its fp32 pattern are zero and bytes 2 and 3
// are the whole value: two 16-entry byte look-ups (one shuffle each, cheap on every
// AVX2 CPU, unlike a 32-bit vpermps on Zen 1) rebuild the exact fp32.
struct Nibble_table {
  __m128i byte2, byte3;
};

inline Nibble_table nibble_table(quant::Format f) {
  alignas(16) uint8_t b2[16], b3[16];
  for (uint32_t c = 0; c < 16; ++c) {
    const uint32_t bits = quant::float_bits(quant::decode(f, c));
    b2[c] = static_cast<uint8_t>(bits >> 16);
    b3[c] = static_cast<uint8_t>(bits >> 24);
  }
  return {_mm_load_si128(reinterpret_cast<const __m128i*>(b2)), _mm_load_si128(reinterpret_cast<const __m128i*>(b3))};
}

// Elements 16k .. 16k+15 of a packed 4-bit stream (bytes = the stream + 8k; element 2j
// in the low nibble of byte j).
inline void decode16_nibbles(const uint8_t* bytes, const Nibble_table& t, __m256& a, __m256& b) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  const __m128i codes = _mm_unpacklo_epi8(lo, hi);  // 16 codes in element order
  const __m128i b2 = _mm_shuffle_epi8(t.byte2, codes);
  const __m128i b3 = _mm_shuffle_epi8(t.byte3, codes);
  const __m128i upper0 = _mm_unpacklo_epi8(b2, b3);  // bits 16..31 of elements 0..7
  const __m128i upper1 = _mm_unpackhi_epi8(b2, b3);  // of elements 8..15
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(upper0), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(upper1), 16));
}

inline __m256 decode8_int8(const uint8_t* codes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes))));
}

inline __m256 decode8_fp8_e4m3(const uint8_t* codes) {
  // Sign-extended, so bit 31 is the code's sign bit.
  const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7F));
  const __m256i normal_bits = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23));
  const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0.001953125f));  // m * 2^-9
  const __m256i exponent_zero = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag);  // mag < 8: e = 0
  const __m256 value = _mm256_blendv_ps(_mm256_castsi256_ps(normal_bits), subnormal,
                                        _mm256_castsi256_ps(exponent_zero));
  const __m256i sign = _mm256_and_si256(c, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  return _mm256_or_ps(value, _mm256_castsi256_ps(sign));
}

// Signed values of elements [e, e + 16) of one chunk's codes (e a multiple of 16).
template <quant::Format F>
inline void decode16(const uint8_t* chunk, int64_t e, const Nibble_table& t, __m256& a, __m256& b) {
  if constexpr (quant::bits_of(F) == 4) {
    decode16_nibbles(chunk + e / 2, t, a, b);
  } else if constexpr (F == quant::Format::INT8) {
    a = decode8_int8(chunk + e);
    b = decode8_int8(chunk + e + 8);
  } else {
    a = decode8_fp8_e4m3(chunk + e);
    b = decode8_fp8_e4m3(chunk + e + 8);
  }
}

// out[e] (+)= sum over chunks c of decode(code of e) * scales[c * scale_stride + e / block_size],
// chunks in order, for e in [e0, e1) (both multiples of 16; block_size = 2^block_log2 >= 16).
// Accumulate: the running value starts from out; otherwise chunk 0's term is assigned
// (so a decoded -0.0 stays -0.0, as in the portable kernel).
template <quant::Format F, bool Accumulate>
void dequantize_range(const uint8_t* data, int64_t data_stride, const float* scales, int64_t scale_stride,
                      int64_t chunks, int block_log2, int64_t e0, int64_t e1, float* out) {
  const Nibble_table t = quant::bits_of(F) == 4 ? nibble_table(F) : Nibble_table{};
  for (int64_t e = e0; e < e1; e += 16) {
    const int64_t block = e >> block_log2;
    __m256 a, b;
    int64_t c = 0;
    if constexpr (Accumulate) {
      a = _mm256_loadu_ps(out + e);
      b = _mm256_loadu_ps(out + e + 8);
    } else {
      const __m256 s = _mm256_broadcast_ss(scales + block);
      decode16<F>(data, e, t, a, b);
      a = _mm256_mul_ps(a, s);
      b = _mm256_mul_ps(b, s);
      c = 1;
    }
    for (; c < chunks; ++c) {
      const __m256 s = _mm256_broadcast_ss(scales + c * scale_stride + block);
      __m256 da, db;
      decode16<F>(data + c * data_stride, e, t, da, db);
      a = _mm256_add_ps(a, _mm256_mul_ps(da, s));
      b = _mm256_add_ps(b, _mm256_mul_ps(db, s));
    }
    _mm256_storeu_ps(out + e, a);
    _mm256_storeu_ps(out + e + 8, b);
  }
}

}  // namespace quant_avx2
}  // namespace trainops
TRAINOPS_TARGET_AVX2_FMA_END

#endif  // TRAINOPS_X86_DISPATCH
