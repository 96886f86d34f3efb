"""Every benchmark runs end to end at tiny sizes and writes its table (into a temporary
folder, not over benchmarks/results/). Times are not checked; the columns that the
README's claims are read from are."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, module: str, *args: str) -> None:
    # No TorchRL comparison (a separate environment where one exists): it takes longer than the rest.
    env = {**os.environ, "TRAINOPS_RESULTS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "TRAINOPS_TORCHRL_PYTHON": str(tmp_path / "no-torchrl")}
    subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, check=True, timeout=600,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_router(tmp_path):
    pytest.importorskip("transformers")
    _run(tmp_path, "benchmarks.bench_router", "--tokens", "96", "--quick", "--no-compile", "--min-run-time", "0.01")
    rows = {r["impl"]: r for r in _rows(tmp_path / "router_cpu.csv")}
    assert set(rows) == {"hf_lbl", "hf_router_lbl", "reference", "fused"}
    fused = rows["fused"]
    assert float(fused["speedup"]) > 0 and float(fused["vs_reference"]) > 0
    assert float(fused["GBps"]) > 0 and float(fused["pct_of_copy_bw"]) > 0
    assert all(r["faults_per_call"] != "" for r in rows.values())
    assert (tmp_path / "router_cpu.md").exists()


def test_bench_router_cold(tmp_path):
    _run(tmp_path, "benchmarks.bench_router", "--tokens", "64", "--quick", "--no-compile", "--cold",
         "--min-run-time", "0.005")
    assert {r["impl"] for r in _rows(tmp_path / "router_cpu_cold.csv")} >= {"reference", "fused"}


def test_bench_quantize(tmp_path):
    _run(tmp_path, "benchmarks.bench_quantize", "--numel", "4096", "--formats", "int8", "fp4_e2m1")
    rows = _rows(tmp_path / "quantize_cpu.csv")
    assert {r["impl"] for r in rows} >= {"trainops", "reference", "copy fp32 (memcpy)"}
    assert all(float(r["GBps"]) > 0 for r in rows if r["impl"] == "trainops")


def test_bench_replay(tmp_path):
    _run(tmp_path, "benchmarks.bench_replay", "--batch", "32", "--capacity", "512", "--token-capacity", "512",
         "--min-run-time", "0.01")
    rows = _rows(tmp_path / "replay_cpu.csv")
    assert len(rows) >= 4 and all(float(r["median_ms"]) > 0 for r in rows)


def test_bench_mora(tmp_path):
    _run(tmp_path, "benchmarks.bench_mora", "--dim", "32", "--tokens", "16", "--rounds", "1",
         "--min-run-time", "0.01")
    rows = _rows(tmp_path / "mora_cpu.csv")
    assert {r["impl"] for r in rows} == {"base", "lora", "reference", "mora"}
    assert len(rows) == 4 * 6  # R in {16, 64, 160} x k in {8, 16}


def test_bench_all_reduce(tmp_path):
    _run(tmp_path, "benchmarks.bench_all_reduce", "--numel", "8192", "--reps", "1", "--formats", "int8")
    rows = {r["impl"]: r for r in _rows(tmp_path / "all_reduce_cpu.csv")}
    assert float(rows["quantized_all_reduce int8"]["bytes_ratio"]) > 3


def test_bench_lbl_sync(tmp_path):
    _run(tmp_path, "benchmarks.bench_lbl_sync", "--layers", "3", "--tokens", "64", "--reps", "2")
    rows = {r["impl"]: r for r in _rows(tmp_path / "lbl_sync_cpu.csv")}
    assert rows["per_layer"]["collectives"] == "3" and rows["batched"]["collectives"] == "1"
    assert float(rows["batched"]["max_abs_diff"]) == 0.0


def test_bench_rlep_overhead(tmp_path):
    _run(tmp_path, "benchmarks.bench_rlep_overhead", "--quick")
    rows = {r["impl"]: r for r in _rows(tmp_path / "rlep_overhead_cpu.csv")}
    assert set(rows) == {"plain GRPO", "RLEP", "replay path", "RLEP fixed shapes", "replay path, fixed shapes"}
    for name in ("replay path", "replay path, fixed shapes"):
        assert 0 < float(rows[name]["replay path % of RLEP step"]) < 100
    assert rows["RLEP"]["baseline"] == "plain GRPO" and float(rows["RLEP"]["speedup"]) > 0


def test_bench_moe_layer(tmp_path):
    _run(tmp_path, "benchmarks.bench_moe_layer", "--quick", "--threads", "1")
    rows = _rows(tmp_path / "moe_layer_cpu.csv")
    assert [r["impl"] for r in rows] == ["per_expert_index", "unbind"] * 2
    assert all(float(r["speedup"]) > 0 for r in rows if r["impl"] == "unbind")
