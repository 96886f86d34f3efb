"""Rows in and out of :class:`~trainops.replay.ReplayBuffer`: plain (nested) dicts of tensors
and TensorDicts.

tensordict is optional and never imported by ``import trainops``: a value is recognised as a
TensorDict only through an already imported ``tensordict`` module (whoever built one imported
it), and the package is imported here only to return TensorDicts from a buffer that stored them.

Field keys: a top-level key is a str; a nested key is a tuple of str (TensorDict's convention).
Inside the buffer a nested key ("next", "obs") is the field name "next.obs", which is why plain
key parts may not contain ".".
"""
from __future__ import annotations

import sys

import torch

__all__ = ["is_tensordict", "field_name", "key_of", "leaves", "stack_items", "build"]


def is_tensordict(x) -> bool:
    td = sys.modules.get("tensordict")
    return td is not None and isinstance(x, td.TensorDictBase)


def _check_part(part, key) -> str:
    if not isinstance(part, str) or not part or "." in part:
        raise ValueError(f"field names must be non-empty strings without '.' (nested keys are tuples of them), "
                         f"got {key!r}")
    return part


def field_name(key) -> str:
    """Storage name of a field key: "obs" -> "obs", ("next", "obs") -> "next.obs"."""
    if isinstance(key, tuple):
        if not key:
            raise ValueError("a nested field key must not be empty")
        return ".".join(_check_part(p, key) for p in key)
    return _check_part(key, key)


def key_of(name: str):
    """Inverse of :func:`field_name`: "next.obs" -> ("next", "obs"), "obs" -> "obs"."""
    parts = tuple(name.split("."))
    return parts if len(parts) > 1 else parts[0]


def leaves(data, what: str) -> dict:
    """Field key -> leaf of a (nested) dict or a TensorDict; the keys as :func:`key_of` gives them."""
    if is_tensordict(data):
        return {key_of(field_name(k)): v for k, v in data.items(include_nested=True, leaves_only=True)}
    if not isinstance(data, dict):
        raise TypeError(f"{what} must be a dict of tensors or a TensorDict, got {type(data).__name__}")
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            key = (*prefix, *k) if isinstance(k, tuple) else (*prefix, k)
            if isinstance(v, dict):
                walk(v, key)
            else:
                out[key_of(field_name(key))] = v

    walk(data, ())
    return out


def stack_items(items, what: str):
    """One batch from a list of single items (all TensorDicts or all dicts)."""
    if not items:
        raise ValueError(f"{what} is an empty list: nothing to add")
    if all(is_tensordict(x) for x in items):
        return torch.stack(list(items))
    rows = [leaves(x, f"{what}[{i}]") for i, x in enumerate(items)]
    keys = list(rows[0])
    for i, r in enumerate(rows):
        if list(r) != keys:
            raise ValueError(f"{what}[{i}] has the fields {sorted(map(str, r))}, "
                             f"{what}[0] has {sorted(map(str, keys))}")
        for k, v in r.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{what}[{i}][{k!r}] must be a torch.Tensor, got {type(v).__name__}")
    return {k: torch.stack([r[k] for r in rows]) for k in keys}


def build(fields: dict, batch_shape, as_tensordict: bool, device):
    """Rows to return: a TensorDict (nested keys restored) or a dict keyed like the spec."""
    if not as_tensordict:
        return dict(fields)
    from tensordict import TensorDict

    out = TensorDict({}, batch_size=list(batch_shape), device=device)
    for key, value in fields.items():
        out.set(key, value)
    return out
