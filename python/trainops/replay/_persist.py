"""Files of :class:`~trainops.replay.ReplayBuffer`: one ``.safetensors`` file per buffer, the
tensors of a stored-only ``state_dict`` plus its config as JSON metadata. Nothing is unpickled:
files are read with safetensors and the config with ``json``, and a file is checked whole before
a buffer is allocated for it or changed by it."""
from __future__ import annotations

import json
import os

from trainops.replay import _state

__all__ = ["save", "from_file", "load_state_file", "LoadEitherWay"]

_METADATA_KEY = "trainops.replay"
# the constructor arguments a saved config holds
_INIT_ARGS = ("capacity", "spec", "sampler", "eviction", "alpha", "beta", "seed", "weight_norm", "priority_eps",
              "task_field", "power_law_exponent", "max_tasks", "ragged")


def _safetensors():
    """The safetensors package (buffer files are safetensors; it is not a core dependency)."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ImportError("ReplayBuffer.save/load need the safetensors package: pip install safetensors") from None
    return safetensors


def _checked_path(path) -> str:
    path = os.fspath(path)
    if not isinstance(path, str) or not path.endswith(".safetensors"):
        raise ValueError(f"replay buffer files are safetensors: the path must end in .safetensors, got {path!r}")
    return path


def save(buf, path) -> None:
    """:meth:`ReplayBuffer.save`."""
    path = _checked_path(path)
    save_file = _safetensors().torch.save_file
    state = buf.state_dict(stored_only=True)
    cfg = state.pop("config")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, path, metadata={_METADATA_KEY: json.dumps(cfg)})


def _read(path) -> dict:
    """The state stored in ``path`` (safetensors: tensors plus JSON config metadata)."""
    path = _checked_path(path)
    st = _safetensors()
    try:
        with st.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            cfg = json.loads(meta[_METADATA_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (st.SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable trainops replay buffer file: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != _state.FORMAT:
        raise ValueError(f"{path} is not a trainops replay buffer file")
    return {**tensors, "config": cfg}


def _from_config(cls, cfg: dict, device):
    """A new, empty ``cls`` buffer with a saved ``config()`` (its values checked as the constructor's)."""
    missing = [k for k in _INIT_ARGS if k not in cfg]
    if missing:
        raise ValueError(f"the saved config is missing {missing}")
    kw = {k: cfg[k] for k in _INIT_ARGS}
    spec = kw["spec"]
    kw["spec"] = None if spec is None else _state.spec_from_config(spec)
    buf = cls(device=device, **kw)
    if not isinstance(cfg.get("returns_tensordict", False), bool):
        raise ValueError("returns_tensordict (in the saved config) must be a bool")
    buf.returns_tensordict = cfg.get("returns_tensordict", False)
    return buf


def from_file(cls, path, device=None):
    """:meth:`ReplayBuffer.from_file`."""
    state = _read(path)
    # Check the whole file against a storage-free buffer first: the file's config decides how
    # much memory the real buffer takes, and nothing is allocated for a file that fails.
    _state.check_state(_from_config(cls, state["config"], "meta"), state)
    buf = _from_config(cls, state["config"], device or "cpu")
    buf.load_state_dict(state)
    return buf


def load_state_file(buf, path):
    """:meth:`ReplayBuffer.load_state_file`."""
    buf.load_state_dict(_read(path))
    return buf


class LoadEitherWay:
    """``ReplayBuffer.load``, kept for compatibility with its two meanings: on the class,
    ``ReplayBuffer.load(path, device=None)`` is :meth:`ReplayBuffer.from_file` (a new buffer);
    on a buffer, ``buffer.load(path)`` is :meth:`ReplayBuffer.load_state_file` (in place)."""

    def __get__(self, obj, cls):
        if obj is None:
            return lambda path, device=None: cls.from_file(path, device)
        return lambda path: obj.load_state_file(path)
