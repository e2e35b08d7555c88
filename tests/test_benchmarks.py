"""Smoke test of the benchmark harness: two methods, two steps, a tiny model (the real runs are not in the tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # runs the benchmark script in child processes (80-120 s here)
def test_train_step_harness_runs_and_checks_targets(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--model", "tiny", "--steps", "2",
           "--methods", "lora,dual,dora,d2,hira,loraplus", "--seq", "32", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "train_step_tiny_fp32.json").read_text())
    assert [r["method"] for r in payload["results"]] == ["lora", "dual", "dora", "d2", "hira", "loraplus"]
    assert all(r["step_seconds"] > 0 and r["peak_mib"] > 0 for r in payload["results"])
    assert {t["target"] for t in payload["targets"]} >= {"Dual LoRA peak memory <= 0.85x LoRA", "D2-LoRA time <= DoRA",
                                                         "Dual LoRA memory below HiRA (the other full-rank update)"}
    assert "| target | measured | holds |" in (tmp_path / "train_step_tiny_fp32.md").read_text()


@pytest.mark.slow  # three child processes through TRL's SFTTrainer (about 40 s here)
def test_sft_step_harness_times_trainer_steps_on_packed_alpaca(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sft_step.py"), "--model", "tiny", "--steps", "2",
           "--max-length", "64", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "sft_step_tiny.json").read_text())
    assert [r["method"] for r in payload["results"]] == ["lora", "dual", "d2"]
    for r in payload["results"]:  # the two steps after the warm-up one, each 2 packed sequences of 64 tokens
        assert len(r["all_step_seconds"]) == 2 and r["step_seconds"] > 0 and r["peak_mib"] > 0
        assert r["tokens_per_step"] == 128
    table = (tmp_path / "sft_step_tiny.md").read_text()
    assert "| lora | 32,768 | " in table and " | 1.00x | " in table and (tmp_path / "sft_step_tiny.png").exists()


def test_one_layer_and_inference_harnesses_run(tmp_path):
    for script, args, produced in (
        ("one_layer.py", ["--shapes", "64x48", "--tokens", "32", "--repeats", "1"], "one_layer.json"),
        ("inference.py", ["--model", "tiny", "--batch", "2", "--seq", "16", "--repeats", "1"], "inference_tiny.json"),
        ("mixed_batch.py", ["--model", "tiny", "--batch", "4", "--seq", "8", "--repeats", "1"],
         "mixed_batch_tiny.json"),
    ):
        result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args,
                                 "--output-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        payload = json.loads((tmp_path / produced).read_text())
        rows = payload["rows"]
        assert rows and all((r.get("ms") or r.get("tokens_per_s") or r.get("s")) > 0 for r in rows)
    one_layer = json.loads((tmp_path / "one_layer.json").read_text())["rows"]
    cases = [(r["method"], r["case"]) for r in json.loads((tmp_path / "mixed_batch_tiny.json").read_text())["rows"]]
    assert ("dual", "mixed, 4 adapters") in cases and ("lora", "mixed, 2 adapters") in cases
    kept = {r["method"]: r["saved_for_backward_mib"] for r in one_layer}
    assert kept["dual"] < kept["dual-autograd"]  # the memory-efficient backward keeps no out x in matrix


@pytest.mark.slow  # runs the benchmark script in child processes (80-120 s here)
def test_growth_harness_writes_table_and_plot(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "growth.py"), "--model", "tiny", "--methods", "lora,dual",
           "--ranks", "8,16", "--seqs", "32", "--steps", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "growth_tiny.json").read_text())["rows"]
    assert len(rows) == 6 and (tmp_path / "growth_tiny.png").exists()
    assert {r["r"] for r in rows if r["sweep"] == "rank"} == {8, 16}


@pytest.mark.slow  # runs the benchmark script in child processes (80-120 s here)
def test_large_layer_harness_runs_each_configuration_in_its_own_process(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "large_layer.py"), "--shapes", "64x48", "--tokens", "16",
           "--repeats", "1", "--configs", "frozen,lora,dual-whole,dual-4MiB,d2-64MiB", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "large_layer.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["frozen", "lora", "dual-whole", "dual-4MiB", "d2-64MiB"]
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert "| 64x48 | dual-4MiB | 1 |" in (tmp_path / "large_layer.md").read_text()  # a small layer: one block


def test_train_step_replot_redraws_from_the_json(tmp_path):
    payload = {"args": {"model": "tiny", "r": 4, "batch": 2, "seq": 8, "precision": "fp32", "steps": 1},
               "device": "CPU", "results": [{"method": "lora", "step_seconds": 1.0, "peak_mib": 100.0,
                                             "trainable_params": 10},
                                            {"method": "dual", "step_seconds": 1.2, "peak_mib": 80.0,
                                             "trainable_params": 10}],
               "targets": []}
    (tmp_path / "train_step_tiny_fp32.json").write_text(json.dumps(payload))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--model", "tiny", "--replot",
           "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| dual | 10 | 1.200 s | 1.20x | 80 MiB | 0.80x |" in (tmp_path / "train_step_tiny_fp32.md").read_text()
    assert (tmp_path / "train_step_tiny_fp32.png").stat().st_size > 0


def test_ste_magnitudes_records_what_each_estimator_acts_on(tiny_checkpoints, bigbench_env, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ste_magnitudes.py"), "--model", str(tiny_checkpoints["bert"]),
           "--task", "sentiment", "--lr", "1e-2", "--rank", "4", "--max-steps", "3", "--warmup-steps", "1",
           "--batch-size", "4", "--max-length", "16", "--max-eval-examples", "8", "--work-dir", str(tmp_path / "runs"),
           "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "ste_magnitudes.json").read_text())
    steps = payload["runs"][0]["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["max_grad"] == 0.0  # lam_0 = 0: no gradient reaches Sign before the first update
    assert all(s["max_grad"] > 0 and s["max_q"] > 0 for s in steps[1:])
    for s in steps:  # the fp16 threshold (2^-16) is below clip's (1): it acts on at least as many elements
        assert 0 <= s["clip_fraction"] <= s["clip_fp16_fraction"] <= 1 and 0 <= s["hardtanh_fraction"] <= 1
    assert "| lr | max abs g | max abs Q |" in (tmp_path / "ste_magnitudes.md").read_text()
    assert (tmp_path / "ste_magnitudes.png").stat().st_size > 0


@pytest.mark.slow  # runs the benchmark script in child processes (80-120 s here)
def test_gpu_check_dry_run_writes_the_record(tmp_path):
    """The GPU side's one script and the command's own code paths, on the CPU at toy sizes (a GPU run differs only in
    sizes and device): duallora from src/, nothing installed, as on the GPU machine."""
    import os

    # the budget only cuts a slow run short: on a busy machine (a 120 s budget skipped cases there) all must still run
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_CHECK_FLAGS": "--dry-run",
           "BUDGET_S": "600"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "duallora 0.2.0 with peft" in result.stdout and (tmp_path / "gpu_check.log").exists()
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert payload["dry_run"] and payload["environment"]["torch"] and not payload["skipped"]
    checks = payload["checks"]
    assert {(c["method"], c["precision"]) for c in checks} == {(m, p) for m in ("dual", "d2")
                                                              for p in ("fp32", "bf16", "fp16")}
    assert all(c["holds"] for c in checks) and all(0 < c["bound"] < 1 for c in checks)
    kinds = {c["what"].split(":")[0] for c in checks}
    assert kinds == {"compiled vs eager", "memory-efficient vs plain autograd", "merged vs unmerged output",
                     "TF32 on vs off"}
    methods = {r["method"] for r in payload["step_results"]}
    assert methods == {"full", "lora", "lora-2r", "loraplus", "dora", "hira", "dual", "dual-bf16-grad", "d2"}
    assert all(r["step_seconds"] > 0 and r["peak_mib"] > 0 for r in payload["step_results"])
    assert {r["checkpointing"] for r in payload["step_results"]} == {False, True}
    quantized = [r for r in payload["step_results"] if r["quantized"]]  # every adapter method but HiRA, on NF4
    assert {r["method"] for r in quantized} == {"lora", "loraplus", "dora", "dual", "d2"} and {
        r["case"] for r in quantized} == {
        "toy nf4 1x64 ckpt"}
    targets = {t["target"] for t in payload["targets"]}
    assert {"dual step time <= 1.3x lora", "dual peak memory <= 1x lora", "d2 step time <= 1x hira",
            "compiled equals eager within bf16 tolerance"} <= targets
    assert all("why" in t for t in payload["targets"] if not t["holds"] and t["case"] != "one layer")
    assert payload["profile"]["dual"] and payload["profile"]["lora"]
    text = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Correctness", "## Training step (bf16)", "## Targets", "## Where the time goes: dual"):
        assert heading in text


def test_gpu_check_records_a_failed_check_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    from gpu_correctness import Check

    failing = Check("dual", "bf16", "compiled vs eager: grad C", difference=0.5, bound=0.1).as_dict()
    monkeypatch.setattr(gpu_check, "run_checks", lambda sizes, device, deadline: ([failing], []))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0"]) == 1
    assert "FAILED dual bf16 compiled vs eager: grad C: 0.5 > bound 0.1" in capsys.readouterr().out
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert payload["checks"] == [failing] and "profile" in payload["skipped"]
    assert "| dual | bf16 | compiled vs eager: gradients | 5.00e-01 | 1.00e-01 | **no** |" in \
        (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow  # three child processes, each compiling the fused kernels (about 60 s here)
def test_moe_harness_runs_and_checks_targets(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--experts", "4", "--hidden", "64", "--width", "48",
           "--layers", "1", "--vocab", "64", "--steps", "1", "--batch", "1", "--seq", "16", "--methods",
           "lora,dual,d2", "--block-mib", "4", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "moe_fp32_block4.json").read_text())
    rows = {r["method"]: r for r in payload["results"]}
    assert list(rows) == ["lora", "dual", "d2"]
    assert rows["dual"]["trainable_params"] == rows["lora"]["trainable_params"] == rows["d2"]["trainable_params"] // 2
    assert all(r["step_seconds"] > 0 and r["peak_mib"] > 0 and r["kept_mib"] > 0 for r in rows.values())
    assert "Dual LoRA kept for backward <= LoRA" in {t["target"] for t in payload["targets"]}
    assert "Regenerate: `python benchmarks/moe.py" in (tmp_path / "moe_fp32_block4.md").read_text()
