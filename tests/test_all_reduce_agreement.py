"""quantized_all_reduce with ranks that disagree, and all-or-nothing error feedback (2 gloo ranks).

Disagreeing arguments (numel, dtype, fmt, op, block_size, min_numel, nan_policy, pipeline_numel) make every
rank raise the same ValueError naming each difference, with tensor and error feedback
unchanged, and the group stays usable. A NaN on one rank only makes every rank raise with
tensor and error feedback unchanged everywhere: the next good call gives exactly what it
gives when the failed call never happened.
"""
import numpy as np
import pytest
import torch
import torch.distributed as dist

import trainops.reference as ref
from trainops.distributed import quantized_all_reduce, spawn

N = 1000
BASE = dict(op="avg", fmt="fp4_e3m0", block_size=128, min_numel=0, nan_policy="raise")
# name -> (rank 1's changes to BASE, its numel, its dtype, the words every rank's message must hold)
MISMATCHES = {
    "numel": ({}, N + 1, torch.float32, ["numel: rank 0 = 1000, rank 1 = 1001"]),
    "dtype": ({}, N, torch.bfloat16, ["dtype: rank 0 = float32, rank 1 = bfloat16"]),
    "fmt": (dict(fmt="int8"), N, torch.float32, ["fmt: rank 0 = 'fp4_e3m0', rank 1 = 'int8'"]),
    "fmt_none": (dict(fmt=None), N, torch.float32, ["fmt: rank 0 = 'fp4_e3m0', rank 1 = None"]),
    "op": (dict(op="sum"), N, torch.float32, ["op: rank 0 = 'avg', rank 1 = 'sum'"]),
    "block_size": (dict(block_size=64), N, torch.float32, ["block_size: rank 0 = 128, rank 1 = 64"]),
    "min_numel": (dict(min_numel=8192), N, torch.float32, ["min_numel: rank 0 = 0, rank 1 = 8192"]),
    "nan_policy": (dict(nan_policy="propagate"), N, torch.float32,
                   ["nan_policy: rank 0 = 'raise', rank 1 = 'propagate'"]),
    "pipeline_numel": (dict(pipeline_numel=256), N, torch.float32, ["pipeline_numel: rank 0 = None, rank 1 = 256"]),
    "several": (dict(fmt="int4", op="sum"), N + 5, torch.float16,
                ["numel: rank 0 = 1000, rank 1 = 1005", "dtype: rank 0 = float32, rank 1 = float16",
                 "op: rank 0 = 'avg', rank 1 = 'sum'", "fmt: rank 0 = 'fp4_e3m0', rank 1 = 'int4'"]),
}
EF_N = 2049
SMALL_N = 300  # below min_numel: the full-precision path
FP_RESIDUAL = 0.25


def _x(rank, n, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 * rank + step)
    return (torch.randn(n, generator=g) * (rank + 1)).to(dtype)


def _attempt(tensor, error_feedback=None, async_op=False, **kwargs):
    """Run one call; return (error message or None, tensor unchanged, error_feedback unchanged)."""
    before = tensor.clone()
    e_before = None if error_feedback is None else error_feedback.clone()
    try:
        work = quantized_all_reduce(tensor, error_feedback=error_feedback, async_op=async_op, **kwargs)
        if async_op:
            work.wait()
        msg = None
    except ValueError as exc:
        msg = str(exc)
    same = bool(torch.equal(before.nan_to_num(7.0), tensor.nan_to_num(7.0)))
    e_same = None if e_before is None else bool(torch.equal(e_before, error_feedback))
    return msg, same, e_same


def _mismatch_worker(rank, world):
    torch.set_num_threads(1)
    out = {}
    for name, (changes, n, dtype, _) in MISMATCHES.items():
        for async_op in (False, True):
            kwargs = dict(BASE, **changes) if rank == 1 else dict(BASE)
            x = _x(rank, n if rank == 1 else N, 0, dtype if rank == 1 else torch.float32)
            e = torch.full((x.numel(),), 0.25)
            out[name, async_op] = _attempt(x, e, async_op=async_op, **kwargs)
    # the group is still usable and in step: a correct call right after gives the right result
    x = _x(rank, N, 1)
    inputs = x.clone()
    quantized_all_reduce(x, **BASE)
    out["after"] = (inputs.numpy(), x.numpy())
    return out


def _nan_worker(rank, world):
    torch.set_num_threads(1)
    out = {}
    for path, n in (("quantized", EF_N), ("full_precision", SMALL_N)):
        e = torch.zeros(n)
        kwargs = dict(op="avg", fmt="fp4_e3m0", block_size=128, min_numel=1024)
        quantized_all_reduce(_x(rank, n, 0), error_feedback=e, **kwargs)  # a good round: e is not zero
        if path == "full_precision":
            e.fill_(FP_RESIDUAL)  # that path sends the whole residual and zeroes it: give it one
        e_after_good = e.clone()

        def bad():  # a fresh input per attempt, NaN on rank 0 only
            x = _x(rank, n, 1)
            if rank == 0:
                x[n // 2] = float("nan")
            return x

        sync = _attempt(bad(), e, **kwargs)
        plain = _attempt(bad(), **kwargs)  # no error feedback: the tensor alone
        asynchronous = _attempt(bad(), e, async_op=True, **kwargs)
        x2 = _x(rank, n, 2)
        quantized_all_reduce(x2, error_feedback=e, **kwargs)  # the next good round
        out[path] = dict(sync=sync, plain=plain, asynchronous=asynchronous, e_nonzero=bool(e_after_good.any()),
                         e_final=e.numpy(), x2=x2.numpy())
    return out


@pytest.fixture(scope="module")
def mismatch():
    return spawn(_mismatch_worker, 2, backend="gloo", timeout_s=60)


@pytest.fixture(scope="module")
def nan_one_rank():
    return spawn(_nan_worker, 2, backend="gloo", timeout_s=60)


@pytest.mark.parametrize("async_op", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("name", list(MISMATCHES))
def test_mismatch_raises_same_error_on_every_rank(mismatch, name, async_op):
    results = [r[name, async_op] for r in mismatch]
    messages = [msg for msg, _, _ in results]
    assert messages[0] is not None and messages[0] == messages[1], messages
    assert "different arguments" in messages[0]
    for words in MISMATCHES[name][3]:
        assert words in messages[0]
    if name != "several":  # the fields that agree are not named
        assert messages[0].count(" = ") == 2
    for _, same, e_same in results:
        assert same and e_same, "a mismatch must leave tensor and error_feedback unchanged"


def test_group_usable_after_mismatch(mismatch):
    xs = [torch.from_numpy(r["after"][0]) for r in mismatch]
    expected, _ = ref.quantized_all_reduce(xs, "avg", "fp4_e3m0", 128)
    for r in mismatch:
        assert torch.equal(torch.from_numpy(r["after"][1]), expected)


@pytest.mark.parametrize("path", ["quantized", "full_precision"])
@pytest.mark.parametrize("mode", ["sync", "plain", "asynchronous"])
def test_nan_on_one_rank_changes_nothing_anywhere(nan_one_rank, path, mode):
    results = [r[path][mode] for r in nan_one_rank]
    assert results[0][0] is not None and "NaN" in results[0][0]
    assert results[0][0] == results[1][0]
    for rank, (_, same, e_same) in enumerate(results):
        assert same, f"rank {rank}: the tensor changed although the call raised"
        assert e_same in (None, True), f"rank {rank}: error_feedback changed although the call raised"


@pytest.mark.parametrize("path, n", [("quantized", EF_N), ("full_precision", SMALL_N)])
def test_failed_call_leaves_no_trace_in_error_feedback(nan_one_rank, path, n):
    """good, NaN (raises), good  ==  good, good  (the reference, with the failed call left out)."""
    assert all(r[path]["e_nonzero"] for r in nan_one_rank)
    errors = [torch.zeros(n) for _ in range(2)]
    for step in (0, 2):
        xs = [_x(rank, n, step) for rank in range(2)]
        if path == "quantized":
            expected, errors = ref.quantized_all_reduce(xs, "avg", "fp4_e3m0", 128, errors=errors)
        else:  # exact exchange of input + residual; the residual is then zero
            expected = sum(x + e for x, e in zip(xs, errors)) / 2
            errors = [torch.full((n,), FP_RESIDUAL if step == 0 else 0.0) for _ in range(2)]
    for rank, r in enumerate(nan_one_rank):
        got = torch.from_numpy(r[path]["x2"])
        if path == "quantized":
            assert torch.equal(got, expected)
            assert torch.equal(torch.from_numpy(r[path]["e_final"]), errors[rank])
        else:
            torch.testing.assert_close(got, expected)
            assert not np.any(r[path]["e_final"])
