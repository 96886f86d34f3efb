// CPU kernel of trainops::replay_sample: draw replay indices by the sampler's weights, gather
// the rows of every storage field into the output batch after the fresh rows, and compute the
// PER importance weights, in one call.
//
// With replacement: stratified inverse-CDF sampling over blocked fp64 prefix sums (rules in
// csrc/common/replay_common.h). Without replacement: Gumbel-top-k / Efraimidis-Spirakis keys
// log(u_i) / w_i, the R largest kept in descending key order (ties: lower slot first).
// Random numbers: Philox4x32-10 keyed by the seed, counter (index, offset, stream), so the
// CUDA kernel and the reference draw the same numbers.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "../common/boxing.h"
#include "../common/op_checks.h"
#include "../common/replay_common.h"

namespace trainops {
namespace {

using replay::kBlock;

struct Field {
  const uint8_t* src;
  uint8_t* dst;
  int64_t row_bytes;
  int64_t elem_bytes;
  bool ragged;
};

std::vector<Field> collect_fields(const std::vector<Tensor>& storage, const std::vector<Tensor>& out,
                                  const std::vector<bool>& ragged, int64_t capacity, int64_t rows) {
  TRAINOPS_CHECK_VALUE(!storage.empty(), "trainops.replay_sample: 'storage' must hold at least one field");
  TRAINOPS_CHECK_VALUE(storage.size() == out.size() && storage.size() == ragged.size(),
                       "trainops.replay_sample: 'storage', 'out' and 'ragged' must have the same length");
  std::vector<Field> fields;
  for (size_t f = 0; f < storage.size(); ++f) {
    const Tensor& s = storage[f];
    const Tensor& o = out[f];
    checks::on_cpu(s, "replay_sample", "storage");
    checks::on_cpu(o, "replay_sample", "out");
    TRAINOPS_CHECK_VALUE(s.dim() >= 1 && s.size(0) == capacity && s.is_contiguous(), "trainops.replay_sample: storage[",
                         f, "] must be contiguous with ", capacity, " rows");
    TRAINOPS_CHECK_VALUE(o.dim() == s.dim() && o.size(0) == rows && o.is_contiguous(), "trainops.replay_sample: out[", f,
                         "] must be contiguous with ", rows, " rows and the row shape of storage[", f, "]");
    TRAINOPS_CHECK_TYPE(o.scalar_type() == s.scalar_type(), "trainops.replay_sample: out[", f, "] has dtype ",
                        o.scalar_type(), " but storage[", f, "] has ", s.scalar_type());
    for (int64_t d = 1; d < s.dim(); ++d) {
      TRAINOPS_CHECK_VALUE(o.size(d) == s.size(d), "trainops.replay_sample: out[", f, "] row shape differs from storage");
    }
    const int64_t row_elems = capacity > 0 ? s.numel() / capacity : 0;
    TRAINOPS_CHECK_VALUE(!ragged[f] || s.dim() == 2, "trainops.replay_sample: ragged field ", f, " must be [capacity, L]");
    fields.push_back({static_cast<const uint8_t*>(s.data_ptr()), static_cast<uint8_t*>(o.data_ptr()),
                      row_elems * static_cast<int64_t>(s.element_size()), static_cast<int64_t>(s.element_size()),
                      static_cast<bool>(ragged[f])});
  }
  return fields;
}

// out[f][n_fresh + r] = storage[f][idx[r]]; ragged rows copy their first lengths[idx] elements
// and zero the rest, so padding never carries stale tokens of a previous occupant.
void gather_rows(const std::vector<Field>& fields, const int32_t* lengths, const int64_t* idx, int64_t n_fresh,
                 int64_t n_replay) {
  constexpr int64_t kAhead = 4;  // rows are scattered: start fetching a later row's first lines early
  torch::stable::parallel_for(0, n_replay, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t slot = idx[n_fresh + r];
      if (r + kAhead < r1) {
        const int64_t next = idx[n_fresh + r + kAhead];
        for (const Field& f : fields) {
          __builtin_prefetch(f.src + next * f.row_bytes);
          __builtin_prefetch(f.src + next * f.row_bytes + 64);
        }
      }
      for (const Field& f : fields) {
        uint8_t* dst = f.dst + (n_fresh + r) * f.row_bytes;
        const uint8_t* src = f.src + slot * f.row_bytes;
        if (f.ragged) {
          const int64_t row_len = f.row_bytes / f.elem_bytes;
          const int64_t n = std::min<int64_t>(std::max<int64_t>(lengths[slot], 0), row_len);
          std::memcpy(dst, src, n * f.elem_bytes);
          std::memset(dst + n * f.elem_bytes, 0, (row_len - n) * f.elem_bytes);
        } else {
          std::memcpy(dst, src, f.row_bytes);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> replay_sample_cpu(
    const std::vector<Tensor>& storage, const std::vector<Tensor>& out, const std::optional<Tensor>& lengths,
    const std::vector<bool>& ragged, const std::optional<Tensor>& weights, const std::optional<Tensor>& block_stats,
    const std::optional<Tensor>& slot_key, const std::optional<Tensor>& table, int64_t mode, int64_t size,
    int64_t n_fresh, int64_t n_replay, int64_t now, double beta, bool batch_max, bool replacement, int64_t seed,
    int64_t offset) {
  TRAINOPS_CHECK_VALUE(!storage.empty(), "trainops.replay_sample: 'storage' must hold at least one field");
  checks::dim_at_least(storage[0], 1, "replay_sample", "storage[0]");
  const int64_t capacity = storage[0].size(0);
  checks::replay_sample_scalars(capacity, size, n_fresh, n_replay, mode, replacement, beta);
  const int64_t rows = n_fresh + n_replay;
  const std::vector<Field> fields = collect_fields(storage, out, ragged, capacity, rows);

  replay::WeightSource src{mode, nullptr, nullptr, nullptr, 0, now};
  if (mode == replay::kWeights) {
    TRAINOPS_CHECK_VALUE(weights.has_value() && block_stats.has_value(),
                         "trainops.replay_sample: mode 1 needs 'weights' and 'block_stats'");
    TRAINOPS_CHECK_TYPE(weights->scalar_type() == ScalarType::Float && weights->is_contiguous() &&
                            weights->numel() == capacity,
                        "trainops.replay_sample: 'weights' must be contiguous float32 [capacity]");
    checks::on_cpu(*weights, "replay_sample", "weights");
    checks::on_cpu(*block_stats, "replay_sample", "block_stats");
    src.weights = st::cdata<float>(*weights);
  }
  if (mode == replay::kRecency || mode == replay::kTable) {
    TRAINOPS_CHECK_VALUE(slot_key.has_value() && slot_key->scalar_type() == ScalarType::Long && slot_key->is_contiguous() &&
                          slot_key->numel() == capacity,
                         "trainops.replay_sample: modes 2 and 3 need 'slot_key' as contiguous int64 [capacity]");
    checks::on_cpu(*slot_key, "replay_sample", "slot_key");
    src.key = st::cdata<int64_t>(*slot_key);
  }
  if (mode == replay::kTable) {
    TRAINOPS_CHECK_VALUE(table.has_value() && table->scalar_type() == ScalarType::Double && table->is_contiguous(),
                         "trainops.replay_sample: mode 3 needs 'table' as contiguous float64");
    checks::on_cpu(*table, "replay_sample", "table");
    src.table = st::cdata<double>(*table);
    src.table_size = table->numel();
  }
  const int32_t* len_ptr = nullptr;
  if (std::find(ragged.begin(), ragged.end(), true) != ragged.end()) {
    TRAINOPS_CHECK_VALUE(lengths.has_value() && lengths->scalar_type() == ScalarType::Int && lengths->is_contiguous() &&
                          lengths->numel() == capacity,
                         "trainops.replay_sample: ragged fields need 'lengths' as contiguous int32 [capacity]");
    checks::on_cpu(*lengths, "replay_sample", "lengths");
    len_ptr = st::cdata<int32_t>(*lengths);
  }

  Tensor indices = st::empty_cpu({rows}, ScalarType::Long);
  Tensor isw = st::empty_cpu({rows}, ScalarType::Float);
  Tensor is_replay = st::empty_cpu({rows}, ScalarType::Bool);
  int64_t* idx = st::data<int64_t>(indices);
  float* w_out = st::data<float>(isw);
  bool* rep = st::data<bool>(is_replay);
  for (int64_t r = 0; r < n_fresh; ++r) {
    idx[r] = -1;
    w_out[r] = 1.0f;
    rep[r] = false;
  }
  for (int64_t r = n_fresh; r < rows; ++r) rep[r] = true;
  if (n_replay == 0) return {indices, isw, is_replay};

  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint64_t uoff = static_cast<uint64_t>(offset);

  // Block sums and smallest positive weights: maintained (mode 1, read in place) or computed
  // here (modes 2 and 3). Uniform sampling needs neither. This pass is the O(size / kBlock)
  // part of a call, so it touches each block once and allocates without zero-filling.
  const int64_t nb = mode == replay::kUniform ? 0 : (size + kBlock - 1) / kBlock;
  const double* bsum = nullptr;
  const double* bmin = nullptr;
  std::unique_ptr<double[]> computed;
  if (mode == replay::kWeights) {
    TRAINOPS_CHECK_VALUE(block_stats->scalar_type() == ScalarType::Double && block_stats->is_contiguous() &&
                          block_stats->dim() == 2 && block_stats->size(0) == 2 &&
                          block_stats->size(1) == (capacity + kBlock - 1) / kBlock,
                         "trainops.replay_sample: 'block_stats' must be contiguous float64 [2, ceil(capacity / 32)]");
    const double* bs = st::cdata<double>(*block_stats);
    bsum = bs;
    bmin = bs + block_stats->size(1);
  } else if (mode != replay::kUniform) {
    computed.reset(new double[2 * nb]);
    double* cs = computed.get();
    replay::dispatch_mode(mode, [&](auto m) {
      torch::stable::parallel_for(0, nb, 256, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) replay::block_stat<decltype(m)::value>(src, b, size, &cs[b], &cs[nb + b]);
      });
    });
    bsum = cs;
    bmin = cs + nb;
  }
  // Exclusive prefix sums, accumulated block by block in order (the rounding every
  // implementation shares: see replay_common.h).
  std::unique_ptr<double[]> prefix_buf(new double[nb > 0 ? nb : 1]);
  double* prefix = prefix_buf.get();
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    prefix[b] = total;
    total += bsum[b];
  }
  // All weights zero (or a non-finite total): fall back to uniform over the stored items.
  const bool uniform = mode == replay::kUniform || !(total > 0.0) || !std::isfinite(total);
  if (uniform) src.mode = replay::kUniform;
  // Smallest positive weight of the buffer, only when the importance weights use it. A minimum
  // is exact in any order, so four independent lanes (which the compiler vectorizes) give the
  // value of a sequential scan.
  double wmin = std::numeric_limits<double>::infinity();
  if (!uniform && beta != 0.0 && !batch_max) {
    double lane[4] = {wmin, wmin, wmin, wmin};
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
      for (int k = 0; k < 4; ++k) lane[k] = std::min(lane[k], bmin[b + k]);
    }
    for (; b < nb; ++b) lane[0] = std::min(lane[0], bmin[b]);
    wmin = std::min(std::min(lane[0], lane[1]), std::min(lane[2], lane[3]));
  }

  std::vector<double> wsel(n_replay, 1.0);
  if (replacement) {
    replay::dispatch_mode(src.mode, [&](auto m) {
      constexpr int64_t M = decltype(m)::value;
      torch::stable::parallel_for(0, n_replay, 256, [&](int64_t j0, int64_t j1) {
        if constexpr (M == replay::kUniform) {
          for (int64_t j = j0; j < j1; ++j) {
            const double u = philox::uniform01(philox::draw(useed, uoff, j, philox::kSample));
            const double t = replay::stratified_target(j, n_replay, u, static_cast<double>(size));
            idx[n_fresh + j] = std::min<int64_t>(static_cast<int64_t>(t), size - 1);
          }
        } else {
          // Pass 1: targets and their blocks (targets grow with j, so each search gallops from
          // the previous block over the cache-resident prefix array). Pass 2: the leaf scans,
          // with the leaves of a block a few draws ahead prefetched, as they are scattered in memory.
          std::vector<double> ts(j1 - j0);
          std::vector<int64_t> bs(j1 - j0);
          int64_t hint = 0;
          for (int64_t j = j0; j < j1; ++j) {
            const double u = philox::uniform01(philox::draw(useed, uoff, j, philox::kSample));
            ts[j - j0] = replay::stratified_target(j, n_replay, u, total);
            hint = replay::find_block(prefix, nb, ts[j - j0], hint);
            bs[j - j0] = hint;
          }
          constexpr int64_t kAhead = 8;
          for (int64_t j = j0; j < j1; ++j) {
            if (M == replay::kWeights && j + kAhead < j1) {
              __builtin_prefetch(src.weights + bs[j + kAhead - j0] * kBlock);
              __builtin_prefetch(src.weights + bs[j + kAhead - j0] * kBlock + 16);
            }
            const int64_t slot = replay::scan_block<M>(src, prefix, bsum, bs[j - j0], size, ts[j - j0]);
            idx[n_fresh + j] = slot;
            wsel[j] = replay::weight_at<M>(src, slot);
          }
        }
      });
    });
  } else {
    std::vector<double> keys(size);
    torch::stable::parallel_for(0, size, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const double u = philox::uniform_open01(philox::draw(useed, uoff, i, philox::kGumbel));
        keys[i] = replay::gumbel_key(replay::slot_weight(src, i), u);
      }
    });
    std::vector<int64_t> order(size);
    for (int64_t i = 0; i < size; ++i) order[i] = i;
    auto by_key = [&](int64_t a, int64_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); };
    std::nth_element(order.begin(), order.begin() + (n_replay - 1), order.end(), by_key);
    std::sort(order.begin(), order.begin() + n_replay, by_key);
    for (int64_t j = 0; j < n_replay; ++j) {
      idx[n_fresh + j] = order[j];
      wsel[j] = replay::slot_weight(src, order[j]);
    }
  }

  if (uniform || beta == 0.0) {
    for (int64_t j = 0; j < n_replay; ++j) w_out[n_fresh + j] = 1.0f;
  } else {
    double ref = wmin;
    if (batch_max) {
      ref = std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < n_replay; ++j) {
        if (wsel[j] > 0.0) ref = std::min(ref, wsel[j]);
      }
    }
    for (int64_t j = 0; j < n_replay; ++j) {
      w_out[n_fresh + j] = replay::importance_weight(wsel[j], ref, total, static_cast<double>(size), beta);
    }
  }
  gather_rows(fields, len_ptr, idx, n_fresh, n_replay);
  return {indices, isw, is_replay};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(trainops, CPU, m) { m.impl("replay_sample", TRAINOPS_BOX(&replay_sample_cpu)); }

}  // namespace trainops
