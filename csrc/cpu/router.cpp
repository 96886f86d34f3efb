// CPU kernels of the fused MoE router (trainops::router_topk, router_topk_backward).
//
// Forward, per token t (one pass over the row of logits x_t, fp32 math):
//   s = softmax(x) or sigmoid(x);  top-k of s + b (b: DeepSeek-V3 aux-loss-free bias,
//   ties -> lower expert index);  w_j = s[i_j] (/ sum_j s[i_j] if renormalize);
//   valid tokens add to counts[i_j], prob_sum += p (p = s for softmax, s / sum(s) for
//   sigmoid) and z_sum += logsumexp(x)^2 (router z-loss, ST-MoE arXiv 2202.08906).
// Backward recomputes s from the logits (nothing of size T x E is saved: keeping exp(x -
// max) for it was measured no faster once the caches are cold, as in a real model, and
// slower at E = 256) and, in one pass per row, adds the gate-weight gradient and the
// load-balancing-loss gradient (dL/dP_i is a per-expert constant, coeff*N_E*f_i/T;
// "Demons in the Detail", arXiv 2501.11873) before applying the Jacobian of the score
// function.
//
// The row kernels live in router_rows.h (portable) and router_rows_avx2.h (AVX2 + FMA);
// this file runs them over the rows. Scores whose exp underflows (below ~1.2e-38) are 0.
//
// Determinism: rows are processed in fixed chunks of kChunk rows whatever the thread
// count; each chunk writes its own partial sums, added in chunk order at the end.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "../common/boxing.h"
#include "../common/op_checks.h"
#include "buffer_pool.h"
#include "router_rows.h"
#include "router_rows_avx2.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace trainops {
namespace {

constexpr int64_t kChunk = 64;

// Pieces of [0, n), handed out in order from a shared counter.
class PieceQueue {
 public:
  PieceQueue(int64_t n, int64_t grain) : n_(n), grain_(grain) {}
  bool pop(int64_t& begin, int64_t& end) {
    const int64_t p = next_.fetch_add(1, std::memory_order_relaxed);
    begin = p * grain_;
    end = std::min(n_, begin + grain_);
    return begin < n_;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_, grain_;
};

// worker(queue) on each of the threads; each worker pops pieces until none are left. Not a
// fixed split: a thread that the machine slows or deschedules leaves its pieces to the
// others instead of holding up the whole call. The kernels write per piece (rows, chunk
// partial sums), so results do not depend on which thread ran a piece.
// Called from inside a parallel region, torch's parallel_for runs the whole range in one call
// on the calling thread: one worker then drains the queue.
template <typename F>
void parallel_pieces(int64_t n, int64_t grain, const F& worker) {
  PieceQueue queue(n, grain);
  const int64_t workers = std::min<int64_t>(torch::stable::get_num_threads(), (n + grain - 1) / grain);
  if (workers <= 1) return worker(queue);
  torch::stable::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(queue); });
}

// t as a contiguous tensor of dtype: t itself when it already is one (the stable API's
// conversions are dispatched ops even when they have nothing to do).
Tensor as_contiguous(const Tensor& t, ScalarType dtype) {
  Tensor out = t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
  return out.is_contiguous() ? out : torch::stable::contiguous(out);
}

// The row kernels, as types whose members are constant function pointers (calls through
// them are direct and inline). with_row_kernels(f) calls f with the AVX2 + FMA kernels
// when the running CPU has AVX2 + FMA, unless the environment sets
// TRAINOPS_ROUTER_PORTABLE=1 (read at each call, so tests also run the portable kernels
// that other CPUs use).
struct PortableRows {
  static constexpr auto exp_row = portable::exp_row;
  static constexpr auto scores_row = portable::scores_row;
  static constexpr auto sum_row = portable::sum_row;
  static constexpr auto topk_row = portable::topk_row;
  static constexpr auto topk_rows2 = portable::topk_rows2;
  static constexpr auto backward_row_softmax = portable::backward_row_softmax;
  static constexpr auto backward_rows2_softmax = portable::backward_rows2_softmax;
  static constexpr auto add_scaled2 = portable::add_scaled2;
};

#if defined(TRAINOPS_ROUTER_AVX2)
struct Avx2Rows {
  static constexpr auto exp_row = avx2::exp_row;
  static constexpr auto scores_row = avx2::scores_row;
  static constexpr auto sum_row = avx2::sum_row;
  static constexpr auto topk_row = avx2::topk_row;
  static constexpr auto topk_rows2 = avx2::topk_rows2;
  static constexpr auto backward_row_softmax = avx2::backward_row_softmax;
  static constexpr auto backward_rows2_softmax = avx2::backward_rows2_softmax;
  static constexpr auto add_scaled2 = avx2::add_scaled2;
};
#endif

template <typename F>
void with_row_kernels(F f) {
#if defined(TRAINOPS_ROUTER_AVX2)
  const char* env = std::getenv("TRAINOPS_ROUTER_PORTABLE");
  if (cpu_isa::has_avx2_fma() && (env == nullptr || std::strcmp(env, "1") != 0)) return f(Avx2Rows{});
#endif
  f(PortableRows{});
}

template <typename scalar_t>
void load_row(const scalar_t* src, int64_t E, float* dst) {
  for (int64_t e = 0; e < E; ++e) dst[e] = static_cast<float>(src[e]);
}

void check_common(const Tensor& logits, int64_t k, const std::string_view score, const std::optional<Tensor>& mask) {
  TRAINOPS_CHECK_VALUE(logits.dim() == 2, "trainops: 'logits' must be 2-D [tokens, experts], got ", logits.dim(), "-D");
  checks::on_cpu(logits, "router_topk", "logits");
  TRAINOPS_CHECK_TYPE(logits.scalar_type() == ScalarType::Float || logits.scalar_type() == ScalarType::BFloat16 ||
                       logits.scalar_type() == ScalarType::Half,
                      "trainops: 'logits' must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TRAINOPS_CHECK_VALUE(k >= 1 && k <= logits.size(1), "trainops: 'k' must be in [1, experts=", logits.size(1),
                       "], got ", k);
  TRAINOPS_CHECK_VALUE(score == "softmax" || score == "sigmoid", "trainops: 'score' must be softmax or sigmoid, got ",
                       score);
  if (mask.has_value()) {
    checks::on_cpu(*mask, "router_topk", "mask");
    TRAINOPS_CHECK_TYPE(mask->scalar_type() == ScalarType::Bool, "trainops: 'mask' must be bool, got ",
                        mask->scalar_type());
    TRAINOPS_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == logits.size(0), "trainops: 'mask' must have shape [",
                         logits.size(0), "], got ", st::sizes_str(*mask));
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> router_topk_cpu(const Tensor& logits_in, int64_t k,
                                                                   std::string_view score, bool renormalize,
                                                                   const std::optional<Tensor>& expert_bias,
                                                                   const std::optional<Tensor>& mask_in, bool with_z) {
  check_common(logits_in, k, score, mask_in);
  const Tensor logits = as_contiguous(logits_in, logits_in.scalar_type());
  const int64_t T = logits.size(0), E = logits.size(1);
  std::optional<Tensor> bias;
  if (expert_bias.has_value()) {
    checks::on_cpu(*expert_bias, "router_topk", "expert_bias");
    TRAINOPS_CHECK_TYPE(st::is_floating(expert_bias->scalar_type()), "trainops: 'expert_bias' must be a float tensor, got ",
                        expert_bias->scalar_type());
    TRAINOPS_CHECK_VALUE(expert_bias->dim() == 1 && expert_bias->size(0) == E, "trainops: 'expert_bias' must have shape [",
                         E, "], got ", st::sizes_str(*expert_bias));
    bias = as_contiguous(*expert_bias, ScalarType::Float);
    // Always checked (E values): a NaN bias would make every comparison of the top-k false and
    // the selection meaningless; an infinite one pins or bans an expert for every token.
    const float* bp = st::cdata<float>(*bias);
    for (int64_t e = 0; e < E; ++e) {
      TRAINOPS_CHECK_VALUE(std::isfinite(bp[e]), "trainops: 'expert_bias' must be finite, got ", bp[e], " at expert ", e);
    }
  }
  const std::optional<Tensor> mask =
      mask_in.has_value() ? std::optional<Tensor>(as_contiguous(*mask_in, ScalarType::Bool)) : std::nullopt;
  // Outputs and per-chunk partial sums from the buffer pool: after other work has let glibc
  // trim its heap, fresh blocks of these sizes page-fault on first touch.
  Tensor weights = pooled_empty({T, k}, ScalarType::Float);
  Tensor indices = pooled_empty({T, k}, ScalarType::Long);
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  Tensor part_p_t = pooled_empty({chunks, E}, ScalarType::Float), part_c_t = pooled_empty({chunks, E}, ScalarType::Long);
  float* part_p = st::data<float>(part_p_t);
  int64_t* part_c = st::data<int64_t>(part_c_t);
  std::fill_n(part_p, chunks * E, 0.0f);
  std::fill_n(part_c, chunks * E, int64_t{0});
  std::vector<float> part_z(static_cast<size_t>(chunks), 0.0f);
  const bool softmax = score == "softmax";
  const float* b = bias.has_value() ? st::cdata<float>(*bias) : nullptr;
  const bool* mk = mask.has_value() ? st::cdata<bool>(*mask) : nullptr;
  float* w_out = st::data<float>(weights);
  int64_t* i_out = st::data<int64_t>(indices);

  with_row_kernels([&](auto rows) {
  TRAINOPS_DISPATCH_FLOATING(logits.scalar_type(), "'logits'", [&] {
    const scalar_t* X = st::cdata<scalar_t>(logits);
    parallel_pieces(chunks, 4, [&](PieceQueue& queue) {
      // Scratch for two rows: the top-k of a pair of rows runs interleaved (topk_rows2).
      const int64_t pad = E + 32;
      std::vector<float> x(2 * E), s(2 * E), tmp(2 * E), sel(2 * E), tv(2 * (k + 1)), cval(2 * pad);
      std::vector<int64_t> cand(2 * pad), ti(2 * (k + 1));  // k + 1: the top-k's spare slot
      int64_t c0, c1;
      while (queue.pop(c0, c1)) {
        for (int64_t c = c0; c < c1; ++c) {
          float* acc = part_p + c * E;
          int64_t* cnt = part_c + c * E;
          float z = 0.0f;
          const int64_t row_end = std::min(T, (c + 1) * kChunk);
          for (int64_t t = c * kChunk; t < row_end; t += 2) {
            const int pair = t + 1 < row_end ? 2 : 1;
            float scale[2] = {1.0f, 1.0f}, lse[2] = {0.0f, 0.0f};
            const float* pick[2];
            for (int r = 0; r < pair; ++r) {
              const int64_t row = t + r;
              const bool valid = mk == nullptr || mk[row];
              float* sr = s.data() + r * E;
              const float* xr = x.data() + r * E;
              if constexpr (std::is_same_v<scalar_t, float>) {
                xr = reinterpret_cast<const float*>(X + row * E);  // fp32 rows are read in place
              } else {
                load_row(X + row * E, E, x.data() + r * E);
              }
              // Softmax rows keep exp(x - max) in s and scale by 1/sum where needed: one pass
              // fewer, and the top-k of exp(x - max) is the top-k of the softmax.
              if (softmax) {
                float sum;
                const float m = rows.exp_row(xr, E, sr, &sum);
                scale[r] = 1.0f / sum;
                if (with_z && valid) lse[r] = m + std::log(sum);
              } else {
                lse[r] = rows.scores_row(xr, E, false, with_z && valid, sr, tmp.data() + r * E);
              }
              pick[r] = sr;
              if (b != nullptr) {
                float* selr = sel.data() + r * E;
                for (int64_t e = 0; e < E; ++e) selr[e] = sr[e] * scale[r] + b[e];
                pick[r] = selr;
              }
            }
            float* tvp[2] = {tv.data(), tv.data() + k + 1};
            int64_t* tip[2] = {ti.data(), ti.data() + k + 1};
            int64_t* candp[2] = {cand.data(), cand.data() + pad};
            float* cvalp[2] = {cval.data(), cval.data() + pad};
            if (pair == 2) {
              rows.topk_rows2(pick, E, k, tvp, tip, candp, cvalp);
            } else {
              rows.topk_row(pick[0], E, k, tvp[0], tip[0], candp[0], cvalp[0]);
            }
            // prob_sum gets the valid rows of the pair in one pass over acc.
            const float* psum_row[2];
            float psum_scale[2];
            int n_psum = 0;
            for (int r = 0; r < pair; ++r) {
              const int64_t row = t + r;
              const float* sr = s.data() + r * E;
              const bool valid = mk == nullptr || mk[row];
              portable::emit_selection(sr, tvp[r], b == nullptr, tip[r], k, scale[r], renormalize, valid,
                                       w_out + row * k, i_out + row * k, cnt);
              if (!valid) continue;
              psum_row[n_psum] = sr;
              psum_scale[n_psum++] = softmax ? scale[r] : 1.0f / rows.sum_row(sr, E);
              if (with_z) z += lse[r] * lse[r];
            }
            // A single valid row is added with itself at weight 0: a padding row, which may
            // hold NaN or Inf, is never read.
            if (n_psum == 1) {
              psum_row[1] = psum_row[0];
              psum_scale[1] = 0.0f;
            }
            if (n_psum > 0) rows.add_scaled2(acc, psum_row[0], psum_scale[0], psum_row[1], psum_scale[1], E);
          }
          part_z[c] = z;
        }
      }
    });
  });
  });

  // Filled here rather than by zeros / fill_: each of those is a dispatched op, and at
  // E = 64 their overhead is a visible share of the call.
  Tensor counts = st::empty_cpu({E}, ScalarType::Long);
  Tensor prob_sum = st::empty_cpu({E}, ScalarType::Float);
  Tensor z_sum = st::empty_cpu({}, ScalarType::Float);
  int64_t* cp = st::data<int64_t>(counts);
  float* pp = st::data<float>(prob_sum);
  std::fill_n(cp, E, int64_t{0});
  std::fill_n(pp, E, 0.0f);
  float zs = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {  // chunk order: the same sum for any thread count
    for (int64_t e = 0; e < E; ++e) {
      cp[e] += part_c[c * E + e];
      pp[e] += part_p[c * E + e];
    }
    zs += part_z[c];
  }
  *st::data<float>(z_sum) = zs;
  return {weights, indices, counts, prob_sum, z_sum};
}

Tensor router_topk_backward_cpu(const Tensor& grad_weights_in, const Tensor& grad_prob_sum_in, const Tensor& grad_z_sum,
                                const Tensor& logits_in, const Tensor& indices_in, const std::optional<Tensor>& mask_in,
                                std::string_view score, bool renormalize, bool with_z) {
  const char* op = "router_topk_backward";
  TRAINOPS_CHECK_VALUE(logits_in.dim() == 2, "trainops: 'logits' must be 2-D [tokens, experts], got ", logits_in.dim(),
                       "-D");
  TRAINOPS_CHECK_VALUE(indices_in.dim() == 2 && indices_in.size(0) == logits_in.size(0),
                       "trainops: 'indices' must be [tokens=", logits_in.size(0), ", k], got ", st::sizes_str(indices_in));
  const int64_t k = indices_in.size(1);
  check_common(logits_in, k, score, mask_in);
  const Tensor logits = as_contiguous(logits_in, logits_in.scalar_type());
  const int64_t T = logits.size(0), E = logits.size(1);
  checks::on_cpu(indices_in, op, "indices");
  TRAINOPS_CHECK_TYPE(indices_in.scalar_type() == ScalarType::Long || indices_in.scalar_type() == ScalarType::Int,
                      "trainops: 'indices' must be int64 or int32, got ", indices_in.scalar_type());
  auto check_grad = [&](const Tensor& t, const char* name) {
    checks::on_cpu(t, op, name);
    TRAINOPS_CHECK_TYPE(st::is_floating(t.scalar_type()), "trainops: '", name, "' must be a float tensor, got ",
                        t.scalar_type());
  };
  check_grad(grad_weights_in, "grad_weights");
  check_grad(grad_prob_sum_in, "grad_prob_sum");
  check_grad(grad_z_sum, "grad_z_sum");
  TRAINOPS_CHECK_VALUE(st::same_sizes(grad_weights_in, indices_in), "trainops: 'grad_weights' must be [tokens, k] like "
                       "'indices' (", st::sizes_str(indices_in), "), got ", st::sizes_str(grad_weights_in));
  TRAINOPS_CHECK_VALUE(grad_prob_sum_in.dim() == 1 && grad_prob_sum_in.numel() == E, "trainops: 'grad_prob_sum' must be [",
                       E, "], got ", st::sizes_str(grad_prob_sum_in));
  TRAINOPS_CHECK_VALUE(grad_z_sum.numel() == 1, "trainops: 'grad_z_sum' must hold one value, got ", grad_z_sum.numel());
  const Tensor gw_t = as_contiguous(grad_weights_in, ScalarType::Float);
  const Tensor gp_t = as_contiguous(grad_prob_sum_in, ScalarType::Float);
  const Tensor idx_t = as_contiguous(indices_in, ScalarType::Long);
  // The kernels read and write row entries at these indices: range-checked first (T x k reads).
  checks::indices_in_range(st::cdata<int64_t>(idx_t), idx_t.numel(), E, op, "indices");
  float gz = 0.0f;
  if (with_z) {
    TRAINOPS_DISPATCH_FLOATING(grad_z_sum.scalar_type(), "'grad_z_sum'",
                               [&] { gz = static_cast<float>(*st::cdata<scalar_t>(grad_z_sum)); });
  }
  const std::optional<Tensor> mask =
      mask_in.has_value() ? std::optional<Tensor>(as_contiguous(*mask_in, ScalarType::Bool)) : std::nullopt;
  Tensor grad = pooled_empty({T, E}, logits.scalar_type());
  const bool softmax = score == "softmax";
  const float* GW = st::cdata<float>(gw_t);
  const float* GP = st::cdata<float>(gp_t);
  const int64_t* IDX = st::cdata<int64_t>(idx_t);
  const bool* mk = mask.has_value() ? st::cdata<bool>(*mask) : nullptr;

  with_row_kernels([&](auto rows) {
  TRAINOPS_DISPATCH_FLOATING(logits.scalar_type(), "'logits'", [&] {
    const scalar_t* X = st::cdata<scalar_t>(logits);
    scalar_t* G = st::data<scalar_t>(grad);
    parallel_pieces(T, 4 * kChunk, [&](PieceQueue& queue) {
      std::vector<float> x(2 * E), s(2 * E), p(E), ds(E), dx(2 * E);
      int64_t t0, t1;
      while (queue.pop(t0, t1)) {
        for (int64_t t = t0; t < t1; ++t) {
          const bool valid = mk == nullptr || mk[t];
          if (softmax && k <= 64) {  // two rows at a time, interleaved; fp32 rows in place
            const int pair = t + 1 < t1 ? 2 : 1;
            const float* xr[2];
            float* dr[2];
            bool ok[2];
            const float* gwr[2] = {GW + t * k, GW + (t + 1) * k};
            const int64_t* idr[2] = {IDX + t * k, IDX + (t + 1) * k};
            float* sr[2] = {s.data(), s.data() + E};
            for (int r = 0; r < pair; ++r) {
              ok[r] = mk == nullptr || mk[t + r];
              xr[r] = x.data() + r * E;
              dr[r] = dx.data() + r * E;
              if constexpr (std::is_same_v<scalar_t, float>) {
                xr[r] = reinterpret_cast<const float*>(X + (t + r) * E);
                dr[r] = reinterpret_cast<float*>(G + (t + r) * E);
              } else {
                load_row(X + (t + r) * E, E, x.data() + r * E);
              }
            }
            if (pair == 2) {
              rows.backward_rows2_softmax(xr, E, k, renormalize, ok, with_z, GP, gwr, idr, gz, sr, dr);
            } else {
              rows.backward_row_softmax(xr[0], E, k, renormalize, ok[0], with_z, GP, gwr[0], idr[0], gz, sr[0], dr[0]);
            }
            if constexpr (!std::is_same_v<scalar_t, float>) {
              for (int r = 0; r < pair; ++r) {
                scalar_t* out = G + (t + r) * E;
                for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(dr[r][e]);
              }
            }
            t += pair - 1;
            continue;
          }
          load_row(X + t * E, E, x.data());
          portable::backward_row(x.data(), E, k, softmax, renormalize, valid, with_z, GP, GW + t * k, IDX + t * k, gz, s.data(),
                       p.data(), ds.data(), dx.data());
          scalar_t* out = G + t * E;
          for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(dx[e]);
        }
      }
    });
  });
  });
  return grad;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(trainops, CPU, m) {
  m.impl("router_topk", TRAINOPS_BOX(&router_topk_cpu));
  m.impl("router_topk_backward", TRAINOPS_BOX(&router_topk_backward_cpu));
}

}  // namespace trainops
