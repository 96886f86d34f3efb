"""Packaging: the torch range a build records and checks, the build backend's answer when the
build environment has no torch, the runtime's missing-extra message, and an import of the
package without triton."""
import os
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def build_support(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    import build_support

    return build_support


def _ext(name, cxx, macros=()):
    return types.SimpleNamespace(name=name, extra_compile_args={"cxx": cxx}, define_macros=list(macros), py_limited_api=False)


def test_stable_abi_build_declares_target_to_bound(build_support):
    flags = ["-O3", "-DTORCH_TARGET_VERSION=0x020b000000000000"]
    rng = build_support.torch_range([_ext("trainops._C", flags)])
    assert rng.stable_abi and rng.minimum == (2, 11) and rng.bound == build_support.STABLE_ABI_TORCH_BOUND
    assert rng.specifier == ">=2.11,<2.15"


def test_target_version_from_define_macros(build_support):
    macros = [("Py_LIMITED_API", "0x030A0000"), ("TORCH_TARGET_VERSION", "0x020B000000000000")]
    rng = build_support.torch_range([_ext("trainops._C", ["-O3"], macros), _ext("trainops._C_cuda", [], macros)])
    assert rng.stable_abi and rng.specifier == ">=2.11,<2.15"


def test_other_build_declares_only_the_torch_it_was_built_with(build_support):
    rng = build_support.torch_range([_ext("trainops._C", ["-O3"]), _ext("trainops._C_cuda", ["-DTORCH_TARGET_VERSION=0x020b000000000000"])])
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert not rng.stable_abi
    assert rng.specifier == f">={major}.{minor},<{major}.{minor + 1}"


def test_unreadable_target_version_is_a_clear_error(build_support):
    with pytest.raises(ValueError, match="TORCH_TARGET_VERSION=two.*torch 2.11"):
        build_support.torch_range([_ext("trainops._C", ["-DTORCH_TARGET_VERSION=two"])])


def test_abi3_tag_only_when_every_extension_uses_the_limited_api(build_support):
    a, b = _ext("trainops._C", []), _ext("trainops._C_cuda", [])
    assert build_support.wheel_options([a, b]) == {}
    a.py_limited_api = b.py_limited_api = True
    assert build_support.wheel_options([a, b]) == {"bdist_wheel": {"py_limited_api": "cp310"}}


def test_backend_without_torch_stops_with_instructions(build_support, monkeypatch):
    monkeypatch.delenv("TRAINOPS_BUILD_TORCH", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(build_support.TorchMissingError, match="pip install --no-build-isolation"):
        build_support._torch_build_requires()


def test_backend_asks_for_the_torch_named_in_the_environment(build_support, monkeypatch):
    monkeypatch.setenv("TRAINOPS_BUILD_TORCH", "torch==2.13.0")
    monkeypatch.setitem(sys.modules, "torch", None)
    assert build_support._torch_build_requires() == ["torch==2.13.0"]


def test_backend_with_torch_asks_for_nothing_more(build_support, monkeypatch):
    monkeypatch.delenv("TRAINOPS_BUILD_TORCH", raising=False)
    assert build_support._torch_build_requires() == []


@pytest.fixture
def build_info(monkeypatch):
    info = types.ModuleType("trainops._build_info")
    info.TORCH_BUILT_WITH, info.TORCH_MINIMUM, info.TORCH_BOUND, info.STABLE_ABI = "2.13.0+cpu", (2, 13), (2, 14), False
    monkeypatch.setitem(sys.modules, "trainops._build_info", info)
    import trainops

    monkeypatch.setattr(trainops, "_build_info", info, raising=False)
    return info


def test_running_torch_in_the_built_range_passes(build_info):
    from trainops._build_info_check import torch_mismatch

    assert torch_mismatch("2.13.1") is None
    assert torch_mismatch("2.13.0+cu128") is None


def test_running_torch_outside_the_range_names_both_versions(build_info):
    from trainops._build_info_check import torch_mismatch

    message = torch_mismatch("2.14.1+cu130")
    assert "built with torch 2.13.0+cpu" in message and "torch 2.14.1+cu130 is running" in message
    assert "torch>=2.13,<2.14" in message
    build_info.TORCH_MINIMUM, build_info.TORCH_BOUND, build_info.STABLE_ABI = (2, 11), (2, 15), True
    assert torch_mismatch("2.14.1") is None
    assert "stable-ABI build: torch >=2.11,<2.15" in torch_mismatch("2.10.0")


def test_installed_build_info_matches_the_running_torch():
    """The package under test was built for the torch it runs with (else it would not load)."""
    from trainops import _extension

    try:
        from trainops import _build_info
    except ImportError:
        pytest.skip("trainops runs from a source tree that setup.py never built")
    assert _extension.TORCH_MISMATCH is None
    assert _build_info.CPU_ARCH != "native" or os.environ.get("TRAINOPS_CPU_ARCH") == "native"


def test_train_names_the_missing_runtime_extra(monkeypatch, capsys):
    import importlib.util

    from trainops.runtime import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "yaml" else real(name, *a))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert "pyyaml" in err and "pip install 'trainops[runtime]'" in err


def test_cpu_ops_work_without_triton():
    """A CPU install need not have triton: nothing imports it until a Triton kernel runs."""
    code = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton is not installed')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "import torch, trainops\n"
        "from trainops import _triton\n"
        "assert not _triton.HAS_TRITON\n"
        "x = torch.randn(300)\n"
        "y = trainops.ops.dequantize(trainops.ops.quantize(x, 'int8', 128))\n"
        "assert y.shape == x.shape and (y - x).abs().max() < 0.05\n"
        "w, i, c, p = trainops.ops.router_topk(torch.randn(8, 16), 2)\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
