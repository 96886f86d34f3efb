"""From a checkout the repository root is on sys.path (``python -m pytest`` puts the working
directory first). Nothing there may be importable as ``kernels``: it would shadow Hugging
Face's ``kernels`` package, which transformers probes (and >= 5.25 imports). The Triton
kernels live in the package, as ``trainops.kernels``."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repository_root_does_not_provide_a_kernels_module():
    code = ("import importlib.util, os, sys\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "origin = spec.origin if spec is not None else None\n"
            "print(origin is None or not os.path.abspath(origin).startswith(os.getcwd() + os.sep))\n"
            "import trainops.kernels.router\n"
            "print(os.path.dirname(trainops.kernels.__file__).endswith(os.path.join('trainops', 'kernels')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"], out
