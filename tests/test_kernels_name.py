"""From a checkout the repository root is on sys.path (``python -m pytest`` puts the working
directory first). Nothing there may be importable as ``kernels``: it would shadow Hugging
Face's ``kernels`` package, which transformers probes (and >= 5.25 imports). The Triton
kernels live in the package, as ``trainops.kernels``."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repository_root_does_not_provide_a_kernels_module():
    # Hugging Face's package may be installed (in a virtual environment that may itself sit
    # in the checkout): what must not resolve is a module or folder at the root itself.
    code = ("import importlib.util, os\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "places = [] if spec is None else [spec.origin or '', *(spec.submodule_search_locations or [])]\n"
            "mine = {os.path.join(os.getcwd(), 'kernels'), os.path.join(os.getcwd(), 'kernels.py'),\n"
            "        os.path.join(os.getcwd(), 'kernels', '__init__.py')}\n"
            "print(not any(os.path.abspath(p) in mine for p in places if p))\n"
            "import trainops.kernels.router\n"
            "print(os.path.dirname(trainops.kernels.__file__).endswith(os.path.join('trainops', 'kernels')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"], out
