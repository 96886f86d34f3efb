// Block-cooperative row copy used by the replay kernels: a thread block moves one row,
// 16 bytes per thread per step when both pointers and the length allow it (rows of 256 fp32
// or 1024 int32 are one or four steps of a 64-thread block), else 4 or 1 byte(s).
#pragma once

#include <cstdint>

namespace trainops {
namespace replay_cuda {

// Copies the first copy_bytes of a row of row_bytes and zero-fills the rest (ragged rows).
__device__ __forceinline__ void copy_row(const uint8_t* src, uint8_t* dst, int64_t copy_bytes, int64_t row_bytes) {
  const uintptr_t align =
      reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(row_bytes);
  if ((align & 15) == 0) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t k = threadIdx.x; k < row_bytes / 16; k += blockDim.x) {
      const int64_t lo = k * 16;
      if (lo + 16 <= copy_bytes) {
        d[k] = s[k];
      } else if (lo >= copy_bytes) {
        d[k] = make_int4(0, 0, 0, 0);
      } else {  // the one chunk that straddles the end of a ragged row
        union {
          int4 v;
          uint8_t b[16];
        } tmp;
        for (int b = 0; b < 16; ++b) tmp.b[b] = lo + b < copy_bytes ? src[lo + b] : 0;
        d[k] = tmp.v;
      }
    }
  } else if ((align & 3) == 0 && (copy_bytes & 3) == 0) {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    const int64_t nc = copy_bytes / 4, nr = row_bytes / 4;
    for (int64_t k = threadIdx.x; k < nr; k += blockDim.x) d[k] = k < nc ? s[k] : 0u;
  } else {
    for (int64_t k = threadIdx.x; k < row_bytes; k += blockDim.x) dst[k] = k < copy_bytes ? src[k] : 0;
  }
}

inline size_t align_up(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

// Carves consecutive 256-byte aligned pieces out of one workspace allocation.
struct Carver {
  uint8_t* base;
  size_t used;
  template <typename T>
  T* take(size_t count) {
    T* p = base == nullptr ? nullptr : reinterpret_cast<T*>(base + used);
    used += align_up(count * sizeof(T));
    return p;
  }
};

}  // namespace replay_cuda
}  // namespace trainops
