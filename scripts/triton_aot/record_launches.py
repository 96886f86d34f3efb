"""pytest plugin: records every launch of a trainops Triton kernel while the tests run
under the Triton interpreter (CPU), as JSON lines in $TRAINOPS_AOT_RECORD: the kernel,
its argument types (the compile signature) and its constexpr values. compile_launches.py
then compiles each recorded specialization for a CUDA target, with no GPU.

Use: TRAINOPS_AOT_RECORD=launches.jsonl python -m pytest -p record_launches tests/...
(with this directory on PYTHONPATH).
"""
import importlib
import inspect
import json
import os

import torch

KERNEL_MODULES = ("trainops.kernels.quantize", "trainops.kernels.router", "trainops.kernels.mora")
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unrecorded kernel argument type {type(value).__name__}")


class _RecordingKernel:
    """Stands in for a module's kernel: kernel[grid](...) records, then launches."""

    def __init__(self, name, kernel, path):
        self._name, self._kernel, self._path = name, kernel, path

    def __getattr__(self, attr):
        return getattr(self._kernel, attr)

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def record_and_launch(*args, **kwargs):
            fn = self._kernel.fn
            names = list(inspect.signature(fn).parameters)
            values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
            signature, constexprs = {}, {}
            for name in names:
                value = values[name]
                if "constexpr" in str(fn.__annotations__.get(name, "")) or value is None:
                    signature[name] = "constexpr"
                    constexprs[name] = value
                else:
                    signature[name] = _arg_type(value)
            options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
            with open(self._path, "a") as f:
                f.write(json.dumps({"module": fn.__module__, "kernel": self._name, "signature": signature,
                                    "constexprs": constexprs, "options": options}) + "\n")
            return launch(*args, **kwargs)

        return record_and_launch


def pytest_configure(config):
    path = os.environ["TRAINOPS_AOT_RECORD"]
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        raise RuntimeError("record_launches runs the tests under the Triton interpreter (no GPU)")
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).copy().items():
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                setattr(module, name, _RecordingKernel(name, obj, path))
