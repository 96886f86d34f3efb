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
