"""Triton kernels of the fused MoE router: scores + top-k + load-balancing statistics
(forward) and the gate-weight plus load-balancing-loss gradient (backward).

Forward, per token t with logits x (fp32 math whatever the input dtype):

    s = softmax(x) or sigmoid(x)
    i_1..i_k = top-k of s + b        (b: DeepSeek-V3 aux-loss-free bias; ties -> lower index)
    w_j = s[i_j]  (/ Σ_j s[i_j] when renormalizing)
    counts[e] += #{j: i_j = e},  prob_sum += p  (p = s, or s / Σ s for sigmoid),
    z_sum += logsumexp(x)²       (valid tokens only; router z-loss, ST-MoE arXiv 2202.08906)

The load-balancing loss LBL = coeff·N_E·Σ_i f_i·P_i (Switch Transformer arXiv 2101.03961;
global-batch f: "Demons in the Detail", arXiv 2501.11873) reaches the logits only through
prob_sum, with dLBL/dprob_sum_i = coeff·N_E·f_i/T a per-expert constant. The backward
kernel recomputes s from the logits and applies, in one pass per row,

    ds = [gP (softmax) | (gP − Σ gP·q)/Σs (sigmoid)] (valid rows) + scatter of dL/dg_j
    dx = s ⊙ (ds − Σ s·ds)  (softmax)  |  ds ⊙ s(1−s)  (sigmoid)   (+ 2·gz·lse·softmax(x))

Determinism: each program writes partial sums for its BLOCK_T rows; the partials are
added in program order by torch.sum (no float atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096


@triton.jit
def _scores(x, cmask, SOFTMAX: tl.constexpr, NEED_LSE: tl.constexpr):
    """(s, lse, softmax(x)) of a [BT, BE] tile whose padding columns hold -inf."""
    if SOFTMAX or NEED_LSE:
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # rows that are all padding
        ex = tl.exp(x - m[:, None])
        ssum = tl.sum(ex, axis=1)
        lse = m + tl.log(ssum)
        sm = ex / ssum[:, None]
    else:
        lse = tl.zeros((x.shape[0],), tl.float32)
        sm = x
    if SOFTMAX:
        s = sm
    else:
        s = tl.where(cmask[None, :], 1.0 / (1.0 + tl.exp(-x)), 0.0)
    return s, lse, sm


@triton.jit
def _router_fwd_kernel(x_ptr, bias_ptr, mask_ptr, w_ptr, i_ptr, pp_ptr, pc_ptr, pz_ptr, T, E, stride_x,
                       K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                       SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_MASK: tl.constexpr, WITH_Z: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    rmask = rows < T
    cmask = cols < E
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=float("-inf")).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("-inf"))
    s, lse, sm = _scores(x, cmask, SOFTMAX, WITH_Z)
    if HAS_BIAS:
        sel = s + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        sel = s
    sel = tl.where(cmask[None, :], sel, float("-inf"))
    if HAS_MASK:
        valid = rmask & (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0)
    else:
        valid = rmask
    kcols = tl.arange(0, KP)
    gk = tl.zeros((BT, KP), tl.float32)
    ik = tl.zeros((BT, KP), tl.int64)
    gsum = tl.zeros((BT,), tl.float32)
    cnt = tl.zeros((BT, BE), tl.int32)
    for j in tl.static_range(K):
        mx = tl.max(sel, axis=1)
        idx = tl.min(tl.where(sel == mx[:, None], cols[None, :], BE), axis=1)  # lowest index among ties
        idx = tl.minimum(idx, E - 1)  # NaN rows: keep the index in range (the wrapper reports them)
        hit = cols[None, :] == idx[:, None]
        g = tl.sum(tl.where(hit, s, 0.0), axis=1)
        gsum += g
        gk = tl.where(kcols[None, :] == j, g[:, None], gk)
        ik = tl.where(kcols[None, :] == j, idx[:, None].to(tl.int64), ik)
        cnt += hit.to(tl.int32)
        sel = tl.where(hit, float("-inf"), sel)
    if RENORM:
        gk = gk / gsum[:, None]
    out_offs = rows[:, None] * K + kcols[None, :]
    out_mask = rmask[:, None] & (kcols[None, :] < K)
    tl.store(w_ptr + out_offs, gk, mask=out_mask)
    tl.store(i_ptr + out_offs, ik, mask=out_mask)
    if SOFTMAX:
        p = s
    else:
        p = s / tl.sum(s, axis=1)[:, None]
    p = tl.where(valid[:, None] & cmask[None, :], p, 0.0)
    tl.store(pp_ptr + pid * E + cols, tl.sum(p, axis=0), mask=cmask)
    tl.store(pc_ptr + pid * E + cols, tl.sum(tl.where(valid[:, None], cnt, 0), axis=0), mask=cmask)
    if WITH_Z:
        tl.store(pz_ptr + pid, tl.sum(tl.where(valid, lse * lse, 0.0), axis=0))


@triton.jit
def _router_bwd_kernel(gw_ptr, gp_ptr, gz_ptr, x_ptr, i_ptr, mask_ptr, dx_ptr, T, E, stride_x,
                       K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, SOFTMAX: tl.constexpr,
                       RENORM: tl.constexpr, HAS_MASK: tl.constexpr, WITH_Z: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    rmask = rows < T
    cmask = cols < E
    tile_mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=tile_mask, other=float("-inf")).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("-inf"))
    s, lse, sm = _scores(x, cmask, SOFTMAX, WITH_Z)
    if HAS_MASK:
        valid = rmask & (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0)
    else:
        valid = rmask
    gp = tl.load(gp_ptr + cols, mask=cmask, other=0.0)
    if SOFTMAX:
        ds = tl.where(valid[:, None], gp[None, :], 0.0)
    else:
        q = tl.sum(s, axis=1)
        dot = tl.sum(gp[None, :] * s, axis=1) / q
        ds = tl.where(valid[:, None], (gp[None, :] - dot[:, None]) / q[:, None], 0.0)
    if RENORM:
        gsum = tl.zeros((BT,), tl.float32)
        gdot = tl.zeros((BT,), tl.float32)
        for j in tl.static_range(K):
            idx = tl.load(i_ptr + rows * K + j, mask=rmask, other=0)
            g = tl.sum(tl.where(cols[None, :] == idx[:, None], s, 0.0), axis=1)
            gsum += g
            gdot += tl.load(gw_ptr + rows * K + j, mask=rmask, other=0.0) * g
        gsum = tl.where(rmask, gsum, 1.0)
        gdot = gdot / gsum
    bad = tl.zeros((BT,), tl.int32)
    for j in tl.static_range(K):
        idx = tl.load(i_ptr + rows * K + j, mask=rmask, other=0)
        bad = bad | ((idx < 0) | (idx >= E)).to(tl.int32)
        gwj = tl.load(gw_ptr + rows * K + j, mask=rmask, other=0.0)
        if RENORM:
            gwj = (gwj - gdot) / gsum
        ds += tl.where(cols[None, :] == idx[:, None], gwj[:, None], 0.0)
    if SOFTMAX:
        dx = s * (ds - tl.sum(s * ds, axis=1)[:, None])
    else:
        dx = ds * s * (1.0 - s)
    if WITH_Z:
        gz = tl.load(gz_ptr)
        dx += tl.where(valid, 2.0 * gz * lse, 0.0)[:, None] * sm
    # Indices only meet column ids in compares (nothing is addressed by them); a row naming an
    # expert outside [0, E) (a caller's bad input: the forward never makes one) gets a NaN
    # gradient row, visible without a host sync, instead of a silently wrong one.
    dx = tl.where(bad[:, None] != 0, float("nan"), dx)
    tl.store(dx_ptr + rows[:, None] * E + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)


def _blocks(T: int, E: int):
    be = triton.next_power_of_2(E)
    bt = max(1, min(triton.next_power_of_2(max(T, 1)), _TILE // be))
    return bt, be


def router_topk(logits: torch.Tensor, k: int, score: str, renormalize: bool, expert_bias, mask, with_z: bool):
    """Launch the forward kernel on [T, E] logits (row stride 1 required along E)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    T, E = logits.shape
    bt, be = _blocks(T, E)
    n_prog = triton.cdiv(T, bt)
    dev = logits.device
    weights = torch.empty(T, k, dtype=torch.float32, device=dev)
    indices = torch.empty(T, k, dtype=torch.int64, device=dev)
    part_p = torch.empty(max(n_prog, 1), E, dtype=torch.float32, device=dev)
    part_c = torch.empty(max(n_prog, 1), E, dtype=torch.int32, device=dev)
    part_z = torch.zeros(max(n_prog, 1), dtype=torch.float32, device=dev)
    if T == 0:
        part_p.zero_()
        part_c.zero_()
    else:
        bias = expert_bias.float().contiguous() if expert_bias is not None else logits
        m = mask.contiguous() if mask is not None else logits
        _router_fwd_kernel[(n_prog,)](
            logits, bias, m, weights, indices, part_p, part_c, part_z, T, E, logits.stride(0),
            K=k, KP=triton.next_power_of_2(k), BT=bt, BE=be, SOFTMAX=score == "softmax", RENORM=bool(renormalize),
            HAS_BIAS=expert_bias is not None, HAS_MASK=mask is not None, WITH_Z=bool(with_z),
        )
    # Partials added in program order: deterministic.
    return weights, indices, part_c.sum(0, dtype=torch.int64), part_p.sum(0), part_z.sum()


def router_topk_backward(grad_weights, grad_prob_sum, grad_z_sum, logits, indices, mask, score: str,
                         renormalize: bool, with_z: bool) -> torch.Tensor:
    """Launch the fused backward kernel → dL/dlogits (dtype of ``logits``)."""
    logits = logits.contiguous()
    T, E = logits.shape
    k = indices.shape[1]
    grad = torch.empty_like(logits)
    if T == 0:
        return grad
    bt, be = _blocks(T, E)
    gz = grad_z_sum.float().reshape(1).contiguous()
    m = mask.contiguous() if mask is not None else logits
    _router_bwd_kernel[(triton.cdiv(T, bt),)](
        grad_weights.float().contiguous(), grad_prob_sum.float().contiguous(), gz, logits, indices.contiguous(), m,
        grad, T, E, logits.stride(0),
        K=k, BT=bt, BE=be, SOFTMAX=score == "softmax", RENORM=bool(renormalize), HAS_MASK=mask is not None,
        WITH_Z=bool(with_z),
    )
    return grad
