"""Pipelined two-shot quantized all-reduce: quantizing piece k + 1 overlaps the transfer of piece k.

The message is cut into pieces that follow the owner chunks (see
:mod:`trainops.distributed._layout`): piece k is a run of ``seg`` elements of every
rank's chunk. Each rank issues, in the same order on every rank::

    Q1(0) A2A(0) | Q1(1) A2A(1) R(0) AG(0) | Q1(2) A2A(2) R(1) AG(1) | ... | R(S-1) AG(S-1) | decode

``Q1(k)``: the stage-1 quantization of piece k (one call per destination slice, with the
worker residual); ``A2A(k)``: ``all_to_all_single`` with ``async_op=True``, in flight while
``Q1(k + 1)`` runs; ``R(k)``: once ``A2A(k)`` arrived, the owner dequantize-accumulates the
W slices in rank order, divides for ``"avg"`` and requantizes (with the owner residual);
``AG(k)``: the asynchronous all-gather of the owner's piece.

Every block is quantized, summed and requantized exactly as in the one-piece exchange
(same block boundaries, same owner, same order of additions), so the result and both
residuals are bit-identical to it for round-to-nearest. The gathered codes are decoded
into ``tensor`` only after every piece has arrived and passed the NaN/Inf check, so a
failure leaves ``tensor`` unchanged (the caller restores the residuals).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainops.distributed._layout import all_gather_single, owner_chunk_numel, piece_numel, raise_non_finite, \
    unpack_rows
from trainops.formats import num_blocks, packed_bytes
from trainops.ops.quantize import dequantize_accumulate, quantize, quantize_error_feedback

__all__ = ["pipelined_two_shot"]


def _fill_row(row: torch.Tensor, q, code_bytes: int) -> None:
    """Codes then scale bytes of ``q`` into ``row``, zero padded (zero codes and scales decode to 0)."""
    nd = q.data.numel()
    row[:nd] = q.data
    row[nd:code_bytes] = 0
    scale_bytes = q.scales.view(torch.uint8)
    row[code_bytes:code_bytes + scale_bytes.numel()] = scale_bytes
    row[code_bytes + scale_bytes.numel():] = 0


def pipelined_two_shot(tensor, op, group, fmt, block_size, error_feedback, owner_error_feedback, pipeline_numel,
                       nan_policy, stats) -> None:
    world = dist.get_world_size(group)
    n = tensor.numel()
    chunk = owner_chunk_numel(n, world, block_size)
    seg = piece_numel(chunk, world, block_size, pipeline_numel)
    pieces = [(start, min(seg, chunk - start)) for start in range(0, chunk, seg)]
    flat = tensor.reshape(-1)  # read only: a copy when tensor is not contiguous
    residual = None if error_feedback is None else error_feedback.view(-1)
    owner_residual = None if owner_error_feedback is None else owner_error_feedback.view(-1)

    def row_bytes(length: int) -> int:
        return packed_bytes(fmt, length) + 4 * num_blocks(length, block_size)

    offsets, total = [], 0
    for _, length in pieces:
        offsets.append(total)
        total += world * row_bytes(length)
    gathered = torch.empty(total, dtype=torch.uint8, device=tensor.device)

    def quantize_piece(start: int, length: int) -> torch.Tensor:
        code_bytes = packed_bytes(fmt, length)
        send = torch.empty(world, row_bytes(length), dtype=torch.uint8, device=tensor.device)
        for r in range(world):
            lo = r * chunk + start
            hi = min(n, lo + length)
            if hi <= lo:  # all padding
                send[r].zero_()
                continue
            # NaN/Inf travel (as NaN blocks) so that every rank raises together at the end.
            if residual is not None:
                q = quantize_error_feedback(flat[lo:hi], residual[lo:hi], fmt, block_size, nan_policy="propagate")
            else:
                q = quantize(flat[lo:hi], fmt, block_size, nan_policy="propagate")
            _fill_row(send[r], q, code_bytes)
        return send

    def reduce_piece(start: int, length: int, recv: torch.Tensor) -> torch.Tensor:
        code_bytes = packed_bytes(fmt, length)
        acc = torch.zeros(length, dtype=torch.float32, device=tensor.device)
        data, scales = unpack_rows(recv, code_bytes)
        dequantize_accumulate(acc, data, scales, fmt, block_size)
        if op == "avg":
            acc.div_(world)
        if owner_residual is not None:
            q = quantize_error_feedback(acc, owner_residual[start:start + length], fmt, block_size,
                                        nan_policy="propagate")
        else:
            q = quantize(acc, fmt, block_size, nan_policy="propagate")
        mine = torch.empty(row_bytes(length), dtype=torch.uint8, device=tensor.device)
        _fill_row(mine, q, code_bytes)
        return mine

    in_flight = None  # (work, recv, piece index) of the last all-to-all
    gathers = []  # (work, the owner's piece it sends): kept alive until waited
    for k in range(len(pieces) + 1):
        nxt = None
        if k < len(pieces):
            send = quantize_piece(*pieces[k])
            recv = torch.empty_like(send)
            nxt = (dist.all_to_all_single(recv, send, group=group, async_op=True), recv, send)
        if in_flight is not None:
            work, recv, _ = in_flight
            work.wait()
            start, length = pieces[k - 1]
            mine = reduce_piece(start, length, recv)
            out = gathered[offsets[k - 1]:offsets[k - 1] + world * mine.numel()]
            gathers.append((all_gather_single(out, mine, group=group, async_op=True), mine))
        in_flight = nxt
    for work, _ in gathers:
        work.wait()
    stats.record(2 * (world - 1) * row_bytes(chunk), n, quantized=True)

    rows = []
    for (start, length), offset in zip(pieces, offsets):
        code_bytes = packed_bytes(fmt, length)
        rows.append(unpack_rows(gathered[offset:offset + world * row_bytes(length)].view(world, -1), code_bytes))
    if nan_policy == "raise":
        # Padding scales are 0, so counting every scale counts the real blocks only.
        nbad = int(sum((~torch.isfinite(scales)).sum() for _, scales in rows))
        if nbad:
            raise_non_finite(nbad, unit="block")
    direct = tensor.dtype == torch.float32 and tensor.is_contiguous()
    out = tensor.view(-1) if direct else torch.empty(n, dtype=torch.float32, device=tensor.device)
    for (start, length), (data, scales) in zip(pieces, rows):
        for r in range(world):
            lo = r * chunk + start
            m = min(n, lo + length) - lo
            if m <= 0:
                continue
            piece = out[lo:lo + m]
            piece.zero_()  # 0 + v == v bit for bit
            codes = data[r:r + 1, :packed_bytes(fmt, m)]
            dequantize_accumulate(piece, codes, scales[r:r + 1, :num_blocks(m, block_size)], fmt, block_size)
    if not direct:
        tensor.copy_(out.view(tensor.shape))
