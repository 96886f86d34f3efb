"""Reference of the two-shot quantized all-reduce, computed in one process from every rank's input.

The spec :func:`trainops.distributed.quantized_all_reduce` must meet bit for bit: given
the list of the W ranks' tensors (and error-feedback buffers), it returns the value every
rank ends with (and each rank's updated residual). :func:`two_stage_quantized_all_reduce`
adds the owner-side residual of each rank's reduced chunk (DoubleSqueeze, Tang et al.
2019): stage 1, each rank r: e_r <- e_r + x_r; q_r = Q(e_r); e_r <- e_r - deQ(q_r);
stage 2, the owner of chunk c: s_c = sum_r deQ(q_r)[c] (/ W for "avg"), s_c <- s_c + o_c;
p_c = Q(s_c); o_c <- s_c - deQ(p_c); every rank ends with deQ(p_0) | ... | deQ(p_{W-1}).
Built on :mod:`trainops.reference.quantize` only.
"""
from __future__ import annotations

import torch

from trainops.formats import get_format, num_blocks, packed_bytes
from trainops.reference.quantize import dequantize, quantize


def quantized_all_reduce(tensors, op="avg", fmt="fp4_e3m0", block_size=128, errors=None):
    """Returns ``(result, new_errors)``; ``result`` has the shape and dtype of ``tensors[0]``.

    ``errors``: None or a list of fp32 residuals (one per rank); they are not modified,
    the updated ones are returned. ``fmt=None``: exact fp32 sum (or average), with the
    residuals added in and returned as zeros.
    """
    result, new_errors, _ = two_stage_quantized_all_reduce(tensors, op, fmt, block_size, errors)
    return result, new_errors


def two_stage_quantized_all_reduce(tensors, op="avg", fmt="fp4_e3m0", block_size=128, errors=None,
                                   owner_errors=None):
    """Returns ``(result, new_errors, new_owner_errors)``.

    ``owner_errors``: None or a list of fp32 owner residuals, one per rank, each of
    ``chunk = ceil(ceil(n / W) / block_size) * block_size`` elements (rank r's covers
    elements [r * chunk, (r + 1) * chunk) of the padded message, in units of the result);
    not modified, the updated ones are returned. ``fmt=None``: exact sum with both
    residuals added in (the owner's scaled by W for "avg"), returned as zeros.
    """
    world = len(tensors)
    shape, dtype = tensors[0].shape, tensors[0].dtype
    n = tensors[0].numel()
    chunk = -(-(-(-n // world)) // block_size) * block_size
    total = world * chunk
    new_owner = None if owner_errors is None else []
    if fmt is None:
        acc = torch.zeros(n, dtype=torch.float32)
        new_errors = None
        for r, t in enumerate(tensors):
            x = t.reshape(-1).float() + (errors[r].reshape(-1) if errors is not None else 0)
            if owner_errors is not None:
                padded = torch.zeros(total, dtype=torch.float32)
                padded[r * chunk:(r + 1) * chunk] = owner_errors[r].reshape(-1) * (world if op == "avg" else 1)
                x = x + padded[:n]
            acc = acc + x
        if errors is not None:
            new_errors = [torch.zeros_like(e) for e in errors]
        if owner_errors is not None:
            new_owner = [torch.zeros_like(o) for o in owner_errors]
        if op == "avg":
            acc = acc / world
        return acc.to(dtype).view(shape), new_errors, new_owner

    f = get_format(fmt)
    # Stage 1: each rank quantizes its whole (zero padded) input.
    decoded, new_errors = [], None if errors is None else []
    for r, t in enumerate(tensors):
        err = None
        if errors is not None:
            err = errors[r].reshape(-1).clone()
            new_errors.append(err.view_as(errors[r]))
        data, scales = quantize(t.reshape(-1), f.name, block_size, error=err)
        decoded.append(dequantize(data, scales, f.name, block_size, n))
    # Stage 2: owner of chunk c sums the decoded chunks in rank order, requantizes.
    gathered = torch.zeros(total, dtype=torch.float32)
    for c in range(world):
        lo, hi = c * chunk, (c + 1) * chunk
        acc = torch.zeros(chunk, dtype=torch.float32)
        for r in range(world):
            part = torch.zeros(total, dtype=torch.float32)
            part[:n] = decoded[r]
            acc = acc + part[lo:hi]
        if op == "avg":
            acc = acc / world
        own = None
        if owner_errors is not None:
            own = owner_errors[c].reshape(-1).clone()
            new_owner.append(own.view_as(owner_errors[c]))
        data, scales = quantize(acc, f.name, block_size, error=own)
        assert data.numel() == packed_bytes(f, chunk) and scales.numel() == num_blocks(chunk, block_size)
        gathered[lo:hi] = dequantize(data, scales, f.name, block_size, chunk)
    return gathered[:n].to(dtype).view(shape), new_errors, new_owner
