"""Plain-PyTorch reference of the blockwise quantization ops: the spec the kernels meet.

Follows :mod:`trainops.formats` literally, one vectorized step at a time; every
kernel (C++ CPU, Triton) must produce the same bytes for the same input.
"""
from __future__ import annotations

import torch

from trainops._counter_rng import hash_uniform01
from trainops.formats import get_format, num_blocks

_FLT_MAX = torch.finfo(torch.float32).max
def _pow2(e: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)


def _round(y: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    if u is None:
        return torch.round(y)  # half to even
    lo = torch.floor(y)
    return lo + (u < (y - lo)).float()


def _magnitude_codes(fmt, y: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Unsigned code of each magnitude y in [0, max_code], as int64."""
    if fmt.name in ("int8", "int4"):
        return _round(y, u).long()
    if fmt.name == "fp8_e4m3":
        exponent = torch.frexp(y).exponent.long() - 1  # floor(log2 y) for y > 0
        quantum = _pow2(exponent.clamp(min=-6) - 3)
        r = _round(y / quantum, u)
        v = r * quantum
        e = torch.frexp(v).exponent.long() - 1
        mantissa = ((v / _pow2(e) - 1.0) * 8.0).long()
        return torch.where(v < 2.0**-6, r.long(), ((e + 7) << 3) | mantissa)
    values = torch.tensor(fmt.values)
    if u is None:
        idx = torch.zeros_like(y, dtype=torch.long)
        for j, mid in enumerate(fmt.mids):  # a tie goes to the even index
            idx += (y > mid).long() if j % 2 == 0 else (y >= mid).long()
        return idx
    lo = (y.unsqueeze(-1) >= values[1:]).long().sum(-1)
    hi = (lo + 1).clamp(max=7)
    gap = values[hi] - values[lo]
    p = torch.where(gap > 0, (y - values[lo]) / torch.where(gap > 0, gap, 1.0), 0.0)
    return lo + (u < p).long()


def signed_values(fmt_name: str) -> torch.Tensor:
    """Signed value of every raw code (256 for 8-bit formats, 16 for 4-bit), fp32."""
    fmt = get_format(fmt_name)
    codes = torch.arange(256 if fmt.bits == 8 else 16)
    if fmt.name == "int8":
        return torch.where(codes >= 128, codes - 256, codes).float()
    if fmt.name == "int4":
        return torch.where(codes >= 8, codes - 16, codes).float()
    if fmt.name == "fp8_e4m3":
        m = codes & 0x7F
        e, mant = m >> 3, (m & 7).float()
        mag = torch.where(e == 0, mant * 2.0**-9, (1.0 + mant / 8.0) * _pow2(e - 7))
        return torch.where(codes >= 128, -mag, mag)
    mag = torch.tensor(fmt.values)[codes & 7]
    return torch.where(codes >= 8, -mag, mag)


def block_scale(absmax: torch.Tensor, max_code: float) -> torch.Tensor:
    """absmax / max_code in fp32, one ulp smaller where max_code * that rounds to +Inf (absmax
    within a rounding of FLT_MAX), so that every code of the block decodes to a finite value."""
    s = absmax / max_code
    over = (s * max_code) > _FLT_MAX
    return torch.where(over, (s.view(torch.int32) - 1).view(torch.float32), s)


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    n = flat.numel()
    padded = torch.zeros(num_blocks(n, block_size) * block_size, dtype=flat.dtype)
    padded[:n] = flat
    return padded.view(-1, block_size)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    codes = codes.to(torch.uint8) if bits == 8 else codes
    if bits == 8:
        return codes
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def _unpack(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    data = data.long()
    if bits == 8:
        return data[:numel]
    return torch.stack([data & 0xF, data >> 4], dim=-1).reshape(-1)[:numel]


def quantize(x, fmt="fp4_e3m0", block_size=128, stochastic=False, seed=0, error=None):
    """Blockwise quantization of the flattened ``x`` (plus ``error`` if given).

    Returns ``(data uint8, scales fp32)``. With ``error`` (fp32, same numel) this is
    the error-feedback step e ← e + x; q = Q(e); e ← e − deQ(q), done in place on
    ``error`` except for blocks holding NaN/Inf, whose residual is left unchanged.
    A block with NaN/Inf gets a NaN scale and zero codes (it decodes to NaN).
    """
    f = get_format(fmt)
    flat = x.reshape(-1).float()
    n = flat.numel()
    if error is not None:
        flat = flat + error.reshape(-1)
    v = _blocks(flat.cpu(), block_size)
    a = v.abs()
    finite = (a <= _FLT_MAX).all(dim=1)
    scale = block_scale(a.amax(dim=1), f.max_code)
    ok = finite & (scale > 0)
    safe = torch.where(ok, scale, 1.0)
    y = torch.minimum(a / safe[:, None], torch.tensor(f.max_code))
    u = None
    if stochastic:
        u = hash_uniform01(torch.arange(v.numel()).view_as(v), seed)
    mag = _magnitude_codes(f, y, u)
    if f.name in ("int8", "int4"):
        codes = torch.where(v < 0, -mag, mag) & (0xFF if f.bits == 8 else 0xF)
    else:
        sign_bit = 0x80 if f.bits == 8 else 0x8
        codes = torch.where((v < 0) & (mag != 0), mag | sign_bit, mag)
    codes = torch.where(ok[:, None], codes, 0)
    scale = torch.where(finite, scale, float("nan"))
    if error is not None:
        decoded = signed_values(f.name)[codes] * scale[:, None]
        residual = (v - decoded).reshape(-1)[:n]
        keep = (~finite)[:, None].expand_as(v).reshape(-1)[:n]
        new_error = torch.where(keep, error.reshape(-1).cpu(), residual)
        error.copy_(new_error.view_as(error))
    data = _pack(codes.reshape(-1)[:n], f.bits)
    return data.to(x.device), scale.to(x.device)


def dequantize(data, scales, fmt, block_size, numel, dtype=torch.float32):
    """Decode ``data``/``scales`` (one chunk) back to a flat tensor of ``numel`` in ``dtype``."""
    f = get_format(fmt)
    codes = _unpack(data.cpu(), f.bits, numel)
    block_of = torch.arange(numel) // block_size
    values = signed_values(f.name)[codes] * scales.cpu()[block_of]
    return values.to(dtype).to(data.device)


def dequantize_accumulate(out, data, scales, fmt, block_size):
    """out += Σ_c dequantize(data[c], scales[c]) in fp32, chunks added in order c = 0, 1, ...
    (no chunks: ``out`` unchanged)."""
    acc = out.cpu().clone()
    for c in range(data.shape[0]):
        acc = acc + dequantize(data[c], scales[c], fmt, block_size, out.numel())
    out.copy_(acc)
    return out
