"""The compiled extensions load: a build that exists but cannot be imported would only
show later, as 'failed to load' from every op that needs it."""
import glob
import os

import pytest
import torch

import trainops
from trainops import _extension


def test_cpu_extension_loads():
    assert _extension.HAS_C, _extension._errors.get("trainops._C")


def test_built_cuda_extension_loads():
    """Where the CUDA extension was built (wherever nvcc was found at build time, whatever
    build of torch: it uses the stable ABI), it imports and registers its kernels, GPU or not."""
    package = os.path.dirname(trainops.__file__)
    if not glob.glob(os.path.join(package, "_C_cuda*.so")):
        pytest.skip("trainops._C_cuda not built here (no nvcc at build time, or TRAINOPS_SKIP_CUDA=1)")
    assert _extension.HAS_CUDA_C, _extension._errors.get("trainops._C_cuda")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("trainops::replay_sample", "CUDA")
