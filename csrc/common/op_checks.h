// Argument checks shared by the op entry points of every backend (csrc/cpu/*.cpp and the CUDA
// bindings csrc/cuda/bindings/*.cpp). Users can call torch.ops.trainops.* directly, so each
// entry point validates every size, index, device and dtype it relies on; a bad argument is a
// Python TypeError / ValueError / IndexError naming it, never an out-of-bounds access.
//
// Host-only (errors.h: ValueError / TypeError / IndexError); nothing here reads device memory.
//
// Index tensors supplied by callers, and what each backend does with an entry out of range:
//   router_topk_backward 'indices'  CPU: IndexError (a pass over T x k before the kernel).
//                                   CUDA (Triton): no host sync; the kernel only compares
//                                   indices with column ids and writes NaN over the gradient
//                                   row of a token naming an expert outside [0, E).
//   replay_update_priorities        both: entries outside [0, size) are ignored and reported
//     'indices'                     as not applied (documented semantics, no error); with
//                                   0 <= size <= capacity checked on the host, no write leaves
//                                   the buffers. The CUDA kernels apply the same rule on device.
//   mora_bwd 'idx'                  CPU: IndexError. CUDA (Triton): compare-based, an entry
//                                   out of range selects no rank (no memory addressed by it).
//   replay_sample slot_key/lengths  both: clamped by the kernels (key outside the table weighs
//                                   0; lengths clamped to [0, L]).
#pragma once

#include "stable_tensor.h"

#include <cmath>
#include <cstdint>
#include <limits>

namespace trainops {
namespace checks {

// t lives on the device of `ref` (the device the kernel runs on).
inline void on_device_of(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TRAINOPS_CHECK_VALUE(st::same_device(t, ref), "trainops.", op, ": '", name, "' is on ", st::device_str(t),
                       " but the op runs on ", st::device_str(ref), " (all tensor arguments must be on one device)");
}

// t is a CPU tensor (the CPU kernels).
inline void on_cpu(const Tensor& t, const char* op, const char* name) {
  TRAINOPS_CHECK_VALUE(t.is_cpu(), "trainops.", op, ": '", name, "' is on ", st::device_str(t),
                       " but the op runs on cpu (all tensor arguments must be on one device)");
}

inline void dim_at_least(const Tensor& t, int64_t d, const char* op, const char* name) {
  TRAINOPS_CHECK_VALUE(t.dim() >= d, "trainops.", op, ": '", name, "' must have at least ", d, " dimension(s), got ",
                       t.dim(), "-D");
}

// Every idx[i] in [0, hi): a cheap host pass (the CPU kernels index memory with them).
inline void indices_in_range(const int64_t* idx, int64_t n, int64_t hi, const char* op, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    TRAINOPS_CHECK_INDEX(idx[i] >= 0 && idx[i] < hi, "trainops.", op, ": '", name, "' holds ", idx[i], " at position ", i,
                         "; every entry must be in [0, ", hi, ")");
  }
}

inline void finite_scalar(double v, const char* op, const char* name) {
  TRAINOPS_CHECK_VALUE(std::isfinite(v), "trainops.", op, ": '", name, "' must be finite, got ", v);
}

// replay_update_priorities: slots < size are live, size <= capacity (slots past capacity do not
// exist; the kernels write priorities / weights / block_stats / winner of every live slot named).
inline void replay_update_scalars(int64_t capacity, int64_t size, int64_t n, double alpha, double eps) {
  const char* op = "replay_update_priorities";
  TRAINOPS_CHECK_VALUE(size >= 0 && size <= capacity, "trainops.", op, ": 'size' must be in [0, capacity=", capacity,
                       "], got ", size);
  TRAINOPS_CHECK_VALUE(n < (int64_t{1} << 31), "trainops.", op, ": at most 2^31 - 1 entries in 'indices', got ", n);
  finite_scalar(alpha, op, "alpha");
  finite_scalar(eps, op, "eps");
  TRAINOPS_CHECK_VALUE(eps >= 0.0, "trainops.", op, ": 'eps' must be >= 0, got ", eps);
}

// replay_insert: mode 0 FIFO / 1 reservoir; size items stored (<= capacity), cursor = stream
// serial of the batch's first item (>= size); serials cursor .. cursor + n - 1 must fit in int64.
inline void replay_insert_scalars(int64_t capacity, int64_t n, int64_t mode, int64_t size, int64_t cursor) {
  const char* op = "replay_insert";
  TRAINOPS_CHECK_VALUE(mode == 0 || mode == 1, "trainops.", op, ": 'eviction' must be 0 (fifo) or 1 (reservoir), got ",
                       mode);
  TRAINOPS_CHECK_VALUE(capacity >= 1, "trainops.", op, ": the storage has capacity 0 (no slot to write)");
  TRAINOPS_CHECK_VALUE(size >= 0 && size <= capacity, "trainops.", op, ": 'size' must be in [0, capacity=", capacity,
                       "], got ", size);
  TRAINOPS_CHECK_VALUE(cursor >= size, "trainops.", op, ": 'cursor' must be >= size (", size, "), got ", cursor);
  TRAINOPS_CHECK_VALUE(cursor <= std::numeric_limits<int64_t>::max() - n, "trainops.", op, ": 'cursor' (", cursor,
                       ") + batch size (", n, ") overflows int64");
}

// replay_sample: size in [1, capacity], counts >= 0, without replacement at most size draws,
// mode 0..3, beta finite and >= 0.
inline void replay_sample_scalars(int64_t capacity, int64_t size, int64_t n_fresh, int64_t n_replay, int64_t mode,
                                  bool replacement, double beta) {
  const char* op = "replay_sample";
  TRAINOPS_CHECK_VALUE(size > 0 && size <= capacity, "trainops.", op, ": 'size' must be in [1, capacity=", capacity,
                       "], got ", size, " (empty buffer?)");
  TRAINOPS_CHECK_VALUE(n_fresh >= 0 && n_replay >= 0, "trainops.", op, ": 'n_fresh' and 'n_replay' must be >= 0, got ",
                       n_fresh, " and ", n_replay);
  TRAINOPS_CHECK_VALUE(n_fresh <= std::numeric_limits<int64_t>::max() - n_replay, "trainops.", op,
                       ": 'n_fresh' + 'n_replay' overflows int64");
  TRAINOPS_CHECK_VALUE(replacement || n_replay <= size, "trainops.", op, ": cannot draw ", n_replay,
                       " rows without replacement from ", size, " stored items");
  TRAINOPS_CHECK_VALUE(mode >= 0 && mode <= 3, "trainops.", op, ": 'weight_mode' must be in [0, 3], got ", mode);
  TRAINOPS_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0, "trainops.", op, ": 'beta' must be finite and >= 0, got ",
                       beta);
}

}  // namespace checks
}  // namespace trainops
