"""State loading that checks before it writes, for the trainops.nn modules.

``torch.nn.Module.load_state_dict`` copies each module's entries as it walks the tree and
reports bad ones at the end, so a state dict with one bad entry is applied in part. A module
here checks every entry of its whole subtree that the state dict holds (a tensor, the shape
of the destination, integer vs floating point, and the values its modules declare in
``_STATE_CHECKS``) before anything is copied; on a failure it records the error and removes
the subtree's entries, so that neither it nor its children load anything (torch copies the
state dict so that ``_load_from_state_dict`` may change it). Missing and unexpected keys are
left to torch, which knows whether the load is strict.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CheckedLoad", "check_subtree", "finite", "nonnegative", "refuse"]


def finite(t: torch.Tensor) -> str | None:
    return None if bool(torch.isfinite(t).all()) else "must be finite"


def nonnegative(t: torch.Tensor) -> str | None:
    return None if bool((t >= 0).all()) else "must be >= 0"


def _problem(src, dst: torch.Tensor, check) -> str | None:
    if not isinstance(src, torch.Tensor):
        return f"must be a tensor, got {type(src).__name__}"
    if src.device.type == "meta" or tuple(src.shape) != tuple(dst.shape) \
            or src.is_floating_point() != dst.is_floating_point() \
            or (src.dtype == torch.bool) != (dst.dtype == torch.bool):
        kind = "a floating-point" if dst.is_floating_point() else f"an integer ({dst.dtype})"
        return (f"must be {kind} tensor of shape {tuple(dst.shape)} with data, "
                f"got {src.dtype} {tuple(src.shape)} on {src.device}")
    return None if check is None else check(src)


def check_subtree(module: nn.Module, state_dict: dict, prefix: str) -> list[str]:
    """The problems of the entries of ``module``'s subtree that ``state_dict`` holds."""
    checks = {}
    for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        for key, check in getattr(type(sub), "_STATE_CHECKS", {}).items():
            checks[f"{name}.{key}" if name else key] = check
    out = []
    for key, dst in module.state_dict(prefix=prefix, keep_vars=True).items():
        if key in state_dict:
            msg = _problem(state_dict[key], dst, checks.get(key))
            if msg:
                out.append(f"{key} {msg}")
    return out


def refuse(state_dict: dict, prefix: str, error_msgs: list, problems: list[str]) -> None:
    """Record ``problems`` and remove every entry under ``prefix``: this module and its
    children load nothing (torch raises with the messages at the end)."""
    error_msgs.extend(problems)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


class CheckedLoad:
    """Mixin for an ``nn.Module``: its subtree's entries are checked before any is loaded;
    ``_after_load()`` runs once some of this module's own entries were applied."""

    _STATE_CHECKS: dict = {}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        problems = check_subtree(self, state_dict, prefix)
        if problems:
            refuse(state_dict, prefix, error_msgs, problems)
            return
        own = [prefix + k for k, v in [*self._parameters.items(), *self._buffers.items()]
               if v is not None and k not in self._non_persistent_buffers_set]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if any(k in state_dict for k in own):
            self._after_load()

    def _after_load(self) -> None:
        pass
