// Code tables and scalar encode/decode of the blockwise quantization formats.
//
// Shared by the CPU kernels (and by any CUDA kernel: everything here is plain C++
// on floats and integers, `inline` and free of torch). The Triton kernels in
// kernels/quantize.py and the reference in trainops/reference/quantize.py implement
// exactly the same arithmetic, so all three produce the same bytes.
//
// Per block: scale = absmax / max_code (one ulp less where max_code * scale would overflow:
// block_scale), y = |x| / scale clamped to max_code, then
// y is rounded onto the format's magnitude grid (round to nearest, ties to the even
// code) or, stochastically, to one of its two neighbours with probability
// proportional to the distance (unbiased). The sign is kept apart; a zero magnitude
// is always stored with a positive sign so the bytes are deterministic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace trainops {
namespace quant {

enum class Format : int { INT8 = 0, INT4 = 1, FP8_E4M3 = 2, FP4_E3M0 = 3, FP4_E2M1 = 4 };

constexpr int bits_of(Format f) {
  return (f == Format::INT4 || f == Format::FP4_E3M0 || f == Format::FP4_E2M1) ? 4 : 8;
}

constexpr float max_code_of(Format f) {
  switch (f) {
    case Format::INT8: return 127.0f;
    case Format::INT4: return 7.0f;
    case Format::FP8_E4M3: return 448.0f;
    case Format::FP4_E3M0: return 1.0f;
    case Format::FP4_E2M1: return 6.0f;
  }
  return 1.0f;
}

// Magnitudes of the 3-bit index of the FP4 formats, and the midpoints between
// neighbours (index j sits between value j and j + 1).
// fp4_e3m0: 1 sign, 3 exponent bits, no mantissa: 0 and 2^(e-7) for e = 1..7.
constexpr float kE3M0Values[8] = {0.0f, 0.015625f, 0.03125f, 0.0625f, 0.125f, 0.25f, 0.5f, 1.0f};
constexpr float kE3M0Mids[7] = {0.0078125f, 0.0234375f, 0.046875f, 0.09375f, 0.1875f, 0.375f, 0.75f};
// fp4_e2m1 (OCP MX FP4): 1 sign, 2 exponent bits, 1 mantissa bit.
constexpr float kE2M1Values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
constexpr float kE2M1Mids[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};

// Round-half-to-even of a non-negative float below 2^22, by the classic
// add-and-subtract 2^23 trick; it needs no rounding-mode state and is what the
// Triton kernel does too. (Built without -ffast-math, so it is not folded away.)
inline float round_half_even(float t) {
  const float big = 8388608.0f;
  return (t + big) - big;
}

// Counter-based uniform in [0, 1): lowbias32 hash of (element index, seed key).
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

inline float uniform01(int64_t index, uint32_t key) {
  uint32_t h = lowbias32(static_cast<uint32_t>(index) ^ key);
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// 3-bit magnitude index of y on an FP4 grid, round to nearest, ties to even index.
inline uint32_t fp4_index_nearest(float y, const float* mids) {
  return static_cast<uint32_t>(y > mids[0]) + static_cast<uint32_t>(y >= mids[1]) +
         static_cast<uint32_t>(y > mids[2]) + static_cast<uint32_t>(y >= mids[3]) +
         static_cast<uint32_t>(y > mids[4]) + static_cast<uint32_t>(y >= mids[5]) +
         static_cast<uint32_t>(y > mids[6]);
}

inline uint32_t fp4_index_stochastic(float y, const float* values, float u) {
  uint32_t lo = 0;
  for (int j = 1; j < 8; ++j) lo += (y >= values[j]);
  uint32_t hi = lo < 7 ? lo + 1 : 7;
  float gap = values[hi] - values[lo];
  float p = gap > 0.0f ? (y - values[lo]) / gap : 0.0f;
  return lo + (u < p ? 1u : 0u);
}

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

inline float bits_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// The block's scale: absmax / max_code, one ulp smaller when max_code * that rounds to +Inf
// (absmax within a rounding of FLT_MAX), so every code decodes to a finite value. One ulp is
// enough: s <= (absmax / max_code)(1 + 2^-24) and ulp(s) > s * 2^-24 give
// (s - ulp(s)) * max_code < absmax <= FLT_MAX. Any other absmax keeps the plain quotient.
inline float block_scale(float absmax, float max_code) {
  const float s = absmax / max_code;
  const float top = s * max_code;
  return top > 3.40282346638528859812e+38f ? bits_float(float_bits(s) - 1u) : s;
}

// 2^e for e in the normal range, exactly.
inline float pow2(int32_t e) { return bits_float(static_cast<uint32_t>(e + 127) << 23); }

// e4m3fn magnitude code (7 bits) of y >= 0, saturating at 448. Branch-free so loops vectorize.
inline uint32_t fp8_e4m3_code(float y, bool stochastic, float u) {
  // Quantum of the binade holding y: 2^(E-3) for normals, 2^-9 for subnormals.
  int32_t exponent = static_cast<int32_t>((float_bits(y) >> 23) & 0xFF) - 127;
  exponent = exponent < -6 ? -6 : exponent;
  const float quantum = pow2(exponent - 3);
  const float t = y / quantum;
  float r;
  if (stochastic) {
    const float lo = std::floor(t);
    r = lo + (u < (t - lo) ? 1.0f : 0.0f);
  } else {
    r = round_half_even(t);
  }
  const float v = std::min(r * quantum, 448.0f);
  const uint32_t vb = float_bits(v);
  const uint32_t normal = ((((vb >> 23) & 0xFF) - 120) << 3) | ((vb >> 20) & 7);  // (e + 7) << 3 | m
  return v < 0.015625f ? static_cast<uint32_t>(r) : normal;
}

inline float fp8_e4m3_value(uint32_t code7) {
  uint32_t e = code7 >> 3, m = code7 & 7;
  if (e == 0) return static_cast<float>(m) * 0.001953125f;  // m * 2^-9
  return (8.0f + static_cast<float>(m)) * pow2(static_cast<int32_t>(e) - 10);
}

// Encode one value given the block's scale (> 0). Returns the raw code: a byte for
// 8-bit formats, a nibble for 4-bit ones. Written without branches (selects and bit
// operations only) so that a loop over it vectorizes.
template <Format F, bool Stochastic>
inline uint32_t encode(float x, float scale, float u) {
  // y can exceed max_code by a rounding of the division; the clamp is applied after
  // rounding (same result, since max_code is on every grid) because clamping first
  // keeps GCC from vectorizing the loop.
  constexpr float max_code = max_code_of(F);
  const float y = std::fabs(x) / scale;
  const uint32_t negative = float_bits(x) >> 31;
  if constexpr (F == Format::INT8 || F == Format::INT4) {
    float m;
    if constexpr (Stochastic) {
      const float lo = std::floor(y);
      m = lo + static_cast<float>(u < (y - lo));
    } else {
      m = round_half_even(y);
    }
    m = std::min(m, max_code);
    const uint32_t mag = static_cast<uint32_t>(static_cast<int32_t>(m));
    const uint32_t q = (mag ^ (0u - negative)) + negative;  // two's complement negate if negative
    return q & (F == Format::INT8 ? 0xFFu : 0xFu);
  } else if constexpr (F == Format::FP8_E4M3) {
    const uint32_t c = fp8_e4m3_code(y, Stochastic, u);
    return c | ((negative & static_cast<uint32_t>(c != 0)) << 7);
  } else {
    constexpr bool kE3M0 = F == Format::FP4_E3M0;
    const uint32_t idx = Stochastic ? fp4_index_stochastic(y, kE3M0 ? kE3M0Values : kE2M1Values, u)
                                    : fp4_index_nearest(y, kE3M0 ? kE3M0Mids : kE2M1Mids);
    return idx | ((negative & static_cast<uint32_t>(idx != 0)) << 3);
  }
}

// Signed value (before scaling) of a raw code.
inline float decode(Format f, uint32_t code) {
  switch (f) {
    case Format::INT8: return static_cast<float>(static_cast<int8_t>(code & 0xFF));
    case Format::INT4: return static_cast<float>(static_cast<int32_t>(code & 0xF) - ((code & 0x8) ? 16 : 0));
    case Format::FP8_E4M3: {
      float v = fp8_e4m3_value(code & 0x7F);
      return (code & 0x80) ? -v : v;
    }
    case Format::FP4_E3M0:
    case Format::FP4_E2M1: {
      float v = (f == Format::FP4_E3M0 ? kE3M0Values : kE2M1Values)[code & 0x7];
      return (code & 0x8) ? -v : v;
    }
  }
  return 0.0f;
}

}  // namespace quant
}  // namespace trainops
