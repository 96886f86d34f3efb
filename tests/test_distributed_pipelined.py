"""Pipelined quantized_all_reduce (``pipeline_numel``) is bit-identical to the one-piece exchange.

Real gloo process groups (2 and 3 ranks). Each case runs the same inputs through both
paths for a few rounds, with their own residuals: results, worker residuals and owner
residuals must match bit for bit, on every rank, and match the reference. Sizes are
chosen so that the last piece is short and some slices are all padding.
"""
import zlib

import pytest
import torch

import trainops.reference as ref
from trainops.distributed import CommStats, quantized_all_reduce, spawn
from trainops.distributed.all_reduce import owner_chunk_numel

# name, shape, dtype, fmt, block, op, pipeline_numel, stages of error feedback (0, 1, 2)
CASES = [
    ("fp4_e3m0_ef2", (10001,), torch.float32, "fp4_e3m0", 128, "avg", 1000, 2),
    ("int4_bf16_ef1", (5000,), torch.bfloat16, "int4", 64, "avg", 700, 1),
    ("fp8_noncontig_sum", (41, 50), torch.float32, "fp8_e4m3", 32, "sum", 300, 0),
    ("int8_fp16_one_block", (2049,), torch.float16, "int8", 16, "avg", 1, 2),
    ("fp4_e2m1_two_pieces", (4099,), torch.float32, "fp4_e2m1", 128, "avg", 1200, 2),
]
ROUNDS = 3


def _x(rank, name, shape, dtype, round_):
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{rank}:{round_}".encode()))
    return (torch.randn(shape, generator=g) * (rank + 1) + 0.3).to(dtype)


def _run(rank, world, case, pipeline_numel, stats):
    name, shape, dtype, fmt, bs, op, _, stages = case
    n = torch.Size(shape).numel()
    err = torch.zeros(n) if stages >= 1 else None
    owner = torch.zeros(owner_chunk_numel(n, world, bs)) if stages == 2 else None
    rounds = []
    for r in range(ROUNDS):
        y = _x(rank, name, shape, dtype, r)
        if name.endswith("noncontig_sum"):
            y = y.t()
            assert not y.is_contiguous()
        quantized_all_reduce(y, op, fmt=fmt, block_size=bs, error_feedback=err, owner_error_feedback=owner,
                             min_numel=0, pipeline_numel=pipeline_numel, stats=stats)
        rounds.append((y.contiguous().clone(), None if err is None else err.clone(),
                       None if owner is None else owner.clone()))
    return rounds


def _worker(rank, world):
    torch.set_num_threads(1)
    out = {}
    for case in CASES:
        plain, piped = CommStats(), CommStats()
        out[case[0]] = (_run(rank, world, case, None, plain), _run(rank, world, case, case[6], piped),
                        plain.as_dict(), piped.as_dict())

    # NaN on one rank: every rank raises, tensor and both residuals unchanged
    x = _x(rank, "nan", (6000,), torch.float32, 0)
    if rank == world - 1:
        x[4321] = float("nan")
    err, owner = torch.randn(6000), torch.randn(owner_chunk_numel(6000, world, 128))
    before = (x.clone(), err.clone(), owner.clone())
    try:
        quantized_all_reduce(x, error_feedback=err, owner_error_feedback=owner, min_numel=0, pipeline_numel=500)
        out["nan"] = None
    except ValueError as e:
        out["nan"] = (str(e), torch.equal(x.nan_to_num(7.0), before[0].nan_to_num(7.0)),
                      torch.equal(err, before[1]), torch.equal(owner, before[2]))
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def results(request):
    return request.param, spawn(_worker, request.param, backend="gloo")


def _same(a, b):
    return (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8),
                                                                          b.view(-1).view(torch.uint8)))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pipelined_is_bit_identical_to_one_piece(results, case):
    world, res = results
    name, shape, dtype, fmt, bs, op, _, stages = case
    for rank in range(world):
        plain, piped, plain_stats, piped_stats = res[rank][name]
        for (y0, e0, o0), (y1, e1, o1), (yr, _, _) in zip(plain, piped, res[0][name][1]):
            assert _same(y0, y1) and _same(e0, e1) and _same(o0, o1)
            assert _same(y1, yr)  # every rank holds the same bytes
        assert plain_stats == piped_stats  # same bytes on the wire
    # and the one-piece path is the reference
    n = torch.Size(shape).numel()
    errors = [torch.zeros(n) for _ in range(world)] if stages >= 1 else None
    owners = [torch.zeros(owner_chunk_numel(n, world, bs)) for _ in range(world)] if stages == 2 else None
    for r in range(ROUNDS):
        xs = [_x(rank, name, shape, dtype, r) for rank in range(world)]
        if name.endswith("noncontig_sum"):
            xs = [x.t().contiguous() for x in xs]
        expected, errors, owners = ref.two_stage_quantized_all_reduce(xs, op, fmt, bs, errors, owners)
        assert torch.equal(res[0][name][1][r][0], expected)


def test_failed_pipelined_exchange_changes_nothing(results):
    _, res = results
    for r in res:
        assert r["nan"] is not None, "NaN on one rank must raise on every rank"
        msg, *unchanged = r["nan"]
        assert "NaN" in msg and all(unchanged)
