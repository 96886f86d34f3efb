// CPU kernels of trainops::replay_insert (batched FIFO / reservoir insertion) and
// trainops::replay_update_priorities (generation-checked, duplicate-safe priority scatter with
// refresh of the touched blocks' sums and minima). Rules: csrc/common/replay_common.h and
// trainops.reference.replay.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/boxing.h"
#include "../common/op_checks.h"
#include "../common/replay_common.h"

namespace trainops {
namespace {

using replay::kBlock;

constexpr int64_t kFifo = 0;
constexpr int64_t kReservoir = 1;

void check_state(const Tensor& t, ScalarType dtype, int64_t capacity, const char* name) {
  TRAINOPS_CHECK_VALUE(t.is_cpu(), "trainops: '", name, "' must be a CPU tensor, got ", st::device_str(t));
  TRAINOPS_CHECK_TYPE(t.scalar_type() == dtype, "trainops: '", name, "' must be ", dtype, ", got ", t.scalar_type());
  TRAINOPS_CHECK_VALUE(t.is_contiguous() && t.numel() == capacity, "trainops: '", name,
                       "' must be contiguous with capacity (", capacity, ") elements");
}

// Slot of every batch item (-1: not stored). FIFO: item i of the batch is the stream's item
// cursor + i and goes to slot (cursor + i) mod capacity; when the batch is larger than the
// buffer only its last `capacity` items are written (the last writer wins, deterministically).
// Reservoir: free slots are filled in order; then the i-th largest remaining batch key replaces
// the i-th smallest stored key while it is larger (this keeps the top-capacity keys of the union;
// an item that filled a slot earlier in the same batch can be displaced again, and is then -1).
std::vector<int64_t> assign_slots(int64_t mode, int64_t n, int64_t capacity, int64_t size, int64_t cursor,
                                  uint64_t seed, double* keys, std::vector<double>& batch_keys) {
  std::vector<int64_t> slots(n, -1);
  if (mode == kFifo) {
    for (int64_t i = std::max<int64_t>(0, n - capacity); i < n; ++i) slots[i] = (cursor + i) % capacity;
    return slots;
  }
  batch_keys.resize(n);
  for (int64_t i = 0; i < n; ++i) batch_keys[i] = replay::reservoir_key(seed, cursor + i);
  const int64_t nfill = std::min(n, capacity - size);
  for (int64_t i = 0; i < nfill; ++i) {
    slots[i] = size + i;
    keys[size + i] = batch_keys[i];
  }
  const int64_t rest = n - nfill;
  if (rest <= 0) return slots;
  const int64_t m = std::min(rest, capacity);
  std::vector<int64_t> items(rest);
  for (int64_t i = 0; i < rest; ++i) items[i] = nfill + i;
  auto desc = [&](int64_t a, int64_t b) {
    return batch_keys[a] > batch_keys[b] || (batch_keys[a] == batch_keys[b] && a < b);
  };
  std::sort(items.begin(), items.end(), desc);
  std::vector<int64_t> stored(capacity);
  for (int64_t s = 0; s < capacity; ++s) stored[s] = s;
  auto asc = [&](int64_t a, int64_t b) { return keys[a] < keys[b] || (keys[a] == keys[b] && a < b); };
  std::nth_element(stored.begin(), stored.begin() + (m - 1), stored.end(), asc);
  std::sort(stored.begin(), stored.begin() + m, asc);
  for (int64_t k = 0; k < m; ++k) {
    if (!(batch_keys[items[k]] > keys[stored[k]])) break;
    slots[items[k]] = stored[k];
    // A slot filled earlier in this batch lost its item again: that item is not stored.
    if (stored[k] >= size) slots[stored[k] - size] = -1;
  }
  return slots;
}

Tensor replay_insert_cpu(const std::vector<Tensor>& storage, const std::vector<Tensor>& batch, const Tensor& generations,
                         const Tensor& stamps, const Tensor& keys, int64_t mode, int64_t size, int64_t cursor,
                         int64_t step, int64_t seed) {
  TRAINOPS_CHECK_VALUE(!storage.empty() && storage.size() == batch.size(),
                       "trainops.replay_insert: 'storage' and 'batch' must list the same, non-empty set of fields");
  checks::dim_at_least(storage[0], 1, "replay_insert", "storage[0]");
  checks::dim_at_least(batch[0], 1, "replay_insert", "batch[0]");
  const int64_t capacity = storage[0].size(0);
  const int64_t n = batch[0].size(0);
  checks::replay_insert_scalars(capacity, n, mode, size, cursor);
  for (size_t f = 0; f < storage.size(); ++f) {
    checks::on_cpu(storage[f], "replay_insert", "storage");
    checks::on_cpu(batch[f], "replay_insert", "batch");
    checks::dim_at_least(storage[f], 1, "replay_insert", "storage");
    checks::dim_at_least(batch[f], 1, "replay_insert", "batch");
    TRAINOPS_CHECK_VALUE(storage[f].is_contiguous() && storage[f].size(0) == capacity && batch[f].is_contiguous() &&
                          batch[f].size(0) == n && batch[f].dim() == storage[f].dim(),
                         "trainops.replay_insert: field ", f, " must be contiguous [capacity, ...] / [n, ...]");
    TRAINOPS_CHECK_TYPE(batch[f].scalar_type() == storage[f].scalar_type(), "trainops.replay_insert: field ", f,
                        " has dtype ", batch[f].scalar_type(), " but the buffer stores ", storage[f].scalar_type());
    for (int64_t d = 1; d < storage[f].dim(); ++d) {
      TRAINOPS_CHECK_VALUE(batch[f].size(d) == storage[f].size(d), "trainops.replay_insert: field ", f,
                           " row shape differs from the buffer's");
    }
  }
  check_state(generations, ScalarType::Long, capacity, "generations");
  check_state(stamps, ScalarType::Long, capacity, "stamps");
  check_state(keys, ScalarType::Double, capacity, "keys");
  int64_t* gen = st::data<int64_t>(generations);
  int64_t* stamp = st::data<int64_t>(stamps);
  double* key = st::data<double>(keys);
  std::vector<double> batch_keys;
  const std::vector<int64_t> slots =
      assign_slots(mode, n, capacity, size, cursor, static_cast<uint64_t>(seed), key, batch_keys);

  // Raw pointers gathered first: each Tensor accessor is a call into torch.
  std::vector<int64_t> rows_bytes(storage.size());
  std::vector<uint8_t*> dst(storage.size());
  std::vector<const uint8_t*> src(storage.size());
  for (size_t f = 0; f < storage.size(); ++f) {
    rows_bytes[f] = (capacity > 0 ? storage[f].numel() / capacity : 0) * static_cast<int64_t>(storage[f].element_size());
    dst[f] = static_cast<uint8_t*>(storage[f].data_ptr());
    src[f] = static_cast<const uint8_t*>(batch[f].data_ptr());
  }
  torch::stable::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = slots[i];
      if (s < 0) continue;
      for (size_t f = 0; f < storage.size(); ++f) {
        std::memcpy(dst[f] + s * rows_bytes[f], src[f] + i * rows_bytes[f], rows_bytes[f]);
      }
      gen[s] = cursor + i;
      stamp[s] = step;
      if (mode == kReservoir) key[s] = batch_keys[i];
    }
  });
  Tensor out = st::empty_cpu({n}, ScalarType::Long);
  std::copy(slots.begin(), slots.end(), st::data<int64_t>(out));
  return out;
}

// Entry j is valid when 0 <= indices[j] < size and (no expectation or the slot's generation
// still equals expected_generations[j]: an overwritten slot ignores the stale update). Among
// valid entries naming the same slot the last one wins. Returns which entries were applied.
Tensor replay_update_priorities_cpu(const Tensor& priorities, const Tensor& weights, const Tensor& block_stats,
                                    const Tensor& winner, const Tensor& generations, const Tensor& indices,
                                    const Tensor& values, const std::optional<Tensor>& expected, double alpha, double eps,
                                    int64_t size) {
  const int64_t capacity = priorities.numel();
  checks::replay_update_scalars(capacity, size, indices.numel(), alpha, eps);
  check_state(priorities, ScalarType::Float, capacity, "priorities");
  check_state(weights, ScalarType::Float, capacity, "weights");
  check_state(winner, ScalarType::Int, capacity, "winner");
  check_state(generations, ScalarType::Long, capacity, "generations");
  const int64_t nbc = (capacity + kBlock - 1) / kBlock;
  TRAINOPS_CHECK_VALUE(block_stats.scalar_type() == ScalarType::Double && block_stats.is_contiguous() &&
                        block_stats.dim() == 2 && block_stats.size(0) == 2 && block_stats.size(1) == nbc,
                       "trainops.replay_update_priorities: 'block_stats' must be contiguous float64 [2, ", nbc, "]");
  checks::on_cpu(block_stats, "replay_update_priorities", "block_stats");
  checks::on_cpu(indices, "replay_update_priorities", "indices");
  checks::on_cpu(values, "replay_update_priorities", "values");
  TRAINOPS_CHECK_TYPE(indices.scalar_type() == ScalarType::Long && values.scalar_type() == ScalarType::Float,
                      "trainops.replay_update_priorities: 'indices' must be int64 and 'values' float32");
  TRAINOPS_CHECK_VALUE(indices.dim() == 1 && values.dim() == 1 && indices.numel() == values.numel() &&
                        indices.is_contiguous() && values.is_contiguous(),
                       "trainops.replay_update_priorities: 'indices' and 'values' must be contiguous 1-D of one length");
  const int64_t n = indices.numel();
  const int64_t* exp = nullptr;
  if (expected.has_value()) {
    checks::on_cpu(*expected, "replay_update_priorities", "expected_generations");
    TRAINOPS_CHECK_VALUE(expected->scalar_type() == ScalarType::Long && expected->is_contiguous() && expected->numel() == n,
                         "trainops.replay_update_priorities: 'expected_generations' must be int64 like 'indices'");
    exp = st::cdata<int64_t>(*expected);
  }
  const int64_t* idx = st::cdata<int64_t>(indices);
  const float* val = st::cdata<float>(values);
  const int64_t* gen = st::cdata<int64_t>(generations);
  float* prio = st::data<float>(priorities);
  float* w = st::data<float>(weights);
  int32_t* win = st::data<int32_t>(winner);
  Tensor applied = st::empty_cpu({n}, ScalarType::Bool);
  bool* app = st::data<bool>(applied);

  // Checked before anything is written, so a bad call leaves the buffer unchanged. (Indices
  // outside [0, size) are not errors here: like stale entries they are ignored, and reported as
  // not applied. size <= capacity is checked above, so every slot written exists.)
  for (int64_t j = 0; j < n; ++j) {
    TRAINOPS_CHECK_VALUE(val[j] >= 0.0f && val[j] <= std::numeric_limits<float>::max(),
                         "trainops.replay_update_priorities: priorities must be finite and >= 0, got ", val[j],
                         " at position ", j, val[j] != val[j] ? " (NaN)" : "");
  }
  auto valid = [&](int64_t j) {
    const int64_t s = idx[j];
    return s >= 0 && s < size && (exp == nullptr || gen[s] == exp[j]);
  };
  // The slots are scattered over the buffer: each pass fetches the lines of an entry a few
  // positions ahead, so the cache misses of consecutive entries overlap.
  constexpr int64_t kAhead = 8;
  auto prefetch_slot = [&](int64_t j, bool for_write) {
    if (j >= n) return;
    const int64_t s = idx[j];
    if (s < 0 || s >= size) return;
    if (for_write) {
      __builtin_prefetch(prio + s, 1);
      __builtin_prefetch(w + s, 1);
    } else {
      __builtin_prefetch(win + s, 1);
      if (exp != nullptr) __builtin_prefetch(gen + s);
    }
  };
  for (int64_t j = 0; j < n; ++j) {
    prefetch_slot(j + kAhead, false);
    if (valid(j)) win[idx[j]] = static_cast<int32_t>(j);
  }
  // Touched blocks, each listed once (a bitmap over the blocks instead of sorting the list:
  // O(n + capacity / 2048) words; every block is refreshed on its own, so order is free).
  std::vector<uint64_t> seen((nbc + 63) / 64, 0);
  std::vector<int64_t> blocks;
  blocks.reserve(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    prefetch_slot(j + kAhead, true);
    app[j] = valid(j) && win[idx[j]] == j;
    if (app[j]) {
      prio[idx[j]] = val[j];
      w[idx[j]] = replay::priority_weight(val[j], alpha, eps);
      const int64_t b = idx[j] / kBlock;
      const uint64_t bit = uint64_t{1} << (b & 63);
      if (!(seen[b >> 6] & bit)) {
        seen[b >> 6] |= bit;
        blocks.push_back(b);
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    if (app[j]) win[idx[j]] = -1;
  }
  double* bs = st::data<double>(block_stats);
  const replay::WeightSource src{replay::kWeights, w, nullptr, nullptr, 0, 0};
  torch::stable::parallel_for(0, static_cast<int64_t>(blocks.size()), 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = blocks[k];
      replay::block_stat<replay::kWeights>(src, b, capacity, &bs[b], &bs[nbc + b]);
    }
  });
  return applied;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(trainops, CPU, m) {
  m.impl("replay_insert", TRAINOPS_BOX(&replay_insert_cpu));
  m.impl("replay_update_priorities", TRAINOPS_BOX(&replay_update_priorities_cpu));
}

}  // namespace trainops
