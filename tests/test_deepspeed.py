"""DeepSpeed ZeRO-2 and ZeRO-3 on this machine's CPUs (2 processes, gloo, fp32): Dual LoRA and D2-LoRA train under
`accelerate launch` with the documented configs (examples/accelerate/zero2.yaml, zero3.yaml) as they do in one
process without DeepSpeed, and the warm-up clock counts DeepSpeed's optimizer steps (ZeRO's optimizer steps flat
copies of the factors, not the factors).

DeepSpeed (the version pinned in constraints.txt) is installed for these tests only, into a folder of its own: it
builds from source and JIT-compiles a communication op on first use (about a minute, with g++), and a library that
is only importable is then picked up by accelerate and transformers in every other test."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FLOAT32_REORDER_RTOL, adamw_bound, assert_same_losses, max_difference, run_flags

from duallora.app.cli import main

ROOT = Path(__file__).parent.parent
# deepspeed's own requirements that the project does not install already (numpy, packaging, psutil, pydantic and
# tqdm it does); none of them may pull a torch
DEEPSPEED_REQUIREMENTS = ("hjson==3.1.0", "msgpack==1.2.4", "ninja==1.13.2", "py-cpuinfo==9.0.0", "einops==0.8.2")


def pinned(package: str) -> str:
    text = (ROOT / "constraints.txt").read_text()
    match = re.search(rf"^{package}==(\S+)", text, flags=re.MULTILINE)
    assert match, f"{package} is not pinned in constraints.txt"
    return f"{package}=={match[1]}"


@pytest.fixture(scope="module")
def deepspeed_env(tmp_path_factory) -> dict:
    target = tmp_path_factory.mktemp("deepspeed")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              pinned("deepspeed"), *DEEPSPEED_REQUIREMENTS], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
            "PATH": os.pathsep.join([str(target / "bin"), os.environ["PATH"]]), "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(target / "torch_extensions"), "OMP_NUM_THREADS": "1"}


def assert_every_factor_trained(method: str, unmoved: list[str]) -> None:
    """Every factor moved, but D2-LoRA's B may not have yet: its gradient is A^T G with A zero at the start, so in the
    first SGD steps its update (lr |A| |G|, about 1e-8) can stay below half an ulp of B (0.1 x 2^-24)."""
    if method == "dual":
        assert unmoved == []
    else:
        assert all("_lora_B_" in name for name in unmoved), unmoved


def launch(config: str, method: str, out: Path, env: dict, *worker_args: str) -> dict:
    with socket.socket() as s:  # a free port, so that parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / config), "--num_processes", "2", "--main_process_port", port,
           str(Path(__file__).parent / "workers" / "zero_train.py"), str(out), method, *worker_args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("config,stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_zero_trains_like_one_process_and_the_clock_counts_its_steps(config, stage, method, deepspeed_env,
                                                                     tmp_path):
    report = launch(config, method, tmp_path / "zero.json", deepspeed_env)
    assert (report["stage"], report["processes"], report["backend"]) == (stage, 2, "gloo")
    assert report["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    steps = len(report["reference_losses"])
    assert report["global_steps"] == steps == 6
    if method == "dual":  # one tick per optimizer step: 12 micro-batches at accumulation 2
        assert report["clocks"] == list(range(1, steps + 1))
    assert report["factors"] > 0 and report["processes_agree"]
    assert_every_factor_trained(method, report["unmoved"])
    # the same sums in another order: the loss of each step within float32's reorder bound
    for got, expected in zip(report["losses"], report["reference_losses"]):
        assert abs(got - expected) <= FLOAT32_REORDER_RTOL * abs(expected), report
    # SGD: w <- w - lr g. Each step's gradients differ by at most the reorder bound of the largest gradient, and each
    # run rounds its weights once (half an ulp of the largest factor, counted as one eps); a factor's difference
    # also changes later gradients, by lr times the loss's curvature, a factor (1 + lr |H|)^6 <= 2 here (lr = 1e-2,
    # |H| of a tiny model well under 10)
    eps = torch.finfo(torch.float32).eps
    bound = 2 * sum(report["lr"] * FLOAT32_REORDER_RTOL * g + eps * report["largest_factor"]
                    for g in report["largest_grads"])
    assert report["largest_factor_difference"] <= bound, report


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_zero3_under_zero_init_trains_refuses_a_merge_outside_a_gather_merges_inside_it_saves_and_loads(
        method, deepspeed_env, tmp_path):
    """The default of the Trainer, accelerate (zero3_init_flag) and TRL: from_pretrained builds the base already
    partitioned. get_peft_model reads the layers' full shapes (ds_shape), training matches one process, a merge
    outside GatheredParameters is refused with nothing changed (peft's LoRA silently merges nothing there), inside it
    merge and unmerge are exact, and the adapter saved from accelerate's gathered state dict loads, with its
    warm-up clock, onto a plain base and onto one built under zero.Init."""
    report = launch("zero3.yaml", method, tmp_path / "zero.json", deepspeed_env, "from_pretrained")
    assert report["built_partitioned"] and report["stage"] == 3 and report["processes"] == 2
    for got, expected in zip(report["losses"], report["reference_losses"]):
        assert abs(got - expected) <= FLOAT32_REORDER_RTOL * abs(expected), report
    assert_every_factor_trained(method, report["unmoved"])
    assert "GatheredParameters" in report["refused"] and "Nothing was changed" in report["refused"]
    assert not report["merged_after_refusal"]
    # merge writes f(W0) computed in float32 as delta_weight does; unmerge inverts it within float32's reorder bound
    assert report["merge"] <= FLOAT32_REORDER_RTOL and report["unmerge"] <= FLOAT32_REORDER_RTOL, report
    for base in ("plain", "zero_init"):
        assert report[f"loaded_{base}_exact"], base
        assert report[f"loaded_{base}_clock"] == (6 if method == "dual" else None), base


def launch_train(config: str, flags: list[str], env: dict) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file examples/accelerate/<config> -m duallora train <flags>` on 2 processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / config), "--num_processes", "2", "--main_process_port", port,
           "-m", "duallora", "train", *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_duallora_train_under_deepspeed_trains_checkpoints_resumes_and_saves_as_one_process_does(
        config, deepspeed_env, bert_without_dropout, tiny_csv, tmp_path):
    """`duallora train` under ZeRO-2/3 (the base built under zero.Init with zero3.yaml): 3 steps with a checkpoint,
    then --resume to 6, on 2 processes with 4 examples each, against the same two commands in one process with 8:
    the same losses (reorder bound), the adapter within AdamW's rounding drift, the same scores, one checkpoint."""
    two, one = tmp_path / "two", tmp_path / "one"
    for steps, resume in ((3, []), (6, ["--resume"])):
        launched = launch_train(config, run_flags(bert_without_dropout, tiny_csv, two, 4, max_steps=steps) + resume,
                                deepspeed_env)
        # the config file's clipping (1.0) gives way to the command line's (none, as under DDP), and it says so
        assert "sets the DeepSpeed config from its flags: gradient_clipping 1.0 -> 0.0" in launched.stderr
        assert main(["train", *run_flags(bert_without_dropout, tiny_csv, one, 8, max_steps=steps), *resume]) == 0
    assert max_difference(one, two) <= adamw_bound(5e-3, 6)
    got, expected = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    assert (got["distributed_type"], got["zero_stage"], got["processes"]) == ("DEEPSPEED", int(config[4]), 2)
    assert got["global_batch_size"] == expected["global_batch_size"] == 8
    assert got["trainable_params"] == expected["trainable_params"] and got["steps"] == 6
    assert_same_losses(got["losses"], expected["losses"])
    assert got["test"] == pytest.approx(expected["test"])
    assert ([e["accuracy"] for e in got["evaluations"]]
            == pytest.approx([e["accuracy"] for e in expected["evaluations"]]))
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-0000006"]
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]  # no temporary directory left


@pytest.mark.parametrize("name,stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_the_documented_zero_configs_parse(name, stage):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "examples" / "accelerate" / name))
    assert config.distributed_type.name == "DEEPSPEED" and config.num_processes == 8
    assert config.deepspeed_config["zero_stage"] == stage
    if stage == 3:  # accelerate's own default for stage 3, and what the zero.Init test runs
        assert config.deepspeed_config["zero3_init_flag"] is True
