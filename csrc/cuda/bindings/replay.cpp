// CUDA registrations of the fused replay ops: tensors -> the C launchers of
// csrc/cuda/replay.h, on the current stream, with the workspace from torch's caching
// allocator (trainops._C_cuda). Stable ABI only: the current stream comes from the C shim,
// so no CUDA header of torch is needed and the extension compiles against any torch build.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "../../common/boxing.h"
#include "../../common/op_checks.h"
#include "../../common/replay_common.h"
#include "../replay.h"

namespace trainops {
namespace {

using replay::kBlock;

// The current stream: aoti_torch_get_current_cuda_stream of torch's C shim, which lives in
// libtorch_cuda. Looked up at the first call in the libtorch_cuda that torch has loaded,
// rather than linked: the extension then builds against a CPU build of torch too (there is no
// libtorch_cuda to link there), and loads wherever torch is a CUDA build.
using CurrentStreamFn = AOTITorchError (*)(int32_t device_index, void** ret_stream);

CurrentStreamFn current_stream_fn() {
  static const CurrentStreamFn fn = [] {
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib != nullptr ? reinterpret_cast<CurrentStreamFn>(dlsym(lib, "aoti_torch_get_current_cuda_stream"))
                          : nullptr;
  }();
  TRAINOPS_CHECK(fn != nullptr, "trainops: the CUDA kernels need a CUDA build of torch (libtorch_cuda is not loaded)");
  return fn;
}

cudaStream_t current_stream(const Tensor& on) {
  void* stream = nullptr;
  TRAINOPS_CHECK(current_stream_fn()(on.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                 "trainops: reading the current CUDA stream failed");
  return static_cast<cudaStream_t>(stream);
}

void check_cuda(int err, const char* op) {
  TRAINOPS_CHECK(err == 0, "trainops.", op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void check_on(const Tensor& t, const Tensor& ref, const char* name) {
  TRAINOPS_CHECK_VALUE(st::same_device(t, ref), "trainops: '", name, "' is on ", st::device_str(t),
                       " but the storage is on ", st::device_str(ref));
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return st::empty_on({static_cast<int64_t>(bytes)}, ScalarType::Byte, like);
}

std::tuple<Tensor, Tensor, Tensor> replay_sample_cuda(
    const std::vector<Tensor>& storage, const std::vector<Tensor>& out, const std::optional<Tensor>& lengths,
    const std::vector<bool>& ragged, const std::optional<Tensor>& weights, const std::optional<Tensor>& block_stats,
    const std::optional<Tensor>& slot_key, const std::optional<Tensor>& table, int64_t mode, int64_t size,
    int64_t n_fresh, int64_t n_replay, int64_t now, double beta, bool batch_max, bool replacement, int64_t seed, int64_t offset) {
  TRAINOPS_CHECK_VALUE(!storage.empty() && storage.size() == out.size() && storage.size() == ragged.size(),
                       "trainops.replay_sample: storage, out and ragged must have the same, non-zero length");
  TRAINOPS_CHECK_VALUE(storage.size() <= TRAINOPS_REPLAY_MAX_FIELDS, "trainops.replay_sample: at most ",
                       TRAINOPS_REPLAY_MAX_FIELDS, " fields");
  const Tensor& dev = storage[0];  // the device of every argument
  torch::stable::accelerator::DeviceGuard guard(dev.get_device_index());
  checks::dim_at_least(storage[0], 1, "replay_sample", "storage[0]");
  const int64_t capacity = storage[0].size(0);
  checks::replay_sample_scalars(capacity, size, n_fresh, n_replay, mode, replacement, beta);
  const int64_t rows = n_fresh + n_replay;
  TRAINOPS_CHECK_VALUE(size < (int64_t{1} << 31), "trainops.replay_sample: at most 2^31 - 1 stored items on CUDA");
  TRAINOPS_CHECK_VALUE(n_replay < (int64_t{1} << 31), "trainops.replay_sample: at most 2^31 - 1 draws on CUDA");

  TrainopsReplaySampleArgs a{};
  a.n_fields = static_cast<int32_t>(storage.size());
  for (size_t f = 0; f < storage.size(); ++f) {
    const Tensor& s = storage[f];
    const Tensor& o = out[f];
    check_on(s, dev, "storage");
    check_on(o, dev, "out");
    TRAINOPS_CHECK_VALUE(s.dim() >= 1 && o.dim() == s.dim() && s.is_contiguous() && o.is_contiguous() &&
                          s.size(0) == capacity && o.size(0) == rows && s.scalar_type() == o.scalar_type() &&
                          st::same_sizes(s, o, 1),
                         "trainops.replay_sample: storage[", f, "] / out[", f, "] shapes or dtypes do not match");
    TRAINOPS_CHECK_VALUE(!ragged[f] || s.dim() == 2, "trainops.replay_sample: ragged field ", f,
                         " must be [capacity, L]");
    a.fields[f].src = s.data_ptr();
    a.fields[f].dst = o.data_ptr();
    a.fields[f].elem_bytes = s.element_size();
    a.fields[f].row_bytes = (s.numel() / capacity) * s.element_size();
    a.fields[f].ragged = ragged[f] ? 1 : 0;
    if (ragged[f]) {
      TRAINOPS_CHECK_VALUE(lengths.has_value() && lengths->scalar_type() == ScalarType::Int && lengths->numel() == capacity &&
                            lengths->is_contiguous(),
                           "trainops.replay_sample: ragged fields need int32 'lengths' [capacity]");
      check_on(*lengths, dev, "lengths");
      a.lengths = st::cdata<int32_t>(*lengths);
    }
  }
  a.mode = mode;
  if (mode == 1) {
    TRAINOPS_CHECK_VALUE(weights.has_value() && block_stats.has_value() && weights->scalar_type() == ScalarType::Float &&
                          block_stats->scalar_type() == ScalarType::Double && weights->numel() == capacity &&
                          weights->is_contiguous() && block_stats->dim() == 2 && block_stats->size(0) == 2 &&
                          block_stats->size(1) == (capacity + kBlock - 1) / kBlock && block_stats->is_contiguous(),
                         "trainops.replay_sample: mode 1 needs float32 weights and float64 block_stats");
    check_on(*weights, dev, "weights");
    check_on(*block_stats, dev, "block_stats");
    a.weights = st::cdata<float>(*weights);
    a.block_stats = st::cdata<double>(*block_stats);
    a.block_stride = block_stats->size(1);
  }
  if (mode == 2 || mode == 3) {
    TRAINOPS_CHECK_VALUE(slot_key.has_value() && slot_key->scalar_type() == ScalarType::Long && slot_key->numel() == capacity &&
                          slot_key->is_contiguous(),
                         "trainops.replay_sample: modes 2 and 3 need int64 slot_key [capacity]");
    check_on(*slot_key, dev, "slot_key");
    a.slot_key = st::cdata<int64_t>(*slot_key);
  }
  if (mode == 3) {
    TRAINOPS_CHECK_VALUE(table.has_value() && table->scalar_type() == ScalarType::Double && table->is_contiguous(),
                         "trainops.replay_sample: mode 3 needs a float64 table");
    check_on(*table, dev, "table");
    a.table = st::cdata<double>(*table);
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
  Tensor indices = st::empty_on({rows}, ScalarType::Long, dev);
  Tensor isw = st::empty_on({rows}, ScalarType::Float, dev);
  Tensor is_replay = st::empty_on({rows}, ScalarType::Bool, dev);
  a.indices = st::data<int64_t>(indices);
  a.is_weights = st::data<float>(isw);
  a.is_replay = st::data<bool>(is_replay);
  const size_t bytes = trainops_replay_sample_workspace(&a);
  Tensor ws = workspace(bytes, dev);
  check_cuda(trainops_replay_sample(&a, ws.data_ptr(), bytes, current_stream(dev)), "replay_sample");
  return {indices, isw, is_replay};
}

Tensor replay_insert_cuda(const std::vector<Tensor>& storage, const std::vector<Tensor>& batch, const Tensor& generations,
                          const Tensor& stamps, const Tensor& keys, int64_t mode, int64_t size, int64_t cursor,
                          int64_t step, int64_t seed) {
  TRAINOPS_CHECK_VALUE(!storage.empty() && storage.size() == batch.size() &&
                        storage.size() <= TRAINOPS_REPLAY_MAX_FIELDS,
                       "trainops.replay_insert: storage and batch must list the same fields (at most 16)");
  const Tensor& dev = storage[0];
  torch::stable::accelerator::DeviceGuard guard(dev.get_device_index());
  checks::dim_at_least(storage[0], 1, "replay_insert", "storage[0]");
  checks::dim_at_least(batch[0], 1, "replay_insert", "batch[0]");
  const int64_t capacity = storage[0].size(0);
  const int64_t n = batch[0].size(0);
  checks::replay_insert_scalars(capacity, n, mode, size, cursor);
  TRAINOPS_CHECK_VALUE(capacity < (int64_t{1} << 31) && n < (int64_t{1} << 31),
                       "trainops.replay_insert: capacity and batch must be below 2^31 on CUDA");
  TrainopsReplayInsertArgs a{};
  a.n_fields = static_cast<int32_t>(storage.size());
  for (size_t f = 0; f < storage.size(); ++f) {
    check_on(storage[f], dev, "storage");
    check_on(batch[f], dev, "batch");
    TRAINOPS_CHECK_VALUE(storage[f].dim() >= 1 && batch[f].dim() == storage[f].dim() && storage[f].is_contiguous() &&
                          batch[f].is_contiguous() && storage[f].size(0) == capacity && batch[f].size(0) == n &&
                          storage[f].scalar_type() == batch[f].scalar_type() && st::same_sizes(storage[f], batch[f], 1),
                         "trainops.replay_insert: field ", f, " does not match the storage");
    a.fields[f].src = batch[f].data_ptr();
    a.fields[f].dst = storage[f].data_ptr();
    a.fields[f].row_bytes = (storage[f].numel() / capacity) * storage[f].element_size();
    a.fields[f].elem_bytes = storage[f].element_size();
    a.fields[f].ragged = 0;
  }
  for (const Tensor* t : std::initializer_list<const Tensor*>{&generations, &stamps, &keys}) check_on(*t, dev, "state");
  TRAINOPS_CHECK_VALUE(generations.scalar_type() == ScalarType::Long && stamps.scalar_type() == ScalarType::Long &&
                        keys.scalar_type() == ScalarType::Double && generations.numel() == capacity &&
                        stamps.numel() == capacity && keys.numel() == capacity && generations.is_contiguous() &&
                        stamps.is_contiguous() && keys.is_contiguous(),
                       "trainops.replay_insert: generations/stamps int64 and keys float64, [capacity] each");
  Tensor slots = st::empty_on({n}, ScalarType::Long, generations);
  a.generations = st::data<int64_t>(generations);
  a.stamps = st::data<int64_t>(stamps);
  a.keys = st::data<double>(keys);
  a.mode = mode;
  a.capacity = capacity;
  a.n = n;
  a.size = size;
  a.cursor = cursor;
  a.step = step;
  a.seed = static_cast<uint64_t>(seed);
  a.slots = st::data<int64_t>(slots);
  const size_t bytes = trainops_replay_insert_workspace(&a);
  Tensor ws = workspace(bytes, generations);
  check_cuda(trainops_replay_insert(&a, ws.data_ptr(), bytes, current_stream(dev)), "replay_insert");
  return slots;
}

Tensor replay_update_priorities_cuda(const Tensor& priorities, const Tensor& weights, const Tensor& block_stats,
                                     const Tensor& winner, const Tensor& generations, const Tensor& indices,
                                     const Tensor& values, const std::optional<Tensor>& expected, double alpha,
                                     double eps, int64_t size) {
  const Tensor& dev = priorities;
  torch::stable::accelerator::DeviceGuard guard(dev.get_device_index());
  const int64_t capacity = priorities.numel();
  checks::replay_update_scalars(capacity, size, indices.numel(), alpha, eps);
  for (const Tensor* t :
       std::initializer_list<const Tensor*>{&weights, &block_stats, &winner, &generations, &indices, &values}) {
    check_on(*t, dev, "replay_update_priorities argument");
  }
  TRAINOPS_CHECK_VALUE(priorities.scalar_type() == ScalarType::Float && weights.scalar_type() == ScalarType::Float &&
                        block_stats.scalar_type() == ScalarType::Double && winner.scalar_type() == ScalarType::Int &&
                        generations.scalar_type() == ScalarType::Long && indices.scalar_type() == ScalarType::Long &&
                        values.scalar_type() == ScalarType::Float,
                       "trainops.replay_update_priorities: wrong dtypes");
  TRAINOPS_CHECK_VALUE(weights.numel() == capacity && winner.numel() == capacity && generations.numel() == capacity &&
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
  Tensor applied = st::empty_on({n}, ScalarType::Bool, dev);
  TrainopsReplayUpdateArgs a{};
  a.priorities = st::data<float>(priorities);
  a.weights = st::data<float>(weights);
  a.block_stats = st::data<double>(block_stats);
  a.block_stride = block_stats.size(1);
  a.winner = st::data<int32_t>(winner);
  a.generations = st::cdata<int64_t>(generations);
  a.indices = st::cdata<int64_t>(indices);
  a.values = st::cdata<float>(values);
  if (expected.has_value()) {
    check_on(*expected, dev, "expected_generations");
    TRAINOPS_CHECK_VALUE(expected->scalar_type() == ScalarType::Long && expected->numel() == n && expected->is_contiguous(),
                         "trainops.replay_update_priorities: expected_generations must be int64 like indices");
    a.expected = st::cdata<int64_t>(*expected);
  }
  a.n = n;
  a.capacity = capacity;
  a.size = size;
  a.alpha = alpha;
  a.eps = eps;
  a.applied = st::data<bool>(applied);
  check_cuda(trainops_replay_update_priorities(&a, current_stream(dev)), "replay_update_priorities");
  return applied;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(trainops, CUDA, m) {
  m.impl("replay_sample", TRAINOPS_BOX(&replay_sample_cuda));
  m.impl("replay_insert", TRAINOPS_BOX(&replay_insert_cuda));
  m.impl("replay_update_priorities", TRAINOPS_BOX(&replay_update_priorities_cuda));
}

}  // namespace trainops
