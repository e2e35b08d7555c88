"""Several processes on this machine (gloo, CPU): DDP through `duallora train` under torchrun gives the adapter of
one process on the whole batch, the processes stay identical after every step, and FSDP2-sharded layers train
like unsharded ones."""

import json
from dataclasses import asdict, replace
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FLOAT32_REORDER_RTOL, adamw_bound, assert_same_losses, max_difference, run_flags

from duallora.app.cli import main
from duallora.app.run_config import RunConfig
from duallora.app.train import train

WORKERS = Path(__file__).parent / "workers"

def torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun`` of ``args`` on this machine's CPUs. (``accelerate launch`` starts several processes through
    torchrun on GPUs only; on CPUs it needs MPI, which this machine lacks.)"""
    with socket.socket() as s:  # a free port, so that parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", port, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_torchrun_two_processes_give_the_adapter_of_one_process_on_twice_the_batch(bert_without_dropout, tiny_csv,
                                                                                   tmp_path):
    two = torchrun("-m", "duallora", "train",
                   *run_flags(bert_without_dropout, tiny_csv, tmp_path / "two", batch_size=4))
    assert main(["train", *run_flags(bert_without_dropout, tiny_csv, tmp_path / "one", batch_size=8)]) == 0
    assert max_difference(tmp_path / "one", tmp_path / "two") <= adamw_bound(5e-3, 6)
    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two_metrics["processes"] == 2 and one_metrics["processes"] == 1
    assert two_metrics["global_batch_size"] == one_metrics["global_batch_size"] == 8
    # the logged loss is the mean over processes: the loss of the whole global batch, at every step
    assert_same_losses(two_metrics["losses"], one_metrics["losses"])
    # evaluation is split across the processes and gathered: the same scores on the same (odd-sized) split
    assert two_metrics["test"] == pytest.approx(one_metrics["test"])
    assert [e["accuracy"] for e in two_metrics["evaluations"]] == pytest.approx(
        [e["accuracy"] for e in one_metrics["evaluations"]])
    # one writer: one header line, no stray temporary directories, one checkpoint
    assert two.stderr.count("trainable of") == 1
    assert not [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-0000006"]  # the last one


@pytest.mark.slow
def test_processes_hold_identical_adapters_after_every_step(bert_without_dropout, tiny_csv, tmp_path):
    cfg = RunConfig(method="d2", model=str(bert_without_dropout), task=str(tiny_csv), text_column="text",
                    label_column="label", output_dir=str(tmp_path / "d2"), max_length=16, batch_size=4, lr=5e-3,
                    max_steps=6, max_eval_examples=23)
    request = tmp_path / "run.json"
    request.write_text(json.dumps(asdict(cfg)))
    torchrun(str(WORKERS / "ddp_train.py"), str(request), str(tmp_path / "differences.json"), str(tmp_path / "g.pt"))
    report = json.loads((tmp_path / "differences.json").read_text())
    assert report["world_size"] == 2 and len(report["differences"]) == 6
    assert max(report["differences"]) == 0.0  # DDP averages the gradients; identical updates, bit for bit
    sys.path.insert(0, str(WORKERS))
    from ddp_train import record_gradients

    one_process = []
    handle = record_gradients(one_process)
    try:
        metrics = train(replace(cfg, batch_size=8, output_dir=str(tmp_path / "d2-one")), progress=False)
    finally:
        handle.remove()
    # the first step starts from the same weights: the averaged gradients of 2 x 4 examples are the gradients of
    # the 8, within the reorder bound of each tensor's size (later steps start from AdamW-rounded weights)
    two_processes = torch.load(tmp_path / "g.pt")
    for got, expected in zip(two_processes[0], one_process[0]):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=0.0,
                                       atol=FLOAT32_REORDER_RTOL * expected.abs().max().item())
    assert max_difference(tmp_path / "d2", tmp_path / "d2-one") <= adamw_bound(5e-3, 6)
    assert_same_losses(json.loads((tmp_path / "d2" / "metrics.json").read_text())["losses"], metrics["losses"])


@pytest.mark.slow
def test_fsdp2_sharded_layers_train_like_unsharded_ones(tmp_path):
    """Before, weights were compared after AdamW, which divides by sqrt(v): a gradient near 0 that differs by
    rounding moves its weight by up to 2 lr either way, and a bound of 1e-5 failed at 1.48e-5 on a busy machine.
    Now the gradients are compared before any optimizer, and SGD's weights within what those differences allow."""
    torchrun(str(WORKERS / "fsdp2_step.py"), str(tmp_path / "fsdp.json"))
    report = json.loads((tmp_path / "fsdp.json").read_text())
    assert report["world_size"] == 2
    eps = torch.finfo(torch.float32).eps
    for method in ("dual", "d2"):
        result = report[method]
        assert result["base_weight_sharded"], method  # the frozen weights really are split across processes
        assert max(result["loss"]) <= FLOAT32_REORDER_RTOL, method
        assert max(result["grads"]) <= FLOAT32_REORDER_RTOL, method
        # SGD: w <- w - lr g, rounded. After step s the weights differ by at most the earlier differences, plus lr
        # times this step's gradient difference, plus one rounding (half an ulp) of each run's weight
        bound = 0.0
        for grad_diff, weight_diff, largest in zip(result["grad_difference"], result["weight_difference"],
                                                   result["largest_weight"]):
            bound += report["lr"] * grad_diff + eps * largest
            assert weight_diff <= bound, (method, result)
        assert result["eval_logits"] <= FLOAT32_REORDER_RTOL, method
        assert result["eval_cache_off_when_sharded"] and result["eval_cache_on_when_not"], method  # no extra copy


@pytest.mark.slow
def test_fsdp1_with_peft_auto_wrap_trains_like_one_process(tmp_path):
    """What accelerate applies to a PEFT model under FSDP1: each factor (a leaf module with a trainable weight) is a
    unit of its own, for both use_orig_params settings, on a float32 base and on a bf16 base with float32 factors
    (before: "Must flatten tensors with uniform requires_grad", and "uniform dtype"). SGD, as in the FSDP2 test: after
    each step the factors differ by at most lr times the gradients' difference (the reorder bound of the largest
    gradient in float32, one bf16 rounding per link of a chain of 16 in bf16), plus one rounding of each factor,
    and a factor's difference changes later gradients by a factor (1 + lr |H|)^3 <= 2."""
    torchrun(str(WORKERS / "fsdp1_step.py"), str(tmp_path / "fsdp1.json"))
    report = json.loads((tmp_path / "fsdp1.json").read_text())
    eps = torch.finfo(torch.float32).eps
    runs = [k for k in report if k not in ("world_size", "lr")]
    assert len(runs) == 8 and report["world_size"] == 2
    for run in runs:
        result = report[run]
        assert result["factor_units"] == 7 * 2 * 4 and result["same_names"] and result["moved"], run
        rtol = FLOAT32_REORDER_RTOL if "float32" in run else 16 * 2.0**-8
        assert max(result["loss"]) <= rtol, (run, result)
        bound = 2 * sum(report["lr"] * rtol * g + eps * result["largest_factor"] for g in result["largest_grads"])
        assert result["factor_difference"] <= bound, (run, result)


@pytest.mark.slow
def test_qlora_under_fsdp2_trains_like_one_process_and_linears_sharded_on_their_own_are_refused(tmp_path):
    """peft's QLoRA+FSDP recipe (bnb_4bit_quant_storage=bfloat16, decoder layers and model fully_shard-ed): FSDP puts
    plain Parameters in place of the Params4bit, and the quantization state is read from the module, as bitsandbytes
    does. The model computes in bfloat16, so sharded and unsharded runs (which round different batch shapes) agree
    within one bf16 rounding (2^-8) per link of the model's chain of at most 16 operations."""
    pytest.importorskip("bitsandbytes")
    torchrun(str(WORKERS / "fsdp2_qlora.py"), str(tmp_path / "qlora.json"))
    report = json.loads((tmp_path / "qlora.json").read_text())
    bf16_chain = 16 * 2.0**-8
    for method in ("dual", "d2"):
        result = report[method]
        assert result["base_sharded"], method
        assert abs(result["loss"] - result["reference_loss"]) <= bf16_chain * result["reference_loss"], result
        assert result["factor_grads"] == result["reference_factor_grads"] == 7 * 2 * 4, result
        assert result["largest_grad_difference"] <= bf16_chain * result["largest_grad"], result
        # the base Linears as FSDP units of their own: refused at the first forward, saying what to shard instead
        assert "FSDP2 unit of its own" in result["per_linear_refused"], result
        assert "apply fully_shard to the decoder layers and the model only" in result["per_linear_refused"]


@pytest.mark.parametrize("name,kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP")])
def test_the_documented_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parent.parent / "examples" / "accelerate" / name))
    assert config.distributed_type.name == kind and config.num_processes == 8
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
