// CUDA kernels of trainops::replay_insert (batched FIFO / reservoir insertion) and
// trainops::replay_update_priorities (generation-checked, duplicate-safe priority scatter).
// Same rules as csrc/cpu/replay_update.cpp; all work is enqueued on one stream.
//
// Reservoir (Vitter 1985, "Random sampling with a reservoir", by random keys): each stream
// item gets a Philox uniform key; the buffer keeps the `capacity` largest. A batch is merged by
// pairing its k-th largest key with the k-th smallest stored key (both from stable CUB radix
// sorts, so ties resolve as on the CPU): the pair swaps when the new key is larger. Duplicate
// priority updates: atomicMax of the entry position per slot picks the last valid writer.
#include <cub/cub.cuh>

#include "../common/replay_common.h"
#include "replay.h"
#include "replay_copy.cuh"

namespace trainops {
namespace replay_cuda {
namespace {

using replay::kBlock;

struct Fields {
  int32_t n;
  TrainopsReplayField f[TRAINOPS_REPLAY_MAX_FIELDS];
};

__global__ void fifo_slots_kernel(int64_t n, int64_t capacity, int64_t cursor, int64_t* slots) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  slots[i] = i >= n - capacity ? (cursor + i) % capacity : -1;
}

// Keys of the batch; the first nfill items take the free slots (their keys are stored now so
// the stored-key sort below sees them).
__global__ void reservoir_keys_kernel(int64_t n, int64_t nfill, int64_t size, int64_t cursor, uint64_t seed,
                                      double* batch_keys, int32_t* items, double* keys, int64_t* slots) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const double k = replay::reservoir_key(seed, cursor + i);
  batch_keys[i] = k;
  items[i] = static_cast<int32_t>(i);
  if (i < nfill) {
    slots[i] = size + i;
    keys[size + i] = k;
  } else {
    slots[i] = -1;
  }
}

__global__ void iota_kernel(int64_t n, int32_t* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = static_cast<int32_t>(i);
}

// Pair k: the k-th largest remaining batch key against the k-th smallest stored key. The keys
// are sorted opposite ways, so the accepted pairs are a prefix and every pair decides alone.
__global__ void reservoir_match_kernel(int64_t m, int64_t size, const double* bkeys_sorted, const int32_t* items_sorted,
                                       const double* skeys_sorted, const int32_t* slots_sorted, int64_t* slots) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= m) return;
  if (bkeys_sorted[k] > skeys_sorted[k]) {
    const int64_t s = slots_sorted[k];
    slots[items_sorted[k]] = s;
    if (s >= size) slots[s - size] = -1;  // filled earlier in this batch, displaced again
  }
}

// One block per batch item: copy its rows into its slot and stamp the slot.
__global__ void write_kernel(Fields fields, const int64_t* slots, const double* batch_keys, int64_t cursor,
                             int64_t step, int64_t* generations, int64_t* stamps, double* keys) {
  const int64_t i = blockIdx.x;
  const int64_t s = slots[i];
  if (s < 0) return;
  for (int32_t f = 0; f < fields.n; ++f) {
    const TrainopsReplayField& fd = fields.f[f];
    copy_row(static_cast<const uint8_t*>(fd.src) + i * fd.row_bytes, static_cast<uint8_t*>(fd.dst) + s * fd.row_bytes,
             fd.row_bytes, fd.row_bytes);
  }
  if (threadIdx.x == 0) {
    generations[s] = cursor + i;
    stamps[s] = step;
    if (batch_keys != nullptr) keys[s] = batch_keys[i];
  }
}

__device__ __forceinline__ bool update_valid(const TrainopsReplayUpdateArgs& a, int64_t j) {
  const int64_t s = a.indices[j];
  return s >= 0 && s < a.size && (a.expected == nullptr || a.generations[s] == a.expected[j]);
}

__global__ void claim_kernel(TrainopsReplayUpdateArgs a) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j < a.n && update_valid(a, j)) atomicMax(&a.winner[a.indices[j]], static_cast<int32_t>(j));
}

__global__ void apply_kernel(TrainopsReplayUpdateArgs a) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= a.n) return;
  const bool app = update_valid(a, j) && a.winner[a.indices[j]] == static_cast<int32_t>(j);
  a.applied[j] = app;
  if (app) {
    const int64_t s = a.indices[j];
    a.priorities[s] = a.values[j];
    a.weights[s] = replay::priority_weight(a.values[j], a.alpha, a.eps);
  }
}

// Each applied entry recomputes its block (entries sharing a block write identical values) and
// hands its winner cell back (-1) for the next call.
__global__ void refresh_kernel(TrainopsReplayUpdateArgs a) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= a.n || !a.applied[j]) return;
  const int64_t s = a.indices[j];
  const int64_t b = s / kBlock;
  const replay::WeightSource src{replay::kWeights, a.weights, nullptr, nullptr, 0, 0};
  replay::block_stat<replay::kWeights>(src, b, a.capacity, &a.block_stats[b], &a.block_stats[a.block_stride + b]);
  a.winner[s] = -1;
}

struct InsertWorkspace {
  double* bkeys;
  double* bkeys_sorted;
  int32_t* items;
  int32_t* items_sorted;
  double* skeys_sorted;
  int32_t* sslots;
  int32_t* sslots_sorted;
  void* cub_temp;
  size_t cub_bytes;
};

size_t insert_layout(const TrainopsReplayInsertArgs* a, uint8_t* base, InsertWorkspace* w) {
  Carver c{base, 0};
  const bool res = a->mode == 1;
  const int64_t n = res ? a->n : 0, cap = res ? a->capacity : 0;
  w->bkeys = c.take<double>(n);
  w->bkeys_sorted = c.take<double>(n);
  w->items = c.take<int32_t>(n);
  w->items_sorted = c.take<int32_t>(n);
  w->skeys_sorted = c.take<double>(cap);
  w->sslots = c.take<int32_t>(cap);
  w->sslots_sorted = c.take<int32_t>(cap);
  size_t s1 = 0, s2 = 0;
  if (res) {
    cub::DeviceRadixSort::SortPairsDescending(nullptr, s1, static_cast<const double*>(nullptr),
                                              static_cast<double*>(nullptr), static_cast<const int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr), static_cast<int>(n));
    cub::DeviceRadixSort::SortPairs(nullptr, s2, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
                                    static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                    static_cast<int>(cap));
  }
  w->cub_bytes = (s1 > s2 ? s1 : s2) + 1;
  w->cub_temp = c.take<uint8_t>(w->cub_bytes);
  return c.used;
}

}  // namespace
}  // namespace replay_cuda
}  // namespace trainops

using namespace trainops;
using namespace trainops::replay_cuda;

extern "C" size_t trainops_replay_insert_workspace(const TrainopsReplayInsertArgs* args) {
  InsertWorkspace w;
  return insert_layout(args, nullptr, &w);
}

extern "C" int trainops_replay_insert(const TrainopsReplayInsertArgs* a, void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) {
  InsertWorkspace w;
  if (insert_layout(a, nullptr, &w) > workspace_bytes) return static_cast<int>(cudaErrorInvalidValue);
  insert_layout(a, static_cast<uint8_t*>(workspace), &w);
  if (a->n <= 0) return 0;
  const int threads = 256;
  const unsigned grid_n = static_cast<unsigned>((a->n + threads - 1) / threads);
  const double* batch_keys = nullptr;
  if (a->mode == 0) {
    fifo_slots_kernel<<<grid_n, threads, 0, stream>>>(a->n, a->capacity, a->cursor, a->slots);
  } else {
    const int64_t free_slots = a->capacity - a->size;
    const int64_t nfill = a->n < free_slots ? a->n : free_slots;
    reservoir_keys_kernel<<<grid_n, threads, 0, stream>>>(a->n, nfill, a->size, a->cursor, a->seed, w.bkeys,
                                                          w.items, a->keys, a->slots);
    batch_keys = w.bkeys;
    const int64_t rest = a->n - nfill;
    if (rest > 0) {
      const int64_t m = rest < a->capacity ? rest : a->capacity;
      size_t bytes = w.cub_bytes;
      cub::DeviceRadixSort::SortPairsDescending(w.cub_temp, bytes, w.bkeys + nfill, w.bkeys_sorted, w.items + nfill,
                                                w.items_sorted, static_cast<int>(rest), 0, 64, stream);
      iota_kernel<<<static_cast<unsigned>((a->capacity + threads - 1) / threads), threads, 0, stream>>>(a->capacity,
                                                                                                          w.sslots);
      bytes = w.cub_bytes;
      cub::DeviceRadixSort::SortPairs(w.cub_temp, bytes, a->keys, w.skeys_sorted, w.sslots, w.sslots_sorted,
                                      static_cast<int>(a->capacity), 0, 64, stream);
      reservoir_match_kernel<<<static_cast<unsigned>((m + threads - 1) / threads), threads, 0, stream>>>(
          m, a->size, w.bkeys_sorted, w.items_sorted, w.skeys_sorted, w.sslots_sorted, a->slots);
    }
  }
  Fields fields;
  fields.n = a->n_fields;
  for (int32_t f = 0; f < a->n_fields; ++f) fields.f[f] = a->fields[f];
  write_kernel<<<static_cast<unsigned>(a->n), 64, 0, stream>>>(fields, a->slots, batch_keys, a->cursor, a->step,
                                                                a->generations, a->stamps, a->keys);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int trainops_replay_update_priorities(const TrainopsReplayUpdateArgs* a, cudaStream_t stream) {
  if (a->n <= 0) return 0;
  const int threads = 256;
  const unsigned grid = static_cast<unsigned>((a->n + threads - 1) / threads);
  claim_kernel<<<grid, threads, 0, stream>>>(*a);
  apply_kernel<<<grid, threads, 0, stream>>>(*a);
  refresh_kernel<<<grid, threads, 0, stream>>>(*a);
  return static_cast<int>(cudaGetLastError());
}
