"""Build plumbing of trainops: the PEP 517 backend, the torch range a build supports, and
the generated trainops/_build_info.py.

The C++ extensions compile against the headers of an installed torch, so the build needs
torch. pip's default build isolation installs build requirements into an empty
environment; a requirement ``torch`` there downloads the newest torch (a CUDA build of
several GB) even when the user has another torch installed, and the binary would then be
built for a torch the user does not run. This backend therefore asks for no torch: when the
build environment has none, it stops at once and says what to run instead. Setting
TRAINOPS_BUILD_TORCH (e.g. "torch==2.13.0") asks pip to install that torch into the
isolated build environment instead.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from setuptools import build_meta as _setuptools

# The torch releases a stable-ABI build is tested against: [target minimum, this bound).
STABLE_ABI_TORCH_BOUND = (2, 15)

NO_TORCH_MESSAGE = """
trainops compiles C++ kernels against the headers of the torch they will run with, but this
build environment has no torch (pip's build isolation starts from an empty environment).
Install torch first, then build against it without isolation:

    pip install torch            # if it is not installed yet
    pip install --no-build-isolation .

(or set TRAINOPS_BUILD_TORCH="torch==<version>" to let pip install that torch into the
isolated build environment; that downloads it again)
"""


class TorchMissingError(SystemExit):
    """The build needs torch and the build environment has none. A SystemExit, so pip shows
    the instructions alone rather than under a traceback."""


def _torch_build_requires() -> list[str]:
    requested = os.environ.get("TRAINOPS_BUILD_TORCH", "").strip()
    if requested:
        return [requested]
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TorchMissingError(NO_TORCH_MESSAGE) from None
    return []


# PEP 517 hooks: setuptools' own, with the torch check in front of the requirement hooks
# (the first hooks pip calls, before anything is compiled or downloaded). setuptools' hook
# runs setup.py, which imports torch, so it runs only once torch is there; setup.py asks
# for nothing beyond pyproject's build-system.requires.
def get_requires_for_build_wheel(config_settings=None):
    return _torch_build_requires() or _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _torch_build_requires() or _setuptools.get_requires_for_build_editable(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _setuptools.get_requires_for_build_sdist(config_settings)


prepare_metadata_for_build_wheel = _setuptools.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_wheel = _setuptools.build_wheel
build_editable = _setuptools.build_editable
build_sdist = _setuptools.build_sdist


@dataclass(frozen=True)
class TorchRange:
    """Torch versions a binary loads into: minimum <= (major, minor) < bound."""

    built_with: str
    minimum: tuple[int, int]
    bound: tuple[int, int]
    stable_abi: bool

    @property
    def specifier(self) -> str:
        return f">={self.minimum[0]}.{self.minimum[1]},<{self.bound[0]}.{self.bound[1]}"


def major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"trainops: cannot read a major.minor version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def _target_version(ext) -> tuple[int, int] | None:
    """(major, minor) of the extension's TORCH_TARGET_VERSION (a define_macros entry or a
    -D flag), if it has one."""
    args = ext.extra_compile_args
    flags = args.get("cxx", []) if isinstance(args, dict) else list(args or [])
    values = [value for name, value in (getattr(ext, "define_macros", None) or []) if name == "TORCH_TARGET_VERSION"]
    values += [flag.split("=", 1)[1] for flag in flags if flag.startswith("-DTORCH_TARGET_VERSION=")]
    if not values:
        return None
    try:
        encoded = int(str(values[0]), 0)  # torch/headeronly/version.h: major << 56 | minor << 48 | ...
    except ValueError:
        raise ValueError(f"trainops: cannot read a torch version from TORCH_TARGET_VERSION={values[0]} "
                         "(expected e.g. 0x020B000000000000 for torch 2.11)") from None
    return (encoded >> 56) & 0xFF, (encoded >> 48) & 0xFF


def torch_range(ext_modules) -> TorchRange:
    """A stable-ABI build (every extension has a TORCH_TARGET_VERSION) loads into torch from
    that version up to STABLE_ABI_TORCH_BOUND; any other build only into the major.minor of
    the torch it was compiled against (its C++ symbols change between releases)."""
    import torch

    built_with = torch.__version__.split("+")[0]
    targets = [_target_version(ext) for ext in ext_modules]
    if targets and all(t is not None for t in targets):
        return TorchRange(torch.__version__, max(targets), STABLE_ABI_TORCH_BOUND, True)
    major, minor = major_minor(built_with)
    return TorchRange(torch.__version__, (major, minor), (major, minor + 1), False)


def wheel_options(ext_modules) -> dict:
    """Tag the wheel cp310-abi3 when every extension uses Python's limited API."""
    if ext_modules and all(getattr(ext, "py_limited_api", False) for ext in ext_modules):
        return {"bdist_wheel": {"py_limited_api": "cp310"}}
    return {}


def write_build_info(path: str, ext_modules, rng: TorchRange, cpu_arch: str) -> None:
    """trainops/_build_info.py: what the binaries were built for, read at import time."""
    cuda = [ext for ext in ext_modules if ext.name == "trainops._C_cuda"]
    cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None
    text = (
        '"""Written by setup.py at build time: what the compiled extensions were built for."""\n'
        f"TORCH_BUILT_WITH = {rng.built_with!r}\n"
        f"TORCH_MINIMUM = {rng.minimum!r}  # (major, minor), inclusive\n"
        f"TORCH_BOUND = {rng.bound!r}  # (major, minor), exclusive\n"
        f"STABLE_ABI = {rng.stable_abi!r}\n"
        f"CPU_ARCH = {cpu_arch!r}\n"
        f"CUDA_ARCHS = {cuda_archs!r}\n"
    )
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # unchanged file, unchanged mtime: no needless rebuilds
        with open(path, "w") as f:
            f.write(text)
