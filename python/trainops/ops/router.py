"""Fused MoE router: ``trainops.ops.router_topk``.

One pass over the router logits gives the gate weights and expert indices of every
token plus the statistics of the load-balancing loss (per-expert selection counts and
sums of the score distribution over valid tokens) and, optionally, the router z-loss.
The backward is one fused kernel too: gradients of the gate weights and of the
load-balancing term (through ``prob_sum``) and of the z-loss, w.r.t. the logits.

Kernels: C++ on CPU (csrc/cpu/router.cpp), Triton on CUDA (kernels/router.py); spec:
:mod:`trainops.reference.router`. Reductions are deterministic (fixed-order partial sums).
"""
from __future__ import annotations

import math

import torch

from trainops import _extension
from trainops._triton import HAS_TRITON
from trainops._validation import FLOAT_DTYPES, check_int

__all__ = ["router_topk"]

_SCORES = ("softmax", "sigmoid")


def _check(logits, k, score, expert_bias, mask, allow_empty=False):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}")
    if logits.device.type not in ("cpu", "cuda"):
        raise ValueError(f"logits must be on a CPU or CUDA device, got {logits.device}")
    T, E = logits.shape
    if E == 0 or (T == 0 and not allow_empty):
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)}): nothing to route")
    check_int("k", k, symint=True)
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, num_experts={E}], got {k}")
    if score not in _SCORES:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    if expert_bias is not None:
        if not isinstance(expert_bias, torch.Tensor):
            raise TypeError(f"expert_bias must be a torch.Tensor or None, got {type(expert_bias).__name__}")
        if expert_bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"expert_bias must be a float tensor, got {expert_bias.dtype}")
        if expert_bias.shape != (E,):
            raise ValueError(f"expert_bias must have shape [{E}], got {tuple(expert_bias.shape)}")
        if expert_bias.device != logits.device:
            raise ValueError(f"expert_bias is on {expert_bias.device} but logits is on {logits.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"mask must be bool or integer (nonzero = valid token), got {mask.dtype}")
        if mask.numel() != T:
            raise ValueError(f"mask must have one entry per token ({T}), got shape {tuple(mask.shape)}")
        if mask.device != logits.device:
            raise ValueError(f"mask is on {mask.device} but logits is on {logits.device}")


_NOT_FINITE = ("logits contains NaN or Inf (the router scores are not finite); "
               "check the router input or pass check_finite=False")


_BIAS_NOT_FINITE = "expert_bias contains NaN or Inf (the expert selection would be meaningless)"


def _check_finite(total: torch.Tensor, expert_bias: torch.Tensor | None = None) -> None:
    """Raise when ``total`` (a sum that every non-finite score reaches) is NaN or Inf.

    Eager: one host read, ValueError. Under torch.compile a host read breaks the graph at
    every call, so on CPU the check is an in-graph assert instead (RuntimeError with the same
    message). On CUDA such an assert would be a device-side assert, which leaves the CUDA
    context unusable, so there the host read (and its graph break) stays; pass
    check_finite=False to compile the router into the surrounding graph.

    ``expert_bias`` joins the same host read (its sum times 0 is NaN exactly when it holds NaN or
    Inf); which of the two failed is told apart only on the error path."""
    if expert_bias is not None:
        total = total + expert_bias.detach().float().sum() * 0.0
    if torch.compiler.is_compiling() and total.device.type == "cpu":
        torch._assert_async(torch.isfinite(total), _NOT_FINITE)
        return
    if not math.isfinite(total.item()):
        if expert_bias is not None and not bool(torch.isfinite(expert_bias).all()):
            raise ValueError(_BIAS_NOT_FINITE)
        raise ValueError(_NOT_FINITE)


def router_topk(logits: torch.Tensor, k: int, *, score: str = "softmax", renormalize: bool = True,
                expert_bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                z_loss: bool = False, check_finite: bool = True):
    """Route tokens to their top-k experts and gather load-balancing statistics.

    Args:
        logits: router logits [T, E] (fp32, bf16 or fp16; math is fp32).
        k: experts per token, 1 ≤ k ≤ E.
        score: ``"softmax"`` (over experts) or ``"sigmoid"`` (per expert, DeepSeek-V3).
        renormalize: divide the k gate weights by their sum.
        expert_bias: [E] added to the scores only to pick experts (aux-loss-free balancing);
            the gate weights come from the raw scores. No gradient.
        mask: [T] bool/int, nonzero = valid token. Padding rows are routed but excluded
            from ``counts``, ``prob_sum`` and the z-loss.
        z_loss: also return the router z-loss, mean over valid tokens of logsumexp(x)².
        check_finite: raise ValueError when NaN/Inf logits make the outputs non-finite, or
            when ``expert_bias`` holds NaN/Inf (one small device-to-host check for both; under
            torch.compile on CPU an in-graph assert that raises RuntimeError, see
            ``_check_finite``). A non-finite ``expert_bias`` is rejected on CPU whatever
            ``check_finite`` says (the C++ kernel checks its E values); on CUDA only with
            ``check_finite`` (the Triton op does no host read).

    Returns:
        ``(weights fp32 [T,k], indices int64 [T,k], counts int64 [E], prob_sum fp32 [E])``
        and the z-loss (fp32 scalar) when ``z_loss``. ``prob_sum`` sums the softmax scores
        (sigmoid: the scores normalized per token) over valid tokens, so P_i =
        prob_sum_i / n_valid. ``weights``, ``prob_sum`` and the z-loss are differentiable
        w.r.t. ``logits`` through one fused backward kernel.
    """
    _check(logits, k, score, expert_bias, mask)
    _extension.require("router_topk", logits.device)
    if mask is not None:
        mask = mask.reshape(-1)
        if mask.dtype != torch.bool:
            mask = mask != 0
    weights, indices, counts, prob_sum, z_sum = torch.ops.trainops.router_topk(
        logits, k, score, bool(renormalize), expert_bias, mask, bool(z_loss))
    # Every weight lies in [0, 1] and every prob_sum entry in [0, T] when the logits are
    # finite, and NaN/Inf propagate through sums. Without a mask every row adds to prob_sum,
    # so its E entries decide; padding rows only reach the weights.
    # (A Python float check: torch.isfinite is several dispatched ops, ~80 us on CPU.)
    if check_finite:
        _check_finite(prob_sum.sum() if mask is None else weights.sum() + prob_sum.sum(), expert_bias)
    if not z_loss:
        return weights, indices, counts, prob_sum
    n_valid = (counts.sum() // k).clamp_min(1)
    return weights, indices, counts, prob_sum, z_sum / n_valid


# --- checks of the raw ops' arguments (torch.ops.trainops.router_topk*) ------------------------

def _check_op(logits, k, score, expert_bias, mask):
    """The checks of the raw op (torch.ops.trainops.router_topk), as the C++ CPU kernel does
    them, for the fakes and the Triton kernels: mask must be bool [T] here (the wrapper converts)."""
    _check(logits, k, score, expert_bias, mask, allow_empty=True)  # an empty batch is valid for the op
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 1):
        raise TypeError(f"mask must be a bool tensor [tokens], got {mask.dtype} of shape {tuple(mask.shape)}")


def _check_backward_op(grad_weights, grad_prob_sum, grad_z_sum, logits, indices, mask, score):
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or not isinstance(logits, torch.Tensor) \
            or logits.dim() != 2 or indices.shape[0] != logits.shape[0]:
        raise ValueError("indices must be [tokens, k] and logits [tokens, experts]")
    _check_op(logits, indices.shape[1], score, None, mask)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    T, E = logits.shape
    for name, t, shape in (("grad_weights", grad_weights, tuple(indices.shape)), ("grad_prob_sum", grad_prob_sum, (E,)),
                           ("grad_z_sum", grad_z_sum, None), ("indices", indices, None)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
        if name != "indices" and not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    if grad_z_sum.numel() != 1:
        raise ValueError(f"grad_z_sum must hold one value, got {grad_z_sum.numel()}")


# --- registration (schemas: ops/_schemas.py; CPU kernels: csrc/cpu/router.cpp) -----------------
# Fakes, autograd and the Triton kernels on CUDA, registered whether or not the C++ extension
# loaded.

@torch.library.register_fake("trainops::router_topk")
def _(logits, k, score, renormalize, expert_bias, mask, with_z):
    _check_op(logits, k, score, expert_bias, mask)
    T, E = logits.shape
    return (logits.new_empty(T, k, dtype=torch.float32), logits.new_empty(T, k, dtype=torch.int64),
            logits.new_empty(E, dtype=torch.int64), logits.new_empty(E, dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


@torch.library.register_fake("trainops::router_topk_backward")
def _(grad_weights, grad_prob_sum, grad_z_sum, logits, indices, mask, score, renormalize, with_z):
    _check_backward_op(grad_weights, grad_prob_sum, grad_z_sum, logits, indices, mask, score)
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, _k, score, renormalize, _expert_bias, mask, with_z = inputs
    ctx.save_for_backward(logits, output[1], mask)
    ctx.args = (score, renormalize, with_z)
    ctx.set_materialize_grads(False)  # zeros only for the gradients the kernel reads


def _backward(ctx, grad_weights, _grad_indices, _grad_counts, grad_prob_sum, grad_z_sum):
    """Gradient w.r.t. the logits of the gate weights, of the load-balancing term (through
    prob_sum) and of the z-loss: one fused kernel, trainops::router_topk_backward. The
    expert bias only picks experts: no gradient."""
    logits, indices, mask = ctx.saved_tensors
    f32 = dict(dtype=torch.float32, device=logits.device)
    grad = torch.ops.trainops.router_topk_backward(
        torch.zeros(indices.shape, **f32) if grad_weights is None else grad_weights,
        torch.zeros(logits.shape[1], **f32) if grad_prob_sum is None else grad_prob_sum,
        torch.zeros((), **f32) if grad_z_sum is None else grad_z_sum,
        logits, indices, mask, *ctx.args)
    return grad, None, None, None, None, None, None


# Measured against the C++ autograd kernel this replaced (benchmarks/bench_router_autograd.py, one CPU
# thread): ~130-200 us more per forward + backward, 0.47 vs 0.31 ms at T=256, E=64 and within a few
# percent from T=4096 on.
torch.library.register_autograd("trainops::router_topk", _backward, setup_context=_setup_context)

if HAS_TRITON:
    from trainops.kernels import router as triton_router

    @torch.library.register_kernel("trainops::router_topk", "cuda")
    def _(logits, k, score, renormalize, expert_bias, mask, with_z):
        _check_op(logits, k, score, expert_bias, mask)
        return triton_router.router_topk(logits, k, score, renormalize, expert_bias, mask, with_z)

    @torch.library.register_kernel("trainops::router_topk_backward", "cuda")
    def _(grad_weights, grad_prob_sum, grad_z_sum, logits, indices, mask, score, renormalize, with_z):
        # Index values are not checked on the host (a sync): the kernel turns the gradient
        # row of a token with an index outside [0, E) into NaN (kernels/router.py).
        _check_backward_op(grad_weights, grad_prob_sum, grad_z_sum, logits, indices, mask, score)
        return triton_router.router_topk_backward(grad_weights, grad_prob_sum, grad_z_sum, logits, indices, mask,
                                                  score, renormalize, with_z)
