"""MoRA, rank-1 LoRA expert mixing: ``trainops.ops.mora``.

Design: the op returns the adapter **delta** ``((p ⊙ w) Bᵀ) · scaling``, not the full
layer output. The frozen base layer stays whatever it is (``nn.Linear``, a quantized
Linear, a tensor-parallel shard) and runs its own GEMM; ``MoRALinear`` adds the two.
The delta costs ≈ R/d_out + k/d_in of the base GEMM's FLOPs.

Registered ops (schemas in ops/_schemas.py):
  ``trainops::mora_fwd(x, A_f, B_f, A, B, ...) -> (delta, p, idx, rho)``
  ``trainops::mora_bwd(dy, x, A_f, B_f, A, B, p, idx, rho, ...) -> (dx, dA, dB)``
CUDA tensors run the Triton kernels of :mod:`trainops.kernels.mora` (fused shrink+gate,
gated expand, fused gate backward). Tensors on other devices (CPU) run the same algorithm
in ATen (the GEMMs dominate; fusing the gate buys nothing on a CPU) — no C++ extension is
needed.
Ranks come in two sources, frozen (A_f, B_f) then trainable (A, B): the kernels read
both without concatenating them, and only the trainable ranks get gradients.

Saved for backward: x (an input anyway), p [T, R] fp32, the top-k indices [T, k] and
ρ [T]; dropout masks are regenerated from the seed. The gate g is recomputed. p is kept
rather than recomputed: it is O(T·R) (2 MiB at T=8192, R=64) and the dense part of the
gate backward, −ρ s (s·ds), needs it over all R, while recomputing it would repeat the
T·R·d_in shrink GEMM.
"""
from __future__ import annotations


import torch

from trainops._triton import HAS_TRITON
from trainops._validation import FLOAT_DTYPES, check_finite_float, check_int, resolve_seed
from trainops._counter_rng import dropout_keep_mask

__all__ = ["mora", "mora_routing", "num_selected"]

EPS = 1e-12


def num_selected(top_k: int, num_ranks: int) -> int:
    """Ranks kept per token: k = max(top_k, 2), at most the number of ranks."""
    return min(max(top_k, 2), num_ranks)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dropped(x, training, dropout_p, seed, ct):
    xt = x.to(ct)
    if training and dropout_p > 0.0:
        keep = dropout_keep_mask(xt.shape, seed, dropout_p, xt.device)
        xt = torch.where(keep, xt * (1.0 / (1.0 - dropout_p)), torch.zeros_like(xt))
    return xt


def _two_source_mm(left, F, right_f, right_t):
    """left[:, :F] @ right_f + left[:, F:] @ right_t without concatenating the banks."""
    out = left[:, F:] @ right_t
    if F > 0:
        out = torch.addmm(out, left[:, :F], right_f)
    return out


# --- CPU (ATen) implementation --------------------------------------------------------------

def _fwd_aten(x, A_f, B_f, A, B, top_k, temperature, threshold, training, scaling, dropout_p, seed):
    ct = _compute_dtype(x)
    F = A_f.shape[0]
    R = F + A.shape[0]
    k = num_selected(top_k, R)
    xt = _dropped(x, training, dropout_p, seed, ct)
    p = xt @ A.to(ct).t()
    if F > 0:
        p = torch.cat([xt @ A_f.to(ct).t(), p], dim=1)  # [T, R] scores, not a concat of the ranks
    rho = 1.0 / p.norm(dim=1).clamp_min(EPS)
    s = p * rho[:, None]
    vals, idx = torch.topk(s, k, dim=1)
    w = torch.softmax(vals / temperature, dim=1)
    if not training:
        w = w * (vals >= threshold).to(w.dtype)
    z = torch.zeros_like(p).scatter_(1, idx, p.gather(1, idx) * w)
    delta = _two_source_mm(z, F, B_f.to(ct).t(), B.to(ct).t()) * scaling
    return delta.to(x.dtype), p, idx, rho


def _bwd_aten(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, training, scaling,
              dropout_p, seed, need_dx, need_dA, need_dB):
    ct = p.dtype
    F = A_f.shape[0]
    dy = dy.to(ct)
    dz = dy @ B.to(ct)
    if F > 0:
        dz = torch.cat([dy @ B_f.to(ct), dz], dim=1)
    dz = dz * scaling                                                   # [T, R]
    pk = p.gather(1, idx)
    sk = pk * rho[:, None]
    g = torch.softmax(sk / temperature, dim=1)
    m = torch.ones_like(g) if training else (sk >= threshold).to(ct)
    wk = g * m
    dzk = dz.gather(1, idx)
    h = dzk * pk * m
    ds = g * (h - (g * h).sum(1, keepdim=True)) / temperature
    live = (p.norm(dim=1) > EPS).to(ct)
    sds = (sk * ds).sum(1) * live
    dp = p * (-(rho * rho) * sds)[:, None]                              # −ρ s (s·ds), dense over R
    dp.scatter_add_(1, idx, dzk * wk + rho[:, None] * ds)
    dx = dA = dB = None
    xt = None
    if need_dx:
        dxt = _two_source_mm(dp, F, A_f.to(ct), A.to(ct))
        if training and dropout_p > 0.0:
            keep = dropout_keep_mask(dxt.shape, seed, dropout_p, dxt.device)
            dxt = torch.where(keep, dxt * (1.0 / (1.0 - dropout_p)), torch.zeros_like(dxt))
        dx = dxt.to(x.dtype)
    if need_dA:
        xt = _dropped(x, training, dropout_p, seed, ct)
        dA = (dp[:, F:].t() @ xt).to(A.dtype)
    if need_dB:
        z = torch.zeros_like(p).scatter_(1, idx, pk * wk)
        dB = ((dy.t() @ z[:, F:]) * scaling).to(B.dtype)
    return dx, dA, dB


# --- checks of the registered ops' arguments ------------------------------------------------
# torch.ops.trainops.mora_fwd / mora_bwd can be called directly, bypassing mora(): every
# implementation (ATen on CPU, Triton on CUDA, the fakes) runs these first.

def _check_op_scalars(top_k, temperature, threshold, scaling, dropout_p):
    """top_k int >= 1, temperature finite > 0, threshold not NaN (+-inf: keep / prune every rank
    in eval), scaling finite, dropout_p in [0, 1). Returns the four numbers as floats."""
    check_int("top_k", top_k, lo=1, symint=True)
    return (check_finite_float("temperature", temperature, lo=0.0, lo_open=True),
            check_finite_float("threshold", threshold, allow_inf=True),
            check_finite_float("scaling", scaling),
            check_finite_float("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True))


def _check_op_banks(x, A_f, B_f, A, B):
    """x [T, D]; A_f [F, D], B_f [N, F]; A [Rt, D], B [N, Rt]; one device; F + Rt >= 1.
    Returns (T, R)."""
    act = FLOAT_DTYPES + ((torch.float64,) if isinstance(x, torch.Tensor) and x.device.type != "cuda" else ())
    _check_tensor(x, "x", act)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, in_features], got shape {tuple(x.shape)}")
    _check_tensor(A, "A", (torch.float32, x.dtype), x.device)
    for name, t in (("A_f", A_f), ("B_f", B_f), ("B", B)):
        _check_tensor(t, name, (A.dtype,), x.device)
    T, D = x.shape
    F, Rt, N = A_f.shape[0] if A_f.dim() else 0, A.shape[0] if A.dim() else 0, B.shape[0] if B.dim() else 0
    for name, t, shape in (("A_f", A_f, (F, D)), ("B_f", B_f, (N, F)), ("A", A, (Rt, D)), ("B", B, (N, Rt))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    if F + Rt == 0:
        raise ValueError("A_f and A have no ranks")
    return T, F + Rt


def _check_op_args(x, A_f, B_f, A, B, top_k, temperature, threshold, scaling, dropout_p):
    _check_op_scalars(top_k, temperature, threshold, scaling, dropout_p)
    return _check_op_banks(x, A_f, B_f, A, B)


def _check_bwd_args(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, scaling, dropout_p,
                    check_values=True):
    T, R = _check_op_args(x, A_f, B_f, A, B, top_k, temperature, threshold, scaling, dropout_p)
    ct = _compute_dtype(x)
    _check_tensor(dy, "dy", FLOAT_DTYPES + (torch.float64,), x.device)
    if tuple(dy.shape) != (T, B.shape[0]):
        raise ValueError(f"dy must have shape [{T}, {B.shape[0]}], got {tuple(dy.shape)}")
    _check_tensor(p, "p", (ct,), x.device)
    _check_tensor(rho, "rho", (ct,), x.device)
    _check_tensor(idx, "idx", (torch.int64,), x.device)
    k = num_selected(top_k, R)
    for name, t, shape in (("p", p, (T, R)), ("idx", idx, (T, k)), ("rho", rho, (T,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    # idx addresses columns of p on the CPU path (gather / scatter): range-checked there. The
    # Triton backward rebuilds the top-k set by comparing column ids with idx (no memory is
    # addressed by an index value), so an out-of-range entry on CUDA selects no rank; it is not
    # checked there, which would need a host sync.
    if check_values and x.device.type == "cpu" and idx.numel() and not bool(((idx >= 0) & (idx < R)).all()):
        raise IndexError(f"idx must hold rank indices in [0, {R}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")


# --- registration (schemas: ops/_schemas.py) -----------------------------------------------
# Kernels (ATen for every device without its own, Triton on CUDA), fakes and autograd.

def _mora_fwd_kernel(x, A_f, B_f, A, B, top_k, temperature, threshold, training, scaling, dropout_p, seed):
    """MoRA forward on x [T, D]: (delta [T, N], p [T, R], top-k indices [T, k] int64, ρ [T])."""
    _check_op_args(x, A_f, B_f, A, B, top_k, temperature, threshold, scaling, dropout_p)
    return _fwd_aten(x, A_f, B_f, A, B, top_k, temperature, threshold, training, scaling, dropout_p, seed)


def _mora_bwd_kernel(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, training, scaling,
                     dropout_p, seed, need_dx, need_dA, need_dB):
    """MoRA backward: (dx, dA, dB) for the trainable ranks; empty tensors where not needed."""
    _check_bwd_args(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, scaling, dropout_p)
    dx, dA, dB = _bwd_aten(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, training,
                           scaling, dropout_p, seed, need_dx, need_dA, need_dB)
    return _or_empty(dx, x), _or_empty(dA, A), _or_empty(dB, B)


def _or_empty(t, like):
    return like.new_empty(0) if t is None else t


# CompositeExplicitAutograd: every device without a kernel of its own (CPU; CUDA has Triton).
torch.library.register_kernel("trainops::mora_fwd", None, _mora_fwd_kernel)
torch.library.register_kernel("trainops::mora_bwd", None, _mora_bwd_kernel)


@torch.library.register_fake("trainops::mora_fwd")
def _(x, A_f, B_f, A, B, top_k, temperature, threshold, training, scaling, dropout_p, seed):
    T, R = _check_op_args(x, A_f, B_f, A, B, top_k, temperature, threshold, scaling, dropout_p)
    ct = _compute_dtype(x)
    k = num_selected(top_k, R)
    return (x.new_empty(T, B.shape[0]), x.new_empty(T, R, dtype=ct), x.new_empty(T, k, dtype=torch.int64),
            x.new_empty(T, dtype=ct))


@torch.library.register_fake("trainops::mora_bwd")
def _(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, training, scaling, dropout_p, seed,
      need_dx, need_dA, need_dB):
    _check_bwd_args(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, scaling, dropout_p,
                    check_values=False)  # a fake has no values
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(A) if need_dA else A.new_empty(0),
            torch.empty_like(B) if need_dB else B.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, A_f, B_f, A, B, top_k, temperature, threshold, training, scaling, dropout_p, seed = inputs
    _, p, idx, rho = output
    ctx.save_for_backward(x, A_f, B_f, A, B, p, idx, rho)
    ctx.args = (top_k, temperature, threshold, training, scaling, dropout_p, seed)


def _backward(ctx, d_delta, _dp, _didx, _drho):
    x, A_f, B_f, A, B, p, idx, rho = ctx.saved_tensors
    need_dx, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
    dx, dA, dB = torch.ops.trainops.mora_bwd(d_delta, x, A_f, B_f, A, B, p, idx, rho, *ctx.args,
                                             need_dx, need_dA, need_dB)
    return (dx if need_dx else None, None, None, dA if need_dA else None, dB if need_dB else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("trainops::mora_fwd", _backward, setup_context=_setup_context)

if HAS_TRITON:
    @torch.library.register_kernel("trainops::mora_fwd", "cuda")
    def _(x, A_f, B_f, A, B, top_k, temperature, threshold, training, scaling, dropout_p, seed):
        from trainops.kernels import mora as km

        _check_op_args(x, A_f, B_f, A, B, top_k, temperature, threshold, scaling, dropout_p)
        return km.mora_forward(x, A_f, B_f, A, B, top_k, temperature, threshold, training, scaling,
                               dropout_p, seed)

    @torch.library.register_kernel("trainops::mora_bwd", "cuda")
    def _(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, training, scaling, dropout_p,
          seed, need_dx, need_dA, need_dB):
        from trainops.kernels import mora as km

        _check_bwd_args(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, scaling, dropout_p)
        dx, dA, dB = km.mora_backward(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold,
                                      training, scaling, dropout_p, seed, need_dx, need_dA, need_dB)
        return _or_empty(dx, x), _or_empty(dA, A), _or_empty(dB, B)


# --- functional wrapper ---------------------------------------------------------------------

def _check_tensor(t, name, dtypes, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _validate(x, A, B, frozen_A, frozen_B, top_k, temperature, threshold, scaling, dropout_p, check_nan):
    act = FLOAT_DTYPES + ((torch.float64,) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else ())
    _check_tensor(x, "x", act)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): nothing to adapt")
    adapter = (torch.float32, x.dtype)
    _check_tensor(A, "A", adapter, x.device)
    _check_tensor(B, "B", (A.dtype,), x.device)
    if A.dim() != 2 or A.shape[1] != x.shape[-1]:
        raise ValueError(f"A must have shape [ranks, {x.shape[-1]}] (in_features of x), got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"B must have shape [out_features, {A.shape[0]}] (ranks of A), got {tuple(B.shape)}")
    if (frozen_A is None) != (frozen_B is None):
        raise ValueError("frozen_A and frozen_B must be given together")
    if frozen_A is not None:
        _check_tensor(frozen_A, "frozen_A", (A.dtype,), x.device)
        _check_tensor(frozen_B, "frozen_B", (A.dtype,), x.device)
        if frozen_A.dim() != 2 or frozen_A.shape[1] != A.shape[1]:
            raise ValueError(f"frozen_A must have shape [frozen ranks, {A.shape[1]}], got {tuple(frozen_A.shape)}")
        if frozen_B.dim() != 2 or frozen_B.shape != (B.shape[0], frozen_A.shape[0]):
            raise ValueError(f"frozen_B must have shape [{B.shape[0]}, {frozen_A.shape[0]}], got {tuple(frozen_B.shape)}")
    if A.shape[0] + (0 if frozen_A is None else frozen_A.shape[0]) == 0:
        raise ValueError("A (with frozen_A) has no ranks")
    temperature, threshold, scaling, dropout_p = _check_op_scalars(top_k, temperature, threshold, scaling, dropout_p)
    if check_nan:
        for name, t in (("x", x), ("A", A), ("B", B), ("frozen_A", frozen_A), ("frozen_B", frozen_B)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
    return temperature, threshold, scaling, dropout_p


def mora_routing(x, A, B, *, top_k=8, temperature=0.03, threshold=0.2, training=True, scaling=1.0,
                 dropout_p=0.0, seed=None, frozen_A=None, frozen_B=None, check_nan=True):
    """Like :func:`mora`, also returning the routing: (delta, p [T, R], idx [T, k], ρ [T])."""
    temperature, threshold, scaling, dropout_p = _validate(
        x, A, B, frozen_A, frozen_B, top_k, temperature, threshold, scaling, dropout_p, check_nan)
    training = bool(training)
    seed = resolve_seed(training and dropout_p > 0.0, seed)
    if frozen_A is None:
        frozen_A, frozen_B = A.new_empty(0, A.shape[1]), B.new_empty(B.shape[0], 0)
    x2 = x.reshape(-1, x.shape[-1])
    delta, p, idx, rho = torch.ops.trainops.mora_fwd(x2, frozen_A, frozen_B, A, B, top_k, temperature,
                                                     threshold, training, scaling, dropout_p, seed)
    return delta.view(*x.shape[:-1], B.shape[0]), p, idx, rho


def mora(x, A, B, *, top_k=8, temperature=0.03, threshold=0.2, training=True, scaling=1.0, dropout_p=0.0,
         seed=None, frozen_A=None, frozen_B=None, check_nan=True):
    """MoRA adapter delta (arXiv 2506.21035): each rank-1 pair (A_i, B_i) is an expert.

        x̃ = dropout(x) (training only),  p = x̃ Aᵀ,  s = p / ‖p‖₂
        keep the top-k of the signed s (k = max(top_k, 2)),  w = softmax(s_K / τ)
        eval only: w ← w · 1[s ≥ threshold] (no renormalization)
        returns ((p ⊙ w) Bᵀ) · scaling, shape x.shape[:-1] + (out_features,)

    x: [..., in] fp32/bf16/fp16 (fp64 on CPU, for gradcheck). A: [R, in], B: [out, R],
    fp32 or x's dtype; accumulation is fp32. ``frozen_A`` [F, in] / ``frozen_B`` [out, F]:
    earlier tasks' ranks, routed over together with A, B (ranks F.. are A's) and given no
    gradient. ``seed`` fixes the dropout mask (None: drawn from torch's generator).
    ``check_nan`` scans the inputs for NaN/Inf (one reduction; off in ``MoRALinear``).
    Returns the delta only: add the frozen base layer's output yourself.
    """
    return mora_routing(x, A, B, top_k=top_k, temperature=temperature, threshold=threshold, training=training,
                        scaling=scaling, dropout_p=dropout_p, seed=seed, frozen_A=frozen_A, frozen_B=frozen_B,
                        check_nan=check_nan)[0]
