"""Build of trainops: the C++ CPU extension always, the CUDA extension where possible.

Environment switches:
  TRAINOPS_SKIP_CUDA=1    never build the CUDA extension (built wherever nvcc and the CUDA
                          headers are found, whatever build of torch: it uses torch's stable ABI)
  TRAINOPS_CUDA_ARCHS     e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST or 8.0;9.0;10.0;12.0)
  TRAINOPS_CPU_ARCH       -march for the C++ CPU kernels (default on x86-64: x86-64-v2, a
                          portable baseline; wider kernels are picked at run time; "native"
                          for a binary tuned to the building CPU only; empty: compiler default)
"""
import glob
import os
import platform
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_support  # noqa: E402  (torch range, _build_info.py, the PEP 517 backend)

from setuptools import find_packages, setup


def _default_cuda_home():
    """Sets CUDA_HOME, when unset, where torch's own guess would lack the CUDA headers.

    torch takes the parent of the directory of the nvcc on PATH; for an nvcc installed
    outside the toolkit (e.g. /usr/local/bin/nvcc) that is /usr/local, which has no
    cuda_runtime.h, and the C++ bindings of the CUDA extension then fail to compile. The
    toolkit's usual link, /usr/local/cuda, is taken instead when it has the headers.
    Runs before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(nvcc))
    toolkit = "/usr/local/cuda"
    if not _has_cuda_headers(guess) and _has_cuda_headers(toolkit):
        os.environ["CUDA_HOME"] = toolkit


def _has_cuda_headers(home):
    return os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


_default_cuda_home()
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# -ffp-contract=off: no FMA contraction, so CPU results match the reference bit for bit.
# -march: a portable baseline by default, so a wheel runs on any x86-64 CPU that torch's
# own CPU build runs on; the AVX2 + FMA kernels are compiled with target attributes and
# chosen at run time (csrc/cpu/cpu_isa.h). TRAINOPS_CPU_ARCH=native opts in to a binary
# for the building CPU only. Other machines (aarch64) use the compiler's default.
CPU_ARCH = os.environ.get("TRAINOPS_CPU_ARCH", "x86-64-v2" if platform.machine() in ("x86_64", "AMD64") else "")
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fopenmp"] + ([f"-march={CPU_ARCH}"] if CPU_ARCH else [])


# Both extensions use only torch's stable ABI (torch/csrc/stable, torch/headeronly) and
# CPython's limited API: one build loads in every torch >= 2.11 and every CPython >= 3.10.
# TORCH_TARGET_VERSION makes any use of a stable API newer than torch 2.11 a compile error.
STABLE_ABI_MACROS = [("Py_LIMITED_API", "0x030A0000"), ("TORCH_TARGET_VERSION", "0x020B000000000000")]


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cpu_extension():
    sources = _rel([os.path.join(ROOT, "csrc", "trainops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    return CppExtension(
        "trainops._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=STABLE_ABI_MACROS,
        py_limited_api=True,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )


def cuda_extension_or_reason():
    """The CUDA extension, or (None, why it is skipped)."""
    if os.environ.get("TRAINOPS_SKIP_CUDA") == "1":
        return None, "TRAINOPS_SKIP_CUDA=1"
    cu_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    bindings = glob.glob(os.path.join(ROOT, "csrc", "cuda", "bindings", "*.cpp"))
    if not cu_sources:
        return None, "no CUDA C++ kernels in csrc/cuda"
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import CUDAExtension

    if cpp_extension.CUDA_HOME is None:
        # A CPU build of torch does not look for the CUDA toolkit. The extension needs only
        # nvcc, the CUDA headers and runtime (no CUDA part of torch: it uses the stable ABI).
        cpp_extension.CUDA_HOME = cpp_extension._find_cuda_home()
    CUDA_HOME = cpp_extension.CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME or "", "bin", "nvcc")):
        return None, "nvcc not found (set CUDA_HOME)"
    if not _has_cuda_headers(CUDA_HOME):
        return None, f"no include/cuda_runtime.h under CUDA_HOME={CUDA_HOME} (set CUDA_HOME to the CUDA toolkit)"
    archs = os.environ.get("TRAINOPS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0;10.0;12.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    ext = CUDAExtension(
        "trainops._C_cuda",
        _rel(cu_sources + bindings),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=STABLE_ABI_MACROS,
        py_limited_api=True,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17", "--fmad=false"]},
        extra_link_args=["-fopenmp"],
    )
    # The bindings need none of torch's CUDA libraries (the current stream is looked up in the
    # loaded libtorch_cuda at run time), and a CPU build of torch has none to link. The CUDA
    # runtime is linked statically: the module then imports wherever torch does (no
    # libcudart.so of a matching major version needed; a CPU-only machine can load it).
    ext.libraries = [lib for lib in ext.libraries if lib not in ("c10_cuda", "torch_cuda", "cudart")]
    ext.libraries += ["cudart_static", "rt", "dl", "pthread"]
    return ext, None


def extensions():
    exts = [cpu_extension()]
    cuda_ext, why = cuda_extension_or_reason()
    if cuda_ext is None:
        print(f"trainops: skipping the CUDA extension: {why}")
    else:
        exts.append(cuda_ext)
    return exts


packages = find_packages(where="python")
ext_modules = extensions()
torch_range = build_support.torch_range(ext_modules)
build_support.write_build_info(os.path.join(ROOT, "python", "trainops", "_build_info.py"), ext_modules, torch_range,
                               CPU_ARCH)
setup(
    packages=packages,
    package_dir={"": "python"},
    ext_modules=ext_modules,
    # The torch this binary loads into: the stable-ABI range, or the torch it was built with.
    install_requires=[f"torch{torch_range.specifier}", "numpy"],
    options=build_support.wheel_options(ext_modules),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
