// Counter-based Philox4x32-10 random numbers (Salmon, Moraes, Dror, Shaw: "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011), usable from host C++ and from CUDA device code.
//
// A draw is a pure function of (key, counter): every sample position j of every call gets its
// own counter, so CPU threads, CUDA threads and the NumPy reference
// (trainops.reference.replay.philox4x32) produce the same stream with no shared state.
//
// Round (10 of them, key bumped by the Weyl constants between rounds):
//   (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2        (32x32 -> 64-bit products)
//   c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TRAINOPS_HD __host__ __device__ __forceinline__
#else
#define TRAINOPS_HD inline
#endif

namespace trainops {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t x[4];
};

TRAINOPS_HD void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds on counter (c0, c1, c2, c3) and key (k0, k1).
TRAINOPS_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, &hi0, &lo0);
    mulhilo(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  U32x4 out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// Streams keep the draws of different purposes apart for the same (seed, offset, index).
enum Stream : uint32_t { kSample = 0, kGumbel = 1, kReservoir = 2 };

// The 128-bit counter of draw `index` of call `offset` in `stream`:
// (index lo, index hi, offset lo, offset hi << 4 | stream). Key: the 64-bit seed.
TRAINOPS_HD U32x4 draw(uint64_t seed, uint64_t offset, uint64_t index, uint32_t stream) {
  return philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                       static_cast<uint32_t>(offset), (static_cast<uint32_t>(offset >> 32) << 4) | (stream & 0xFu),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform double in [0, 1) from the top 53 bits of (x0, x1): exact, so every backend agrees.
TRAINOPS_HD double uniform01(const U32x4& r) {
  const uint64_t bits = ((static_cast<uint64_t>(r.x[0]) << 32) | r.x[1]) >> 11;
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
}

// Uniform double in (0, 1) (never 0: its logarithm stays finite), same bits as uniform01.
TRAINOPS_HD double uniform_open01(const U32x4& r) {
  const uint64_t bits = ((static_cast<uint64_t>(r.x[0]) << 32) | r.x[1]) >> 11;
  return (static_cast<double>(bits) + 0.5) * (1.0 / 9007199254740992.0);
}

}  // namespace philox
}  // namespace trainops
