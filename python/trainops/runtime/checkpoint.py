"""Multi-worker checkpoints without pickle, verified before use.

Layout of ``out_dir/checkpoint``::

    latest.json              pointer: {"format", "step", "dir", "final", "world_size", "manifest_sha256"}
    step-<N>/ (or final-<N>/)
        rank<r>.safetensors  one per worker: the tensors of its state, and the rest of the
                             state as a JSON skeleton in the safetensors header metadata
        manifest.json        sha256 and size of every rank file, step, world size

Nothing is unpickled: tensors are read by safetensors and everything else is JSON, so a
crafted checkpoint cannot run code. :func:`flatten_state` / :func:`unflatten_state` turn a
nested state (dicts with str or int keys, lists, tuples, tensors, JSON scalars, ...) into
(tensors, JSON skeleton) and back exactly: dtype, shape and bits of every tensor, ints vs
floats, tuples vs lists, key types and order.

Writes are atomic: each file goes to a temporary name (removed again if the write fails)
and is moved into place with ``os.replace``. ``latest.json`` is replaced only after every
worker has written its file (a barrier) and rank 0 has written the manifest, so an
interrupted, killed or failed save never becomes the checkpoint ``--resume`` reads.

Loading confines the pointer to the checkpoint folder (``dir`` must be ``step-<N>`` or
``final-<N>``, a real directory inside the folder, no symlinks) and checks the manifest's
digest and each file's digest before anything is parsed or applied; every problem is a
one-line :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import math
import os
import re
import shutil
import stat

import torch

from trainops._validation import is_int
from trainops.runtime.config import RESUME_KEYS, ConfigError

__all__ = ["CheckpointError", "FORMAT", "flatten_state", "unflatten_state", "state_to_bytes", "state_from_bytes",
           "atomic_write_bytes", "atomic_write_text", "atomic_save", "save_checkpoint", "read_pointer",
           "verify_checkpoint", "load_checkpoint", "check_resume_config"]

FORMAT = "trainops-checkpoint-2"
POINTER = "latest.json"
MANIFEST = "manifest.json"
_NAME = re.compile(r"(step|final)-[0-9]+")  # used with fullmatch: no trailing newline
_TAG = "__trainops__"  # marks a JSON object of the skeleton that is not a plain str-keyed dict
_META_KEY = "trainops.state"  # safetensors header metadata entry holding the skeleton


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, damaged, tampered with or outside its folder."""


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


# --------------------------------------------------------------------------------------------
# nested state <-> (tensors, JSON skeleton)
# --------------------------------------------------------------------------------------------

def flatten_state(obj) -> tuple[dict[str, torch.Tensor], object]:
    """Split a nested state into ``(tensors, skeleton)``.

    ``tensors`` maps names to contiguous CPU copies (no shared storage, so safetensors can
    write them); ``skeleton`` is JSON-serializable (strict JSON: no NaN/Infinity literals)
    and refers to the tensors by name. Supported: ``None``, ``bool``, ``int``, ``float``
    (any value: non-finite ones are tagged), ``str``, ``bytes``, ``list``, ``tuple``,
    ``dict`` / ``OrderedDict`` (keys of any supported hashable type; ``_metadata`` of a
    module state dict kept), ``torch.Tensor`` (dense, any device; restored to its device
    type), ``torch.dtype``, ``torch.Size``, ``torch.device``. Anything else raises
    TypeError naming where it is.
    """
    tensors: dict[str, torch.Tensor] = {}

    def key_for(path: str) -> str:
        name = path.lstrip("/") or "tensor"
        if name in tensors:
            i = 1
            while f"{name}#{i}" in tensors:
                i += 1
            name = f"{name}#{i}"
        return name

    def enc(x, path: str):
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            x = float(x)
            return x if math.isfinite(x) else {_TAG: "float", "v": repr(x)}
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.is_quantized or x.device.type == "meta":
                raise TypeError(f"state{path}: cannot store a {x.layout} / quantized / meta tensor")
            t = x.detach()
            if t.is_conj():
                t = t.resolve_conj()
            if t.is_neg():
                t = t.resolve_neg()
            t = t.to("cpu").clone(memory_format=torch.contiguous_format)
            name = key_for(path)
            tensors[name] = t
            return {_TAG: "tensor", "key": name, "device": x.device.type}
        if isinstance(x, torch.dtype):
            return {_TAG: "dtype", "v": str(x).replace("torch.", "")}
        if isinstance(x, torch.device):
            return {_TAG: "device", "v": str(x)}
        if isinstance(x, torch.Size):
            return {_TAG: "size", "v": [int(d) for d in x]}
        if isinstance(x, (bytes, bytearray)):
            return {_TAG: "bytes", "v": base64.b64encode(bytes(x)).decode("ascii")}
        if isinstance(x, tuple) and type(x) is tuple:
            return {_TAG: "tuple", "items": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list) and type(x) is list:
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict) and type(x) in (dict, collections.OrderedDict):
            meta = getattr(x, "_metadata", None)
            if type(x) is dict and meta is None and all(isinstance(k, str) and k != _TAG for k in x):
                return {k: enc(v, f"{path}/{k}") for k, v in x.items()}
            for k in x:
                if not (k is None or isinstance(k, (bool, int, float, str, bytes, tuple, torch.dtype))):
                    raise TypeError(f"state{path}: cannot store a dict key of type {type(k).__name__}")
            node = {_TAG: "odict" if type(x) is collections.OrderedDict else "dict",
                    "items": [[enc(k, f"{path}/<key>"), enc(v, f"{path}/{k}")] for k, v in x.items()]}
            if meta is not None:
                if not isinstance(meta, dict):
                    raise TypeError(f"state{path}: _metadata must be a dict, got {type(meta).__name__}")
                node["meta"] = enc(meta if type(meta) in (dict, collections.OrderedDict) else dict(meta),
                                   f"{path}/_metadata")
            return node
        raise TypeError(f"state{path}: cannot store {type(x).__module__}.{type(x).__qualname__} in a "
                        "checkpoint (tensors, JSON scalars, lists, tuples and dicts only)")

    return tensors, enc(obj, "")


def _dtype(name) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton, device: str | None = "saved"):
    """Inverse of :func:`flatten_state`. ``device="saved"`` puts each tensor back on the
    device type it was saved from when that is available here (CUDA: the current device),
    ``None`` leaves every tensor on the CPU. Raises ValueError on a malformed skeleton or a
    tensor that is missing or not referenced."""
    used: set[str] = set()

    def dec(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            raise ValueError(f"unexpected {type(x).__name__} in the state skeleton")
        if _TAG not in x:
            return {k: dec(v) for k, v in x.items()}
        tag = x[_TAG]
        if tag == "tensor":
            key = x.get("key")
            if not isinstance(key, str) or key not in tensors:
                raise ValueError(f"the state refers to a tensor {key!r} the file does not hold")
            if key in used:
                raise ValueError(f"tensor {key!r} is referenced twice")
            used.add(key)
            t = tensors[key]
            if device == "saved" and x.get("device") == "cuda" and torch.cuda.is_available():
                t = t.to(torch.device("cuda", torch.cuda.current_device()))
            return t
        if tag == "float":
            v = x.get("v")
            if v not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad float {v!r}")
            return float(v)
        if tag == "tuple":
            return tuple(dec(v) for v in _items(x))
        if tag in ("dict", "odict"):
            out = collections.OrderedDict() if tag == "odict" else {}
            for pair in _items(x):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError("bad dict item in the state skeleton")
                k = dec(pair[0])
                if isinstance(k, (list, dict, torch.Tensor)):
                    raise ValueError("unhashable dict key in the state skeleton")
                out[k] = dec(pair[1])
            if "meta" in x:
                meta = dec(x["meta"])
                if not isinstance(meta, dict) or tag != "odict":
                    raise ValueError("bad _metadata in the state skeleton")
                out._metadata = meta  # type: ignore[attr-defined]
            return out
        if tag == "dtype":
            return _dtype(x.get("v"))
        if tag == "device":
            return torch.device(str(x.get("v")))
        if tag == "size":
            v = x.get("v")
            if not isinstance(v, list) or not all(map(is_int, v)):
                raise ValueError("bad torch.Size in the state skeleton")
            return torch.Size(v)
        if tag == "bytes":
            return base64.b64decode(str(x.get("v")).encode("ascii"), validate=True)
        raise ValueError(f"unknown tag {tag!r} in the state skeleton")

    out = dec(skeleton)
    extra = set(tensors) - used
    if extra:
        raise ValueError(f"the file holds tensors the state does not refer to: {sorted(extra)[:5]}")
    return out


def _items(x: dict) -> list:
    items = x.get("items")
    if not isinstance(items, list):
        raise ValueError(f"bad {x[_TAG]} node in the state skeleton")
    return items


def state_to_bytes(state) -> bytes:
    """A nested state as one safetensors file (the skeleton in the header metadata)."""
    from safetensors.torch import save

    tensors, skeleton = flatten_state(state)
    text = json.dumps({"format": FORMAT, "state": skeleton}, allow_nan=False, separators=(",", ":"))
    return save(tensors, metadata={_META_KEY: text})


def state_from_bytes(data: bytes, device: str | None = "saved"):
    """Inverse of :func:`state_to_bytes`; ValueError if ``data`` is not such a file."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + n])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError("not a trainops checkpoint file (no state in the safetensors header)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "state" not in meta:
        raise ValueError(f"not a {FORMAT} file")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"unreadable tensors ({e})") from None
    return unflatten_state(tensors, meta["state"], device)


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file that never outlives a failed write."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(os.path.dirname(path) or ".")


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(obj, path: str) -> None:
    """A nested state (see :func:`flatten_state`) to one safetensors file, atomically."""
    atomic_write_bytes(path, state_to_bytes(obj))


# --------------------------------------------------------------------------------------------
# save / verify / load
# --------------------------------------------------------------------------------------------

def _sha256_file(path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def save_checkpoint(root: str, global_step: int, rank: int, state: dict, barrier, final: bool = False) -> None:
    """Every rank calls this with its state (which holds ``world_size``); ``barrier()``
    synchronizes the ranks. Each save gets a directory of its own; ``latest.json`` names it
    only once every rank file and the manifest are in place."""
    name = f"{'final' if final else 'step'}-{global_step}"
    step_dir = os.path.join(root, name)
    os.makedirs(step_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(step_dir, rank_file(rank)), state_to_bytes(state))
    barrier()
    if rank == 0:
        world = int(state["world_size"])
        files = {}
        for r in range(world):
            digest, size = _sha256_file(os.path.join(step_dir, rank_file(r)))
            files[rank_file(r)] = {"sha256": digest, "bytes": size}
        manifest = json.dumps({"format": FORMAT, "step": global_step, "final": final, "world_size": world,
                               "files": files}, indent=1, sort_keys=True)
        atomic_write_text(os.path.join(step_dir, MANIFEST), manifest)
        atomic_write_text(os.path.join(root, POINTER),
                          json.dumps({"format": FORMAT, "step": global_step, "dir": name, "final": final,
                                      "world_size": world,
                                      "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()}))
        # older checkpoints, partial ones, temporaries of killed saves (here or in a step
        # directory a killed save of the same step left; every rank's own write is done)
        leftovers = [os.path.join(name, f) for f in os.listdir(step_dir) if ".tmp" in f]
        for old in os.listdir(root) + leftovers:
            path = os.path.join(root, old)
            if old != name and (_NAME.fullmatch(old) or ".tmp" in old):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
    barrier()


def _read_confined(path: str, what: str) -> bytes:
    """A regular file's bytes, refusing symlinks (O_NOFOLLOW) and anything but a plain file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise CheckpointError(f"--resume: {what} {path} is missing") from None
    except OSError as e:
        if os.path.islink(path):
            raise CheckpointError(f"--resume: {what} {path} is a symlink; refused") from None
        raise CheckpointError(f"--resume: cannot read {what} {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"--resume: {what} {path} is not a regular file")
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            return fh.read()
    finally:
        if fd >= 0:
            os.close(fd)


def read_pointer(root: str) -> dict:
    """``latest.json`` checked: format, a ``dir`` confined to ``root``, well-typed fields.
    Returns the pointer with ``path`` (the step directory) added."""
    pointer = os.path.join(root, POINTER)
    if not os.path.lexists(pointer):
        raise CheckpointError(f"--resume: no checkpoint in {root} (latest.json missing)")
    raw = _read_confined(pointer, "checkpoint pointer")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"--resume: {pointer} is not valid JSON (damaged)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"--resume: {pointer} is not a checkpoint pointer")
    name = meta.get("dir")
    if meta.get("format") != FORMAT:
        if isinstance(name, str) and _NAME.fullmatch(name) and os.path.exists(os.path.join(root, name, "rank0.pt")):
            raise CheckpointError(f"--resume: the checkpoint in {root} was written by an older trainops as pickle "
                                  "(rank*.pt), which is not loaded because it can run code; start over with "
                                  "--overwrite")
        raise CheckpointError(f"--resume: {pointer} is not a {FORMAT} pointer")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(f"--resume: {pointer} names {name!r}; only step-<N> or final-<N> inside {root} "
                              "is accepted")
    for key, typ in (("step", int), ("world_size", int), ("final", bool), ("manifest_sha256", str)):
        if not (is_int(meta.get(key)) if typ is int else isinstance(meta.get(key), typ)):
            raise CheckpointError(f"--resume: {pointer}: {key} is missing or not a {typ.__name__}")
    if meta["world_size"] < 1 or int(name.split("-")[1]) != meta["step"]:
        raise CheckpointError(f"--resume: {pointer}: inconsistent step / world_size")
    path = os.path.join(root, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"--resume: {pointer} names {name!r}, which is missing") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"--resume: {path} is not a real directory (symlink?); refused")
    real_root = os.path.realpath(root)
    if os.path.dirname(os.path.realpath(path)) != real_root:
        raise CheckpointError(f"--resume: {path} resolves outside {root}; refused")
    return {**meta, "path": path}


def _manifest(meta: dict) -> dict:
    path = os.path.join(meta["path"], MANIFEST)
    raw = _read_confined(path, "checkpoint manifest")
    if hashlib.sha256(raw).hexdigest() != meta["manifest_sha256"]:
        raise CheckpointError(f"--resume: {path} does not match the digest in latest.json (damaged)")
    try:
        man = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"--resume: {path} is not valid JSON (damaged)") from None
    expected = {rank_file(r) for r in range(meta["world_size"])}
    if (not isinstance(man, dict) or man.get("format") != FORMAT or man.get("step") != meta["step"]
            or man.get("world_size") != meta["world_size"] or man.get("final") != meta["final"]
            or not isinstance(man.get("files"), dict) or set(man["files"]) != expected
            or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                       for v in man["files"].values())):
        raise CheckpointError(f"--resume: {path} does not describe the checkpoint latest.json names")
    return man


def _verified_bytes(meta: dict, man: dict, rank: int) -> bytes:
    name = rank_file(rank)
    path = os.path.join(meta["path"], name)
    data = _read_confined(path, "checkpoint file")
    want = man["files"][name]
    if len(data) != want["bytes"]:
        raise CheckpointError(f"--resume: {path} has {len(data)} bytes, the manifest says {want['bytes']} "
                              "(truncated or damaged)")
    if hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise CheckpointError(f"--resume: {path} does not match its sha256 in the manifest (damaged)")
    return data


def _check_world(root: str, meta: dict, world_size: int | None) -> None:
    if world_size is not None and meta["world_size"] != world_size:
        raise ConfigError(f"--resume: checkpoint in {root} was written by {meta['world_size']} workers, this run has "
                          f"{world_size}; resume with --workers {meta['world_size']}")


def verify_checkpoint(root: str, world_size: int | None = None) -> dict:
    """Check the checkpoint ``latest.json`` names, every rank file against the manifest's
    sha256, and that each parses; returns the pointer (``step``, ``final``, ``world_size``,
    ``path``). Raises :class:`CheckpointError` (one line naming the file) otherwise."""
    meta = read_pointer(root)
    man = _manifest(meta)
    _check_world(root, meta, world_size)
    for r in range(meta["world_size"]):
        data = _verified_bytes(meta, man, r)
        try:
            state_from_bytes(data, device=None)
        except ValueError as e:
            raise CheckpointError(f"--resume: {os.path.join(meta['path'], rank_file(r))}: {e}") from None
    return meta


def load_checkpoint(root: str, rank: int, world_size: int, device: str | None = "saved") -> dict:
    """Worker ``rank``'s state from the checkpoint ``latest.json`` names, verified first."""
    meta = read_pointer(root)
    man = _manifest(meta)
    _check_world(root, meta, world_size)
    data = _verified_bytes(meta, man, rank)
    try:
        state = state_from_bytes(data, device=device)
    except ValueError as e:
        raise CheckpointError(f"--resume: {os.path.join(meta['path'], rank_file(rank))}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {os.path.join(meta['path'], rank_file(rank))} holds no worker state")
    return state


def check_resume_config(saved: dict, current: dict, defaults: dict | None = None) -> None:
    """Refuse to resume with a config that differs from the checkpoint's (but for RESUME_KEYS).

    A key the checkpoint lacks was added to the config after the checkpoint was written;
    a new key's default keeps the earlier behaviour, so it counts as ``defaults[key]``
    (the current config class's default) and a run that leaves it at its default resumes."""
    saved = {**{k: v for k, v in (defaults or {}).items() if k not in saved}, **saved}
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in RESUME_KEYS and saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise ConfigError(f"--resume: the checkpoint was written with a different config ({detail})")