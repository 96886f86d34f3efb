// Autograd of trainops::router_topk, for every device: the forward runs the device's
// kernel (C++ on CPU, Triton on CUDA, through the dispatcher), the backward runs
// trainops::router_topk_backward (one fused kernel: gate weights, load-balancing term
// through prob_sum, z-loss), or on CPU with softmax scores the pair
// router_topk_saving_scores / router_topk_backward_saved. Registered in C++ rather than with
// torch.library.register_autograd: the Python route (autograd.Function, setup_context,
// backward in Python) cost ~160 us per training step, about 5% of a T=16384, E=64 step
// on 2 CPU cores.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace trainops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using RouterOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

RouterOutputs call_router_topk(const at::Tensor& logits, int64_t k, c10::string_view score, bool renormalize,
                               const c10::optional<at::Tensor>& expert_bias, const c10::optional<at::Tensor>& mask,
                               bool with_z) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("trainops::router_topk", "")
                       .typed<RouterOutputs(const at::Tensor&, int64_t, c10::string_view, bool,
                                            const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool)>();
  return op.call(logits, k, score, renormalize, expert_bias, mask, with_z);
}

at::Tensor call_router_topk_backward(const at::Tensor& grad_weights, const at::Tensor& grad_prob_sum,
                                     const at::Tensor& grad_z_sum, const at::Tensor& logits, const at::Tensor& indices,
                                     const c10::optional<at::Tensor>& mask, c10::string_view score, bool renormalize,
                                     bool with_z) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("trainops::router_topk_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const c10::optional<at::Tensor>&, c10::string_view, bool,
                                         bool)>();
  return op.call(grad_weights, grad_prob_sum, grad_z_sum, logits, indices, mask, score, renormalize, with_z);
}

using SavingOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SavingOutputs call_router_topk_saving_scores(const at::Tensor& logits, int64_t k, bool renormalize,
                                             const c10::optional<at::Tensor>& expert_bias,
                                             const c10::optional<at::Tensor>& mask, bool with_z) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("trainops::router_topk_saving_scores", "")
                       .typed<SavingOutputs(const at::Tensor&, int64_t, bool, const c10::optional<at::Tensor>&,
                                            const c10::optional<at::Tensor>&, bool)>();
  return op.call(logits, k, renormalize, expert_bias, mask, with_z);
}

at::Tensor call_router_topk_backward_saved(const at::Tensor& grad_weights, const at::Tensor& grad_prob_sum,
                                           const at::Tensor& grad_z_sum, const at::Tensor& scores,
                                           const at::Tensor& row_stats, const at::Tensor& indices,
                                           const c10::optional<at::Tensor>& mask, bool renormalize, bool with_z,
                                           at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("trainops::router_topk_backward_saved", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, bool,
                                         bool, at::ScalarType)>();
  return op.call(grad_weights, grad_prob_sum, grad_z_sum, scores, row_stats, indices, mask, renormalize, with_z,
                 dtype);
}

// Softmax routing on CPU keeps exp(x - max) [T, E] fp32 for the backward (as torch.softmax
// keeps its output): exp is most of the CPU backward's cost. Elsewhere (CUDA: Triton)
// the backward recomputes the scores from the logits, cheaper than the memory traffic.
bool saves_scores(const at::Tensor& logits, c10::string_view score, int64_t k) {
  return logits.device().is_cpu() && score == "softmax" && k <= 64;
}

class RouterTopkFunction : public torch::autograd::Function<RouterTopkFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k, c10::string_view score,
                               bool renormalize, const c10::optional<at::Tensor>& expert_bias,
                               const c10::optional<at::Tensor>& mask, bool with_z) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor weights, indices, counts, prob_sum, z_sum, scores, row_stats;
    const bool saved = saves_scores(logits, score, k);
    if (saved) {
      std::tie(weights, indices, counts, prob_sum, z_sum, scores, row_stats) =
          call_router_topk_saving_scores(logits, k, renormalize, expert_bias, mask, with_z);
      ctx->save_for_backward({scores, row_stats, indices, mask.has_value() ? *mask : at::Tensor()});
    } else {
      std::tie(weights, indices, counts, prob_sum, z_sum) =
          call_router_topk(logits, k, score, renormalize, expert_bias, mask, with_z);
      ctx->save_for_backward({logits, indices, mask.has_value() ? *mask : at::Tensor()});
    }
    ctx->saved_data["saved_scores"] = saved;
    ctx->saved_data["dtype"] = logits.scalar_type();
    ctx->saved_data["score"] = std::string(score);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["with_z"] = with_z;
    ctx->mark_non_differentiable({indices, counts});
    ctx->set_materialize_grads(false);  // zeros only where the kernel needs them
    return {weights, indices, counts, prob_sum, z_sum};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool from_scores = ctx->saved_data["saved_scores"].toBool();
    const at::Tensor& indices = saved[from_scores ? 2 : 1];
    const at::Tensor& mask_t = saved[from_scores ? 3 : 2];
    const c10::optional<at::Tensor> mask = mask_t.defined() ? c10::optional<at::Tensor>(mask_t) : c10::nullopt;
    const int64_t E = saved[0].size(1);
    const auto f32 = saved[0].options().dtype(at::kFloat);
    const at::Tensor gw = grads[0].defined() ? grads[0] : at::zeros(indices.sizes(), f32);
    const at::Tensor gp = grads[3].defined() ? grads[3] : at::zeros({E}, f32);
    const at::Tensor gz = grads[4].defined() ? grads[4] : at::zeros({}, f32);
    const bool renormalize = ctx->saved_data["renormalize"].toBool();
    const bool with_z = ctx->saved_data["with_z"].toBool();
    at::Tensor grad;
    if (from_scores) {
      grad = call_router_topk_backward_saved(gw, gp, gz, saved[0], saved[1], indices, mask, renormalize, with_z,
                                             ctx->saved_data["dtype"].toScalarType());
    } else {
      grad = call_router_topk_backward(gw, gp, gz, saved[0], indices, mask, ctx->saved_data["score"].toStringRef(),
                                       renormalize, with_z);
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

RouterOutputs router_topk_autograd(const at::Tensor& logits, int64_t k, c10::string_view score, bool renormalize,
                                   const c10::optional<at::Tensor>& expert_bias,
                                   const c10::optional<at::Tensor>& mask, bool with_z) {
  // Without a graph to record (inference, no_grad, logits without grad) nothing is saved,
  // so the plain forward runs.
  if (!torch::autograd::GradMode::is_enabled() || !logits.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_router_topk(logits, k, score, renormalize, expert_bias, mask, with_z);
  }
  auto out = RouterTopkFunction::apply(logits, k, score, renormalize, expert_bias, mask, with_z);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(trainops, Autograd, m) {
  m.impl("router_topk", &router_topk_autograd);
}

}  // namespace trainops
