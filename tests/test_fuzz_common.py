"""Shared pieces of the fuzz suite (tests/test_fuzz_*.py); holds no tests itself.

Every fuzz case ends in one of two ways: the op's result equals the reference's
(trainops.reference), or the op raises one of the clear exceptions below with a message.
A crash, an out-of-bounds access (see scripts/asan_check.sh) or a silently wrong result fails.

Runs are reproducible (``derandomize=True``) and sized for CI: ``TRAINOPS_FUZZ_SCALE``
multiplies every example budget (scripts/asan_check.sh passes it through). Each file counts the
cases it ran per op in ``CASES`` and prints the counts when its module finishes.
"""
from __future__ import annotations

import math
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CLEAR_ERRORS = (TypeError, ValueError, IndexError, RuntimeError)  # NotImplementedError is a RuntimeError
SCALE = float(os.environ.get("TRAINOPS_FUZZ_SCALE", "1"))
FLT_MAX = torch.finfo(torch.float32).max
# Values that break naive kernels: non-finite, extremes, subnormals, signed zero.
HOSTILE = [float("nan"), float("inf"), -float("inf"), FLT_MAX, -FLT_MAX, 1e-45, -1e-40, 1.2e-38, 0.0, -0.0]


def fuzz_settings(max_examples: int):
    """Reproducible settings with an example budget scaled by TRAINOPS_FUZZ_SCALE."""
    return settings(max_examples=max(1, int(max_examples * SCALE)), deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)


def expect_clear_error(fn, *, match: str | None = None, types=CLEAR_ERRORS):
    """fn() must raise one of ``types`` with a non-empty message (containing ``match``)."""
    with pytest.raises(types) as info:
        fn()
    assert str(info.value).strip(), "an error without a message"
    if match is not None:
        assert match in str(info.value), f"{match!r} not in {str(info.value)!r}"
    return info.value


@st.composite
def hostile_tensor(draw, shape, dtype=torch.float32, hostile_p: float = 0.3, exponents=(-40, 38)):
    """A random tensor of ``shape``; with probability ``hostile_p`` some entries are set to
    hostile values (NaN, Inf, ±FLT_MAX, subnormals, ±0). Built from a drawn seed so the
    draw stays cheap; scaled by a drawn power of ten."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** draw(st.integers(*exponents))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if t.numel() and draw(st.floats(0, 1)) < hostile_p:
        for _ in range(draw(st.integers(1, 3))):
            value = draw(st.sampled_from(HOSTILE))
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value
    return t.clamp(-FLT_MAX, FLT_MAX).where(t.isfinite(), t).to(dtype)


def maybe_non_contiguous(draw, t: torch.Tensor) -> torch.Tensor:
    """t itself or a non-contiguous view with the same values (a strided copy)."""
    if t.dim() == 0 or t.numel() < 2 or not draw(st.booleans()):
        return t
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def all_finite(*ts) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in ts if t is not None and t.numel())


def case_counter(name: str):
    """(counts, fixture): a Counter of cases per op for a fuzz module, and the module-scoped
    autouse fixture that reports it when the module finishes. Assign both at module level:
    ``CASES, _fuzz_summary = case_counter("router")``."""
    counts = Counter()

    @pytest.fixture(scope="module", autouse=True)
    def _fuzz_summary(request):
        yield
        report_counts(request, name, counts)

    return counts, _fuzz_summary


def report_counts(request, name: str, counts: Counter) -> None:
    """Prints 'fuzz cases run per op' for the module (shown by pytest even with -q)."""
    line = f"fuzz cases run per op ({name}): " + ", ".join(f"{op}={n}" for op, n in sorted(counts.items()))
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capman is None or reporter is None:  # pragma: no cover
        print(line)
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


def isclose_or_both_nan(a: float, b: float, rel: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=rel)
