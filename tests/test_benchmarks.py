"""Smoke test of the benchmark harness: two methods, two steps, a tiny model (the real runs are not in the tests)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_train_step_harness_runs_and_checks_targets(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--model", "tiny", "--steps", "2",
           "--methods", "lora,dual,dora,d2", "--seq", "32", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "train_step_tiny_fp32.json").read_text())
    assert [r["method"] for r in payload["results"]] == ["lora", "dual", "dora", "d2"]
    assert all(r["step_seconds"] > 0 and r["peak_mib"] > 0 for r in payload["results"])
    assert {t["target"] for t in payload["targets"]} >= {"Dual LoRA peak memory <= 0.85x LoRA", "D2-LoRA time <= DoRA"}
    assert "| target | measured | holds |" in (tmp_path / "train_step_tiny_fp32.md").read_text()


def test_one_layer_and_inference_harnesses_run(tmp_path):
    for script, args, produced in (
        ("one_layer.py", ["--shapes", "64x48", "--tokens", "32", "--repeats", "1"], "one_layer.json"),
        ("inference.py", ["--model", "tiny", "--batch", "2", "--seq", "16", "--repeats", "1"], "inference_tiny.json"),
    ):
        result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--output-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        payload = json.loads((tmp_path / produced).read_text())
        rows = payload["rows"]
        assert rows and all((r.get("ms") or r.get("tokens_per_s")) > 0 for r in rows)
    one_layer = json.loads((tmp_path / "one_layer.json").read_text())["rows"]
    kept = {r["method"]: r["saved_for_backward_mib"] for r in one_layer}
    assert kept["dual"] < kept["dual-autograd"]  # the memory-efficient backward keeps no out x in matrix


def test_growth_harness_writes_table_and_plot(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "growth.py"), "--model", "tiny", "--methods", "lora,dual",
           "--ranks", "8,16", "--seqs", "32", "--steps", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "growth_tiny.json").read_text())["rows"]
    assert len(rows) == 6 and (tmp_path / "growth_tiny.png").exists()
    assert {r["r"] for r in rows if r["sweep"] == "rank"} == {8, 16}
