"""Triton kernels (pure @triton.jit functions and their launchers), installed as ``trainops.kernels``."""
if __name__ == "kernels":
    # Imported under the bare name: the repository root is on sys.path (``python -m pytest``
    # from a checkout puts the working directory first), and this folder shadows Hugging Face's
    # ``kernels`` package, which transformers >= 5.25 imports. Hand the import over to the
    # installed package (or fail as if this folder were not there).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the folder kernels/ of a trainops checkout is "
                                  "trainops.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
