// CUDA kernels of trainops::replay_sample: weighted replay sampling, row gather into the
// output batch after the fresh rows, and PER importance weights, enqueued on one stream with
// no host synchronization. Same rules as the CPU kernel (csrc/common/replay_common.h):
//
//   block stats   one thread per 32-slot block: fp64 sum (slot by slot) and smallest positive
//                 weight (computed here for recency / table modes; maintained for mode 1)
//   prefix        CUB exclusive scan of the block sums (fp64), CUB min of the block minima
//   sample        one thread per draw: Philox4x32-10 u_j, stratified target
//                 t_j = (j + u_j) / R * total, binary search over blocks, scan inside the block;
//                 without replacement: Gumbel-top-k keys log(u_i) / w_i sorted by CUB radix sort
//   weights       one block: PER w_j = (N P(j))^-beta / max w (buffer-wide or batch max)
//   gather        one thread block per sampled row, 16-byte vector copies per field
//
// PER: Schaul, Quan, Antonoglou, Silver, "Prioritized Experience Replay", ICLR 2016.
// Gumbel-top-k: Kool, van Hoof, Welling, ICML 2019; Efraimidis & Spirakis, IPL 2006.
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

__device__ __forceinline__ bool use_uniform(int64_t mode, double total) {
  return mode == replay::kUniform || !(total > 0.0) || !isfinite(total);
}

template <int64_t M>
__global__ void block_stats_kernel(replay::WeightSource src, int64_t nb, int64_t size, double* sums, double* mins) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < nb) replay::block_stat<M>(src, b, size, &sums[b], &mins[b]);
}

// scalars[0] = total weight, [1] = smallest positive weight (the CUB min wrote it already).
__global__ void total_kernel(const double* prefix, const double* sums, int64_t nb, double* scalars) {
  scalars[0] = prefix[nb - 1] + sums[nb - 1];
}

template <int64_t M>
__global__ void sample_kernel(replay::WeightSource src, const double* prefix, const double* sums, int64_t nb,
                              const double* scalars, int64_t size, int64_t n_fresh, int64_t n_replay, uint64_t seed,
                              uint64_t offset, int64_t* indices, double* wsel) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= n_replay) return;
  const double total = src.mode == replay::kUniform ? static_cast<double>(size) : scalars[0];
  const double u = philox::uniform01(philox::draw(seed, offset, static_cast<uint64_t>(j), philox::kSample));
  int64_t slot;
  if (use_uniform(src.mode, total)) {
    const double t = replay::stratified_target(j, n_replay, u, static_cast<double>(size));
    slot = static_cast<int64_t>(t);
    if (slot > size - 1) slot = size - 1;
    wsel[j] = 1.0;
  } else {
    const double t = replay::stratified_target(j, n_replay, u, total);
    slot = replay::locate<M>(src, prefix, sums, nb, size, t);
    wsel[j] = replay::weight_at<M>(src, slot);
  }
  indices[n_fresh + j] = slot;
}

__global__ void gumbel_keys_kernel(replay::WeightSource src, const double* scalars, int64_t size, uint64_t seed,
                                   uint64_t offset, double* keys, int32_t* slots) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= size) return;
  const double total = src.mode == replay::kUniform ? static_cast<double>(size) : scalars[0];
  const double w = use_uniform(src.mode, total) ? 1.0 : replay::slot_weight(src, i);
  const double u = philox::uniform_open01(philox::draw(seed, offset, static_cast<uint64_t>(i), philox::kGumbel));
  keys[i] = replay::gumbel_key(w, u);
  slots[i] = static_cast<int32_t>(i);
}

__global__ void take_top_kernel(replay::WeightSource src, const double* scalars, const int32_t* sorted_slots,
                                 int64_t size, int64_t n_fresh, int64_t n_replay, int64_t* indices, double* wsel) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= n_replay) return;
  const double total = src.mode == replay::kUniform ? static_cast<double>(size) : scalars[0];
  const int64_t slot = sorted_slots[j];
  indices[n_fresh + j] = slot;
  wsel[j] = use_uniform(src.mode, total) ? 1.0 : replay::slot_weight(src, slot);
}

// One block: fresh rows (index -1, weight 1), is_replay, and the importance weights.
__global__ void weights_kernel(int64_t mode, const double* scalars, const double* wsel, int64_t size,
                               int64_t n_fresh, int64_t n_replay, double beta, int32_t batch_max, int64_t* indices,
                               float* is_weights, bool* is_replay) {
  __shared__ double smin[1024];
  const double total = mode == replay::kUniform ? static_cast<double>(size) : scalars[0];
  const bool uniform = use_uniform(mode, total) || beta == 0.0;
  double ref = uniform ? 1.0 : scalars[1];
  if (!uniform && batch_max) {
    double m = INFINITY;
    for (int64_t j = threadIdx.x; j < n_replay; j += blockDim.x) {
      if (wsel[j] > 0.0 && wsel[j] < m) m = wsel[j];
    }
    smin[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s && smin[threadIdx.x + s] < smin[threadIdx.x]) smin[threadIdx.x] = smin[threadIdx.x + s];
      __syncthreads();
    }
    ref = smin[0];
  }
  for (int64_t r = threadIdx.x; r < n_fresh + n_replay; r += blockDim.x) {
    if (r < n_fresh) {
      indices[r] = -1;
      is_weights[r] = 1.0f;
      is_replay[r] = false;
    } else {
      is_weights[r] = uniform ? 1.0f
                              : replay::importance_weight(wsel[r - n_fresh], ref, total, static_cast<double>(size), beta);
      is_replay[r] = true;
    }
  }
}

__global__ void gather_kernel(Fields fields, const int32_t* lengths, const int64_t* indices, int64_t n_fresh) {
  const int64_t row = n_fresh + blockIdx.x;
  const int64_t slot = indices[row];
  for (int32_t f = 0; f < fields.n; ++f) {
    const TrainopsReplayField& fd = fields.f[f];
    int64_t copy = fd.row_bytes;
    if (fd.ragged) {
      int64_t len = lengths[slot];
      const int64_t row_len = fd.row_bytes / fd.elem_bytes;
      len = len < 0 ? 0 : (len > row_len ? row_len : len);
      copy = len * fd.elem_bytes;
    }
    copy_row(static_cast<const uint8_t*>(fd.src) + slot * fd.row_bytes,
             static_cast<uint8_t*>(fd.dst) + row * fd.row_bytes, copy, fd.row_bytes);
  }
}

struct Workspace {
  double* sums;
  double* mins;
  double* prefix;
  double* scalars;
  double* wsel;
  double* keys_in;
  double* keys_out;
  int32_t* slots_in;
  int32_t* slots_out;
  void* cub_temp;
  size_t cub_bytes;
};

// Lays the workspace out (base == nullptr: only counts the bytes).
size_t layout(const TrainopsReplaySampleArgs* a, uint8_t* base, Workspace* w) {
  const int64_t nb = (a->size + kBlock - 1) / kBlock;
  Carver c{base, 0};
  w->sums = c.take<double>(nb);
  w->mins = c.take<double>(nb);
  w->prefix = c.take<double>(nb);
  w->scalars = c.take<double>(4);
  w->wsel = c.take<double>(a->n_replay > 0 ? a->n_replay : 1);
  const bool gumbel = !a->replacement;
  w->keys_in = c.take<double>(gumbel ? a->size : 0);
  w->keys_out = c.take<double>(gumbel ? a->size : 0);
  w->slots_in = c.take<int32_t>(gumbel ? a->size : 0);
  w->slots_out = c.take<int32_t>(gumbel ? a->size : 0);
  size_t scan = 0, reduce = 0, sort = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
                                static_cast<int>(nb));
  cub::DeviceReduce::Min(nullptr, reduce, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
                         static_cast<int>(nb));
  if (gumbel) {
    cub::DeviceRadixSort::SortPairsDescending(nullptr, sort, static_cast<const double*>(nullptr),
                                              static_cast<double*>(nullptr), static_cast<const int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr), static_cast<int>(a->size));
  }
  size_t need = scan > reduce ? scan : reduce;
  need = need > sort ? need : sort;
  w->cub_bytes = need > 0 ? need : 1;
  w->cub_temp = c.take<uint8_t>(w->cub_bytes);
  return c.used;
}

}  // namespace
}  // namespace replay_cuda
}  // namespace trainops

using namespace trainops;
using namespace trainops::replay_cuda;

extern "C" size_t trainops_replay_sample_workspace(const TrainopsReplaySampleArgs* args) {
  Workspace w;
  return layout(args, nullptr, &w);
}

extern "C" int trainops_replay_sample(const TrainopsReplaySampleArgs* a, void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) {
  Workspace w;
  if (layout(a, nullptr, &w) > workspace_bytes) return static_cast<int>(cudaErrorInvalidValue);
  layout(a, static_cast<uint8_t*>(workspace), &w);
  const int64_t nb = (a->size + kBlock - 1) / kBlock;
  const int threads = 256;
  replay::WeightSource src{a->mode, a->weights, a->slot_key, a->table, a->table_size, a->now};
  const double* sums = w.sums;
  const double* mins = w.mins;
  if (a->n_replay > 0 && a->mode != replay::kUniform) {
    if (a->mode == replay::kWeights) {
      sums = a->block_stats;
      mins = a->block_stats + a->block_stride;
    } else {
      replay::dispatch_mode(a->mode, [&](auto m) {
        block_stats_kernel<decltype(m)::value><<<static_cast<unsigned>((nb + threads - 1) / threads), threads, 0,
                                                 stream>>>(src, nb, a->size, w.sums, w.mins);
      });
    }
    size_t bytes = w.cub_bytes;
    cub::DeviceScan::ExclusiveSum(w.cub_temp, bytes, sums, w.prefix, static_cast<int>(nb), stream);
    bytes = w.cub_bytes;
    cub::DeviceReduce::Min(w.cub_temp, bytes, mins, w.scalars + 1, static_cast<int>(nb), stream);
    total_kernel<<<1, 1, 0, stream>>>(w.prefix, sums, nb, w.scalars);
  }
  if (a->n_replay > 0) {
    const unsigned grid_r = static_cast<unsigned>((a->n_replay + threads - 1) / threads);
    if (a->replacement) {
      replay::dispatch_mode(a->mode, [&](auto m) {
        sample_kernel<decltype(m)::value><<<grid_r, threads, 0, stream>>>(
            src, w.prefix, sums, nb, w.scalars, a->size, a->n_fresh, a->n_replay, a->seed, a->offset, a->indices,
            w.wsel);
      });
    } else {
      const unsigned grid_s = static_cast<unsigned>((a->size + threads - 1) / threads);
      gumbel_keys_kernel<<<grid_s, threads, 0, stream>>>(src, w.scalars, a->size, a->seed, a->offset, w.keys_in,
                                                         w.slots_in);
      size_t bytes = w.cub_bytes;
      cub::DeviceRadixSort::SortPairsDescending(w.cub_temp, bytes, w.keys_in, w.keys_out, w.slots_in, w.slots_out,
                                                static_cast<int>(a->size), 0, 64, stream);
      take_top_kernel<<<grid_r, threads, 0, stream>>>(src, w.scalars, w.slots_out, a->size, a->n_fresh, a->n_replay,
                                                      a->indices, w.wsel);
    }
  }
  weights_kernel<<<1, 1024, 0, stream>>>(a->mode, w.scalars, w.wsel, a->size, a->n_fresh, a->n_replay, a->beta,
                                         a->batch_max, a->indices, a->is_weights, a->is_replay);
  if (a->n_replay > 0) {
    Fields fields;
    fields.n = a->n_fields;
    for (int32_t f = 0; f < a->n_fields; ++f) fields.f[f] = a->fields[f];
    gather_kernel<<<static_cast<unsigned>(a->n_replay), 64, 0, stream>>>(fields, a->lengths, a->indices,
                                                                          a->n_fresh);
  }
  return static_cast<int>(cudaGetLastError());
}
