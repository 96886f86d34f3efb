"""The tolerance model of tests/tolerances.py checked on the CPU: sums evaluated in two
orders stay within it over random inputs, and results that are clearly wrong do not."""
import numpy as np
import pytest
import torch

from tolerances import eps, random_sum_tolerance, reduction_tolerance, rounding_tolerance


def _two_orders(t: np.ndarray) -> tuple[float, float]:
    """The float32 sum of ``t`` sequentially (left to right) and pairwise over a shuffled copy."""
    sequential = np.cumsum(t, dtype=np.float32)[-1]
    shuffled = np.random.default_rng(len(t)).permutation(t)
    return float(sequential), float(np.sum(shuffled, dtype=np.float32))


@pytest.mark.parametrize("k", [16, 1000, 65536])
@pytest.mark.parametrize("seed", range(5))
def test_dot_in_two_orders_is_within_reduction_tolerance(k, seed):
    rng = np.random.default_rng(seed)
    terms = (rng.standard_normal(k) * rng.standard_normal(k)).astype(np.float32)  # a dot product's products
    a, b = _two_orders(terms)
    bound = reduction_tolerance(torch.float32, k) * float(np.abs(terms.astype(np.float64)).sum())
    assert abs(a - b) <= bound
    exact = float(terms.astype(np.float64).sum())
    assert abs(a - exact) <= bound and abs(b - exact) <= bound


@pytest.mark.parametrize("k", [1000, 65536])
def test_clearly_wrong_sums_fall_outside(k):
    rng = np.random.default_rng(1)
    terms = (rng.standard_normal(k) * rng.standard_normal(k)).astype(np.float32)
    a, _ = _two_orders(terms)
    bound = reduction_tolerance(torch.float32, k) * float(np.abs(terms.astype(np.float64)).sum())
    largest = int(np.argmax(np.abs(terms)))
    dropped = float(np.sum(np.delete(terms, largest), dtype=np.float32))  # one term lost
    assert abs(dropped - a) > bound
    flipped = terms.copy()
    flipped[largest] = -flipped[largest]  # one sign wrong
    assert abs(float(np.sum(flipped, dtype=np.float32)) - a) > bound


@pytest.mark.parametrize("operand_dtype", [torch.float32, torch.bfloat16])
def test_matmul_of_random_data_is_within_random_sum_tolerance(operand_dtype):
    g = torch.Generator().manual_seed(0)
    T, k, N = 64, 333, 48
    x, w = torch.randn(T, k, generator=g), torch.randn(k, N, generator=g)
    got = x.to(operand_dtype).float() @ w.to(operand_dtype).float()  # rounded operands, fp32 accumulation
    want = x.double() @ w.double()
    tol = random_sum_tolerance(k, operand_dtype=operand_dtype)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
    with pytest.raises(AssertionError):  # a wrong product (one input row swapped) is caught
        torch.testing.assert_close((x[[1, 0, *range(2, T)]].double() @ w.double()), want, rtol=tol,
                                   atol=tol * float(want.abs().max()))


def test_rounding_tolerance_is_one_ulp_per_rounding():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(10000, generator=g, dtype=torch.float64) * 100
    nearby = v * (1 + 1e-9)  # two evaluations that agree far below a float ulp (1.2e-7)
    a, b = v.float().double(), nearby.float().double()
    assert bool(((a - b).abs() <= rounding_tolerance(torch.float32) * b.abs()).all())
    assert float(((a - b).abs() / b.abs()).max()) > 0  # some pairs do round apart
    assert not bool(((a * (1 + 4 * eps(torch.float32)) - b).abs() <= rounding_tolerance(torch.float32) * b.abs()).all())


def test_arguments_checked():
    with pytest.raises(ValueError, match="k must be >= 1"):
        reduction_tolerance(torch.float32, 0)
    with pytest.raises(ValueError, match="roundings must be >= 1"):
        rounding_tolerance(torch.float32, 0)
    assert random_sum_tolerance(100, torch.bfloat16) > random_sum_tolerance(100) > reduction_tolerance(torch.float32, 100)
