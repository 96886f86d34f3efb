"""Test set-up: Triton kernels run on CPU tensors through the interpreter when no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this runs
before the package (and its kernels) is imported by a test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device():
    """Device the Triton kernels run on in this session: cuda, or cpu under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"
