"""trainops train configuration: --help from the dataclass, YAML + overrides, clear errors;
embedded domains are deterministic and well-formed."""
import dataclasses

import pytest
import torch

from trainops.runtime.cli import main
from trainops.runtime.config import ConfigError, TrainConfig, load_config
from trainops.runtime.domains import generator, make_domains


def test_help_lists_every_option(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert f.metadata["help"] in out


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lbl_scope: micro_batch\nworkers: 3\nerror_feedback: false\n")
    cfg = load_config(["--config", str(path), "--workers", "1", "--replay=off", "--no-progress"])
    assert (cfg.lbl_scope, cfg.workers, cfg.replay, cfg.error_feedback, cfg.progress) == \
        ("micro_batch", 1, "off", False, False)


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "unknown option --bogus"),
    (["--lbl-scope", "batch"], "lbl_scope='batch': must be one of micro_batch, sequence, global"),
    (["--replay", "sometimes"], "replay='sometimes'"),
    (["--adapter", "dora"], "adapter='dora'"),
    (["--exchange", "fp5"], "unknown fmt 'fp5'"),
    (["--workers", "two"], "workers must be int"),
    (["--workers", "0"], "workers=0: must be >= 1"),
    (["--sync-every", "7"], "sync_every=7: must divide pretrain_steps"),
    (["--tasks", "arith,poetry"], "unknown domain 'poetry'"),
    (["--d-model", "30", "--n-heads", "4"], "d_model=30: must be divisible by n_heads=4"),
    (["--resume"], "no checkpoint"),
])
def test_bad_configs_fail_clearly(argv, message, capsys, tmp_path):
    assert main(["train", "--out-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainops train: error:") and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "lr=inf: must be a finite number"),
    (["--lr", "nan"], "lr=nan: must be a finite number"),
    (["--task-lr", "-inf"], "task_lr=-inf: must be a finite number"),
    (["--outer-lr", "nan"], "outer_lr=nan: must be a finite number"),
    (["--mora-temperature", "inf"], "mora_temperature=inf: must be a finite number"),
    (["--lbl-coeff", "inf"], "lbl_coeff=inf: must be a finite number"),
    (["--timeout-s", "inf"], "timeout_s=inf: must be a finite number"),
    (["--timeout-s", "1e12"], "timeout_s=1000000000000.0: must be <= 604800"),
    (["--replay-ratio", "nan"], "replay_ratio=nan: must be a finite number"),
    (["--outer-momentum", "nan"], "outer_momentum=nan: must be a finite number"),
    (["--seq-len", "100000"], "seq_len=100000: must be <= 4096"),
    (["--batch-size", "1000000000"], "batch_size=1000000000: must be <= 8192"),
    (["--d-model", "1048576", "--n-heads", "4"], "d_model=1048576: must be <= 8192"),
    (["--n-layers", "100000"], "n_layers=100000: must be <= 128"),
    (["--num-experts", "100000"], "num_experts=100000: must be <= 1024"),
    (["--ffn-size", "10000000"], "ffn_size=10000000: must be <= 65536"),
    (["--replay-capacity", "1000000000"], "replay_capacity=1000000000: must be <= 1000000"),
    (["--workers", "1000"], "workers=1000: must be <= 256"),
    (["--batch-size", "8192", "--seq-len", "4096"], "batch_size=8192: x seq_len=4096 must be <= 1048576 tokens"),
    (["--adapter-targets", "q|(k"], "adapter_targets='q|(k': not a valid regular expression (missing )"),
    (["--adapter-targets", "qkv"], "adapter_targets='qkv': matches no layer of the model (layer names: head, k, o"),
    (["--adapter", "lora", "--adapter-targets", "["], "adapter_targets='[': not a valid regular expression"),
    (["--tasks", "arith,reverse", "--seq-len", "8"], "seq_len=8: domain 'reverse' needs seq_len >= 9, got 8"),
    (["--tasks", "sort", "--seq-len", "10"], "seq_len=10: domain 'sort' needs seq_len >= 11"),
    (["--tasks", "grammar", "--seq-len", "9"], "seq_len=9: domain 'grammar' needs seq_len >= 10"),
    (["--tasks", "arith", "--seq-len", "4"], "seq_len=4: domain 'arith' needs seq_len >= 5"),
    (["--out-dir", ""], "out_dir='': must not be empty"),
    (["--out-dir", "  "], "out_dir='  ': must not be empty"),
    (["--resume", "--overwrite"], "overwrite=True: contradicts --resume"),
])
def test_values_that_would_fail_inside_workers_are_refused_up_front(argv, message, capsys, tmp_path):
    assert main(["train", "--out-dir", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainops train: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_text_domain_too_long_for_seq_len(tmp_path, capsys):
    path = tmp_path / "long.txt"
    path.write_text("a long prompt\tand its answer\n")
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--tasks", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"tasks: {path}:1: prompt and answer must be non-empty and fit seq_len=12" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device='cuda': CUDA is not available here" in err and "--device cpu" in err and err.count("\n") == 1


def test_more_workers_than_the_machine_holds(tmp_path, capsys):
    import os
    workers = 4 * (os.cpu_count() or 1) + 1
    if workers > 256 or torch.cuda.is_available():
        pytest.skip("machine too large for this check")
    assert main(["train", "--out-dir", str(tmp_path / "run"), "--workers", str(workers), "--device", "cpu"]) == 2
    assert f"workers={workers}: workers x threads ({workers}) must be <= 4 x the" in capsys.readouterr().err


@pytest.mark.parametrize("text, line", [
    ("seed: 1\nlr: [1, 2\nworkers: 2\n", 3),
    ("seed: 1\n\n  bad indent: 2\n workers: 3\n", 3),
    ("tasks: 'arith\n", 2),
    ("seed: 1\nseed: 1\tx: : 2\n", 2),
])
def test_yaml_syntax_error_is_one_line_with_line_number(tmp_path, capsys, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"trainops train: error: --config {path}: YAML syntax error at line {line}"), err
    assert err.count("\n") == 1


def test_yaml_non_finite_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: .inf\n")
    with pytest.raises(ConfigError, match="lr=inf: must be a finite number"):
        load_config(["--config", str(path)])


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lbl_scop: global\n")
    with pytest.raises(ConfigError, match="unknown key 'lbl_scop'"):
        load_config(["--config", str(path)])


def test_domains_deterministic_and_answerable():
    doms = make_domains(["arith", "reverse", "sort", "grammar"], 12)
    for d in doms:
        t1, m1 = d.sample(generator(0, 1, 2), 64)
        t2, m2 = d.sample(generator(0, 1, 2), 64)
        t3, _ = d.sample(generator(0, 1, 3), 64)
        assert torch.equal(t1, t2) and torch.equal(m1, m2) and not torch.equal(t1, t3)
        assert t1.shape == (64, 12) and int(t1.max()) < 128
        assert bool((m1.sum(1) > 0).all())
    arith, rev, srt, gram = (d.sample(generator(5), 32)[0] for d in doms)
    for row in arith:
        s = bytes(row[:5].tolist()).decode()
        assert s[1] == "+" and s[3] == "=" and s[4] == str((int(s[0]) + int(s[2])) % 10)
    for row in rev:
        r = bytes(row[:9].tolist()).decode()
        assert r[4] == "<" and r[5:] == r[:4][::-1] and int(row[9]) == 0
    for row in srt:
        o = bytes(row[:11].tolist()).decode()
        assert o[5] == ">" and o[6:] == "".join(sorted(o[:5]))
    answers = [chr(int(row[9])) for row in gram]
    assert set(answers) == {"Y", "N"}
    for row in gram:
        text, depth, ok = bytes(row[:8].tolist()).decode(), 0, True
        for c in text:
            depth += 1 if c == "(" else -1
            ok &= depth >= 0
        assert (chr(int(row[9])) == "Y") == (ok and depth == 0)


def test_text_file_domain(tmp_path):
    path = tmp_path / "capitals.txt"
    path.write_text("fr\tParis\nde\tBerlin\n")
    (d,) = make_domains([str(path)], 12)
    tokens, mask = d.sample(generator(0), 8)
    row = bytes(tokens[0][tokens[0] > 0].tolist()).decode()
    assert row in ("frParis", "deBerlin")
    assert int(mask[0].sum()) == len(row) - 2


class _NextByte(torch.nn.Module):
    """A stand-in model whose prediction at each position is the byte there plus one."""

    def forward(self, tokens):
        return torch.nn.functional.one_hot((tokens + 1) % 128, 128).float(), None


def test_greedy_answers_feed_back_own_predictions():
    from trainops.runtime.loop import greedy_answers
    tokens = torch.tensor([[65, 66, 90, 90, 90, 0], [70, 90, 90, 0, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])  # answers: tokens 2-4 and 1-2
    gen = greedy_answers(_NextByte(), tokens, mask)
    # free generation continues from its own output (67, 68, 69); teacher forcing would give 67, 91, 91
    assert gen.tolist() == [[65, 66, 67, 68, 69, 0], [70, 71, 72, 0, 0, 0]]


def test_resume_config_keys_added_since_the_checkpoint_count_as_their_defaults():
    from trainops.runtime.checkpoint import check_resume_config
    from trainops.runtime.rl_config import RLConfig

    for cls in (TrainConfig, RLConfig):
        defaults = cls().to_dict()
        older = {k: v for k, v in defaults.items() if k not in ("outer_momentum", "ddp_hook")}  # an earlier version's
        check_resume_config(older, defaults, defaults)  # left at the defaults: resumes
        changed = {**defaults, "outer_momentum": 0.0}
        with pytest.raises(ConfigError, match=r"outer_momentum: saved 0\.5 vs now 0\.0"):
            check_resume_config(older, changed, defaults)
        with pytest.raises(ConfigError, match="outer_momentum: saved None"):  # without defaults: refused
            check_resume_config(older, defaults)
