"""Tolerances for comparing a kernel with its reference where the bytes cannot match.

Where every implementation must give the same bytes (quantize codes and scales, router
indices and counts, replay indices, the quantized all-reduce) tests assert equality; these
helpers are only for floating-point results whose evaluation order or precision differs
between a GPU kernel and the reference (tiled fp32 accumulation, bf16 operands, exp/pow of
another math library). They come from the rounding-error model, not from trial and error:

* **Order of a sum.** A length-k sum (or dot product) accumulated in a type with unit
  roundoff u = eps/2 is within ``λ·√k·u·Σ|t_i|`` of the exact sum with probability at least
  ``1 − 2k·exp(−λ²(1−u)²/2)`` when its rounding errors behave as independent zero-mean
  variables (Higham & Mary, "A new approach to probabilistic rounding error analysis",
  SIAM J. Sci. Comput. 41(5), 2019, Thm 3.1; the worst case is k·u·Σ|t_i|, Higham,
  *Accuracy and Stability of Numerical Algorithms*, §3.1). Two orders differ by at most
  twice that: :func:`reduction_tolerance` = ``λ·√k·eps``, relative to Σ|t_i|.
* **Σ|t_i| for zero-mean random data.** Tests draw random inputs; for zero-mean terms
  |Σt_i| ≈ √k·σ while Σ|t_i| ≈ k·σ, so relative to the *result* the bound grows by √k more:
  :func:`random_sum_tolerance` adds that factor and scales by the largest |result|.
* **Rounding to a narrower type.** Operands rounded to ``dtype`` before an fp32 reduction
  (bf16 tensor-core inputs, a stored intermediate) add ``λ·u·‖t‖₂`` ≈ λ·u·|Σt|; two values
  rounded to ``dtype`` from nearly equal numbers may land ``n`` ulps apart after ``n``
  roundings: :func:`rounding_tolerance` = ``n·eps`` (relative).

λ = 6 makes a violation of one element's bound less likely than 2k·1.5e-8.
"""
from __future__ import annotations

import math

import torch

LAMBDA = 6.0


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (2u: the gap between 1 and the next number)."""
    return torch.finfo(dtype).eps


def reduction_tolerance(dtype: torch.dtype, k: int) -> float:
    """Bound on |sum in one order − sum in another| / Σ|t_i| for a length-k reduction
    accumulated in ``dtype``: λ·√k·eps(dtype). For positive terms (softmax denominators,
    probability sums) Σ|t_i| is the result itself, so this is a relative tolerance."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return LAMBDA * math.sqrt(k) * eps(dtype)


def random_sum_tolerance(k: int, operand_dtype: torch.dtype = torch.float32,
                         accumulate: torch.dtype = torch.float32) -> float:
    """Bound on |kernel − reference| / max|result| for a length-k reduction of zero-mean random
    terms whose operands are rounded to ``operand_dtype`` and accumulated in ``accumulate``:
    the order term λ·√k·eps(accumulate) times Σ|t|/|Σt| ≈ √k, plus λ·eps(operand_dtype) when the
    operands are rounded to a narrower type than the accumulator."""
    tol = reduction_tolerance(accumulate, k) * math.sqrt(k)
    if eps(operand_dtype) > eps(accumulate):
        tol += LAMBDA * eps(operand_dtype)
    return tol


def rounding_tolerance(dtype: torch.dtype, roundings: int = 1) -> float:
    """Relative gap between two values each rounded to ``dtype`` from nearly equal numbers, after
    at most ``roundings`` roundings (or elementwise functions good to ``roundings`` ulps)."""
    if roundings < 1:
        raise ValueError(f"roundings must be >= 1, got {roundings}")
    return roundings * eps(dtype)
