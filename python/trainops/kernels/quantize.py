"""Triton kernels of blockwise quantization: quantize (optionally with error feedback)
and dequantize-accumulate.

Per block of ``B`` elements (see :mod:`trainops.formats` for the code tables):

    scale = absmax / max_code,  y = min(|x| / scale, max_code),  code = round(y) on the grid

(scale one ulp smaller where max_code * scale would overflow to Inf, so codes decode finite)

with round-to-nearest (ties to the even code) or unbiased stochastic rounding from a
counter-based hash (u_i = lowbias32(i xor key)). Error feedback (EF-SGD, Seide et al.
2014; Karimireddy et al. 2019) fuses e ← e + g; q = Q(e); e ← e − deQ(q) in one pass.
Dequantize-accumulate sums chunks in order: out ← out + Σ_c deQ(q_c) (the reduction
of the two-shot quantized all-reduce, ZeRO++ qgZ / Streaming DiLoCo, arXiv 2501.18512).

The arithmetic is the one of csrc/common/quant_format.h step for step (no FMA
contraction: kernels launch with ``enable_fp_fusion=False``), so CPU and GPU produce
the same bytes. One program handles ``ROWS`` blocks as a [ROWS, B] tile.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from trainops.formats import get_format, num_blocks, packed_bytes, seed_key

FORMAT_IDS = {"int8": 0, "int4": 1, "fp8_e4m3": 2, "fp4_e3m0": 3, "fp4_e2m1": 4}
_TILE_ELEMENTS = 4096
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pow2(e):
    """2^e for integer e in the normal range, exactly, from the exponent bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_half_even(t):
    return (t + 8388608.0) - 8388608.0


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _uniform01(offs, key):
    h = _lowbias32((offs & 0xFFFFFFFF).to(tl.uint32) ^ key.to(tl.uint32))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _round_int(y, u, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        lo = tl.floor(y)
        r = lo + tl.where(u < y - lo, 1.0, 0.0)
    else:
        r = _round_half_even(y)
    return r


@triton.jit
def _fp4_code(y, u, E3M0: tl.constexpr, STOCHASTIC: tl.constexpr):
    """3-bit magnitude index on the FP4 grid."""
    if E3M0:
        v1, v2, v3, v4, v5, v6, v7 = 0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0
    else:
        v1, v2, v3, v4, v5, v6, v7 = 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0
    if STOCHASTIC:
        lo = ((y >= v1).to(tl.int32) + (y >= v2).to(tl.int32) + (y >= v3).to(tl.int32)
              + (y >= v4).to(tl.int32) + (y >= v5).to(tl.int32) + (y >= v6).to(tl.int32)
              + (y >= v7).to(tl.int32))
        vlo = _fp4_value(lo, E3M0)
        vhi = _fp4_value(tl.minimum(lo + 1, 7), E3M0)
        gap = vhi - vlo
        p = tl.where(gap > 0.0, (y - vlo) / tl.where(gap > 0.0, gap, 1.0), 0.0)
        idx = lo + tl.where(u < p, 1, 0)
    else:
        # Midpoints; strict at even j and inclusive at odd j sends ties to the even index.
        idx = ((y > (0.0 + v1) / 2).to(tl.int32) + (y >= (v1 + v2) / 2).to(tl.int32)
               + (y > (v2 + v3) / 2).to(tl.int32) + (y >= (v3 + v4) / 2).to(tl.int32)
               + (y > (v4 + v5) / 2).to(tl.int32) + (y >= (v5 + v6) / 2).to(tl.int32)
               + (y > (v6 + v7) / 2).to(tl.int32))
    return idx


@triton.jit
def _fp4_value(idx, E3M0: tl.constexpr):
    if E3M0:
        v = tl.where(idx > 0, _pow2(idx - 7), 0.0)
    else:
        # 0, 0.5 for idx < 2; (1 + m/2)·2^(e-1) with e = idx >> 1, m = idx & 1 otherwise.
        v = tl.where(idx < 2, idx.to(tl.float32) * 0.5,
                     (2 + (idx & 1)).to(tl.float32) * _pow2((idx >> 1) - 2))
    return v


@triton.jit
def _fp8_code(y, u, STOCHASTIC: tl.constexpr):
    """7-bit e4m3fn magnitude code of y in [0, 448]."""
    exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum = _pow2(tl.maximum(exponent, -6) - 3)
    r = _round_int(y / quantum, u, STOCHASTIC)
    v = r * quantum
    vb = v.to(tl.int32, bitcast=True)
    e = ((vb >> 23) & 0xFF) - 127
    return tl.where(v < 0.015625, r.to(tl.int32), ((e + 7) << 3) | ((vb >> 20) & 7))


@triton.jit
def _fp8_value(c7):
    e = c7 >> 3
    m = (c7 & 7).to(tl.float32)
    return tl.where(e == 0, m * 0.001953125, (8.0 + m) * _pow2(tl.maximum(e, 1) - 10))


@triton.jit
def _block_scale(absmax, MAX_CODE: tl.constexpr):
    """absmax / max_code, one ulp smaller where max_code * that overflows fp32 (quant::block_scale)."""
    s = absmax / MAX_CODE
    top = s * MAX_CODE
    return tl.where(top > 3.4028234663852886e38, (s.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), s)


@triton.jit
def _encode(v, a, scale_safe, u, FMT: tl.constexpr, MAX_CODE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Raw code (byte or nibble, int32) of v with |v| = a."""
    y = tl.minimum(a / scale_safe, MAX_CODE)
    negative = v < 0.0
    if FMT == 0 or FMT == 1:
        m = _round_int(y, u, STOCHASTIC).to(tl.int32)
        code = tl.where(negative, -m, m) & (0xFF if FMT == 0 else 0xF)
    elif FMT == 2:
        m = _fp8_code(y, u, STOCHASTIC)
        code = tl.where(negative & (m != 0), m | 0x80, m)
    else:
        m = _fp4_code(y, u, FMT == 3, STOCHASTIC)
        code = tl.where(negative & (m != 0), m | 0x8, m)
    return code


@triton.jit
def _decode(code, FMT: tl.constexpr):
    """Signed value (before scaling) of raw int32 codes."""
    if FMT == 0:
        v = tl.where(code >= 128, code - 256, code).to(tl.float32)
    elif FMT == 1:
        v = tl.where(code >= 8, code - 16, code).to(tl.float32)
    elif FMT == 2:
        mag = _fp8_value(code & 0x7F)
        v = tl.where(code >= 128, -mag, mag)
    else:
        mag = _fp4_value(code & 7, FMT == 3)
        v = tl.where(code >= 8, -mag, mag)
    return v


@triton.jit
def _quantize_kernel(x_ptr, err_ptr, data_ptr, scale_ptr, n, n_blocks, key,
                     FMT: tl.constexpr, MAX_CODE: tl.constexpr, B: tl.constexpr, ROWS: tl.constexpr,
                     STOCHASTIC: tl.constexpr, HAS_ERROR: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * B + tl.arange(0, B)[None, :]
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ERROR:
        v = v + tl.load(err_ptr + offs, mask=mask, other=0.0)
    a = tl.abs(v)
    bad = tl.max(tl.where(a <= 3.4028234663852886e38, 0, 1), axis=1)  # NaN fails the compare too
    scale = _block_scale(tl.max(tl.where(a <= 3.4028234663852886e38, a, 0.0), axis=1), MAX_CODE)
    finite = bad == 0
    ok = finite & (scale > 0.0)
    if STOCHASTIC:
        u = _uniform01(offs, key)
    else:
        u = a  # unused
    code = _encode(v, a, tl.where(ok, scale, 1.0)[:, None], u, FMT, MAX_CODE, STOCHASTIC)
    code = tl.where(ok[:, None], code, 0)
    tl.store(scale_ptr + rows, tl.where(finite, scale, float("nan")), mask=rows < n_blocks)
    if HAS_ERROR:
        residual = v - _decode(code, FMT) * scale[:, None]
        tl.store(err_ptr + offs, residual, mask=mask & finite[:, None])
    if FMT == 1 or FMT == 3 or FMT == 4:
        lo, hi = tl.split(tl.reshape(code, (ROWS, B // 2, 2)))
        byte_offs = rows[:, None] * (B // 2) + tl.arange(0, B // 2)[None, :]
        tl.store(data_ptr + byte_offs, (lo | (hi << 4)).to(tl.uint8), mask=byte_offs < (n + 1) // 2)
    else:
        tl.store(data_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(data_ptr, scale_ptr, out_ptr, n, n_blocks, chunks, data_stride,
                       FMT: tl.constexpr, B: tl.constexpr, ROWS: tl.constexpr, ACCUMULATE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * B + tl.arange(0, B)[None, :]
    mask = offs < n
    row_mask = rows < n_blocks
    if ACCUMULATE:
        acc = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((ROWS, B), tl.float32)
    for c in range(chunks):
        if FMT == 1 or FMT == 3 or FMT == 4:
            byte_offs = rows[:, None] * (B // 2) + tl.arange(0, B // 2)[None, :]
            byte = tl.load(data_ptr + c * data_stride + byte_offs, mask=byte_offs < (n + 1) // 2,
                           other=0).to(tl.int32)
            code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (ROWS, B))
        else:
            code = tl.load(data_ptr + c * data_stride + offs, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scale_ptr + c * n_blocks + rows, mask=row_mask, other=0.0)
        value = _decode(code, FMT) * scale[:, None]
        if ACCUMULATE:
            acc = acc + value
        else:
            acc = tl.where(c == 0, value, acc + value)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_per_program(block_size: int) -> int:
    return max(1, _TILE_ELEMENTS // block_size)


def quantize(x: torch.Tensor, fmt: str, block_size: int, stochastic: bool, seed: int,
             error: torch.Tensor | None = None):
    """Launch the quantize kernel on flat contiguous ``x`` → (data uint8, scales fp32)."""
    f = get_format(fmt)
    n = x.numel()
    nb = num_blocks(n, block_size)
    data = torch.empty(packed_bytes(f, n), dtype=torch.uint8, device=x.device)
    scales = torch.empty(nb, dtype=torch.float32, device=x.device)
    if n == 0:
        return data, scales
    rows = _rows_per_program(block_size)
    grid = (triton.cdiv(nb, rows),)
    _quantize_kernel[grid](
        x, error if error is not None else x, data, scales, n, nb, seed_key(seed),
        FMT=FORMAT_IDS[f.name], MAX_CODE=f.max_code, B=block_size, ROWS=rows,
        STOCHASTIC=bool(stochastic), HAS_ERROR=error is not None, enable_fp_fusion=False,
    )
    return data, scales


def dequantize(data: torch.Tensor, scales: torch.Tensor, fmt: str, block_size: int, numel: int,
               out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    """Decode chunks [C, bytes] → out (sum over chunks; added to ``out`` if given)."""
    f = get_format(fmt)
    accumulate = out is not None
    if not accumulate and dtype != torch.float32 and _INTERPRET:
        # The interpreter truncates fp32 -> bf16/fp16 casts; GPUs round to nearest even,
        # as torch does. Decode in fp32 and let torch round.
        return dequantize(data, scales, fmt, block_size, numel).to(dtype)
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=data.device)
    if numel == 0:
        return out
    data2 = data.reshape(-1, packed_bytes(f, numel))
    nb = num_blocks(numel, block_size)
    rows = _rows_per_program(block_size)
    _dequantize_kernel[(triton.cdiv(nb, rows),)](
        data2, scales, out, numel, nb, data2.shape[0], data2.shape[1],
        FMT=FORMAT_IDS[f.name], B=block_size, ROWS=rows, ACCUMULATE=accumulate, enable_fp_fusion=False,
    )
    return out
