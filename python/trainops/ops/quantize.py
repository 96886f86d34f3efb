"""Blockwise low-bit quantization: ``trainops.ops.quantize`` / ``dequantize``.

Formats and code tables: :mod:`trainops.formats`. Kernels: C++ on CPU
(csrc/cpu/quantize.cpp), Triton on CUDA (kernels/quantize.py); both produce the same
bytes as :mod:`trainops.reference.quantize` for round-to-nearest and for stochastic
rounding with the same seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainops import _extension
from trainops._triton import HAS_TRITON
from trainops._validation import FLOAT_DTYPES, is_int, resolve_seed
from trainops.formats import (
    bits_per_element,
    check_block_size,
    check_nan_policy,
    get_format,
    num_blocks,
    packed_bytes,
)

_FLT_MAX = torch.finfo(torch.float32).max

__all__ = ["QuantizedTensor", "quantize", "dequantize", "dequantize_accumulate", "quantize_error_feedback"]


@dataclass
class QuantizedTensor:
    """Packed codes (``data``, uint8), one fp32 scale per block, and what is needed to decode."""

    data: torch.Tensor
    scales: torch.Tensor
    fmt: str
    block_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: codes plus scales."""
        return self.data.numel() + 4 * self.scales.numel()

    @property
    def bits_per_element(self) -> float:
        return bits_per_element(self.fmt, self.block_size)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def _check_float_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def _raise_non_finite(scales: torch.Tensor, name: str) -> None:
    bad = (~torch.isfinite(scales)).nonzero().flatten()
    raise ValueError(
        f"{name} contains NaN or Inf (in {bad.numel()} block(s), first block {int(bad[0])}); "
        "pass nan_policy='propagate' to let such blocks decode to NaN instead"
    )


def _check_quantize_args(x, fmt, block_size, nan_policy):
    _check_float_tensor(x, "x")
    f = get_format(fmt)
    check_block_size(block_size)
    check_nan_policy(nan_policy)
    if x.numel() == 0:
        raise ValueError("x is empty: nothing to quantize")
    return f


def quantize(
    x: torch.Tensor,
    fmt: str = "fp4_e3m0",
    block_size: int = 128,
    *,
    stochastic: bool = False,
    seed: int | None = None,
    nan_policy: str = "raise",
) -> QuantizedTensor:
    """Quantize ``x`` (any shape, contiguous or not) blockwise over its flattened elements.

    ``stochastic=True`` rounds up with probability equal to the distance to the lower
    grid point (unbiased: E[deQ(Q(x))] = x); ``seed`` fixes the draw (``None``: taken
    from torch's global generator). ``nan_policy="raise"`` (default) raises ValueError
    on NaN/Inf; ``"propagate"`` lets the affected blocks decode to NaN.
    """
    f = _check_quantize_args(x, fmt, block_size, nan_policy)
    _extension.require("quantize", x.device)
    seed = resolve_seed(stochastic, seed)
    data, scales = torch.ops.trainops.quantize(x.reshape(-1).contiguous(), f.name, block_size, bool(stochastic), seed)
    if nan_policy == "raise" and not torch.isfinite(scales).all():
        _raise_non_finite(scales, "x")
    return QuantizedTensor(data, scales, f.name, block_size, x.shape, x.dtype)


def _check_error_feedback_finite(x: torch.Tensor, error: torch.Tensor) -> None:
    """nan_policy="raise" for error feedback: x, the residual and their sum x + error must be
    finite, checked before the kernel so a bad step leaves the residual untouched.

    One host read of two maxima; the exact elementwise sum is formed only when the maxima show
    that it could overflow (|x_i| + |e_i| <= max|x| + max|e| <= FLT_MAX cannot round to Inf).
    """
    amax = torch.stack([x.detach().abs().amax().float(), error.detach().abs().amax()]).tolist()
    if not math.isfinite(amax[0]):
        # Checked before the kernel so a bad gradient leaves the residual untouched.
        raise ValueError("x contains NaN or Inf; pass nan_policy='propagate' to let such blocks decode to NaN")
    if not math.isfinite(amax[1]):
        raise ValueError("error (the error-feedback residual) contains NaN or Inf; reset it (error.zero_()) or pass "
                         "nan_policy='propagate'")
    if amax[0] + amax[1] > _FLT_MAX and not bool(torch.isfinite(x.float() + error.view(x.shape)).all()):
        raise ValueError("x + error overflows float32 (Inf) in some element; pass nan_policy='propagate' to let "
                         "such blocks decode to NaN")


def quantize_error_feedback(
    x: torch.Tensor,
    error: torch.Tensor,
    fmt: str = "fp4_e3m0",
    block_size: int = 128,
    *,
    stochastic: bool = False,
    seed: int | None = None,
    nan_policy: str = "raise",
) -> QuantizedTensor:
    """Fused error feedback in one pass: e ← e + x; q = Q(e); e ← e − deQ(q); returns q.

    ``error`` is an fp32 buffer with as many elements as ``x`` (contiguous), updated in
    place. With ``nan_policy="raise"`` NaN/Inf in ``x`` or in ``error``, or an ``x + error``
    that overflows, raises ValueError before anything is changed; with ``"propagate"`` the
    affected blocks decode to NaN and keep their residual.
    """
    f = _check_quantize_args(x, fmt, block_size, nan_policy)
    if not isinstance(error, torch.Tensor):
        raise TypeError(f"error must be a torch.Tensor, got {type(error).__name__}")
    if error.dtype != torch.float32:
        raise TypeError(f"error must be float32, got {error.dtype}")
    if error.numel() != x.numel() or not error.is_contiguous():
        raise ValueError(f"error must be contiguous with {x.numel()} elements like x, got {error.numel()}")
    if error.device != x.device:
        raise ValueError(f"error is on {error.device} but x is on {x.device}")
    _extension.require("quantize_error_feedback", x.device)
    if nan_policy == "raise":
        _check_error_feedback_finite(x, error)
    seed = resolve_seed(stochastic, seed)
    data, scales = torch.ops.trainops.quantize_error_feedback(
        x.reshape(-1).contiguous(), error.view(-1), f.name, block_size, bool(stochastic), seed
    )
    return QuantizedTensor(data, scales, f.name, block_size, x.shape, x.dtype)


def dequantize(q: QuantizedTensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode ``q`` to a tensor of its original shape (and dtype unless ``dtype`` is given)."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    _check_packed_op(q.data, q.scales, q.fmt, q.block_size, q.numel)
    _extension.require("dequantize", q.data.device)
    flat = torch.ops.trainops.dequantize(q.data, q.scales, q.fmt, q.block_size, q.numel, dtype)
    return flat.view(q.shape)


def dequantize_accumulate(out: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, fmt: str,
                          block_size: int) -> torch.Tensor:
    """out ← out + Σ_c deQ(data[c], scales[c]) in fp32, chunks added in order (deterministic).

    ``out``: contiguous fp32 with n elements; ``data``: uint8 [C, bytes(n)];
    ``scales``: fp32 [C, ceil(n / block_size)]. Returns ``out``. With C = 0 chunks the sum is
    empty and ``out`` is returned unchanged (on every backend).
    """
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        raise TypeError(f"out must be a float32 tensor, got {getattr(out, 'dtype', type(out).__name__)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    f = get_format(fmt)
    check_block_size(block_size)
    n = out.numel()
    if data.dtype != torch.uint8:
        raise TypeError(f"data must be uint8, got {data.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if data.dim() != 2 or data.shape[1] != packed_bytes(f, n):
        raise ValueError(f"data must have shape [chunks, {packed_bytes(f, n)}] for {n} elements, got {tuple(data.shape)}")
    if scales.shape != (data.shape[0], num_blocks(n, block_size)):
        raise ValueError(
            f"scales must have shape [{data.shape[0]}, {num_blocks(n, block_size)}], got {tuple(scales.shape)}"
        )
    for name, t in (("data", data), ("scales", scales)):
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device} but out is on {out.device}")
    _extension.require("dequantize_accumulate", out.device)
    torch.ops.trainops.dequantize_accumulate(out.view(-1), data.contiguous(), scales.contiguous(), f.name, block_size)
    return out


# --- checks of the registered ops' arguments -----------------------------------------------------
# The raw ops (torch.ops.trainops.*) can be called directly. The C++ CPU kernels check their
# arguments themselves (csrc/cpu/quantize.cpp); these are the same checks for the other
# implementations of the schemas: the fakes (meta / torch.compile) and the Triton kernels on CUDA.

_MAX_NUMEL = 2**62


def _check_flat_input_op(x, fmt, block_size, error=None):
    _check_float_tensor(x, "x")
    get_format(fmt)
    check_block_size(block_size)
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 1-D tensor (the wrappers flatten it), got shape {tuple(x.shape)}")
    if error is not None:
        if error.device != x.device:
            raise ValueError(f"error is on {error.device} but x is on {x.device}")
        if error.dtype != torch.float32:
            raise TypeError(f"error must be float32, got {error.dtype}")
        if not error.is_contiguous() or error.numel() != x.numel():
            raise ValueError(f"error must be contiguous with as many elements as x ({x.numel()}), got {error.numel()}")


def _check_packed_op(data, scales, fmt, block_size, numel, chunks=None, out=None):
    """data uint8 / scales fp32 of ``chunks`` chunks (None: one, flat) of ``numel`` elements."""
    f = get_format(fmt)
    check_block_size(block_size)
    for name, t in (("data", data), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if data.dtype != torch.uint8:
        raise TypeError(f"data must be uint8, got {data.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    ref_name, device = ("data", data.device) if out is None else ("out", out.device)
    for name, t in (("data", data), ("scales", scales)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {device}")
    if not is_int(numel, symint=True) or not 0 <= numel <= _MAX_NUMEL:  # ValueError, as the C++ kernel
        raise ValueError(f"numel must be an int in [0, 2^62], got {numel!r}")
    nbytes, nb = packed_bytes(f, numel), num_blocks(numel, block_size)
    if chunks is None:
        if data.numel() != nbytes or scales.numel() != nb:
            raise ValueError(f"data / scales hold {data.numel()} / {scales.numel()} values; expected {nbytes} / {nb} "
                             f"for {numel} elements")
    elif data.shape != (chunks, nbytes) or scales.shape != (chunks, nb):
        raise ValueError(f"data / scales must have shapes [{chunks}, {nbytes}] / [{chunks}, {nb}] for {numel} "
                         f"elements, got {tuple(data.shape)} / {tuple(scales.shape)}")


def _check_accumulate_op(out, data, scales, fmt, block_size):
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or not out.is_contiguous():
        raise TypeError(f"out must be a contiguous float32 tensor, got {getattr(out, 'dtype', type(out).__name__)}")
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        raise ValueError("data must be 2-D [chunks, bytes]")
    _check_packed_op(data, scales, fmt, block_size, out.numel(), chunks=data.shape[0], out=out)


# --- registration (schemas: ops/_schemas.py; CPU kernels: csrc/cpu/quantize.cpp) ---------------
# Fakes (meta tensors, torch.compile) and the Triton kernels on CUDA, registered whether or not
# the C++ extension loaded.

@torch.library.register_fake("trainops::quantize")
def _(x, fmt, block_size, stochastic, seed):
    _check_flat_input_op(x, fmt, block_size)
    n = x.numel()
    return (x.new_empty(packed_bytes(fmt, n), dtype=torch.uint8),
            x.new_empty(num_blocks(n, block_size), dtype=torch.float32))


@torch.library.register_fake("trainops::quantize_error_feedback")
def _(x, error, fmt, block_size, stochastic, seed):
    _check_flat_input_op(x, fmt, block_size, error)
    n = x.numel()
    return (x.new_empty(packed_bytes(fmt, n), dtype=torch.uint8),
            x.new_empty(num_blocks(n, block_size), dtype=torch.float32))


@torch.library.register_fake("trainops::dequantize")
def _(data, scales, fmt, block_size, numel, dtype):
    _check_packed_op(data, scales, fmt, block_size, numel)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return data.new_empty(numel, dtype=dtype)


@torch.library.register_fake("trainops::dequantize_accumulate")
def _(out, data, scales, fmt, block_size):
    _check_accumulate_op(out, data, scales, fmt, block_size)
    return None


if HAS_TRITON:
    from trainops.kernels import quantize as triton_quantize

    @torch.library.register_kernel("trainops::quantize", "cuda")
    def _(x, fmt, block_size, stochastic, seed):
        _check_flat_input_op(x, fmt, block_size)
        return triton_quantize.quantize(x, fmt, block_size, stochastic, seed)

    @torch.library.register_kernel("trainops::quantize_error_feedback", "cuda")
    def _(x, error, fmt, block_size, stochastic, seed):
        _check_flat_input_op(x, fmt, block_size, error)
        return triton_quantize.quantize(x, fmt, block_size, stochastic, seed, error=error)

    @torch.library.register_kernel("trainops::dequantize", "cuda")
    def _(data, scales, fmt, block_size, numel, dtype):
        _check_packed_op(data, scales, fmt, block_size, numel)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return triton_quantize.dequantize(data.contiguous(), scales.contiguous(), fmt, block_size, numel, dtype=dtype)

    @torch.library.register_kernel("trainops::dequantize_accumulate", "cuda")
    def _(out, data, scales, fmt, block_size):
        _check_accumulate_op(out, data, scales, fmt, block_size)
        triton_quantize.dequantize(data.contiguous(), scales.contiguous(), fmt, block_size, out.numel(), out=out)
