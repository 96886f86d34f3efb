"""trainops._validation: every helper's accepted and refused values, and the message style
(the exception type, the argument's name, what it must be and what it got)."""
import numpy as np
import pytest
import torch

from trainops._validation import (FLOAT_DTYPES, CheckedFloat, check_bool, check_finite_float, check_int, is_int,
                                  is_number, resolve_seed)


@pytest.mark.parametrize("value, expected", [(0, True), (-3, True), (2**70, True), (True, False), (False, False),
                                             (1.0, False), ("1", False), (None, False), (np.float64(1.0), False)])
def test_is_int(value, expected):
    assert is_int(value) is expected


def test_is_int_symint_only_when_asked():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    s = ShapeEnv().create_unbacked_symint()
    assert is_int(s, symint=True) and not is_int(s)
    assert not is_int(True, symint=True)


@pytest.mark.parametrize("value, expected", [(0, True), (1.5, True), (float("inf"), True), (np.float32(2), True),
                                             (True, False), ("1", False), (None, False), (1j, False)])
def test_is_number(value, expected):
    assert is_number(value) is expected


def test_check_int_accepts_and_returns():
    assert check_int("n", 5) == 5
    assert check_int("n", 0, lo=0) == 0
    assert check_int("n", 7, lo=1, hi=7) == 7
    assert check_int("n", -5, hi=-5) == -5


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None, np.float64(3)])
def test_check_int_refuses_non_ints_with_type_error(value):
    with pytest.raises(TypeError, match=rf"^count must be an int, got {type(value).__name__}$"):
        check_int("count", value)


@pytest.mark.parametrize("value, lo, hi, bound", [(0, 1, None, ">= 1"), (9, None, 8, "<= 8"), (9, 1, 8, r"in \[1, 8\]"),
                                                  (0, 1, 8, r"in \[1, 8\]")])
def test_check_int_range_message_names_argument_bound_and_value(value, lo, hi, bound):
    with pytest.raises(ValueError, match=rf"^count must be {bound}, got {value}$"):
        check_int("count", value, lo=lo, hi=hi)


def test_check_bool():
    assert check_bool("flag", True) is True and check_bool("flag", False) is False
    for value in (1, 0, "yes", None, np.bool_(True)):
        with pytest.raises(TypeError, match=rf"^flag must be a bool, got {type(value).__name__}$"):
            check_bool("flag", value)


def test_check_finite_float_accepts_and_converts():
    assert check_finite_float("x", 3) == 3.0 and isinstance(check_finite_float("x", 3), float)
    assert check_finite_float("x", np.float32(0.5), lo=0.0, hi=1.0) == 0.5
    assert check_finite_float("x", 0.0, lo=0.0) == 0.0
    assert check_finite_float("x", float("-inf"), allow_inf=True) == float("-inf")


@pytest.mark.parametrize("value", [True, "0.5", None, torch.tensor(0.5)])
def test_check_finite_float_refuses_non_numbers(value):
    with pytest.raises(TypeError, match=rf"^rate must be a number, got {type(value).__name__}$"):
        check_finite_float("rate", value)


@pytest.mark.parametrize("value, kw, words", [
    (float("nan"), {}, "must be finite, got nan"),
    (float("inf"), {}, "must be finite, got inf"),
    (float("nan"), {"allow_inf": True}, "must be not NaN, got nan"),
    (float("inf"), {"hi": 1.0, "allow_inf": True}, "must be <= 1.0, got inf"),
    (0.0, {"lo": 0.0, "lo_open": True}, "must be > 0.0, got 0.0"),
    (1.0, {"lo": 0.0, "hi": 1.0, "hi_open": True}, "must be >= 0.0 and < 1.0, got 1.0"),
    (-0.5, {"lo": 0.0}, "must be >= 0.0, got -0.5"),
])
def test_check_finite_float_value_errors(value, kw, words):
    with pytest.raises(ValueError, match=rf"^rate {words}$"):
        check_finite_float("rate", value, **kw)


def test_checked_float_checks_every_assignment():
    class Holder:
        rate = CheckedFloat(lo=0.0)

    h = Holder()
    h.rate = 2
    assert h.rate == 2.0 and isinstance(h.rate, float)
    with pytest.raises(ValueError, match="rate must be >= 0.0"):
        h.rate = -1.0
    with pytest.raises(TypeError, match="rate must be a number"):
        h.rate = True
    assert h.rate == 2.0 and Holder.rate.check(3) == 3.0


def test_resolve_seed():
    assert resolve_seed(False, 123) == 0
    assert resolve_seed(True, 5) == 5
    torch.manual_seed(0)
    a = resolve_seed(True, None)
    torch.manual_seed(0)
    assert resolve_seed(True, None) == a
    with pytest.raises(TypeError, match="seed must be an int or None, got bool"):
        resolve_seed(True, True)
    with pytest.raises(ValueError, match="seed must fit in a signed 64-bit integer"):
        resolve_seed(True, 2**63)


def test_float_dtypes_order_is_the_all_reduce_header_code():
    # quantized_all_reduce sends a dtype as its index in this tuple: reordering breaks peers.
    assert FLOAT_DTYPES == (torch.float32, torch.bfloat16, torch.float16)
    assert all(d.is_floating_point for d in FLOAT_DTYPES)


def test_raise_for_invalid_priorities_names_the_first_bad_kind():
    import torch

    from trainops._validation import raise_for_invalid_priorities
    raise_for_invalid_priorities(torch.tensor([0.0, 1.5, 3e38]))  # all valid: returns
    with pytest.raises(ValueError, match="priorities contain NaN"):
        raise_for_invalid_priorities(torch.tensor([-1.0, float("nan"), float("inf")]))
    with pytest.raises(ValueError, match="priority must be >= 0"):
        raise_for_invalid_priorities(torch.tensor([-1.0, float("inf")]), "priority")
    with pytest.raises(ValueError, match="priorities must be finite"):
        raise_for_invalid_priorities(torch.tensor([1.0, float("inf")]))
