// CUDA registrations of the fused replay ops: tensors -> the C launchers of
// csrc/cuda/replay.h, on the current stream, with the workspace from torch's caching
// allocator. Built only where a CUDA build of torch exists (trainops._C_cuda).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "../../common/op_checks.h"
#include "../../common/replay_common.h"
#include "../replay.h"

namespace trainops {
namespace {

using replay::kBlock;

void check_cuda(int err, const char* op) {
  TORCH_CHECK(err == 0, "trainops.", op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void check_on(const at::Tensor& t, const at::Device& d, const char* name) {
  TORCH_CHECK_VALUE(t.device() == d, "trainops: '", name, "' is on ", t.device(), " but the storage is on ", d);
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> replay_sample_cuda(
    at::TensorList storage, at::TensorList out, const std::optional<at::Tensor>& lengths,
    const c10::List<bool>& ragged, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& block_stats, const std::optional<at::Tensor>& slot_key,
    const std::optional<at::Tensor>& table, int64_t mode, int64_t size, int64_t n_fresh, int64_t n_replay,
    int64_t now, double beta, bool batch_max, bool replacement, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(!storage.empty() && storage.size() == out.size() && storage.size() == ragged.size(),
                    "trainops.replay_sample: storage, out and ragged must have the same, non-zero length");
  TORCH_CHECK_VALUE(storage.size() <= TRAINOPS_REPLAY_MAX_FIELDS, "trainops.replay_sample: at most ",
                    TRAINOPS_REPLAY_MAX_FIELDS, " fields");
  const at::Device dev = storage[0].device();
  c10::cuda::CUDAGuard guard(dev);
  checks::dim_at_least(storage[0], 1, "replay_sample", "storage[0]");
  const int64_t capacity = storage[0].size(0);
  checks::replay_sample_scalars(capacity, size, n_fresh, n_replay, mode, replacement, beta);
  const int64_t rows = n_fresh + n_replay;
  TORCH_CHECK_VALUE(size < (int64_t{1} << 31), "trainops.replay_sample: at most 2^31 - 1 stored items on CUDA");
  TORCH_CHECK_VALUE(n_replay < (int64_t{1} << 31), "trainops.replay_sample: at most 2^31 - 1 draws on CUDA");

  TrainopsReplaySampleArgs a{};
  a.n_fields = static_cast<int32_t>(storage.size());
  for (size_t f = 0; f < storage.size(); ++f) {
    const at::Tensor& s = storage[f];
    const at::Tensor& o = out[f];
    check_on(s, dev, "storage");
    check_on(o, dev, "out");
    TORCH_CHECK_VALUE(s.dim() >= 1 && o.dim() == s.dim() && s.is_contiguous() && o.is_contiguous() &&
                          s.size(0) == capacity && o.size(0) == rows && s.scalar_type() == o.scalar_type() &&
                          s.sizes().slice(1) == o.sizes().slice(1),
                      "trainops.replay_sample: storage[", f, "] / out[", f, "] shapes or dtypes do not match");
    TORCH_CHECK_VALUE(!ragged.get(f) || s.dim() == 2, "trainops.replay_sample: ragged field ", f,
                      " must be [capacity, L]");
    a.fields[f].src = s.const_data_ptr();
    a.fields[f].dst = o.data_ptr();
    a.fields[f].elem_bytes = s.element_size();
    a.fields[f].row_bytes = (s.numel() / capacity) * s.element_size();
    a.fields[f].ragged = ragged.get(f) ? 1 : 0;
    if (ragged.get(f)) {
      TORCH_CHECK_VALUE(lengths.has_value() && lengths->scalar_type() == at::kInt && lengths->numel() == capacity &&
                            lengths->is_contiguous(),
                        "trainops.replay_sample: ragged fields need int32 'lengths' [capacity]");
      check_on(*lengths, dev, "lengths");
      a.lengths = lengths->const_data_ptr<int32_t>();
    }
  }
  a.mode = mode;
  if (mode == 1) {
    TORCH_CHECK_VALUE(weights.has_value() && block_stats.has_value() && weights->scalar_type() == at::kFloat &&
                          block_stats->scalar_type() == at::kDouble && weights->numel() == capacity &&
                          weights->is_contiguous() && block_stats->dim() == 2 && block_stats->size(0) == 2 &&
                          block_stats->size(1) == (capacity + kBlock - 1) / kBlock && block_stats->is_contiguous(),
                      "trainops.replay_sample: mode 1 needs float32 weights and float64 block_stats");
    check_on(*weights, dev, "weights");
    check_on(*block_stats, dev, "block_stats");
    a.weights = weights->const_data_ptr<float>();
    a.block_stats = block_stats->const_data_ptr<double>();
    a.block_stride = block_stats->size(1);
  }
  if (mode == 2 || mode == 3) {
    TORCH_CHECK_VALUE(slot_key.has_value() && slot_key->scalar_type() == at::kLong && slot_key->numel() == capacity &&
                          slot_key->is_contiguous(),
                      "trainops.replay_sample: modes 2 and 3 need int64 slot_key [capacity]");
    check_on(*slot_key, dev, "slot_key");
    a.slot_key = slot_key->const_data_ptr<int64_t>();
  }
  if (mode == 3) {
    TORCH_CHECK_VALUE(table.has_value() && table->scalar_type() == at::kDouble && table->is_contiguous(),
                      "trainops.replay_sample: mode 3 needs a float64 table");
    check_on(*table, dev, "table");
    a.table = table->const_data_ptr<double>();
    a.table_size = table->numel();
  }
  a.capacity = capacity;
  a.size = size;
  a.n_fresh = n_fresh;
  a.n_replay = n_replay;
  a.now = now;
  a.beta = beta;
  a.batch_max = batch_max ? 1 : 0;
  a.replacement = replacement ? 1 : 0;
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  at::Tensor indices = at::empty({rows}, storage[0].options().dtype(at::kLong));
  at::Tensor isw = at::empty({rows}, storage[0].options().dtype(at::kFloat));
  at::Tensor is_replay = at::empty({rows}, storage[0].options().dtype(at::kBool));
  a.indices = indices.data_ptr<int64_t>();
  a.is_weights = isw.data_ptr<float>();
  a.is_replay = is_replay.data_ptr<bool>();
  const size_t bytes = trainops_replay_sample_workspace(&a);
  at::Tensor ws = workspace(bytes, storage[0]);
  check_cuda(trainops_replay_sample(&a, ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream().stream()), "replay_sample");
  return {indices, isw, is_replay};
}

at::Tensor replay_insert_cuda(at::TensorList storage, at::TensorList batch, at::Tensor generations, at::Tensor stamps,
                              at::Tensor keys, int64_t mode, int64_t size, int64_t cursor, int64_t step,
                              int64_t seed) {
  TORCH_CHECK_VALUE(!storage.empty() && storage.size() == batch.size() &&
                        storage.size() <= TRAINOPS_REPLAY_MAX_FIELDS,
                    "trainops.replay_insert: storage and batch must list the same fields (at most 16)");
  const at::Device dev = storage[0].device();
  c10::cuda::CUDAGuard guard(dev);
  checks::dim_at_least(storage[0], 1, "replay_insert", "storage[0]");
  checks::dim_at_least(batch[0], 1, "replay_insert", "batch[0]");
  const int64_t capacity = storage[0].size(0);
  const int64_t n = batch[0].size(0);
  checks::replay_insert_scalars(capacity, n, mode, size, cursor);
  TORCH_CHECK_VALUE(capacity < (int64_t{1} << 31) && n < (int64_t{1} << 31),
                    "trainops.replay_insert: capacity and batch must be below 2^31 on CUDA");
  TrainopsReplayInsertArgs a{};
  a.n_fields = static_cast<int32_t>(storage.size());
  for (size_t f = 0; f < storage.size(); ++f) {
    check_on(storage[f], dev, "storage");
    check_on(batch[f], dev, "batch");
    TORCH_CHECK_VALUE(storage[f].dim() >= 1 && batch[f].dim() == storage[f].dim() && storage[f].is_contiguous() &&
                          batch[f].is_contiguous() && storage[f].size(0) == capacity && batch[f].size(0) == n &&
                          storage[f].scalar_type() == batch[f].scalar_type() &&
                          storage[f].sizes().slice(1) == batch[f].sizes().slice(1),
                      "trainops.replay_insert: field ", f, " does not match the storage");
    a.fields[f].src = batch[f].const_data_ptr();
    a.fields[f].dst = storage[f].data_ptr();
    a.fields[f].row_bytes = (storage[f].numel() / capacity) * storage[f].element_size();
    a.fields[f].elem_bytes = storage[f].element_size();
    a.fields[f].ragged = 0;
  }
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&generations, &stamps, &keys}) check_on(*t, dev, "state");
  TORCH_CHECK_VALUE(generations.scalar_type() == at::kLong && stamps.scalar_type() == at::kLong &&
                        keys.scalar_type() == at::kDouble && generations.numel() == capacity &&
                        stamps.numel() == capacity && keys.numel() == capacity && generations.is_contiguous() &&
                        stamps.is_contiguous() && keys.is_contiguous(),
                    "trainops.replay_insert: generations/stamps int64 and keys float64, [capacity] each");
  at::Tensor slots = at::empty({n}, generations.options());
  a.generations = generations.data_ptr<int64_t>();
  a.stamps = stamps.data_ptr<int64_t>();
  a.keys = keys.data_ptr<double>();
  a.mode = mode;
  a.capacity = capacity;
  a.n = n;
  a.size = size;
  a.cursor = cursor;
  a.step = step;
  a.seed = static_cast<uint64_t>(seed);
  a.slots = slots.data_ptr<int64_t>();
  const size_t bytes = trainops_replay_insert_workspace(&a);
  at::Tensor ws = workspace(bytes, generations);
  check_cuda(trainops_replay_insert(&a, ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream().stream()), "replay_insert");
  return slots;
}

at::Tensor replay_update_priorities_cuda(at::Tensor priorities, at::Tensor weights, at::Tensor block_stats,
                                         at::Tensor winner, const at::Tensor& generations, const at::Tensor& indices,
                                         const at::Tensor& values, const std::optional<at::Tensor>& expected,
                                         double alpha, double eps, int64_t size) {
  const at::Device dev = priorities.device();
  c10::cuda::CUDAGuard guard(dev);
  const int64_t capacity = priorities.numel();
  checks::replay_update_scalars(capacity, size, indices.numel(), alpha, eps);
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&weights, &block_stats, &winner, &generations, &indices, &values}) {
    check_on(*t, dev, "replay_update_priorities argument");
  }
  TORCH_CHECK_VALUE(priorities.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat &&
                        block_stats.scalar_type() == at::kDouble && winner.scalar_type() == at::kInt &&
                        generations.scalar_type() == at::kLong && indices.scalar_type() == at::kLong &&
                        values.scalar_type() == at::kFloat,
                    "trainops.replay_update_priorities: wrong dtypes");
  TORCH_CHECK_VALUE(weights.numel() == capacity && winner.numel() == capacity && generations.numel() == capacity &&
                        block_stats.dim() == 2 && block_stats.size(0) == 2 &&
                        block_stats.size(1) == (capacity + kBlock - 1) / kBlock && indices.numel() == values.numel() &&
                        priorities.is_contiguous() && weights.is_contiguous() && winner.is_contiguous() &&
                        generations.is_contiguous() && block_stats.is_contiguous() && indices.is_contiguous() &&
                        values.is_contiguous(),
                    "trainops.replay_update_priorities: wrong shapes (contiguous [capacity] state, block_stats [2, ",
                    (capacity + kBlock - 1) / kBlock, "], indices and values of one length)");
  // Index values are not read on the host (a sync): the kernels ignore entries outside [0, size)
  // (reported as not applied), and size <= capacity (checked above) keeps every write in bounds.
  const int64_t n = indices.numel();
  at::Tensor applied = at::empty({n}, indices.options().dtype(at::kBool));
  TrainopsReplayUpdateArgs a{};
  a.priorities = priorities.data_ptr<float>();
  a.weights = weights.data_ptr<float>();
  a.block_stats = block_stats.data_ptr<double>();
  a.block_stride = block_stats.size(1);
  a.winner = winner.data_ptr<int32_t>();
  a.generations = generations.const_data_ptr<int64_t>();
  a.indices = indices.const_data_ptr<int64_t>();
  a.values = values.const_data_ptr<float>();
  if (expected.has_value()) {
    check_on(*expected, dev, "expected_generations");
    TORCH_CHECK_VALUE(expected->scalar_type() == at::kLong && expected->numel() == n && expected->is_contiguous(),
                      "trainops.replay_update_priorities: expected_generations must be int64 like indices");
    a.expected = expected->const_data_ptr<int64_t>();
  }
  a.n = n;
  a.capacity = capacity;
  a.size = size;
  a.alpha = alpha;
  a.eps = eps;
  a.applied = applied.data_ptr<bool>();
  check_cuda(trainops_replay_update_priorities(&a, c10::cuda::getCurrentCUDAStream().stream()), "replay_update_priorities");
  return applied;
}

}  // namespace

TORCH_LIBRARY_IMPL(trainops, CUDA, m) {
  m.impl("replay_sample", &replay_sample_cuda);
  m.impl("replay_insert", &replay_insert_cuda);
  m.impl("replay_update_priorities", &replay_update_priorities_cuda);
}

}  // namespace trainops
