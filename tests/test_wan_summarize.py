"""benchmarks.wan.summarize on two synthetic runs: the target, time and step at target, speed-up,
seconds per step and compute utilization come out of the metrics rows as defined."""
import json

from benchmarks.wan.summarize import sweep_tables


def _run(root, method, losses, step_s, comm_s):
    out = root / "100mbit" / method
    out.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": v, "bytes_sent": 1000 * (i + 1), "wall_s": step_s * (i + 1),
             "comm_s": comm_s * (i + 1), "flag_s": 0.0} for i, v in enumerate(losses)]
    rows.insert(2, {"event": "eval", "accuracy": [0.5]})  # not a step
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "summary.json").write_text("{}")


def test_target_speedup_and_utilization(tmp_path):
    _run(tmp_path, "ddp_fp32", [4.0, 3.0, 2.0, 1.0], step_s=2.0, comm_s=1.5)
    _run(tmp_path, "sdiloco_fp4_h4", [3.0, 1.0, 0.5, 0.5], step_s=0.5, comm_s=0.05)
    text = sweep_tables(str(tmp_path), window=1, factor=1.02, plot=None)
    assert "target loss 1.0200" in text
    ddp = next(ln for ln in text.splitlines() if ln.startswith("| DDP fp32"))
    sd = next(ln for ln in text.splitlines() if ln.startswith("| Streaming DiLoCo fp4_e3m0 (H 4"))
    assert [c.strip() for c in ddp.split("|")[4:10]] == ["8.0", "2.000", "1.0000", "8.0", "4", "1.00x"]
    # reaches 1.02 at step 2 (1.0 s): 8 / 1 = 8x; computes 90% of the time
    assert [c.strip() for c in sd.split("|")[4:10]] == ["2.0", "0.500", "0.5000", "1.0", "2", "8.00x"]
    assert sd.split("|")[11].strip() == "90.0%" and ddp.split("|")[11].strip() == "25.0%"
