// Shared definitions of the fused replay ops (trainops::replay_sample, replay_insert,
// replay_update_priorities), plain C++ usable from the CPU kernels and from CUDA device code.
// The Python reference trainops.reference.replay implements exactly these rules.
//
// Sampling is inverse-CDF over blocked fp64 prefix sums (PER, Schaul et al. 2016, sample by
// P(i) = w_i / sum w): slots are grouped in blocks of kBlock leaves; a block's sum is
// accumulated leaf by leaf in fp64, blocks are prefix-summed, a target t is located by binary
// search over the block prefixes and then by a sequential scan inside the block. Blocking keeps
// the fp64 drift of a flat cumulative sum over 2^20+ slots away, and lets priority updates
// refresh only the blocks they touch. 32 leaves balance the per-call block scan (N / 32 fp64
// adds) against the per-draw leaf scan and the per-update block refresh (32 leaves each).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "philox.h"

namespace trainops {
namespace replay {

constexpr int64_t kBlock = 32;  // leaves per block of the blocked prefix sums

// How the per-slot sampling weight w_i is obtained.
enum Mode : int64_t {
  kUniform = 0,     // w_i = 1
  kWeights = 1,     // w_i = weights[i] (stored p_i^alpha), block sums/minima maintained by updates
  kRecency = 2,     // w_i = 1 / (now - key[i] + 1): key = insertion step
  kTable = 3,       // w_i = table[key[i]]: key = task id (power-law rehearsal)
};

struct WeightSource {
  int64_t mode;
  const float* weights;
  const int64_t* key;
  const double* table;
  int64_t table_size;
  int64_t now;
};

// w_i for a mode known at compile time (the hot loops below are instantiated per mode, so the
// per-leaf work is one load and one fp64 add).
template <int64_t M>
TRAINOPS_HD double weight_at(const WeightSource& s, int64_t i) {
  if constexpr (M == kWeights) {
    return static_cast<double>(s.weights[i]);
  } else if constexpr (M == kRecency) {
    int64_t age = s.now - s.key[i];
    if (age < 0) age = 0;
    return 1.0 / static_cast<double>(age + 1);
  } else if constexpr (M == kTable) {
    const int64_t k = s.key[i];
    return (k >= 0 && k < s.table_size) ? s.table[k] : 0.0;
  } else {
    return 1.0;
  }
}

TRAINOPS_HD double slot_weight(const WeightSource& s, int64_t i) {
  switch (s.mode) {
    case kWeights: return weight_at<kWeights>(s, i);
    case kRecency: return weight_at<kRecency>(s, i);
    case kTable: return weight_at<kTable>(s, i);
    default: return 1.0;
  }
}

// Sum (leaf by leaf, fp64) and smallest positive weight (+inf if none) of block b over slots < size.
template <int64_t M>
TRAINOPS_HD void block_stat(const WeightSource& s, int64_t b, int64_t size, double* sum, double* minpos) {
  const int64_t begin = b * kBlock;
  const int64_t end = begin + kBlock < size ? begin + kBlock : size;
  double acc = 0.0;
  double mn = INFINITY;
  for (int64_t i = begin; i < end; ++i) {
    const double w = weight_at<M>(s, i);
    acc += w;
    if (w > 0.0 && w < mn) mn = w;
  }
  *sum = acc;
  *minpos = mn;
}

// The largest block b in [lo, nb) with prefix[b] <= t, given prefix[lo] <= t (or lo = 0):
// galloping from lo, then binary search. Increasing targets (stratified draws of one thread)
// pass the previous answer as lo, so consecutive searches touch a few neighbouring prefixes
// instead of log2(nb) scattered ones.
TRAINOPS_HD int64_t find_block(const double* prefix, int64_t nb, double t, int64_t lo) {
  int64_t step = 1;
  while (lo + step < nb && prefix[lo + step] <= t) {
    lo += step;
    step <<= 1;
  }
  int64_t hi = lo + step < nb ? lo + step - 1 : nb - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Slot of target t in block b (found by find_block): trailing zero-sum blocks are stepped back
// over, then the first positive leaf whose running sum prefix[b] + w_0 + ... + w_i exceeds t;
// if rounding leaves t past the block's end, its last positive leaf.
template <int64_t M>
TRAINOPS_HD int64_t scan_block(const WeightSource& s, const double* prefix, const double* block_sum, int64_t b,
                               int64_t size, double t) {
  while (b > 0 && !(block_sum[b] > 0.0)) --b;
  const int64_t begin = b * kBlock;
  const int64_t end = begin + kBlock < size ? begin + kBlock : size;
  double cum = prefix[b];
  int64_t last = begin;
  for (int64_t i = begin; i < end; ++i) {
    const double w = weight_at<M>(s, i);
    cum += w;
    if (w > 0.0) {
      last = i;
      if (t < cum) return i;
    }
  }
  return last;
}

// Slot of target t in [0, total): inverse CDF over the blocked prefix sums.
template <int64_t M>
TRAINOPS_HD int64_t locate(const WeightSource& s, const double* prefix, const double* block_sum, int64_t nb,
                           int64_t size, double t) {
  return scan_block<M>(s, prefix, block_sum, find_block(prefix, nb, t, 0), size, t);
}

// Target of stratified sample j of n: t = (j + u) / n * total, one draw per stratum.
TRAINOPS_HD double stratified_target(int64_t j, int64_t n, double u, double total) {
  return (static_cast<double>(j) + u) / static_cast<double>(n) * total;
}

// PER importance weight (N P(i))^-beta / (N P_min)^-beta with P = w / total; w_ref is the
// smallest positive weight of the buffer (buffer-wide max) or of the batch (batch max).
TRAINOPS_HD float importance_weight(double w, double w_ref, double total, double n, double beta) {
  if (beta == 0.0) return 1.0f;
  if (!(w > 0.0)) return 0.0f;  // a zero-weight slot (only drawn without replacement) carries no weight
  const double num = pow(n * (w / total), -beta);
  const double den = pow(n * (w_ref / total), -beta);
  return static_cast<float>(num / den);
}

// Efraimidis-Spirakis / Gumbel-top-k key of slot i for sampling without replacement:
// log(u) / w (the R largest keys are a weighted sample without replacement); -inf for w = 0.
TRAINOPS_HD double gumbel_key(double w, double u_open) {
  return w > 0.0 ? log(u_open) / w : -INFINITY;
}

// Reservoir key of the item with serial number `serial` (its position in the whole stream):
// uniform in [0, 1); the buffer keeps the `capacity` items with the largest keys, which is a
// uniform random sample of the stream (Vitter's reservoir by random keys).
TRAINOPS_HD double reservoir_key(uint64_t seed, int64_t serial) {
  return philox::uniform01(philox::draw(seed, 0, static_cast<uint64_t>(serial), philox::kReservoir));
}

// Stored sampling weight of a priority: max(p, eps)^alpha, computed in fp64, stored as fp32.
TRAINOPS_HD float priority_weight(float p, double alpha, double eps) {
  const double q = static_cast<double>(p) > eps ? static_cast<double>(p) : eps;
  return static_cast<float>(pow(q, alpha));
}

// Calls fn(std::integral_constant<int64_t, M>) for the runtime mode, so hot loops see M as a constant.
template <typename Fn>
inline void dispatch_mode(int64_t mode, Fn&& fn) {
  switch (mode) {
    case kWeights: fn(std::integral_constant<int64_t, kWeights>()); break;
    case kRecency: fn(std::integral_constant<int64_t, kRecency>()); break;
    case kTable: fn(std::integral_constant<int64_t, kTable>()); break;
    default: fn(std::integral_constant<int64_t, kUniform>()); break;
  }
}

}  // namespace replay
}  // namespace trainops
