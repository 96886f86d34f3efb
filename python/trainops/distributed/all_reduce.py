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
from trainops.distributed.stats import CommStats, comm_stats, ring_all_reduce_bytes
from trainops.formats import FLOAT_DTYPES, FORMATS, NAN_POLICIES, check_block_size, check_nan_policy, get_format, \
    packed_bytes
from trainops.ops.quantize import QuantizedTensor, dequantize, dequantize_accumulate, quantize, quantize_error_feedback

__all__ = ["quantized_all_reduce", "DEFAULT_MIN_NUMEL", "chunk_layout"]

#: Below this many elements a message goes through full-precision ``dist.all_reduce``
#: (32 KiB of fp32: latency-bound on gloo and NCCL alike).
DEFAULT_MIN_NUMEL = 8192

_OPS = ("sum", "avg")
# torch >= 2.13 renamed all_gather_into_tensor; keep both working (2.11 - 2.13).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def chunk_layout(numel: int, world_size: int, fmt: str, block_size: int) -> tuple[int, int, int]:
    """(elements per rank chunk, packed code bytes per chunk, scales per chunk)."""
    per_rank = -(-numel // world_size)
    chunk = -(-per_rank // block_size) * block_size
    return chunk, packed_bytes(fmt, chunk), chunk // block_size


def _check_args(tensor, op, group, fmt, block_size, error_feedback, min_numel, nan_policy):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"tensor must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError("tensor is empty: nothing to reduce")
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    if fmt is not None:
        get_format(fmt)
        check_block_size(block_size)
    check_nan_policy(nan_policy)
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"min_numel must be an int >= 0, got {min_numel!r}")
    if error_feedback is not None:
        if not isinstance(error_feedback, torch.Tensor):
            raise TypeError(f"error_feedback must be a torch.Tensor or None, got {type(error_feedback).__name__}")
        if error_feedback.dtype != torch.float32:
            raise TypeError(f"error_feedback must be float32, got {error_feedback.dtype}")
        if error_feedback.numel() != tensor.numel() or not error_feedback.is_contiguous():
            raise ValueError(
                f"error_feedback must be contiguous with {tensor.numel()} elements like tensor, "
                f"got {error_feedback.numel()}"
            )
        if error_feedback.device != tensor.device:
            raise ValueError(f"error_feedback is on {error_feedback.device} but tensor is on {tensor.device}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("quantized_all_reduce needs an initialized process group (dist.init_process_group)")
    if dist.get_rank(group) < 0:
        raise ValueError("this rank is not a member of group")


# The header: one int64 per field, the same length on every rank. A field a rank leaves out
# (block_size and min_numel without fmt) is -1. Codes index these tuples, the same on every rank.
_HEADER_VERSION = 1
_HEADER_FIELDS = ("version", "numel", "dtype", "op", "nan_policy", "fmt", "block_size", "min_numel")
_FMT_CODES = tuple(FORMATS)
_DECODE = {
    "dtype": lambda c: str(FLOAT_DTYPES[c]).replace("torch.", "") if 0 <= c < len(FLOAT_DTYPES) else c,
    "op": lambda c: repr(_OPS[c]) if 0 <= c < len(_OPS) else c,
    "nan_policy": lambda c: repr(NAN_POLICIES[c]) if 0 <= c < len(NAN_POLICIES) else c,
    "fmt": lambda c: repr(_FMT_CODES[c]) if 0 <= c < len(_FMT_CODES) else "None" if c == -1 else c,
}


def _header(tensor, op, fmt, block_size, min_numel, nan_policy) -> list[int]:
    quantized = fmt is not None
    return [_HEADER_VERSION, tensor.numel(), FLOAT_DTYPES.index(tensor.dtype), _OPS.index(op),
            NAN_POLICIES.index(nan_policy), _FMT_CODES.index(fmt) if quantized else -1,
            block_size if quantized else -1, min_numel if quantized else -1]


def _agree(tensor, op, group, fmt, block_size, min_numel, nan_policy) -> None:
    """All-gather the call's header; raise the same ValueError on every rank if the ranks differ."""
    mine = torch.tensor(_header(tensor, op, fmt, block_size, min_numel, nan_policy), dtype=torch.int64,
                        device=tensor.device)
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
def _restored_on_error(error_feedback):
    """Put ``error_feedback`` back as it was if the block raises (the block updates it in place)."""
    if error_feedback is None:
        yield
        return
    n = error_feedback.numel()
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n or buf.device != error_feedback.device:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32, device=error_feedback.device)
    backup = buf[:n]
    backup.copy_(error_feedback.view(-1))
    try:
        yield
    except BaseException:
        error_feedback.view(-1).copy_(backup)
        raise


def _raise_non_finite(nbad: int, unit: str = "element") -> None:
    raise ValueError(
        f"quantized_all_reduce: the reduced result holds NaN/Inf ({nbad} {unit}(s)): some rank's input "
        "(or error feedback) is not finite; pass nan_policy='propagate' to let NaN pass through"
    )


def _full_precision(tensor, op, group, error_feedback, nan_policy, stats):
    world = dist.get_world_size(group)
    if error_feedback is not None:
        # Exact exchange: the whole accumulated residual goes out, nothing is left behind.
        work = tensor.reshape(-1).float() + error_feedback
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
        _raise_non_finite(int((~torch.isfinite(work)).sum()))
    if error_feedback is not None:
        error_feedback.zero_()
    if work is not tensor:
        tensor.copy_(work.view(tensor.shape))


def _pack(q: QuantizedTensor, rows: int, code_bytes: int, nscales: int) -> torch.Tensor:
    """[rows, code_bytes + 4 * nscales] uint8: row r = codes then scales of chunk r (zero padded)."""
    buf = torch.empty(rows, code_bytes + 4 * nscales, dtype=torch.uint8, device=q.data.device)
    codes = buf[:, :code_bytes]
    scales = buf[:, code_bytes:]
    # Only the padding past the real codes/scales is zeroed (allocation and zero-fill of
    # whole buffers dominated large messages on CPU).
    full_rows, tail = divmod(q.data.numel(), code_bytes)
    codes[:full_rows] = q.data[: full_rows * code_bytes].view(full_rows, code_bytes)
    if full_rows < rows:
        codes[full_rows, :tail] = q.data[full_rows * code_bytes:]
        codes[full_rows, tail:] = 0
        codes[full_rows + 1:] = 0
    scale_bytes = q.scales.view(torch.uint8)
    full_rows, tail = divmod(scale_bytes.numel(), 4 * nscales)
    scales[:full_rows] = scale_bytes[: full_rows * 4 * nscales].view(full_rows, 4 * nscales)
    if full_rows < rows:
        scales[full_rows, :tail] = scale_bytes[full_rows * 4 * nscales:]
        scales[full_rows, tail:] = 0
        scales[full_rows + 1:] = 0
    return buf


def _unpack(buf: torch.Tensor, code_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = buf[:, :code_bytes].contiguous()
    scales = buf[:, code_bytes:].contiguous().view(torch.float32)
    return data, scales


def _two_shot(tensor, op, group, fmt, block_size, error_feedback, stochastic, seed, nan_policy, stats):
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
    send = _pack(q, world, code_bytes, nscales)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)

    acc = torch.zeros(chunk, dtype=torch.float32, device=tensor.device)
    data, scales = _unpack(recv, code_bytes)
    dequantize_accumulate(acc, data, scales, fmt, block_size)
    if op == "avg":
        acc.div_(world)
    # The owner's requantization draws its own stream (kept within int64 for the op schema).
    seed2 = None if seed is None else (seed * 1_000_003 + 7_919 * (rank + 1) + 1) % 2**62
    mine = _pack(quantize(acc, fmt, block_size, stochastic=stochastic, seed=seed2, nan_policy="propagate"),
                 1, code_bytes, nscales)
    gathered = torch.empty(world * mine.numel(), dtype=torch.uint8, device=tensor.device)
    _all_gather_single(gathered, mine.view(-1), group=group)

    data, scales = _unpack(gathered.view(world, -1), code_bytes)
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
        _raise_non_finite(int(bad_blocks.sum()), unit="block")
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
):
    """All-reduce ``tensor`` in place through blockwise quantization; bit-identical on every rank.

    ``op``: ``"sum"`` or ``"avg"``. ``fmt``: a format of :mod:`trainops.formats`, or
    ``None`` for full precision. ``error_feedback``: an fp32 buffer with ``tensor``'s
    numel kept by the caller across calls; the rank's quantization residual goes in it
    (e <- e + x; q = Q(e); e <- e - deQ(q)), so nothing is lost over time. Tensors with
    fewer than ``min_numel`` elements use full-precision ``dist.all_reduce`` (then the
    residual is sent too and ``error_feedback`` is zeroed).

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
    ``async_op=True``), with ``tensor`` and ``error_feedback`` unchanged. ``verify=False``
    skips that check (one small all-gather per call): only for callers that guarantee
    agreement otherwise, and the same on every rank (the DDP hook checks its settings on
    the first bucket and relies on DDP for the buckets' sizes and dtypes). On any error,
    ``tensor`` and ``error_feedback`` are left as they were.
    """
    _check_args(tensor, op, group, fmt, block_size, error_feedback, min_numel, nan_policy)
    stats = comm_stats() if stats is None else stats
    if stochastic and seed is None:
        # Drawn here, in the caller's thread, so torch.manual_seed makes it reproducible.
        seed = int(torch.randint(0, 2**62, (1,)).item())
    def job():
        if verify:
            _agree(tensor, op, group, fmt, block_size, min_numel, nan_policy)
        if fmt is None or tensor.numel() < min_numel:
            _full_precision(tensor, op, group, error_feedback, nan_policy, stats)
        else:
            with _restored_on_error(error_feedback):
                _two_shot(tensor, op, group, fmt, block_size, error_feedback, stochastic, seed, nan_policy, stats)
    if async_op:
        return async_work.submit(group, job, tensor.device)
    if async_work.has_worker(group):
        # Keep the order of collectives on this group: run after the pending async jobs.
        async_work.submit(group, job, tensor.device).wait()
        return None
    job()
    return None
