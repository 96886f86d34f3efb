"""Compiles every Triton kernel specialization recorded by record_launches.py for CUDA
targets, ahead of time and without a GPU (Triton's own ptxas): a check that the kernels,
so far run only by the interpreter, build for real GPUs with the installed Triton.

Kernels with a LOWP constexpr (MoRA's tensor-core path, which the interpreter cannot run:
no 16-bit tl.dot) are also compiled with LOWP=True and 16-bit activations and weights.

Use: python compile_launches.py launches.jsonl [arch ...]   (default: 80 90)
"""
import collections
import importlib
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FP32_SCRATCH = ("z_ptr", "p_ptr", "rho_ptr", "dp_ptr")  # MoRA's fp32 buffers, whatever the activations


def specializations(path):
    seen = {}
    for line in open(path):
        launch = json.loads(line)
        seen[json.dumps(launch, sort_keys=True)] = launch
        if launch["constexprs"].get("LOWP") is False:
            for dtype in ("bf16", "fp16"):
                low = json.loads(line)
                low["constexprs"]["LOWP"] = True
                low["signature"] = {k: "*" + dtype if v == "*fp32" and k not in FP32_SCRATCH else v
                                    for k, v in low["signature"].items()}
                seen[json.dumps(low, sort_keys=True)] = low
    return list(seen.values())


def main():
    path, archs = sys.argv[1], [int(a) for a in sys.argv[2:]] or [80, 90]
    launches = specializations(path)
    compiled, failures = collections.Counter(), []
    for arch in archs:
        for launch in launches:
            kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
            source = ASTSource(kernel, launch["signature"], launch["constexprs"])
            try:
                triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"])
                compiled[f"sm_{arch} {launch['kernel']}"] += 1
            except Exception as exc:  # report every failure, then fail
                failures.append(f"sm_{arch} {launch['kernel']} {launch['constexprs']}: {exc!r}"[:2000])
    print(f"Triton {triton.__version__}: compiled {sum(compiled.values())} kernel specializations")
    for key, n in sorted(compiled.items()):
        print(f"  {key}: {n}")
    for failure in failures:
        print("FAILED", failure)
    sys.exit(1 if failures or not compiled else 0)


if __name__ == "__main__":
    main()
