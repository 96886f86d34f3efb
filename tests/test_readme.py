"""README.md's code runs as pasted.

Every ```python block is saved as a script and run with ``python block.py`` in a fresh
process, on the CPU (``CUDA_VISIBLE_DEVICES=""``), in an empty temporary folder. Every
command of a ```bash block is checked without running it (a full training run or the test
suite would take too long here): scripts exist and parse (``bash -n``), ``trainops ...``
arguments parse into a valid config and the console script answers ``--help``,
``python -m X`` names an importable module, pytest paths exist. Inline ``python -m X`` and
``python path.py`` mentions and the runtime's ``--options`` are checked too.

A block that cannot run as pasted is marked on the line before its fence with
``<!-- not-run: reason -->``; at most ``MAX_NOT_RUN`` such blocks are allowed.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_NOT_RUN = 2
# Two slow shared cores: a block that starts worker processes takes about a minute there.
BLOCK_TIMEOUT_S = 900
SHELL_LANGS = ("bash", "sh", "shell", "console")
# Sections whose blocks do not run as pasted yet, by heading: a block that passes fails the
# test (strict), so the mark goes when the section is fixed.
XFAIL_SECTIONS: dict[str, str] = {}

_FENCE = re.compile(r"^```\s*([\w+-]*)")
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    section: str
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    not_run: str | None  # the reason, for a block marked not-run

    @property
    def id(self) -> str:
        return f"{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}@L{self.line}"


def parse_blocks(text: str) -> list[Block]:
    """Fenced blocks of a markdown text with the heading they sit under and their not-run mark."""
    blocks, section, lines, i = [], "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        m = _FENCE.match(line)
        if m:
            start, lang, body = i + 1, m.group(1).lower(), []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"README.md:{start}: unclosed code fence")
            prev = next((ln for ln in reversed(lines[:start - 1]) if ln.strip()), "")
            mark = _NOT_RUN.match(prev.strip())
            blocks.append(Block(section, lang, "\n".join(body) + "\n", start, mark.group(1) if mark else None))
        i += 1
    return blocks


BLOCKS = parse_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python" and b.not_run is None]
SHELL = [b for b in BLOCKS if b.lang in SHELL_LANGS and b.not_run is None]


def _params(blocks):
    out = []
    for b in blocks:
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL_SECTIONS[b.section])] if b.section in XFAIL_SECTIONS else []
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


def _cpu_env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_readme_has_blocks_and_the_parser_sees_them():
    assert len(PYTHON) >= 2 and len(SHELL) >= 1
    assert {"Quantized gradient exchange", "Set-up: the two commands"} <= {b.section for b in BLOCKS}
    text = "intro\n# A\n<!-- not-run: needs a GPU -->\n```python\nx = 1\n```\n## B\n```bash\nls\n```\n"
    a, b = parse_blocks(text)
    assert (a.section, a.lang, a.code, a.line, a.not_run) == ("A", "python", "x = 1\n", 4, "needs a GPU")
    assert (b.section, b.lang, b.not_run) == ("B", "bash", None)


def test_blocks_not_run_are_marked_with_a_reason_and_few():
    marked = [b for b in BLOCKS if b.not_run is not None]
    assert all(b.not_run for b in marked), [b.id for b in marked if not b.not_run]
    assert len(marked) <= MAX_NOT_RUN, f"{len(marked)} blocks marked not-run (at most {MAX_NOT_RUN}): " \
        + ", ".join(f"{b.id} ({b.not_run})" for b in marked)


def test_xfail_marks_name_real_sections():
    sections = {b.section for b in BLOCKS}
    assert set(XFAIL_SECTIONS) <= sections, set(XFAIL_SECTIONS) - sections


@pytest.mark.parametrize("block", _params(PYTHON))
def test_python_block_runs_as_pasted(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.code)
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_cpu_env(), capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{block.line} ({block.section}) did not finish in {BLOCK_TIMEOUT_S} s")
    assert proc.returncode == 0, (f"README.md:{block.line} ({block.section}) exited with {proc.returncode}:\n"
                                  f"{proc.stderr[-3000:]}")


# --- shell blocks: each command checked without running it -------------------------------------------------------

def _check_script(argv: list[str]) -> None:
    path = ROOT / argv[0]
    assert path.is_file(), f"{argv[0]}: no such file"
    assert os.access(path, os.X_OK), f"{argv[0]}: not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def _check_trainops(argv: list[str]) -> None:
    exe = shutil.which("trainops")
    assert exe, "the trainops console script is not on PATH"
    args = argv[1:]
    if args and args[0] in ("train", "rl"):
        from trainops.runtime.config import TrainConfig, load_config
        from trainops.runtime.rl_config import RLConfig
        # raises ConfigError on a bad option
        load_config([a for a in args[1:] if a not in ("-h", "--help")], RLConfig if args[0] == "rl" else TrainConfig)
    help_argv = [exe, *args[:1], "--help"] if args else [exe]
    proc = subprocess.run(help_argv, env=_cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: trainops" in proc.stdout, (help_argv, proc.stdout, proc.stderr)


def _check_python(argv: list[str]) -> None:
    if argv[1:2] == ["-m"]:
        module = argv[2]
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
        if module == "pytest":
            for a in argv[3:]:
                if not a.startswith("-"):
                    assert (ROOT / a).exists(), f"pytest path {a} does not exist"
    else:
        assert (ROOT / argv[1]).is_file(), f"python {argv[1]}: no such file"


def check_command(command: str) -> None:
    argv = shlex.split(command)
    if argv[0].startswith(("./", "scripts/")):
        _check_script(argv)
    elif argv[0] == "trainops":
        _check_trainops(argv)
    elif argv[0] in ("python", "python3"):
        _check_python(argv)
    else:
        raise AssertionError(f"no check for the command {argv[0]!r}; add one to tests/test_readme.py")


def shell_commands(code: str) -> list[str]:
    out = []
    for line in code.splitlines():
        line = line.split("#", 1)[0].strip().removeprefix("$ ")
        out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


@pytest.mark.parametrize("block", _params(SHELL))
def test_shell_block_commands_are_valid(block):
    commands = shell_commands(block.code)
    assert commands, f"README.md:{block.line}: empty shell block"
    for c in commands:
        check_command(c)


def test_shell_check_catches_bad_commands():
    from trainops.runtime.config import ConfigError
    with pytest.raises(ConfigError, match="unknown option --no-such-option"):
        check_command("trainops train --no-such-option 1")
    with pytest.raises(ConfigError, match="unknown option --rlep"):  # an option of `trainops rl` only
        check_command("trainops train --rlep on")
    with pytest.raises(ConfigError, match="rlep='sometimes'"):
        check_command("trainops rl --rlep sometimes")
    with pytest.raises(AssertionError, match="no such file"):
        check_command("./scripts/no_such_script.sh")
    with pytest.raises(AssertionError, match="no such module"):
        check_command("python -m trainops.no_such_module")
    with pytest.raises(AssertionError, match="no check for the command"):
        check_command("rm -rf build")
    assert shell_commands("# a comment\na && b  # tail\n$ c\n") == ["a", "b", "c"]


# --- inline mentions -----------------------------------------------------------------------------------------------

_INLINE = re.compile(r"`([^`\n]+)`")


def _inline_code() -> list[str]:
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.S | re.M)
    return _INLINE.findall(text)


def test_inline_python_commands_name_real_modules_and_files():
    seen = 0
    for span in _inline_code():
        for m in re.finditer(r"python (-m [\w.]+|[\w./-]+\.py)", span):
            target = m.group(1)
            if "<" in target:
                continue
            seen += 1
            _check_python(["python", *target.split()])
    assert seen >= 3


def test_runtime_options_in_readme_exist():
    from trainops.runtime.rl_config import RLConfig  # TrainConfig's options and those of `trainops rl`
    names = {f.name.replace("_", "-"): f.type for f in fields(RLConfig)}
    # `--key value` is the README's placeholder for any option
    known = {"help", "config", "key"} | set(names) | {f"no-{n}" for n, t in names.items() if t in (bool, "bool")}
    text = README.read_text()
    runtime = text[text.index("### The runtime"):text.index("### Quantized gradient exchange")]
    flags = set()
    for span in _INLINE.findall(runtime):
        if span.startswith(("trainops", "--")):
            flags |= set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", span))
    assert len(flags) >= 5
    assert flags <= known, flags - known


# --- the runtime results: rendered by scripts/regenerate_readme_results.py -----------------------------------------

def _regenerate_script():
    spec = importlib.util.spec_from_file_location("regenerate_readme_results",
                                                  ROOT / "scripts" / "regenerate_readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runtime_results_are_the_committed_run_rendered():
    import json
    script = _regenerate_script()
    summary = json.loads((ROOT / "docs" / "images" / "default_run_summary.json").read_text())
    text = README.read_text()
    block = text.split(script.BEGIN)[1].split(script.END)[0]
    assert block == "\n" + script.render(summary) + "\n", "README.md's results were edited by hand; rerun the script"
    assert summary["seed"] == 0 and summary["rows"][0] == "pretrain" and len(summary["accuracy"]) == 5
    for name in script.PLOTS:
        assert (ROOT / "docs" / "images" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(docs/images/{name})" in text


def test_regenerate_script_replaces_only_between_the_markers():
    script = _regenerate_script()
    text = f"head\n{script.BEGIN}\nold table\n{script.END}\ntail\n"
    assert script.replace_block(text, "new") == f"head\n{script.BEGIN}\nnew\n{script.END}\ntail\n"
    with pytest.raises(SystemExit, match="exactly once"):
        script.replace_block("no markers here", "new")
    with pytest.raises(SystemExit, match="exactly once"):
        script.replace_block(text + script.BEGIN, "new")
