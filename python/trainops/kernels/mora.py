"""Triton kernels of MoRA, rank-1 LoRA expert mixing ("Little By Little", arXiv 2506.21035).

Each rank-1 pair (A_i key, B_i value) of the adapter is an expert. With x̃ = dropout(x):

    p = x̃ Aᵀ (all R ranks),  ρ = 1 / max(‖p‖₂, ε),  s = p ρ
    K = top-k of the signed s (k = max(top_k, 2)),  g = softmax(s_K / τ)
    w = g · 1[s ≥ δ] in eval (no renormalization), w = g in training
    delta = ((p ⊙ w) Bᵀ) · scaling          (the value uses the raw projection p)

The rank bank is given as two sources, frozen ranks (A_f, B_f) followed by trainable
ranks (A_t, B_t): the kernels read rank r from one or the other with masked loads, so
the old and new ranks are never concatenated. Nothing of size T×R×d (per-expert
outputs), no −∞ score matrix and no merged ΔW is materialized: the only T×R tensors are
p and the gated projection Z = p ⊙ w (fp32).

Kernels:
  _shrink_gate_kernel   p, ρ, signed top-k, softmax, eval pruning in one pass → Z, p, idx, ρ
  _expand_kernel        delta = (Z Bᵀ) · scaling
  _gate_bwd_kernel      dZ = scaling · dY B, then the gate backward (the softmax-over-top-k Jacobian):
                          h = dZ ⊙ p ⊙ m;  du_K = g_K (h_K − Σ g h);  dn = du / τ
                          dp = dZ ⊙ w + ρ (dn − s (s·dn))        (dense over all R)
  _dx_kernel            dx̃ = dp A, times the dropout mask
  _tn_kernel            Σ_t L[t, i] R[t, j]: dA_t = dp_tᵀ x̃ and dB_t = scaling · dYᵀ Z_t

Dropout is a counter-based hash of the element index (the stream of
``trainops._counter_rng.hash_uniform01``), so the backward regenerates the mask from
the seed instead of saving it. Accumulation is fp32 throughout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainops.formats import seed_key
from trainops.kernels.quantize import _uniform01


def block_r(num_ranks: int) -> int:
    """Rank tile: all ranks of a row are held in one tile (top-k and softmax are row-wise)."""
    return max(16, triton.next_power_of_2(num_ranks))


@triton.jit
def _load_x(x_ptr, t, d, T, D, stride_xt, stride_xd, drop_p, drop_scale, key, DROPOUT: tl.constexpr):
    """x̃ tile [BT, BD] in fp32: x, zeroed where u(t·D + d) < drop_p and scaled by 1/(1 − p)."""
    mask = (t[:, None] < T) & (d[None, :] < D)
    xt = tl.load(x_ptr + t[:, None] * stride_xt + d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        u = _uniform01(t[:, None].to(tl.int64) * D + d[None, :], key)
        xt = tl.where(u >= drop_p, xt * drop_scale, 0.0)
    return xt


@triton.jit
def _load_ranks(f_ptr, t_ptr, r, c, F, R, C, stride_fr, stride_fc, stride_tr, stride_tc):
    """Tile [len(r), len(c)] of the bank [R, C] whose rows r < F come from the frozen
    source and rows F ≤ r < R from the trainable one (two masked loads, no concatenation)."""
    cm = c[None, :] < C
    fm = (r[:, None] < F) & cm
    tm = (r[:, None] >= F) & (r[:, None] < R) & cm
    rt = tl.where(r >= F, r - F, 0)
    a = tl.load(f_ptr + r[:, None] * stride_fr + c[None, :] * stride_fc, mask=fm, other=0.0).to(tl.float32)
    b = tl.load(t_ptr + rt[:, None] * stride_tr + c[None, :] * stride_tc, mask=tm, other=0.0).to(tl.float32)
    return a + b


@triton.jit
def _dot(a, b, ref_ptr, LOWP: tl.constexpr):
    """fp32-accumulated a·b; with LOWP the fp32 tiles are fed to the tensor cores in the
    activations' 16-bit dtype (bf16/fp16 inputs only), otherwise exact fp32 products."""
    if LOWP:
        return tl.dot(a.to(ref_ptr.dtype.element_ty), b.to(ref_ptr.dtype.element_ty))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _gate(p, rho, sel, r, R, inv_tau, threshold, TRAINING: tl.constexpr):
    """Softmax over the selected ranks of s / τ, pruned by s ≥ δ in eval: (s, g, w)."""
    s = p * rho[:, None]
    smax = tl.max(tl.where(sel, s, float("-inf")), axis=1)
    e = tl.where(sel, tl.exp((s - smax[:, None]) * inv_tau), 0.0)
    den = tl.sum(e, axis=1)
    g = e / tl.where(den > 0.0, den, 1.0)[:, None]  # den = 0 only on padding rows
    if TRAINING:
        w = g
    else:
        w = tl.where(s >= threshold, g, 0.0)
    return s, g, w


@triton.jit
def _shrink_gate_kernel(x_ptr, af_ptr, at_ptr, z_ptr, p_ptr, idx_ptr, rho_ptr,
                        T, D, F, R, K,
                        stride_xt, stride_xd, stride_afr, stride_afd, stride_atr, stride_atd,
                        inv_tau, threshold, drop_p, drop_scale, key,
                        TRAINING: tl.constexpr, DROPOUT: tl.constexpr, SELECT_ALL: tl.constexpr, LOWP: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fused shrink + gate for BLOCK_T tokens: p = x̃ Aᵀ over all ranks (fp32 accumulator,
    one pass over d_in), ρ = 1/max(‖p‖, ε), signed top-k of s = pρ by k rounds of row max
    (lowest index on ties), g = softmax(s_K/τ), eval pruning, Z = p ⊙ w."""
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        xt = _load_x(x_ptr, t, d, T, D, stride_xt, stride_xd, drop_p, drop_scale, key, DROPOUT)
        a = _load_ranks(af_ptr, at_ptr, r, d, F, R, D, stride_afr, stride_afd, stride_atr, stride_atd)
        acc += _dot(xt, tl.trans(a), x_ptr, LOWP)
    p = acc
    norm = tl.sqrt(tl.sum(p * p, axis=1))
    rho = 1.0 / tl.maximum(norm, 1e-12)  # ε = 1e-12 as torch.nn.functional.normalize
    valid = r < R
    if SELECT_ALL:
        sel = valid[None, :] & tmask[:, None]
        for j in range(0, K):
            tl.store(idx_ptr + t.to(tl.int64) * K + j, tl.zeros_like(t).to(tl.int64) + j, mask=tmask)
    else:
        cur = tl.where(valid[None, :], p * rho[:, None], float("-inf"))
        chosen = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.int32)
        for j in range(0, K):
            m = tl.max(cur, axis=1)
            first = tl.min(tl.where(cur == m[:, None], r[None, :], BLOCK_R), axis=1)
            tl.store(idx_ptr + t.to(tl.int64) * K + j, first.to(tl.int64), mask=tmask)
            hit = r[None, :] == first[:, None]
            chosen = tl.where(hit, 1, chosen)
            cur = tl.where(hit, float("-inf"), cur)
        sel = chosen != 0
    s, g, w = _gate(p, rho, sel, r, R, inv_tau, threshold, TRAINING)
    z = p * w
    offs = t.to(tl.int64)[:, None] * R + r[None, :]
    m2 = tmask[:, None] & valid[None, :]
    tl.store(z_ptr + offs, z, mask=m2)
    tl.store(p_ptr + offs, p, mask=m2)
    tl.store(rho_ptr + t, rho, mask=tmask)


@triton.jit
def _expand_kernel(z_ptr, bf_ptr, bt_ptr, out_ptr, T, N, F, R,
                   stride_bfn, stride_bfr, stride_btn, stride_btr, stride_ot, stride_on, scaling,
                   LOWP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gated expand: delta[t, n] = scaling · Σ_r Z[t, r] B[n, r] (fp32 accumulation)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    z = tl.load(z_ptr + t.to(tl.int64)[:, None] * R + r[None, :], mask=(t[:, None] < T) & (r[None, :] < R), other=0.0)
    # B is [N, R]: the bank tile is read with rows = ranks (strides swapped).
    b = _load_ranks(bf_ptr, bt_ptr, r, n, F, R, N, stride_bfr, stride_bfn, stride_btr, stride_btn)
    out = _dot(z, b, out_ptr, LOWP) * scaling
    tl.store(out_ptr + t[:, None] * stride_ot + n[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (n[None, :] < N))


@triton.jit
def _gate_bwd_kernel(dy_ptr, bf_ptr, bt_ptr, p_ptr, idx_ptr, rho_ptr, dp_ptr, z_ptr,
                     T, N, F, R, K,
                     stride_dyt, stride_dyn, stride_bfn, stride_bfr, stride_btn, stride_btr,
                     scaling, inv_tau, threshold,
                     TRAINING: tl.constexpr, LOWP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """dZ = scaling · dY B (one pass over d_out), then the gate backward with the top-k set
    rebuilt from idx and g recomputed from p, ρ:
        h = dZ ⊙ p ⊙ m,  du = g (h − Σ g h),  ds = du / τ,  dp = dZ ⊙ w + ρ (ds − s (s·ds)).
    Writes dp (dense over R) and Z = p ⊙ w (for dB)."""
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    r = tl.arange(0, BLOCK_R)
    valid = r < R
    dz = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + t[:, None] * stride_dyt + n[None, :] * stride_dyn,
                     mask=tmask[:, None] & (n[None, :] < N), other=0.0).to(tl.float32)
        b = _load_ranks(bf_ptr, bt_ptr, r, n, F, R, N, stride_bfr, stride_bfn, stride_btr, stride_btn)
        dz += _dot(dy, tl.trans(b), dy_ptr, LOWP)
    dz = dz * scaling
    offs = t.to(tl.int64)[:, None] * R + r[None, :]
    m2 = tmask[:, None] & valid[None, :]
    p = tl.load(p_ptr + offs, mask=m2, other=0.0)
    rho = tl.load(rho_ptr + t, mask=tmask, other=1.0)
    chosen = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.int32)
    for j in range(0, K):
        ij = tl.load(idx_ptr + t.to(tl.int64) * K + j, mask=tmask, other=-1)
        chosen = tl.where(r[None, :] == ij[:, None], 1, chosen)
    sel = chosen != 0
    s, g, w = _gate(p, rho, sel, r, R, inv_tau, threshold, TRAINING)
    if TRAINING:
        h = tl.where(sel, dz * p, 0.0)
    else:
        h = tl.where(sel & (s >= threshold), dz * p, 0.0)
    gh = tl.sum(g * h, axis=1)
    ds = tl.where(sel, g * (h - gh[:, None]), 0.0) * inv_tau
    # Below ε the normalization is p/ε, whose Jacobian has no projection term.
    norm = tl.sqrt(tl.sum(p * p, axis=1))
    sds = tl.where(norm > 1e-12, tl.sum(s * ds, axis=1), 0.0)
    dp = dz * w + rho[:, None] * (ds - s * sds[:, None])
    tl.store(dp_ptr + offs, dp, mask=m2)
    tl.store(z_ptr + offs, p * w, mask=m2)


@triton.jit
def _dx_kernel(dp_ptr, af_ptr, at_ptr, dx_ptr, T, D, F, R,
               stride_afr, stride_afd, stride_atr, stride_atd, stride_dxt, stride_dxd,
               drop_p, drop_scale, key,
               DROPOUT: tl.constexpr, LOWP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """dx = (dp A) ⊙ dropout mask / (1 − p): the adapter's input gradient."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_R)
    dp = tl.load(dp_ptr + t.to(tl.int64)[:, None] * R + r[None, :], mask=(t[:, None] < T) & (r[None, :] < R), other=0.0)
    a = _load_ranks(af_ptr, at_ptr, r, d, F, R, D, stride_afr, stride_afd, stride_atr, stride_atd)
    dx = _dot(dp, a, dx_ptr, LOWP)
    if DROPOUT:
        u = _uniform01(t[:, None].to(tl.int64) * D + d[None, :], key)
        dx = tl.where(u >= drop_p, dx * drop_scale, 0.0)
    tl.store(dx_ptr + t[:, None] * stride_dxt + d[None, :] * stride_dxd, dx.to(dx_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (d[None, :] < D))


@triton.jit
def _tn_kernel(l_ptr, r_ptr, out_ptr, T, I, J, stride_lt, stride_li, stride_rt, stride_rj,
               stride_oi, stride_oj, scale, drop_p, drop_scale, key,
               DROPOUT: tl.constexpr, LOWP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
               BLOCK_J: tl.constexpr):
    """out[i, j] = scale · Σ_t L[t, i] R̃[t, j] with R̃ = dropout(R) when DROPOUT (R is x, J = d_in).
    Reduction over tokens in one program per output tile: deterministic, no atomics."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        lt = tl.load(l_ptr + t[None, :] * stride_lt + i[:, None] * stride_li,
                     mask=(t[None, :] < T) & (i[:, None] < I), other=0.0).to(tl.float32)
        rt = _load_x(r_ptr, t, j, T, J, stride_rt, stride_rj, drop_p, drop_scale, key, DROPOUT)
        acc += _dot(lt, rt, out_ptr, LOWP)
    acc = acc * scale
    tl.store(out_ptr + i[:, None] * stride_oi + j[None, :] * stride_oj, acc.to(out_ptr.dtype.element_ty),
             mask=(i[:, None] < I) & (j[None, :] < J))


# --- launchers ------------------------------------------------------------------------------


def _drop_args(training: bool, dropout_p: float, seed: int):
    dropout = training and dropout_p > 0.0
    scale = 1.0 / (1.0 - dropout_p) if dropout else 1.0
    return dropout, float(dropout_p), scale, seed_key(seed) if dropout else 0


def _lowp(x, A) -> bool:
    """16-bit tensor-core products when activations and adapters share a 16-bit dtype."""
    return x.dtype in (torch.bfloat16, torch.float16) and A.dtype == x.dtype


def _warps(block_r: int) -> int:
    # The [BLOCK_T, BLOCK_R] gate tiles live in registers: more warps for wide rank banks.
    return 8 if block_r >= 128 else 4


def _stages(lowp: bool) -> int:
    # fp32 tiles of a 256-wide rank bank with 3 pipeline stages need >164 KiB of shared
    # memory (the A100 limit); 2 stages fit.
    return 3 if lowp else 2


def num_selected(top_k: int, num_ranks: int) -> int:
    """k = max(top_k, 2), at most the number of ranks."""
    return min(max(top_k, 2), num_ranks)


def mora_forward(x, A_f, B_f, A, B, top_k, temperature, threshold, training, scaling, dropout_p, seed):
    """Forward: (delta [T, N] in x.dtype, p [T, R] fp32, idx [T, k] int64, rho [T] fp32).

    x [T, D]; A_f [F, D], B_f [N, F] frozen; A [R_t, D], B [N, R_t] trainable (any strides)."""
    T, D = x.shape
    F, Rt, N = A_f.shape[0], A.shape[0], B.shape[0]
    R = F + Rt
    K = num_selected(top_k, R)
    BR = block_r(R)
    dev = x.device
    z = torch.empty(T, R, device=dev, dtype=torch.float32)
    p = torch.empty(T, R, device=dev, dtype=torch.float32)
    idx = torch.empty(T, K, device=dev, dtype=torch.int64)
    rho = torch.empty(T, device=dev, dtype=torch.float32)
    out = torch.empty(T, N, device=dev, dtype=x.dtype)
    af = A_f if F > 0 else A  # an empty source is never read (all its loads are masked)
    bf = B_f if F > 0 else B
    dropout, dp_, dscale, key = _drop_args(training, dropout_p, seed)
    lowp = _lowp(x, A)
    BT = 16 if T <= 16 else 32 if BR > 128 else 64
    BD = 32 if BR > 128 else 64
    _shrink_gate_kernel[(triton.cdiv(T, BT),)](
        x, af, A, z, p, idx, rho, T, D, F, R, K,
        x.stride(0), x.stride(1), af.stride(0), af.stride(1), A.stride(0), A.stride(1),
        1.0 / temperature, threshold, dp_, dscale, key,
        TRAINING=bool(training), DROPOUT=dropout, SELECT_ALL=K == R, LOWP=lowp,
        BLOCK_T=BT, BLOCK_R=BR, BLOCK_D=BD, num_warps=_warps(BR), num_stages=_stages(lowp))
    BN = 64
    _expand_kernel[(triton.cdiv(T, BT), triton.cdiv(N, BN))](
        z, bf, B, out, T, N, F, R,
        bf.stride(0), bf.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1), float(scaling),
        LOWP=lowp, BLOCK_T=BT, BLOCK_R=BR, BLOCK_N=BN, num_warps=_warps(BR))
    return out, p, idx, rho


def mora_backward(dy, x, A_f, B_f, A, B, p, idx, rho, top_k, temperature, threshold, training, scaling,
                  dropout_p, seed, need_dx=True, need_dA=True, need_dB=True):
    """Backward: (dx, dA, dB) for the trainable ranks only (None where not needed)."""
    T, D = x.shape
    F, Rt, N = A_f.shape[0], A.shape[0], B.shape[0]
    R = F + Rt
    K = idx.shape[1]
    BR = block_r(R)
    dev = x.device
    af = A_f if F > 0 else A
    bf = B_f if F > 0 else B
    dropout, dp_, dscale, key = _drop_args(training, dropout_p, seed)
    lowp = _lowp(x, A)
    dp = torch.empty(T, R, device=dev, dtype=torch.float32)
    z = torch.empty(T, R, device=dev, dtype=torch.float32)
    BT = 16 if T <= 16 else 32 if BR > 128 else 64
    _gate_bwd_kernel[(triton.cdiv(T, BT),)](
        dy, bf, B, p, idx, rho, dp, z, T, N, F, R, K,
        dy.stride(0), dy.stride(1), bf.stride(0), bf.stride(1), B.stride(0), B.stride(1),
        float(scaling), 1.0 / temperature, threshold,
        TRAINING=bool(training), LOWP=lowp, BLOCK_T=BT, BLOCK_R=BR, BLOCK_N=32 if BR > 128 else 64,
        num_warps=_warps(BR), num_stages=_stages(lowp))
    dx = dA = dB = None
    if need_dx:
        dx = torch.empty(T, D, device=dev, dtype=x.dtype)
        BD = 64
        _dx_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
            dp, af, A, dx, T, D, F, R,
            af.stride(0), af.stride(1), A.stride(0), A.stride(1), dx.stride(0), dx.stride(1),
            dp_, dscale, key, DROPOUT=dropout, LOWP=lowp, BLOCK_T=BT, BLOCK_R=BR, BLOCK_D=BD)
    if need_dA:
        dA = torch.empty(Rt, D, device=dev, dtype=A.dtype)
        if Rt > 0:
            dpt = dp[:, F:]
            BI = 16 if Rt <= 16 else 32
            _tn_kernel[(triton.cdiv(Rt, BI), triton.cdiv(D, 64))](
                dpt, x, dA, T, Rt, D, dpt.stride(0), dpt.stride(1), x.stride(0), x.stride(1),
                dA.stride(0), dA.stride(1), 1.0, dp_, dscale, key,
                DROPOUT=dropout, LOWP=lowp, BLOCK_T=32, BLOCK_I=BI, BLOCK_J=64)
    if need_dB:
        dB = torch.empty(N, Rt, device=dev, dtype=B.dtype)
        if Rt > 0:
            zt = z[:, F:]
            BJ = 16 if Rt <= 16 else 32
            _tn_kernel[(triton.cdiv(N, 64), triton.cdiv(Rt, BJ))](
                dy, zt, dB, T, N, Rt, dy.stride(0), dy.stride(1), zt.stride(0), zt.stride(1),
                dB.stride(0), dB.stride(1), float(scaling), 0.0, 1.0, 0,
                DROPOUT=False, LOWP=lowp, BLOCK_T=32, BLOCK_I=64, BLOCK_J=BJ)
    return dx, dA, dB
