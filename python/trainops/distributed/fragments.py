"""Split a model's parameters into Streaming DiLoCo fragments, strided over layers.

A *unit* is one layer: the parameter name up to its first numeric component
(``layers.3.attn.q.weight`` -> ``layers.3``, ``0.weight`` -> ``0``), or, without one,
the owning module (``embed.weight`` -> ``embed``). Units are numbered in parameter
order and unit ``u`` goes to fragment ``u % num_fragments``: the strided pattern, which
Streaming DiLoCo (arXiv 2501.18512) found better than contiguous fragments.
"""
from __future__ import annotations

import torch


def unit_of(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or parts[0]


def strided_fragments(named_params, num_fragments: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """``num_fragments`` lists of ``(name, param)``; raises ValueError if a fragment would be empty."""
    units: dict[str, int] = {}
    fragments: list[list] = [[] for _ in range(num_fragments)]
    for name, p in named_params:
        u = units.setdefault(unit_of(name), len(units))
        fragments[u % num_fragments].append((name, p))
    if len(units) < num_fragments:
        raise ValueError(
            f"num_fragments={num_fragments} but the model has only {len(units)} layer unit(s) "
            f"({', '.join(units)}) to spread over fragments"
        )
    return fragments
