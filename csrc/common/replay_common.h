// Shared definitions of the fused replay ops (trainops::replay_sample, replay_insert,
// replay_update_priorities), plain C++ usable from the CPU kernels and from CUDA device code.
// The Python reference trainops.reference.replay implements exactly these rules.
//
// Sampling is inverse-CDF over blocked fp64 prefix sums (PER, Schaul et al. 2016, sample by
// P(i) = w_i / sum w): slots are grouped in blocks of kBlock leaves; a block's sum is
// accumulated leaf by leaf in fp64, blocks are prefix-summed, a target t is located by binary
// search over the block prefixes and then by a sequential scan inside the block. Blocking keeps
// the fp64 drift of a flat cumulative sum over 2^20+ slots away, and lets priority updates
// refresh only the blocks they touch.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace trainops {
namespace replay {

constexpr int64_t kBlock = 64;  // leaves per block of the blocked prefix sums

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

TRAINOPS_HD double slot_weight(const WeightSource& s, int64_t i) {
  switch (s.mode) {
    case kWeights:
      return static_cast<double>(s.weights[i]);
    case kRecency: {
      int64_t age = s.now - s.key[i];
      if (age < 0) age = 0;
      return 1.0 / static_cast<double>(age + 1);
    }
    case kTable: {
      const int64_t k = s.key[i];
      return (k >= 0 && k < s.table_size) ? s.table[k] : 0.0;
    }
    default:
      return 1.0;
  }
}

// Sum (leaf by leaf, fp64) and smallest positive weight (+inf if none) of block b over slots < size.
TRAINOPS_HD void block_stat(const WeightSource& s, int64_t b, int64_t size, double* sum, double* minpos) {
  const int64_t begin = b * kBlock;
  const int64_t end = begin + kBlock < size ? begin + kBlock : size;
  double acc = 0.0;
  double mn = INFINITY;
  for (int64_t i = begin; i < end; ++i) {
    const double w = slot_weight(s, i);
    acc += w;
    if (w > 0.0 && w < mn) mn = w;
  }
  *sum = acc;
  *minpos = mn;
}

// Slot of target t in [0, total): the largest block b with prefix[b] <= t (trailing zero-sum
// blocks stepped back over), then the first positive leaf whose running sum prefix[b] + w_0 +
// ... + w_i exceeds t; if rounding leaves t past the block's end, its last positive leaf.
TRAINOPS_HD int64_t locate(const WeightSource& s, const double* prefix, const double* block_sum, int64_t nb,
                           int64_t size, double t) {
  int64_t lo = 0, hi = nb - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  int64_t b = lo;
  while (b > 0 && !(block_sum[b] > 0.0)) --b;
  const int64_t begin = b * kBlock;
  const int64_t end = begin + kBlock < size ? begin + kBlock : size;
  double cum = prefix[b];
  int64_t last = begin;
  for (int64_t i = begin; i < end; ++i) {
    const double w = slot_weight(s, i);
    cum += w;
    if (w > 0.0) {
      last = i;
      if (t < cum) return i;
    }
  }
  return last;
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

}  // namespace replay
}  // namespace trainops
