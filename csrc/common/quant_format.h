// Code tables and scalar encode/decode of the blockwise quantization formats.
//
// Shared by the CPU kernels (and by any CUDA kernel: everything here is plain C++
// on floats and integers, `inline` and free of torch). The Triton kernels in
// kernels/quantize.py and the reference in trainops/reference/quantize.py implement
// exactly the same arithmetic, so all three produce the same bytes.
//
// Per block: scale = absmax / max_code, y = |x| / scale clamped to max_code, then
// y is rounded onto the format's magnitude grid (round to nearest, ties to the even
// code) or, stochastically, to one of its two neighbours with probability
// proportional to the distance (unbiased). The sign is kept apart; a zero magnitude
// is always stored with a positive sign so the bytes are deterministic.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace trainops {
namespace quant {

enum class Format : int { INT8 = 0, INT4 = 1, FP8_E4M3 = 2, FP4_E3M0 = 3, FP4_E2M1 = 4 };

inline int bits_of(Format f) {
  return (f == Format::INT4 || f == Format::FP4_E3M0 || f == Format::FP4_E2M1) ? 4 : 8;
}

inline float max_code_of(Format f) {
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
  uint32_t idx = 0;
  for (int j = 0; j < 7; ++j) idx += (j % 2 == 0) ? (y > mids[j]) : (y >= mids[j]);
  return idx;
}

inline uint32_t fp4_index_stochastic(float y, const float* values, float u) {
  uint32_t lo = 0;
  for (int j = 1; j < 8; ++j) lo += (y >= values[j]);
  uint32_t hi = lo < 7 ? lo + 1 : 7;
  float gap = values[hi] - values[lo];
  float p = gap > 0.0f ? (y - values[lo]) / gap : 0.0f;
  return lo + (u < p ? 1u : 0u);
}

// e4m3fn magnitude code (7 bits) of y in [0, 448].
inline uint32_t fp8_e4m3_code(float y, bool stochastic, float u) {
  // Quantum of the binade holding y: 2^(E-3) for normals, 2^-9 for subnormals.
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  int exponent = static_cast<int>((bits >> 23) & 0xFF) - 127;
  if (exponent < -6) exponent = -6;
  float quantum = std::ldexp(1.0f, exponent - 3);
  float t = y / quantum;
  float r;
  if (stochastic) {
    float lo = std::floor(t);
    r = lo + (u < (t - lo) ? 1.0f : 0.0f);
  } else {
    r = round_half_even(t);
  }
  float v = r * quantum;
  if (v < 0.015625f) return static_cast<uint32_t>(r);  // subnormal: code is the mantissa count
  std::memcpy(&bits, &v, sizeof(bits));
  int e = static_cast<int>((bits >> 23) & 0xFF) - 127;
  return static_cast<uint32_t>(((e + 7) << 3) | ((bits >> 20) & 7));
}

inline float fp8_e4m3_value(uint32_t code7) {
  uint32_t e = code7 >> 3, m = code7 & 7;
  if (e == 0) return std::ldexp(static_cast<float>(m), -9);
  return std::ldexp(1.0f + static_cast<float>(m) * 0.125f, static_cast<int>(e) - 7);
}

// Encode one value given the block's scale (> 0). Returns the raw code: a byte for
// 8-bit formats, a nibble for 4-bit ones.
inline uint32_t encode(Format f, float x, float scale, float max_code, bool stochastic, float u) {
  float y = std::fabs(x) / scale;
  y = y < max_code ? y : max_code;
  bool negative = x < 0.0f;
  switch (f) {
    case Format::INT8:
    case Format::INT4: {
      float m;
      if (stochastic) {
        float lo = std::floor(y);
        m = lo + (u < (y - lo) ? 1.0f : 0.0f);
      } else {
        m = round_half_even(y);
      }
      int32_t q = negative ? -static_cast<int32_t>(m) : static_cast<int32_t>(m);
      return static_cast<uint32_t>(q) & (f == Format::INT8 ? 0xFFu : 0xFu);
    }
    case Format::FP8_E4M3: {
      uint32_t c = fp8_e4m3_code(y, stochastic, u);
      return (negative && c != 0) ? (c | 0x80u) : c;
    }
    case Format::FP4_E3M0:
    case Format::FP4_E2M1: {
      bool e3m0 = f == Format::FP4_E3M0;
      uint32_t idx = stochastic ? fp4_index_stochastic(y, e3m0 ? kE3M0Values : kE2M1Values, u)
                                : fp4_index_nearest(y, e3m0 ? kE3M0Mids : kE2M1Mids);
      return (negative && idx != 0) ? (idx | 0x8u) : idx;
    }
  }
  return 0;
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
