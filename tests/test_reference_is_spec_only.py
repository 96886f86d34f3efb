"""trainops.reference is a specification: tests and benchmarks compare the kernels with it, and no
production module imports it (docs/ARCHITECTURE.md). What both need lives in shared modules
(formats, _counter_rng, _router_scores, _replay_spec)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = "trainops.reference"
# The package root loads the public trainops.reference when a user asks for the attribute
# (``trainops.reference``, lazily: ``import trainops`` does not load it); it uses nothing from it.
PUBLIC_REEXPORT = {("trainops/__init__.py", "trainops.reference")}


def _production_modules(root: str):
    """(module name, path relative to the package folder's parent, path) of every production
    module: python/trainops except reference/ (the Triton kernels, trainops.kernels, included)."""
    for top, package in [(os.path.join(root, "python", "trainops"), "trainops")]:
        for folder, dirs, files in os.walk(top):
            rel = os.path.relpath(folder, top)
            parts = [] if rel == "." else rel.split(os.sep)
            if package == "trainops" and parts[:1] == ["reference"]:
                dirs[:] = []
                continue
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in sorted(files):
                if name.endswith(".py"):
                    mod = ".".join([package, *parts] + ([] if name == "__init__.py" else [name[:-3]]))
                    yield mod, "/".join([*package.split("."), *parts, name]), os.path.join(folder, name)


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """Every module name an import statement (or importlib.import_module / __import__ call with
    a literal name) of ``tree`` names, relative imports resolved; ``from a import b`` gives a.b."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in ("import_module", "__import__"):
                yield node.args[0].value


def reference_imports(root: str) -> list[str]:
    """'path: module' for every import of trainops.reference by a production module."""
    found = []
    for module, rel, path in _production_modules(root):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for name in set(_imported_names(tree, module, path.endswith("__init__.py"))):
            if (name == REFERENCE or name.startswith(REFERENCE + ".")) and (rel, name) not in PUBLIC_REEXPORT:
                found.append(f"{rel}: {name}")
    return sorted(found)


def test_no_production_module_imports_the_reference():
    assert reference_imports(ROOT) == []


def test_the_check_sees_every_form_of_import(tmp_path):
    pkg = tmp_path / "python" / "trainops"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "reference").mkdir()
    (pkg / "kernels").mkdir()
    (pkg / "__init__.py").write_text("from trainops import reference\n")
    (pkg / "reference" / "__init__.py").write_text("from trainops.reference import replay\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "a.py").write_text("from trainops.reference.replay import BLOCK\n")
    (pkg / "ops" / "b.py").write_text("import trainops.reference.router as r\n")
    (pkg / "ops" / "c.py").write_text("from ..reference import mora\n")
    (pkg / "ops" / "d.py").write_text("from trainops import reference\n")
    (pkg / "ops" / "e.py").write_text("import importlib\nm = importlib.import_module('trainops.reference')\n")
    (pkg / "ops" / "f.py").write_text("from trainops import formats\nimport trainops._replay_spec\n")
    (pkg / "kernels" / "k.py").write_text("def f():\n    from trainops.reference import quantize\n")
    assert reference_imports(str(tmp_path)) == [
        "trainops/kernels/k.py: trainops.reference", "trainops/kernels/k.py: trainops.reference.quantize",
        "trainops/ops/a.py: trainops.reference.replay", "trainops/ops/a.py: trainops.reference.replay.BLOCK",
        "trainops/ops/b.py: trainops.reference.router", "trainops/ops/c.py: trainops.reference",
        "trainops/ops/c.py: trainops.reference.mora", "trainops/ops/d.py: trainops.reference",
        "trainops/ops/e.py: trainops.reference"]


def test_import_trainops_does_not_load_the_reference():
    import subprocess
    import sys
    code = "import sys, trainops; print('trainops.reference' in sys.modules, trainops.reference.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "trainops.reference"]
