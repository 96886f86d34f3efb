"""trainops train end to end on CPU: 2 gloo workers, tiny config (seconds per run)."""
import json
import os

import pytest
import torch

from trainops.distributed import spawn
from trainops.runtime.checkpoint import load_checkpoint
from trainops.runtime.cli import main
from trainops.runtime.config import config_from_dict

TINY = {"tasks": "arith,reverse", "seq_len": 12, "batch_size": 8, "eval_size": 32, "d_model": 32, "n_layers": 2,
        "n_heads": 2, "num_experts": 4, "top_k": 2, "ffn_size": 32, "pretrain_steps": 4, "grad_accum": 2,
        "task_steps": 4, "sync_every": 2, "replay_capacity": 64, "replay_ratio": 0.5, "checkpoint_every": 4,
        "progress": False, "timeout_s": 60}


def _argv(d: dict) -> list:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [json.loads(ln) for ln in fh]


def _final_models(out_dir):
    return [load_checkpoint(os.path.join(out_dir, "checkpoint"), r, 2) for r in range(2)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base"))
    assert main(["train", *_argv({**TINY, "workers": 2, "out_dir": out})]) == 0
    return out


def test_two_worker_run_writes_report_plots_checkpoint(base_run):
    report = open(os.path.join(base_run, "report.md")).read()
    for needle in ("Accuracy matrix", "forgetting", "specialization", "Bytes exchanged", "exchange **fp4_e3m0**",
                   "LBL scope **global**", "replay **power_law**", "adapter **mora**", "| task1:reverse |"):
        assert needle in report, needle
    for png in ("loss", "accuracy_matrix", "expert_by_domain", "bytes_exchanged"):
        path = os.path.join(base_run, "plots", f"{png}.png")
        assert os.path.getsize(path) > 1000
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(os.path.join(base_run, "config.yaml"))
    models = _final_models(base_run)
    assert models[0]["world_size"] == 2 and models[0]["phase"] == 3
    # DiLoCo: every phase ends on a sync, so the two workers hold the same model.
    _assert_workers_agree_each_phase(base_run)
    rows = _rows(base_run)
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["phase"] for r in evals] == ["pretrain", "task0:arith", "task1:reverse"]
    assert all(0.0 <= a <= 1.0 for r in evals for k in ("accuracy", "byte_accuracy") for a in r[k])
    assert "greedily" in report and "Teacher-forced accuracy per answer byte" in report


def _assert_workers_agree_each_phase(out_dir):
    models = _final_models(out_dir)
    digests = [m["state"]["weights_sha1"] for m in models]
    assert list(digests[0]) == ["pretrain", "task0:arith", "task1:reverse"]
    assert digests[0] == digests[1]
    for k, v in models[0]["model"].items():
        assert torch.equal(v, models[1]["model"][k]), k


def test_default_switches_do_what_they_say(base_run):
    rows = [r for r in _rows(base_run) if "event" not in r]
    assert {r["lbl_scope"] for r in rows if r["phase"] == "pretrain"} == {"global"}
    # replay rows only once a finished task is in the buffer, then exactly replay_ratio of the batch
    assert all(r["replay_rows"] == 0 for r in rows if r["phase"] in ("pretrain", "task0:arith"))
    assert all(r["replay_rows"] == 4 for r in rows if r["phase"] == "task1:reverse")
    last = rows[-1]
    assert last["exchange"] == "fp4_e3m0" and last["bytes_sent"] > 0
    assert last["bytes_fp32_equiv"] > 4 * last["bytes_sent"]  # fp4 + block scales vs fp32
    info = _final_models(base_run)[0]["state"]["phase_info"]
    assert info["task0:arith"]["adapter_modules"] == {"MoRALinear": 9}  # q, k, v, o x 2 layers + head
    assert info["task1:reverse"]["mora_ranks"] == [8]  # add_task appended 4 ranks
    assert info["task0:arith"]["trainable_params"] < info["pretrain"]["trainable_params"]


def _run_configs(rank, world, cfgs):
    from trainops.runtime.loop import run_worker
    return [run_worker(rank, world, c) for c in cfgs]


@pytest.fixture(scope="module")
def ablations(tmp_path_factory, base_run):
    """Two ablation runs, then a run stopped at global step 6 and its --resume, one after
    another in one pair of worker processes (each process start costs seconds)."""
    a = {**TINY, "out_dir": str(tmp_path_factory.mktemp("abl_a")), "lbl_scope": "micro_batch", "replay": "off",
         "exchange": "fp32", "adapter": "lora"}
    b = {**TINY, "out_dir": str(tmp_path_factory.mktemp("abl_b")), "adapter": "none", "replay": "reservoir",
         "fragments": 2}
    resumed = str(tmp_path_factory.mktemp("resumed"))
    # stop inside task 0 (global step 6 of 12), not on a checkpoint_every boundary
    stop = {**TINY, "out_dir": resumed, "stop_after": 6}
    resume = {**TINY, "out_dir": resumed, "resume": True}
    cfgs = [config_from_dict(c).to_dict() for c in (a, b, stop, resume)]
    summaries = spawn(_run_configs, 2, cfgs, timeout_s=120)
    return a["out_dir"], b["out_dir"], resumed, summaries[0]


def test_ablation_switches(ablations, base_run):
    a, b = ablations[:2]
    rows_a = [r for r in _rows(a) if "event" not in r]
    base = [r for r in _rows(base_run) if "event" not in r]
    # --lbl-scope micro_batch: the router's loss module uses that scope, and the value differs
    assert {r["lbl_scope"] for r in rows_a if r["phase"] == "pretrain"} == {"micro_batch"}
    assert [r["lbl"] for r in rows_a[:4]] != [r["lbl"] for r in base[:4]]
    # --replay off: no replayed rows ever
    assert all(r["replay_rows"] == 0 for r in rows_a)
    # --exchange fp32: what was sent is the fp32 ring all-reduce payload
    assert rows_a[-1]["bytes_sent"] == rows_a[-1]["bytes_fp32_equiv"] > 0
    info_a = _final_models(a)[0]["state"]["phase_info"]
    assert info_a["task0:arith"]["adapter_modules"] == {"LoRALinear": 9}
    info_b = _final_models(b)[0]["state"]["phase_info"]
    assert info_b["task0:arith"]["adapter_modules"] == {}
    assert info_b["task0:arith"]["trainable_params"] == info_b["pretrain"]["trainable_params"]
    rows_b = [r for r in _rows(b) if "event" not in r]
    assert all(r["replay_rows"] == 4 for r in rows_b if r["phase"] == "task1:reverse")
    for d in (a, b):
        assert os.path.exists(os.path.join(d, "report.md"))


def test_streaming_diloco_workers_identical_at_each_phase_end(ablations):
    # fragments=2: one fragment is sent after odd steps, so without the full sync at the
    # end of each phase the workers would differ in it after 4 steps
    _assert_workers_agree_each_phase(ablations[1])
    _assert_workers_agree_each_phase(ablations[0])
    assert "fragments=2" in open(os.path.join(ablations[1], "report.md")).read()


def test_resume_equals_uninterrupted(base_run, ablations):
    out, (stopped, finished) = ablations[2], ablations[3][2:]
    assert stopped["interrupted"] and stopped["state"]["global_step"] == 6
    assert not finished["interrupted"] and finished["state"]["global_step"] == 12
    ref, got = _final_models(base_run), _final_models(out)
    for r in range(2):
        for k, v in ref[r]["model"].items():
            assert torch.equal(v, got[r]["model"][k]), (r, k)
        assert ref[r]["state"]["acc_matrix"] == got[r]["state"]["acc_matrix"]
        assert ref[r]["state"]["weights_sha1"] == got[r]["state"]["weights_sha1"]
    times = ("tokens_per_s", "wall_s", "comm_s", "flag_s")  # measured seconds
    strip = lambda rows: [{k: v for k, v in r.items() if k not in times} for r in rows]  # noqa: E731
    assert strip(_rows(out)) == strip(_rows(base_run))


def test_resume_with_other_config_fails_clearly(base_run, capsys):
    assert main(["train", *_argv({**TINY, "workers": 2, "out_dir": base_run, "seed": 3, "resume": "true"})]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "seed: saved 0 vs now 3" in err
