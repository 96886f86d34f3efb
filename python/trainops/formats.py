"""Quantization formats: code tables and block-layout arithmetic shared by every layer.

Per block of ``block_size`` elements of the flattened input:
``scale = absmax / max_code`` (in fp32; one ulp smaller in the one case where
``max_code * scale`` would round to Inf, absmax within a rounding of FLT_MAX, so every code
decodes to a finite value); ``y = min(|x| / scale, max_code)`` is rounded onto the
format's magnitude grid (round to nearest, ties to the even code; or stochastically,
unbiased) and the sign is stored apart (zero is always stored as +0).

=========  ====  ========  =====================================================
format     bits  max_code  magnitudes (before scaling)
=========  ====  ========  =====================================================
int8       8     127       0, 1, ..., 127 (two's complement byte, -127..127)
int4       4     7         0, 1, ..., 7 (two's complement nibble, -7..7)
fp8_e4m3   8     448       OCP E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits;
                           subnormals m·2^-9; normals (1 + m/8)·2^(e-7); no Inf
fp4_e3m0   4     1         1 sign, 3 exponent bits, 0 mantissa: 0, 2^-6, ..., 2^0
                           (the FP4 of Streaming DiLoCo; code e in 1..7 is 2^(e-7))
fp4_e2m1   4     6         OCP MX FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6
=========  ====  ========  =====================================================

4-bit codes are packed two per byte, element ``2i`` in the low nibble and ``2i + 1``
in the high nibble; the FP4 nibble is ``sign << 3 | index`` into the table above.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainops._validation import check_int


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int
    max_code: float
    values: tuple[float, ...] | None = None  # FP4 magnitudes by 3-bit index
    mids: tuple[float, ...] | None = None  # midpoints between neighbouring magnitudes


_E3M0_VALUES = (0.0, 2**-6, 2**-5, 2**-4, 2**-3, 2**-2, 2**-1, 1.0)
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _mids(values):
    return tuple((a + b) / 2 for a, b in zip(values[:-1], values[1:]))


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat("int8", 8, 127.0),
    "int4": QuantFormat("int4", 4, 7.0),
    "fp8_e4m3": QuantFormat("fp8_e4m3", 8, 448.0),
    "fp4_e3m0": QuantFormat("fp4_e3m0", 4, 1.0, _E3M0_VALUES, _mids(_E3M0_VALUES)),
    "fp4_e2m1": QuantFormat("fp4_e2m1", 4, 6.0, _E2M1_VALUES, _mids(_E2M1_VALUES)),
}

MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 8192
NAN_POLICIES = ("raise", "propagate")


def get_format(fmt: str) -> QuantFormat:
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be a str naming a format, got {type(fmt).__name__}")
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown fmt {fmt!r}; expected one of {', '.join(FORMATS)}") from None


def check_block_size(block_size: int) -> int:
    check_int("block_size", block_size)
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(
            f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size}"
        )
    return block_size


def check_nan_policy(nan_policy: str) -> str:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    return nan_policy


def num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def packed_bytes(fmt: QuantFormat | str, numel: int) -> int:
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    return (numel + 1) // 2 if fmt.bits == 4 else numel


def bits_per_element(fmt: QuantFormat | str, block_size: int) -> float:
    """b + 32 / B: code bits plus the fp32 scale shared by a block."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    return fmt.bits + 32.0 / block_size


def _lowbias32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def seed_key(seed: int) -> int:
    """32-bit key of the counter-based uniform stream u_i = hash(i xor key) (as the C++ kernel)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    return _lowbias32((s & 0xFFFFFFFF) ^ _lowbias32(s >> 32))
