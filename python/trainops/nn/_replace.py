"""Swapping the matching ``nn.Linear`` layers of a model for adapter layers, PEFT-style: the
one walk shared by :func:`trainops.nn.apply_mora` and the runtime's LoRA adapter."""
from __future__ import annotations

import re
from collections.abc import Callable, Collection

from torch import nn

__all__ = ["module_matcher", "replace_linears"]


def module_matcher(target_modules) -> Callable[[str], bool]:
    """A predicate on qualified module names: ``target_modules`` is a regex string (full match,
    as PEFT) or a non-empty list of names, each matching a qualified name exactly or its last
    component (e.g. ``["q_proj", "v_proj"]``)."""
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(target_modules, (list, tuple, set)) and target_modules and all(
            isinstance(t, str) for t in target_modules):
        names = set(target_modules)
        return lambda name: name in names or name.rsplit(".", 1)[-1] in names
    raise TypeError("target_modules must be a regex string or a non-empty list of module names, "
                    f"got {target_modules!r}")


def replace_linears(model: nn.Module, match: Callable[[str], bool], make: Callable[[nn.Linear], nn.Module], *,
                    no_match: str, keep_trainable: Collection[int] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` whose qualified name satisfies ``match`` by
    ``make(linear)`` (in the linear's train/eval mode), after freezing every parameter of the
    model except those whose ``id`` is in ``keep_trainable``; the new layers' own parameters
    keep their flags. ValueError(``no_match``) when nothing matches, before anything changes.
    Returns ``model`` (changed in place)."""
    targets = [(name, mod) for name, mod in model.named_modules() if name and isinstance(mod, nn.Linear)
               and match(name)]
    if not targets:
        raise ValueError(no_match)
    for p in model.parameters():
        if id(p) not in keep_trainable:
            p.requires_grad_(False)
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod).train(mod.training))
    return model
