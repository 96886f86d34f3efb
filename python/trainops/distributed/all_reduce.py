"""Two-shot quantized all-reduce (ZeRO++ qgZ / torchft ``allreduce_quantized`` pattern).

Per call, with W ranks and n elements (flattened)::

    chunk = ceil(ceil(n / W) / B) * B            # rank r owns elements [r*chunk, (r+1)*chunk)
    q     = Q(x)   (or, with error feedback e:  e <- e + x; q = Q(e); e <- e - deQ(q))
    all_to_all:  rank r receives chunk r of every rank's q (codes + fp32 scales)
    s_r   = sum_c deQ(q_c[r])   in fp32, chunks added in rank order  (/ W for "avg")
    all_gather:  every rank receives Q(s_0), ..., Q(s_{W-1})
    x     <- deQ(Q(s_0) | ... | Q(s_{W-1}))[:n]

``B`` is the block size, so chunk boundaries fall on block boundaries and quantizing
the unpadded input gives exactly the blocks of the padded one (padding is zeros,
which never change a block's absmax). Every rank decodes the same gathered bytes,
its own chunk included, so the result is bit-identical on every rank.

Bytes sent per rank: ``2 (W-1) P`` with ``P = chunk * bits / 8 + 4 * chunk / B``,
against ``2 (W-1) * 4n / W`` for a ring all-reduce in fp32: 32 / (bits + 32/B), i.e.
7.5x for FP4 at B = 128.

Messages with fewer than ``min_numel`` elements (default :data:`DEFAULT_MIN_NUMEL`)
and ``fmt=None`` go through ``dist.all_reduce`` in full precision: below that size
the call is latency-bound and quantizing saves no time. These calls are counted
apart in :class:`~trainops.distributed.stats.CommStats` (``full_precision_calls``),
so a fallback is never silent.

Agreement: every call starts with one small all-gather of a fixed-size int64 header
(numel, dtype, op, nan_policy, fmt, block_size, min_numel). Ranks that disagree would
otherwise run mismatched collectives (an abort inside gloo, a wrong result, or a wait
until the process-group timeout); instead every rank raises the same ValueError naming
each differing argument and every rank's value, before anything is modified. The header
is the same size on every rank, so its own collective cannot mismatch.

All or nothing: ``tensor`` is written only once the call has succeeded, and
``error_feedback``, which the fused kernel updates in place, is put back from a backup
if the call raises. The backup lives in a buffer each thread reuses, as large as the
largest residual it has seen (a fresh copy per call cost 5x more on CPU, in page
faults). The NaN/Inf verdict is taken from the reduced data, which is identical on
every rank, so either every rank keeps the update or every rank raises with nothing
changed.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist

from trainops.distributed import async_work
from trainops.distributed._layout import all_gather_single as _all_gather_single
from trainops.distributed._layout import chunk_layout, owner_chunk_numel, pack_rows, piece_numel, raise_non_finite, \
    unpack_rows
from trainops.distributed.pipelined import pipelined_two_shot
from trainops.distributed.stats import CommStats, comm_stats, ring_all_reduce_bytes
from trainops._validation import FLOAT_DTYPES, check_bool, is_int
from trainops.formats import FORMATS, NAN_POLICIES, check_block_size, check_nan_policy, get_format, packed_bytes
from trainops.ops.quantize import QuantizedTensor, dequantize, dequantize_accumulate, quantize, quantize_error_feedback

__all__ = ["quantized_all_reduce", "DEFAULT_MIN_NUMEL", "chunk_layout", "owner_chunk_numel"]

#: Below this many elements a message goes through full-precision ``dist.all_reduce``
#: (32 KiB of fp32: latency-bound on gloo and NCCL alike).
DEFAULT_MIN_NUMEL = 8192

_OPS = ("sum", "avg")


def check_exchange_settings(fmt, block_size, nan_policy, min_numel, pipeline_numel, **flags) -> None:
    """The settings of a quantized exchange, checked the same way for quantized_all_reduce,
    QuantizedCommState and DiLoCo: fmt (None: full precision) and block_size, nan_policy,
    min_numel int >= 0, pipeline_numel None or int >= 1, and each of ``flags`` a bool.
    min_numel and pipeline_numel raise ValueError for any bad value, a wrong type included
    (the long-standing behaviour of quantized_all_reduce and QuantizedCommState)."""
    if fmt is not None:
        get_format(fmt)
        check_block_size(block_size)
    check_nan_policy(nan_policy)
    if not is_int(min_numel) or min_numel < 0:
        raise ValueError(f"min_numel must be an int >= 0, got {min_numel!r}")
    if pipeline_numel is not None and (not is_int(pipeline_numel) or pipeline_numel < 1):
        raise ValueError(f"pipeline_numel must be None or an int >= 1, got {pipeline_numel!r}")
    for name, value in flags.items():
        check_bool(name, value)


def _check_residual(name, residual, numel, device, what):
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {residual.dtype}")
    if residual.numel() != numel or not residual.is_contiguous():
        raise ValueError(f"{name} must be contiguous with {numel} elements ({what}), got {residual.numel()}")
    if residual.device != device:
        raise ValueError(f"{name} is on {residual.device} but tensor is on {device}")


def _check_args(tensor, op, group, fmt, block_size, error_feedback, min_numel, nan_policy, owner_error_feedback,
                pipeline_numel):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"tensor must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError("tensor is empty: nothing to reduce")
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    check_exchange_settings(fmt, block_size, nan_policy, min_numel, pipeline_numel)
    if error_feedback is not None:
        _check_residual("error_feedback", error_feedback, tensor.numel(), tensor.device, "like tensor")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("quantized_all_reduce needs an initialized process group (dist.init_process_group)")
    if dist.get_rank(group) < 0:
        raise ValueError("this rank is not a member of group")
    if owner_error_feedback is not None:
        check_block_size(block_size)
        chunk = owner_chunk_numel(tensor.numel(), dist.get_world_size(group), block_size)
        _check_residual("owner_error_feedback", owner_error_feedback, chunk, tensor.device,
                        "owner_chunk_numel(numel, world_size, block_size)")


# The header: one int64 per field, the same length on every rank. A field a rank leaves out
# (block_size and min_numel without fmt) is -1. Codes index these tuples, the same on every rank.
_HEADER_VERSION = 2
_HEADER_FIELDS = ("version", "numel", "dtype", "op", "nan_policy", "fmt", "block_size", "min_numel",
                  "pipeline_numel")
_FMT_CODES = tuple(FORMATS)
_DECODE = {
    "dtype": lambda c: str(FLOAT_DTYPES[c]).replace("torch.", "") if 0 <= c < len(FLOAT_DTYPES) else c,
    "op": lambda c: repr(_OPS[c]) if 0 <= c < len(_OPS) else c,
    "nan_policy": lambda c: repr(NAN_POLICIES[c]) if 0 <= c < len(NAN_POLICIES) else c,
    "fmt": lambda c: repr(_FMT_CODES[c]) if 0 <= c < len(_FMT_CODES) else "None" if c == -1 else c,
    "pipeline_numel": lambda c: "None" if c == -1 else c,
}


def _header(tensor, op, fmt, block_size, min_numel, nan_policy, pipeline_numel) -> list[int]:
    quantized = fmt is not None
    return [_HEADER_VERSION, tensor.numel(), FLOAT_DTYPES.index(tensor.dtype), _OPS.index(op),
            NAN_POLICIES.index(nan_policy), _FMT_CODES.index(fmt) if quantized else -1,
            block_size if quantized else -1, min_numel if quantized else -1,
            pipeline_numel if quantized and pipeline_numel is not None else -1]


def _agree(tensor, op, group, fmt, block_size, min_numel, nan_policy, pipeline_numel) -> None:
    """All-gather the call's header; raise the same ValueError on every rank if the ranks differ."""
    mine = torch.tensor(_header(tensor, op, fmt, block_size, min_numel, nan_policy, pipeline_numel),
                        dtype=torch.int64, device=tensor.device)
    world = dist.get_world_size(group)
    everyone = torch.empty(world * mine.numel(), dtype=torch.int64, device=tensor.device)
    _all_gather_single(everyone, mine, group=group)
    rows = everyone.view(world, -1).tolist()
    diffs = []
    for i, field in enumerate(_HEADER_FIELDS):
        values = [row[i] for row in rows]
        # block_size and min_numel matter only when every rank quantizes; else fmt differs
        if len(set(values)) > 1 and not (field in ("block_size", "min_numel") and -1 in values):
            show = _DECODE.get(field, lambda c: c)
            diffs.append(f"{field}: " + ", ".join(f"rank {r} = {show(v)}" for r, v in enumerate(values)))
    if diffs:
        raise ValueError(
            "quantized_all_reduce: the ranks of the group called it with different arguments (every rank "
            "must pass the same; nothing was changed): " + "; ".join(diffs)
        )


_SCRATCH = threading.local()


@contextlib.contextmanager
def _restored_on_error(*residuals):
    """Put the residuals back as they were if the block raises (the block updates them in place)."""
    residuals = [r for r in residuals if r is not None]
    if not residuals:
        yield
        return
    n = sum(r.numel() for r in residuals)
    device = residuals[0].device
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n or buf.device != device:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32, device=device)
    backups, offset = [], 0
    for r in residuals:
        backups.append(buf[offset:offset + r.numel()])
        backups[-1].copy_(r.view(-1))
        offset += r.numel()
    try:
        yield
    except BaseException:
        for r, backup in zip(residuals, backups):
            r.view(-1).copy_(backup)
        raise


def _full_precision(tensor, op, group, error_feedback, owner_error_feedback, block_size, nan_policy, stats):
    world = dist.get_world_size(group)
    if error_feedback is not None or owner_error_feedback is not None:
        # Exact exchange: the whole accumulated residual goes out, nothing is left behind.
        work = tensor.reshape(-1).float() + (0.0 if error_feedback is None else error_feedback)
        if owner_error_feedback is not None:
            # The owner residual is in units of the result: scaled by W it survives the average.
            n = work.numel()
            chunk = owner_error_feedback.numel()
            lo = dist.get_rank(group) * chunk
            hi = min(n, lo + chunk)
            if hi > lo:
                work[lo:hi].add_(owner_error_feedback[:hi - lo], alpha=world if op == "avg" else 1)
    elif nan_policy == "raise" or not tensor.is_contiguous():
        # Reduced apart (one copy; small messages, or fmt=None): a raise below leaves tensor unchanged.
        work = tensor.reshape(-1).clone()
    else:
        work = tensor
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    if op == "avg":
        work.div_(world)
    stats.record(ring_all_reduce_bytes(work.numel() * work.element_size(), world), tensor.numel(), quantized=False)
    # Every rank holds the same sum, so every rank reaches the same verdict before committing.
    if nan_policy == "raise" and not torch.isfinite(work).all():
        raise_non_finite(int((~torch.isfinite(work)).sum()))
    if error_feedback is not None:
        error_feedback.zero_()
    if owner_error_feedback is not None:
        owner_error_feedback.zero_()
    if work is not tensor:
        tensor.copy_(work.view(tensor.shape))


def _two_shot(tensor, op, group, fmt, block_size, error_feedback, owner_error_feedback, stochastic, seed, nan_policy,
              stats):
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n = tensor.numel()
    chunk, code_bytes, nscales = chunk_layout(n, world, fmt, block_size)
    # Each rank rounds with its own stream (ranks often share a torch seed): correlated
    # rounding errors would add up coherently in the sum instead of averaging out.
    seed1 = None if seed is None else (seed * 1_000_003 + 104_729 * rank) % 2**62
    # NaN/Inf always travel (as NaN blocks) so that every rank sees them and raises
    # together below; raising before the collective would leave the other ranks waiting.
    if error_feedback is not None:
        q = quantize_error_feedback(tensor, error_feedback, fmt, block_size, stochastic=stochastic, seed=seed1,
                                    nan_policy="propagate")
    else:
        q = quantize(tensor, fmt, block_size, stochastic=stochastic, seed=seed1, nan_policy="propagate")
    send = pack_rows(q, world, code_bytes, nscales)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)

    acc = torch.zeros(chunk, dtype=torch.float32, device=tensor.device)
    data, scales = unpack_rows(recv, code_bytes)
    dequantize_accumulate(acc, data, scales, fmt, block_size)
    if op == "avg":
        acc.div_(world)
    # The owner's requantization draws its own stream (kept within int64 for the op schema).
    seed2 = None if seed is None else (seed * 1_000_003 + 7_919 * (rank + 1) + 1) % 2**62
    if owner_error_feedback is not None:
        # Second stage of error feedback: the owner's requantization residual is carried too.
        q2 = quantize_error_feedback(acc, owner_error_feedback, fmt, block_size, stochastic=stochastic, seed=seed2,
                                     nan_policy="propagate")
    else:
        q2 = quantize(acc, fmt, block_size, stochastic=stochastic, seed=seed2, nan_policy="propagate")
    mine = pack_rows(q2, 1, code_bytes, nscales)
    gathered = torch.empty(world * mine.numel(), dtype=torch.uint8, device=tensor.device)
    _all_gather_single(gathered, mine.view(-1), group=group)

    data, scales = unpack_rows(gathered.view(world, -1), code_bytes)
    # Chunks are whole blocks, so the first n elements of the concatenated chunks are
    # encoded by a prefix of the codes and of the scales: decode exactly n elements.
    nblocks = -(-n // block_size)
    full = QuantizedTensor(data.view(-1)[: packed_bytes(fmt, n)], scales.view(-1)[:nblocks], fmt, block_size,
                           tensor.shape, tensor.dtype)
    stats.record(2 * (world - 1) * mine.numel(), n, quantized=True)
    # A decoded value is non-finite exactly when its block's scale is (codes are bounded
    # and |code · scale| <= absmax), so checking the scales checks the whole result.
    bad_blocks = ~torch.isfinite(full.scales)
    if nan_policy == "raise" and bad_blocks.any():
        raise_non_finite(int(bad_blocks.sum()), unit="block")
    if tensor.dtype == torch.float32 and tensor.is_contiguous():
        # Decode straight into the caller's buffer (0 + v == v bit for bit): a fresh
        # output the size of the message costs page faults and an extra copy.
        tensor.zero_()
        dequantize_accumulate(tensor.view(-1), full.data[None], full.scales[None], fmt, block_size)
    else:
        tensor.copy_(dequantize(full))


def quantized_all_reduce(
    tensor: torch.Tensor,
    op: str = "avg",
    group=None,
    fmt: str | None = "fp4_e3m0",
    block_size: int = 128,
    error_feedback: torch.Tensor | None = None,
    async_op: bool = False,
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
    stochastic: bool = False,
    seed: int | None = None,
    nan_policy: str = "raise",
    stats: CommStats | None = None,
    verify: bool = True,
    owner_error_feedback: torch.Tensor | None = None,
    pipeline_numel: int | None = None,
):
    """All-reduce ``tensor`` in place through blockwise quantization; bit-identical on every rank.

    ``op``: ``"sum"`` or ``"avg"``. ``fmt``: a format of :mod:`trainops.formats`, or
    ``None`` for full precision. ``error_feedback``: an fp32 buffer with ``tensor``'s
    numel kept by the caller across calls; the rank's quantization residual goes in it
    (e <- e + x; q = Q(e); e <- e - deQ(q)), so nothing is lost over time. Tensors with
    fewer than ``min_numel`` elements use full-precision ``dist.all_reduce`` (then the
    residual is sent too and ``error_feedback`` is zeroed).

    ``owner_error_feedback``: the second stage of error feedback (DoubleSqueeze, Tang et
    al. 2019, arXiv 1905.05957): an fp32 buffer of :func:`owner_chunk_numel` elements,
    this rank's residual of requantizing the reduced chunk it owns (in units of the
    result, i.e. after the ``/ W`` of ``"avg"``): s <- s + e_s; q = Q(s); e_s <- s - deQ(q).
    With both stages every quantization error is fed back, so the running sum of the
    results tracks the exact running sum; with ``error_feedback`` alone the owner's
    rounding errors accumulate (about 5% relative drift over 200 exchanges for FP4, see
    ``tests/test_error_feedback_two_stage.py``). In the full-precision path it is sent
    too (scaled by W for ``"avg"``) and zeroed.

    ``pipeline_numel``: cut the exchange into pieces of about that many elements so that
    quantizing piece k + 1 overlaps the transfer of piece k (asynchronous collectives);
    the result and residuals are bit-identical to the one-piece exchange (the pieces
    follow block and owner boundaries). ``None``: one piece. Ignored with
    ``stochastic=True`` (the random stream is indexed by the element's place in the whole
    message). Every rank must pass the same value (checked with the other arguments).

    NaN/Inf: with ``nan_policy="raise"`` every rank raises ValueError when any rank's
    input is not finite (``tensor`` and ``error_feedback`` are left unchanged); with
    ``"propagate"`` the affected blocks become NaN on every rank.

    ``async_op=True`` returns an :class:`~trainops.distributed.async_work.AsyncWork`
    (``wait()``, ``is_completed()``, ``get_future()``) at once; the reduction runs on
    the group's background thread, in submission order. Do not touch ``tensor`` or use
    ``group`` from another thread until ``wait()`` returns. Returns None otherwise.
    Bytes sent are added to ``stats`` (default: :func:`~trainops.distributed.comm_stats`).

    Ranks that pass different numel, dtype, op, nan_policy, fmt, block_size or min_numel
    all raise the same ValueError naming the differences (at ``wait()`` with
    ``async_op=True``), with ``tensor`` and both residuals unchanged. ``verify=False``
    skips that check (one small all-gather per call): only for callers that guarantee
    agreement otherwise, and the same on every rank (the DDP hook checks its settings on
    the first bucket and relies on DDP for the buckets' sizes and dtypes). On any error,
    ``tensor`` and both residuals are left as they were.
    """
    _check_args(tensor, op, group, fmt, block_size, error_feedback, min_numel, nan_policy, owner_error_feedback,
                pipeline_numel)
    stats = comm_stats() if stats is None else stats
    if stochastic and seed is None:
        # Drawn here, in the caller's thread, so torch.manual_seed makes it reproducible.
        seed = int(torch.randint(0, 2**62, (1,)).item())
    def job():
        if verify:
            _agree(tensor, op, group, fmt, block_size, min_numel, nan_policy, pipeline_numel)
        if fmt is None or tensor.numel() < min_numel:
            _full_precision(tensor, op, group, error_feedback, owner_error_feedback, block_size, nan_policy, stats)
            return
        world = dist.get_world_size(group)
        chunk = owner_chunk_numel(tensor.numel(), world, block_size)
        pipelined = not stochastic and piece_numel(chunk, world, block_size, pipeline_numel) < chunk
        with _restored_on_error(error_feedback, owner_error_feedback):
            if pipelined:
                pipelined_two_shot(tensor, op, group, fmt, block_size, error_feedback, owner_error_feedback,
                                   pipeline_numel, nan_policy, stats)
            else:
                _two_shot(tensor, op, group, fmt, block_size, error_feedback, owner_error_feedback, stochastic, seed,
                          nan_policy, stats)
    if async_op:
        return async_work.submit(group, job, tensor.device)
    if async_work.has_worker(group):
        # Keep the order of collectives on this group: run after the pending async jobs.
        async_work.submit(group, job, tensor.device).wait()
        return None
    job()
    return None
