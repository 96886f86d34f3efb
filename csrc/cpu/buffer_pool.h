// Reuse of CPU buffers between calls, for the kernels' per-step outputs and scratch (the
// router's logits gradient, T x E, its weights, indices and per-chunk partial sums).
//
// Why: glibc returns freed blocks of a few MB to the kernel (mmap, or trimming the heap
// top), so the next step's buffer of the same size page-faults again: 4 KiB at a time,
// each zeroed by the kernel. At T = 16384, E = 64..256 that is 4-16 MB per buffer, and
// page-fault handling was ~17% of a router training step's time on 2 cores in `perf`.
// Training repeats its shapes, so a small pool of freed blocks, matched by exact byte
// size, removes nearly all of it (the CUDA caching allocator does the same for cudaMalloc).
//
// Blocks smaller than kMinBytes (64 KiB) go through torch's allocator. The pool keeps at most
// TRAINOPS_CPU_POOL_MB (default 256) of free blocks, evicting the oldest first;
// TRAINOPS_CPU_POOL_MB=0 turns it off (read at each allocation and free).
// torch.ops.trainops.cpu_pool_empty() frees the blocks it holds. Tensors from the pool are
// CPU tensors over the block (torch::stable::from_blob with a deleter that hands it back):
// they shrink in place, but their storage is not resizable, so growing one in place
// (Tensor.resize_ to more bytes) is an error; a copy (clone) grows like any tensor. The
// stable ABI offers no resizable storage with a custom deleter.
#pragma once

#include <initializer_list>

#include "../common/stable_tensor.h"

namespace trainops {

// An uninitialized contiguous CPU tensor of the given sizes and dtype, from the pool
// when it is at least kMinBytes.
Tensor pooled_empty(std::initializer_list<int64_t> sizes, ScalarType dtype);

// Bytes of free blocks the pool holds now; pool_empty frees them all.
int64_t pool_cached_bytes();
void pool_empty();

}  // namespace trainops
