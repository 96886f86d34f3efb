"""From a checkout, the repository root is on sys.path (``python -m pytest`` puts the working
directory first) and its ``kernels/`` folder (installed as ``trainops.kernels``) would shadow
Hugging Face's ``kernels`` package, which transformers >= 5.25 imports: the bare name must
resolve to the installed package, or fail as if the folder were not there."""
import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed_kernels() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_bare_kernels_is_not_the_checkout_folder():
    code = ("import sys\n"
            "try:\n"
            "    import kernels\n"
            "    print('installed', kernels.__file__)\n"
            "except ModuleNotFoundError as e:\n"
            "    print('missing', e.name)\n"
            "import trainops.kernels.router\n"
            "print('trainops.kernels', sys.modules['trainops.kernels'] is not sys.modules.get('kernels'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    first, second = out.splitlines()
    if _installed_kernels():
        assert first.startswith("installed") and os.path.join(ROOT, "kernels") not in first, first
    else:
        assert first == "missing kernels", first
    assert second == "trainops.kernels True"
