"""Where each element of a two-shot quantized all-reduce goes (owner chunks, pipeline pieces, wire rows).

Rank ``r`` of ``W`` owns elements ``[r * chunk, (r + 1) * chunk)`` of the flattened message
(``chunk`` a multiple of the block size ``B``, the last chunk zero padded). A pipelined
exchange cuts every owner chunk into pieces of ``seg`` elements (also a multiple of ``B``):
piece ``k`` is the elements ``[r * chunk + k * seg, r * chunk + (k + 1) * seg)`` of every
rank ``r``. Block boundaries and owners are the same for every ``seg``, which is what makes
the pipelined result bit-identical to the one-piece exchange.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainops.formats import packed_bytes

# torch >= 2.13 renamed all_gather_into_tensor; keep both working (2.11 - 2.13).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def owner_chunk_numel(numel: int, world_size: int, block_size: int) -> int:
    """Elements each rank owns (and keeps an owner residual for): ceil(ceil(numel / W) / B) * B."""
    per_rank = -(-numel // world_size)
    return -(-per_rank // block_size) * block_size


def chunk_layout(numel: int, world_size: int, fmt: str, block_size: int) -> tuple[int, int, int]:
    """(elements per rank chunk, packed code bytes per chunk, scales per chunk)."""
    chunk = owner_chunk_numel(numel, world_size, block_size)
    return chunk, packed_bytes(fmt, chunk), chunk // block_size


def piece_numel(chunk: int, world_size: int, block_size: int, pipeline_numel: int | None) -> int:
    """``seg``: elements of each owner chunk per pipeline piece, so that a piece holds about
    ``pipeline_numel`` elements of the message (rounded up to whole blocks per rank, at most
    ``chunk``). ``None``: one piece."""
    if pipeline_numel is None:
        return chunk
    per_rank = -(-pipeline_numel // world_size)
    return min(chunk, max(block_size, -(-per_rank // block_size) * block_size))


def pack_rows(q, rows: int, code_bytes: int, nscales: int) -> torch.Tensor:
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


def unpack_rows(buf: torch.Tensor, code_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = buf[:, :code_bytes].contiguous()
    scales = buf[:, code_bytes:].contiguous().view(torch.float32)
    return data, scales


def raise_non_finite(nbad: int, unit: str = "element") -> None:
    raise ValueError(
        f"quantized_all_reduce: the reduced result holds NaN/Inf ({nbad} {unit}(s)): some rank's input "
        "(or error feedback) is not finite; pass nan_policy='propagate' to let NaN pass through"
    )
