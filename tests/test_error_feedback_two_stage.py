"""Two-stage error feedback in quantized_all_reduce (real gloo process groups, 2 and 3 ranks).

With the worker residual alone, the owner's requantization error of each reduced chunk
is lost at every exchange, and the running sum of the results drifts away from the exact
running sum; with the owner residual too (``owner_error_feedback``) every quantization
error is fed back and the running sum tracks the exact one. Every rank ends each exchange
with the same bytes, and the result and both residuals equal the reference bit for bit.
"""
import zlib

import numpy as np
import pytest
import torch

import trainops.reference as ref
from trainops.distributed import quantized_all_reduce, spawn
from trainops.distributed.all_reduce import owner_chunk_numel

N, ROUNDS, BLOCK = 3001, 200, 128
# (fmt, stages): the drift runs
DRIFT_RUNS = [("fp4_e3m0", 1), ("fp4_e3m0", 2), ("fp4_e2m1", 2), ("int4", 2)]
TOLERANCE = 0.005  # relative norm of (running sum of results - exact running sum)
REF_N, REF_BLOCK, REF_ROUNDS = 1001, 64, 4


def _inputs(world, seed, n):
    """Per round, every rank's input: a fixed per-rank direction plus noise (gradient-like)."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(n, generator=g) for _ in range(world)]
    while True:
        yield [base[r] + torch.randn(n, generator=g) for r in range(world)]


def _drift_run(rank, world, fmt, stages):
    err = torch.zeros(N)
    owner = torch.zeros(owner_chunk_numel(N, world, BLOCK)) if stages == 2 else None
    running = torch.zeros(N, dtype=torch.float64)
    exact = torch.zeros(N, dtype=torch.float64)
    crcs = []
    rounds = _inputs(world, zlib.crc32(fmt.encode()), N)
    for _ in range(ROUNDS):
        xs = next(rounds)
        y = xs[rank].clone()
        quantized_all_reduce(y, "avg", fmt=fmt, block_size=BLOCK, error_feedback=err, owner_error_feedback=owner,
                             min_numel=0, verify=False)
        crcs.append(zlib.crc32(y.numpy().tobytes()))
        running += y.double()
        exact += sum(x.double() for x in xs) / world
    return running.numpy(), exact.numpy(), crcs


def _worker(rank, world):
    torch.set_num_threads(1)
    out = {"drift": {(fmt, stages): _drift_run(rank, world, fmt, stages) for fmt, stages in DRIFT_RUNS}}

    # against the reference, bit for bit: both residuals over several rounds, sum and avg
    err = torch.zeros(REF_N)
    owner = torch.zeros(owner_chunk_numel(REF_N, world, REF_BLOCK))
    rounds = _inputs(world, 99, REF_N)
    ref_rounds = []
    for r in range(REF_ROUNDS):
        xs = next(rounds)
        y = xs[rank].clone()
        op = "sum" if r % 2 else "avg"
        quantized_all_reduce(y, op, fmt="fp4_e3m0", block_size=REF_BLOCK, error_feedback=err,
                             owner_error_feedback=owner, min_numel=0)
        ref_rounds.append((op, y.clone(), err.clone(), owner.clone()))
    out["ref"] = ref_rounds

    # all or nothing: NaN on one rank makes every rank raise with both residuals unchanged
    xs = next(rounds)
    bad = xs[rank].clone()
    if rank == world - 1:
        bad[5] = float("nan")
    e_before, o_before = err.clone(), owner.clone()
    try:
        quantized_all_reduce(bad, "avg", fmt="fp4_e3m0", block_size=REF_BLOCK, error_feedback=err,
                             owner_error_feedback=owner, min_numel=0)
        out["nan"] = None
    except ValueError as e:
        out["nan"] = (str(e), torch.equal(err, e_before), torch.equal(owner, o_before))

    # full precision (below min_numel): both residuals are sent and zeroed
    small_err = torch.full((300,), 0.5 * (rank + 1))
    small_owner = torch.full((owner_chunk_numel(300, world, 128),), 0.25 * (rank + 1))
    x = torch.full((300,), float(rank))
    quantized_all_reduce(x, "avg", error_feedback=small_err, owner_error_feedback=small_owner)
    out["full_precision"] = (x.clone(), bool((small_err == 0).all()), bool((small_owner == 0).all()))
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def results(request):
    return request.param, spawn(_worker, request.param, backend="gloo")


def _drift(res, fmt, stages):
    running, exact, _ = res[0]["drift"][(fmt, stages)]
    return float(np.linalg.norm(running - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("fmt", ["fp4_e3m0", "fp4_e2m1", "int4"])
def test_two_stage_running_sum_tracks_exact_sum(results, fmt):
    world, res = results
    assert _drift(res, fmt, 2) < TOLERANCE
    for r in res[1:]:  # every rank got the same bytes at every exchange
        assert r["drift"][(fmt, 2)][2] == res[0]["drift"][(fmt, 2)][2]
        assert r["drift"][(fmt, 2)][0].tobytes() == res[0]["drift"][(fmt, 2)][0].tobytes()


def test_one_stage_drifts(results, fmt="fp4_e3m0"):
    """The same measurement with the worker residual only fails the tolerance: the check can fail."""
    _, res = results
    assert _drift(res, fmt, 1) > 2 * TOLERANCE
    assert _drift(res, fmt, 1) > 5 * _drift(res, fmt, 2)


def test_matches_reference_bit_for_bit(results):
    world, res = results
    errors = [torch.zeros(REF_N) for _ in range(world)]
    owners = [torch.zeros(owner_chunk_numel(REF_N, world, REF_BLOCK)) for _ in range(world)]
    rounds = _inputs(world, 99, REF_N)
    for r in range(REF_ROUNDS):
        xs = next(rounds)
        op = res[0]["ref"][r][0]
        expected, errors, owners = ref.two_stage_quantized_all_reduce(xs, op, "fp4_e3m0", REF_BLOCK, errors, owners)
        for rank in range(world):
            _, y, e, o = res[rank]["ref"][r]
            assert torch.equal(y, expected)
            assert torch.equal(e, errors[rank])
            assert torch.equal(o, owners[rank])
    assert all(o.abs().sum() > 0 for o in owners)


def test_failed_exchange_leaves_both_residuals(results):
    _, res = results
    for r in res:
        assert r["nan"] is not None, "NaN on one rank must raise on every rank"
        msg, err_same, owner_same = r["nan"]
        assert "NaN" in msg and err_same and owner_same


def test_full_precision_path_sends_both_residuals(results):
    world, res = results
    # avg of x_r + e_r plus the owners' residuals (each covers its own chunk of the message)
    chunk = owner_chunk_numel(300, world, 128)
    expected = torch.zeros(300)
    for r in range(world):
        expected += r + 0.5 * (r + 1)
        expected[r * chunk:(r + 1) * chunk] += 0.25 * (r + 1) * world
    expected /= world
    for r in res:
        x, err_zero, owner_zero = r["full_precision"]
        torch.testing.assert_close(x, expected)
        assert err_zero and owner_zero


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(owner_error_feedback=torch.zeros(10, dtype=torch.float64)), TypeError, "owner_error_feedback"),
    (dict(owner_error_feedback=torch.zeros(7)), ValueError, "owner_error_feedback"),
    (dict(owner_error_feedback=[0.0]), TypeError, "owner_error_feedback"),
    (dict(pipeline_numel=0), ValueError, "pipeline_numel"),
    (dict(pipeline_numel=True), ValueError, "pipeline_numel"),
])
def test_bad_arguments(kwargs, exc, word):
    import torch.distributed as dist
    from trainops.distributed.launch import free_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(exc, match=word):
            quantized_all_reduce(torch.zeros(10), min_numel=0, **kwargs)
    finally:
        dist.destroy_process_group()
