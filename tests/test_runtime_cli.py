"""The `trainops` command: bare `trainops` lists the commands, TensorBoard logging
(--tensorboard), log lines on stderr with --no-progress (--log-every). Tiny runs, seconds each."""
import json
import os
import subprocess
import sys
import tomllib

import pytest

from trainops.runtime.cli import main
from trainops.runtime.config import load_config
from trainops.runtime.monitor import RunMonitor, scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"tasks": "arith,reverse", "seq_len": 12, "batch_size": 8, "eval_size": 16, "d_model": 32, "n_layers": 2,
        "n_heads": 2, "num_experts": 4, "top_k": 2, "ffn_size": 32, "pretrain_steps": 4, "grad_accum": 2,
        "task_steps": 4, "sync_every": 2, "replay_capacity": 64, "checkpoint_every": 0, "timeout_s": 60}


def _argv(d: dict) -> list:
    return [a for k, v in d.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _trainops(*args, cwd=None):
    exe = os.path.join(os.path.dirname(sys.executable), "trainops")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_bare_trainops_prints_the_commands_and_starts_nothing(tmp_path):
    proc = _trainops(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: trainops <command>") and "\n  train " in proc.stdout
    assert os.listdir(tmp_path) == []  # no runs/default: nothing was trained


def test_top_level_help_and_mistakes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in ([], ["--help"], ["-h"], ["help"]):
        assert main(argv) == 0
        assert capsys.readouterr().out.startswith("usage: trainops <command>")
    assert main(["--workers", "1"]) == 2
    assert capsys.readouterr().err == "trainops: options follow a command: trainops train --workers 1\n"
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: trainops train")
    assert os.listdir(tmp_path) == []


def test_python_dash_m_trainops_train_still_takes_options_without_the_command():
    proc = subprocess.run([sys.executable, "-m", "trainops.train", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: trainops train"), proc.stderr
    assert "--tensorboard" in proc.stdout and "--log-every" in proc.stdout


def test_new_options_parse_and_are_checked():
    cfg = load_config(["--tensorboard", "--no-progress", "--log-every", "7"])
    assert (cfg.tensorboard, cfg.progress, cfg.log_every) == (True, False, 7)
    assert load_config([]).tensorboard is False
    with pytest.raises(ValueError, match="log_every=-1: must be >= 0"):
        load_config(["--log-every", "-1"])


def test_missing_tensorboard_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = str(tmp_path / "run")
    assert main(["train", "--tensorboard", "--out-dir", out, "--workers", "1"]) == 2
    assert capsys.readouterr().err == ("trainops train: error: tensorboard=True needs the tensorboard package: "
                                       "pip install 'trainops[tensorboard]'\n")
    assert not os.path.exists(out)  # refused before anything was written
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    assert extras["tensorboard"] == ["tensorboard"]


def test_scalars_of_metrics_rows():
    step = {"global_step": 5, "phase": "pretrain", "step": 5, "loss": 1.5, "lbl": 0.02, "lbl_scope": "global",
            "replay_rows": 0, "tokens_per_s": 100.0, "bytes_sent": 10, "bytes_fp32_equiv": 80, "exchange": "fp4_e3m0"}
    assert scalars(step, ["a", "b"]) == {"train/loss": 1.5, "train/lbl": 0.02, "train/replay_rows": 0.0,
                                         "train/tokens_per_s": 100.0, "train/bytes_sent": 10.0,
                                         "train/bytes_fp32_equiv": 80.0}
    ev = {"global_step": 5, "phase": "pretrain", "event": "eval", "accuracy": [0.5, 1.0], "byte_accuracy": [0.75, 1.0],
          "specialization": 0.1, "weights_sha1": "ab"}
    assert scalars(ev, ["a", "b"]) == {"eval/accuracy/a": 0.5, "eval/accuracy/b": 1.0, "eval/byte_accuracy/a": 0.75,
                                       "eval/byte_accuracy/b": 1.0, "eval/specialization": 0.1}


@pytest.mark.parametrize("rank,progress,log_every,lines", [(0, False, 2, 3), (0, False, 0, 0), (0, True, 2, 0),
                                                          (1, False, 2, 0)])
def test_log_lines_only_from_rank_0_without_bars(capsys, rank, progress, log_every, lines, tmp_path):
    cfg = load_config(["--out-dir", str(tmp_path), "--log-every", str(log_every), f"--progress={progress}"])
    mon = RunMonitor(cfg, rank, ["a"], {"p": 5})
    for s in range(1, 6):  # lines at steps 2, 4 and the phase's last step, 5
        mon.log({"global_step": s, "phase": "p", "step": s, "loss": 1.0, "lbl": 0.0, "tokens_per_s": 1.0,
                 "bytes_sent": 0})
    mon.close()
    assert capsys.readouterr().err.count("\n") == lines


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Two workers, --tensorboard, --no-progress --log-every 3: the real command."""
    out = str(tmp_path_factory.mktemp("run"))
    cmd = [sys.executable, "-m", "trainops.train", *_argv({**TINY, "workers": 2, "out_dir": out, "log_every": 3}),
           "--no-progress", "--tensorboard"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(ln) for ln in fh]
    return out, proc.stderr, rows


def test_log_lines_on_stderr(logged_run):
    _, err, rows = logged_run
    lines = [ln for ln in err.splitlines() if ln.startswith("trainops train: [")]
    # each of the 3 phases: steps 3 and 4 (its last), then its evaluation; rank 0 only
    assert len(lines) == 9, err
    assert lines[0].startswith("trainops train: [pretrain] step 3/4 (global 3) loss ")
    assert "tokens/s" in lines[0] and lines[1].startswith("trainops train: [pretrain] step 4/4 (global 4)")
    assert lines[2].startswith("trainops train: [pretrain] exact-match (greedy) arith=")
    assert lines[-1].startswith("trainops train: [task1:reverse] exact-match (greedy)")
    row = next(r for r in rows if r.get("global_step") == 3 and "event" not in r)
    assert f"loss {row['loss']:.4f} " in lines[0]


def test_tensorboard_holds_the_metrics_scalars(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, rows = logged_run
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    expected: dict = {}
    for r in rows:
        for tag, v in scalars(r, ["arith", "reverse"]).items():
            expected.setdefault(tag, []).append((r["global_step"], v))
    assert set(acc.Tags()["scalars"]) == set(expected)
    assert {"train/loss", "train/tokens_per_s", "eval/accuracy/arith", "eval/specialization"} <= set(expected)
    for tag, want in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert len(expected["train/loss"]) == 12
