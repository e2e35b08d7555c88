"""The command line end to end on tiny local checkpoints and generated data, in temporary directories."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import assert_float32_close

from duallora.app.cli import main
from duallora.app.run_config import RunConfig
from duallora.app.train import train


def run_args(tiny_checkpoints, tiny_csv, out, *extra, model="bert"):
    return ["--model", str(tiny_checkpoints[model]), "--task", str(tiny_csv), "--text-column", "text",
            "--label-column", "label", "--output-dir", str(out), "--max-length", "16", "--batch-size", "8",
            "--lr", "5e-3", "--max-eval-examples", "24", *extra]


@pytest.fixture(scope="module")
def trained_run(tiny_checkpoints, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dual"
    assert main(["train", "--method", "dual", "--max-steps", "12", "--eval-every", "6", "--warmup-steps", "3",
                 *run_args(tiny_checkpoints, tiny_csv, out)]) == 0
    return out


def test_train_writes_adapter_metrics_and_plot(trained_run, tiny_checkpoints):
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "run_config.json",
                 "training.png"):
        assert (trained_run / name).exists(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["steps"] == 12 and len(metrics["losses"]) == 12
    assert [e["step"] for e in metrics["evaluations"]] == [6, 12]
    assert metrics["trainable_params"] > 0 and metrics["peak_memory_mib"] > 0
    # wall and process CPU time of the optimisation (CPU time grows less with other work on the machine), and the
    # machine's load as training ended
    assert metrics["train_seconds"] > 0 and metrics["train_cpu_seconds"] > 0 and len(metrics["load_average"]) == 3
    assert metrics["environment"]["peft"] and metrics["config"]["method"] == "dual"
    assert 0 <= metrics["test"]["accuracy"] <= 1
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints["bert"], num_labels=2)
    loaded = PeftModel.from_pretrained(base, trained_run)  # plain PEFT format
    assert int(loaded.base_model.model.bert.encoder.layer[0].attention.self.query.dual_lora_step["default"]) == 12


def test_eval_reports_unmerged_and_merged(trained_run, capsys):
    assert main(["eval", "--adapter", str(trained_run), "--merged"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["merged"]["accuracy"] == pytest.approx(scores["unmerged"]["accuracy"])


def test_merged_checkpoint_loads_without_duallora(trained_run, tmp_path):
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained_run), "--output", str(merged)]) == 0
    from duallora.app.train import load_trained

    model, tokenizer, task, _ = load_trained(trained_run)
    batch = tokenizer(["good movie", "awful plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save(dict(batch), tmp_path / "batch.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(merged)!r}).eval()
with torch.no_grad():
    out = model(**torch.load({str(tmp_path / 'batch.pt')!r})).logits
assert "duallora" not in sys.modules and "peft" not in sys.modules
torch.save(out, {str(tmp_path / 'out.pt')!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_float32_close(torch.load(tmp_path / "out.pt"), expected)
    # the label names stay with the classifier (they were LABEL_0 and LABEL_1 in the merged folder)
    assert json.loads((merged / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_inspect_shows_full_rank_updates(trained_run, tmp_path):
    assert main(["inspect", "--adapter", str(trained_run), "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "inspect.json").read_text())
    assert rows and (tmp_path / "inspect.png").exists() and (tmp_path / "inspect.md").exists()
    for row in rows:
        assert row["rank_dW"] > row["lora_bound"]  # the update's rank is not bounded by r
        assert 0 < row["relu_off_fraction"] < 1 and row["warmup_step"] == 12


def test_compare_two_methods_writes_table_and_plot_and_keeps_finished_runs(tiny_checkpoints, tiny_csv, tmp_path,
                                                                           capsys):
    args = ["compare", "--methods", "dual,lora", "--seeds", "0", "--max-steps", "4",
            *run_args(tiny_checkpoints, tiny_csv, tmp_path / "cmp")]
    assert main(args) == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["method"] for r in results["summary"]] == ["dual", "lora"]
    assert results["summary"][0]["trainable_params"] == results["summary"][1]["trainable_params"]
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| dual |" in table and "**" in table and (tmp_path / "cmp" / "results.png").exists()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 2


def test_resumed_run_ends_with_the_same_adapter(tiny_checkpoints, tiny_csv, tmp_path):
    def config(out):
        values = dict(zip(*[iter(run_args(tiny_checkpoints, tiny_csv, out))] * 2))
        values = {k.lstrip("-").replace("-", "_"): v for k, v in values.items()}
        values.update(method="dual", max_steps=8, save_every=3, warmup_steps=4, max_length=16, batch_size=8,
                      lr=5e-3, max_eval_examples=8)
        return RunConfig.from_dict(values)

    train(config(tmp_path / "straight"), progress=False)

    def interrupt(step, model):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "interrupted"), progress=False, on_step=interrupt)
    assert (tmp_path / "interrupted" / "checkpoints" / "step-0000003").exists()
    assert not (tmp_path / "interrupted" / "metrics.json").exists()
    train(config(tmp_path / "interrupted"), resume=True, progress=False)
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    losses = [json.loads((tmp_path / d / "metrics.json").read_text())["losses"] for d in ("straight", "interrupted")]
    assert losses[0] == losses[1]


def test_causal_lm_on_choice_and_generation_tasks(tiny_checkpoints, bigbench_env, tmp_path):
    for task, metric in (("strategyqa", "accuracy"), ("social-iqa", "accuracy"), ("e2e-nlg", "bleu")):
        out = tmp_path / task
        assert main(["train", "--method", "d2", "--model", str(tiny_checkpoints["llama"]), "--task", task,
                     "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--max-length", "48",
                     "--max-eval-examples", "4"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metric in metrics["test"] and metrics["task_kind"] != "classification"
        if task == "e2e-nlg":
            assert "rougeL" in metrics["test"]


def test_encoder_on_yes_no_task_uses_a_classification_head(tiny_checkpoints, bigbench_env, tmp_path):
    assert main(["train", "--method", "lora", "--model", str(tiny_checkpoints["bert"]), "--task", "strategyqa",
                 "--output-dir", str(tmp_path / "sqa"), "--max-steps", "2", "--batch-size", "4"]) == 0
    assert json.loads((tmp_path / "sqa" / "metrics.json").read_text())["task_kind"] == "classification"


def test_config_file_with_command_line_winning(tiny_checkpoints, tiny_csv, tmp_path):
    (tmp_path / "run.yaml").write_text("method: lora\nmax_steps: 2\nr: 4\nbatch_size: 8\n")
    out = tmp_path / "from-config"
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--r", "2",
                 *run_args(tiny_checkpoints, tiny_csv, out)]) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["method"], saved["max_steps"], saved["r"]) == ("lora", 2, 2)


def test_bad_input_names_the_problem(tiny_checkpoints, tiny_csv, trained_run, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n{"text" "b"}\n')
    free_text = tmp_path / "pairs.jsonl"
    free_text.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(60)))
    cases = [
        (["train", "--method", "qlora"], "Unknown method 'qlora'; valid: "
                                         "['dual', 'd2', 'lora', 'loraplus', 'dora', 'hira', 'full']"),
        (["train", "--model", "gpt5", "--output-dir", str(tmp_path / "a")], "Unknown model 'gpt5': not one of "
                                                                            "['minilm', 'smollm2']"),
        (["train", "--task", "sst-2", "--model", str(tiny_checkpoints["bert"]), "--output-dir", str(tmp_path / "b")],
         "Valid names: ['arc-challenge', 'arc-easy', 'boolq', 'commonsense', 'e2e-nlg', 'fact-verification', "
         "'hellaswag', 'mrpc', 'news-topics', 'openbookqa', 'piqa', 'quartz', 'rated-sentiment', 'rte', 'sarcasm', "
         "'sentiment', 'siqa', 'social-iqa', 'sst2', 'strategyqa', 'winogrande']"),
        (["train", "--lr", "-1"], "--lr must be > 0; got -1.0"),
        (["train", "--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        (["train", "--ste", "round", *run_args(tiny_checkpoints, tiny_csv, tmp_path / "c")],
         "`ste` must be one of ['clip', 'identity', 'hardtanh']; got 'round'"),
        (["train", "--model", str(tiny_checkpoints["bert"]), "--task", str(tiny_csv), "--text-column", "sentence",
          "--label-column", "label", "--output-dir", str(tmp_path / "d")],
         "its columns are ['text', 'other', 'label']"),
        (["train", *run_args(tiny_checkpoints, tiny_csv, trained_run)], "holds an earlier run"),
        (["compare", "--methods", "dual,vera"], "Unknown method(s) ['vera']"),
        (["train", "--model", str(tiny_checkpoints["bert"]), "--task", "my_data.jsonl", "--text-column", "text",
          "--label-column", "label", "--output-dir", str(tmp_path / "e")], "No such file: 'my_data.jsonl'"),
        (["train", "--model", str(tiny_checkpoints["bert"]), "--task", str(broken), "--text-column", "text",
          "--label-column", "label", "--output-dir", str(tmp_path / "f")],
         "broken.jsonl, line 2: not valid JSON (column 9: Expecting ':' delimiter)"),
        (["train", "--model", str(tiny_checkpoints["bert"]), "--task", str(free_text), "--text-column", "prompt",
          "--label-column", "completion", "--output-dir", str(tmp_path / "g")],
         "the label column 'completion' has 60 distinct values in 60 rows: free text, not classes"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len([line for line in err.splitlines() if "error:" in line]) == 1, (argv, err)
    assert [d for d in "abcdefg" if (tmp_path / d).exists()] == []  # nothing written for a refused run
    assert (trained_run / "metrics.json").exists()  # the earlier run was not touched


def test_python_m_duallora_help():
    result = subprocess.run([sys.executable, "-m", "duallora", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--warmup-steps" in result.stdout and "--resume" in result.stdout
    from duallora.app.tasks import task_names

    listed = re.sub(r"-\s+", "-", " ".join(result.stdout.split()))  # argparse wraps the help, at hyphens too
    assert all(name in listed for name in task_names()) and "commonsense" in listed


def test_bf16_gradient_checkpointing_and_accumulation(tiny_checkpoints, tiny_csv, tmp_path, capsys):
    from duallora.app.process import bf16_is_native

    out = tmp_path / "bf16"
    assert main(["train", "--method", "dual", "--max-steps", "3", "--grad-accum", "2", "--bf16",
                 "--gradient-checkpointing", *run_args(tiny_checkpoints, tiny_csv, out)]) == 0
    # said before training where bf16 has no kernels here (AVX2 CPUs), and only there
    assert ("has no bfloat16 kernels" in capsys.readouterr().err) == (not bf16_is_native(torch.device("cpu")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and all(loss == loss for loss in metrics["losses"])  # finite, not NaN
    from duallora.app.train import load_trained

    model, *_ = load_trained(out)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert int(layer.dual_lora_step["default"]) == 3  # one warm-up tick per optimizer step, not per micro-batch


def test_bf16_without_kernels_is_announced_with_the_fix(monkeypatch):
    from duallora.app import process

    monkeypatch.setattr(process, "bf16_is_native", lambda device: False)
    warning = process.bf16_warning(torch.device("cpu"))
    assert f"this CPU ({torch.backends.cpu.get_cpu_capability()} instructions)" in warning
    assert "17x slower than float32" in warning and "Train without --bf16 (or `bf16: false`)" in warning
    monkeypatch.setattr(process, "bf16_is_native", lambda device: True)
    assert process.bf16_warning(torch.device("cpu")) is None


def every_run_flag() -> list[str]:
    """Each run option as it is written on the command line, with a value where it takes one."""
    from duallora.app.cli import build_parser

    train_parser = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()
                        if a.prog.endswith("train"))
    argv = []
    for action in train_parser._actions:
        if action.option_strings and action.dest not in ("help", "resume", "overwrite"):
            argv += [action.option_strings[0]] + ([] if action.nargs == 0 else ["1"])
    return argv


def test_every_train_flag_passes_through_torchrun_and_rank_replaces_r():
    """torchrun's parser takes an abbreviation of its own options anywhere in argv: `--r 16` failed there
    ("ambiguous option: --r could match --rdzv-backend ..."). Every flag of `duallora train` must reach us."""
    from torch.distributed.run import get_args_parser

    from duallora.app.cli import build_parser

    flags = every_run_flag()
    assert "--rank" in flags and "--r" not in flags
    launched = get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "duallora", "train", *flags])
    assert (launched.training_script, launched.training_script_args) == ("duallora", ["train", *flags])
    with pytest.raises(SystemExit):  # why --rank: torchrun refuses --r itself
        get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "duallora", "train", "--r", "16"])
    for argv in (["--rank", "16"], ["--r", "16"], ["--r=16"], ["--rank=16"]):  # outside torchrun --r still works
        assert build_parser().parse_args(["train", *argv]).r == 16, argv


def resume_args(tiny_checkpoints, tiny_csv, out, *extra):
    return ["train", "--method", "dual", "--warmup-steps", "2", "--save-every", "2",
            *run_args(tiny_checkpoints, tiny_csv, out), *extra]


def test_resume_honours_a_new_step_budget_and_cadence(tiny_checkpoints, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*resume_args(tiny_checkpoints, tiny_csv, out), "--max-steps", "4"]) == 0
    first = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    # a finished run, resumed with a larger budget and another evaluation cadence, given as bare flags: the options
    # not given are the run's own, not the defaults (its --lr is 5e-3, the default 1e-3)
    assert main(["train", "--output-dir", str(out), "--resume", "--max-steps", "6", "--eval-every", "5"]) == 0
    err = capsys.readouterr().err
    assert "from " + str(out / "checkpoints" / "step-0000004") in err
    assert "--max-steps 4 -> 6" in err and "--eval-every None -> 5" in err
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 6
    assert resumed["losses"][:4] == first["losses"]  # went on from the end of the first run
    assert [e["step"] for e in resumed["evaluations"]] == [5, 6]
    assert resumed["config"]["lr"] == 5e-3 and resumed["config"]["max_steps"] == 6


def test_an_auto_warm_up_is_fitted_to_the_run_and_kept_when_a_resume_changes_the_budget(tiny_checkpoints, tiny_csv,
                                                                                       tmp_path, capsys):
    """No --warmup-steps: a 20-step run ramps over ceil(20 / 10) = 2 steps; resumed to 60 steps (which alone would
    fit 6), it keeps the 2 it started with, so lam_t does not fall back mid-run."""
    out = tmp_path / "run"
    flags = ["train", "--method", "dual", "--save-every", "10", *run_args(tiny_checkpoints, tiny_csv, out)]
    assert main([*flags, "--max-steps", "20"]) == 0
    err = capsys.readouterr().err
    assert "20 steps; Dual LoRA's dW warm-up 2 steps (a tenth of the run, at most 100)" in err
    assert "Dual LoRA warm-up 2 steps" in err  # the summary
    assert json.loads((out / "metrics.json").read_text())["dual_warmup_steps"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["warmup_steps"] == 2
    assert json.loads((out / "run_config.json").read_text())["warmup_steps"] is None  # the flag as given
    assert main(["train", "--output-dir", str(out), "--resume", "--max-steps", "60"]) == 0
    assert json.loads((out / "metrics.json").read_text())["dual_warmup_steps"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["warmup_steps"] == 2


def test_report_to_tensorboard_logs_every_step_and_evaluation_into_the_run_folder(tiny_checkpoints, tiny_csv,
                                                                                  tmp_path):
    from conftest import tensorboard_scalars

    out = tmp_path / "run"
    assert main(["train", "--method", "dual", "--max-steps", "6", "--eval-every", "3", "--report-to", "tensorboard",
                 *run_args(tiny_checkpoints, tiny_csv, out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    scalars = tensorboard_scalars(out / "logs")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    # float32 in the event file: the run's float64 losses to within its rounding
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(metrics["losses"], rel=2 ** -23)
    assert len(scalars["train/learning_rate"]) == 6
    validations = [(e["step"], e["accuracy"]) for e in metrics["evaluations"]]
    assert [(s, pytest.approx(v, rel=2 ** -23)) for s, v in scalars["eval/accuracy"]] == validations
    assert scalars["test/accuracy"] == [(6, pytest.approx(metrics["test"]["accuracy"], rel=2 ** -23))]


@pytest.mark.parametrize("trackers, message", [
    ("tensorbored", "--report-to: unknown tracker(s) ['tensorbored']; known: tensorboard, wandb, mlflow"),
    ("tensorboard,wandb", "--report-to wandb needs the wandb package, which is not installed: pip install wandb."),
])
def test_a_tracker_that_cannot_log_is_refused_before_anything_is_written(tiny_checkpoints, tiny_csv, tmp_path, capsys,
                                                                         trackers, message):
    pytest.importorskip("tensorboardX")
    if trackers.endswith("wandb") and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    out = tmp_path / "run"
    assert main(["train", "--method", "dual", "--max-steps", "2", "--report-to", trackers,
                 *run_args(tiny_checkpoints, tiny_csv, out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def saved_clock(folder) -> int:
    """Dual LoRA's warm-up clock in a saved adapter: the optimizer steps its factors had taken when it was saved."""
    from safetensors.torch import load_file

    clocks = {int(v) for k, v in load_file(folder / "adapter_model.safetensors").items() if "dual_lora_step" in k}
    assert len(clocks) == 1
    return clocks.pop()


def test_keep_best_publishes_the_adapter_of_the_best_evaluation(tiny_checkpoints, tiny_csv, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "dual", "--max-steps", "8", "--eval-every", "2", "--keep-best", "--lr", "5e-2",
                 *run_args(tiny_checkpoints, tiny_csv, out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    scores = [(e["step"], e["accuracy"]) for e in metrics["evaluations"]]
    best_step, best = max(scores, key=lambda s: s[1])  # the first of equal scores, as transformers' Trainer keeps
    assert [s for s, _ in scores] == [2, 4, 6, 8] and metrics["kept_step"] == best_step
    assert metrics["validation"]["accuracy"] == best
    assert saved_clock(out) == best_step  # the published adapter is the one saved at that step
    assert not (out / "best").exists()


def test_resume_refuses_other_changed_flags_by_name(tiny_checkpoints, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*resume_args(tiny_checkpoints, tiny_csv, out), "--max-steps", "2"]) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--lr", "1e-2", "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run has 0.005)" in err and "--rank 4 (the run has 8)" in err
    assert "Only --max-steps, --epochs, --eval-every, --save-every, --report-to may change on resume" in err
    assert (out / "adapter_model.safetensors").read_bytes() == before  # nothing the user had was touched


def test_resume_says_when_there_is_no_checkpoint(tiny_checkpoints, tiny_csv, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main([*resume_args(tiny_checkpoints, tiny_csv, out), "--max-steps", "2", "--resume"]) == 0
    assert f"from step 0: no checkpoint in {out / 'checkpoints'}" in capsys.readouterr().err


def test_collectives_get_tensors_on_the_accelerator_device():
    """NCCL rejects CPU tensors: the losses and costs are reduced on accelerator.device (a GPU there)."""
    from duallora.app.process import reduce_across_processes

    class RecordingAccelerator:
        device = torch.device("meta")  # not the CPU: a tensor made on the CPU by mistake would show

        def __init__(self):
            self.devices = []

        def reduce(self, tensor, reduction):
            self.devices.append(tensor.device)
            return torch.full(tensor.shape, 2.5, dtype=tensor.dtype)  # what the collective would return

    accelerator = RecordingAccelerator()
    assert reduce_across_processes(accelerator, [1.0, 3.0], "max") == [2.5, 2.5]
    assert accelerator.devices == [torch.device("meta")]


def test_without_the_cli_extra_one_message_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("matplotlib", "sacrebleu") else real(name, *a))
    assert main(["train", "--help"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib, sacrebleu are not installed" in err and "pip install 'duallora[cli]'" in err


def test_import_duallora_brings_nothing_of_the_application():
    """The library is one small dependency: its import pulls in no command line, task, plot or metric code."""
    script = ("import sys, duallora; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
              "('matplotlib', 'sacrebleu', 'rouge_score', 'gguf') or m.startswith('duallora.app')); "
              "print(bad); assert not bad")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_files_written_atomically_have_the_permissions_open_gives(tmp_path):
    import os

    from duallora.app.run_files import atomic_write_text

    atomic_write_text(tmp_path / "metrics.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    assert os.stat(tmp_path / "metrics.json").st_mode == os.stat(tmp_path / "plain.json").st_mode


def test_quantize_trains_on_a_4bit_base_and_merge_writes_a_dense_model(tiny_checkpoints, bigbench_env, tmp_path):
    """`--quantize 4bit`: the base loads as bitsandbytes' Linear4bit, the adapter trains and is saved alone, and
    `duallora merge` writes a dense checkpoint (merge_and_dequantize) with the adapted model's outputs."""
    out, merged = tmp_path / "qdual", tmp_path / "merged"
    assert main(["train", "--method", "dual", "--quantize", "4bit", "--model", str(tiny_checkpoints["llama"]),
                 "--task", "strategyqa", "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4",
                 "--max-length", "48", "--max-eval-examples", "4", "--warmup-steps", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["quantize"] == "4bit" and metrics["steps"] == 3 and "accuracy" in metrics["test"]
    assert all(loss == loss for loss in metrics["losses"])
    from duallora.app.train import load_trained

    model, tokenizer, _, cfg = load_trained(out)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit" and int(layer.dual_lora_step["default"]) == 3
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert getattr(dense.config, "quantization_config", None) is None
    ids = tokenizer(["is the sky blue"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert_float32_close(dense(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_quantize_refuses_full_fine_tuning_and_unknown_bit_widths(tiny_checkpoints, tiny_csv, tmp_path, capsys):
    for argv, message in (
            (["--method", "full", "--quantize", "4bit"], "--quantize freezes the base in 4 or 8 bits, which full "
                                                        "fine-tuning would train"),
            (["--method", "dual", "--quantize", "3bit"], "--quantize must be one of ['4bit', '8bit']; got '3bit'")):
        assert main(["train", *argv, *run_args(tiny_checkpoints, tiny_csv, tmp_path / "q")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_quantize_4bit_on_smollm2(bigbench_env, tmp_path):
    """The README's QLoRA-style command on the embedded SmolLM2-135M (its widths are whole 4-bit blocks: the
    row-block dequantization runs), a few steps on the test-sized task archive."""
    out = tmp_path / "smollm2-qdual"
    assert main(["train", "--method", "dual", "--quantize", "4bit", "--model", "smollm2", "--task", "strategyqa",
                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--max-length", "48",
                 "--max-eval-examples", "4", "--warmup-steps", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["quantize"] == "4bit" and all(loss == loss for loss in metrics["losses"])
    assert (out / "adapter_model.safetensors").stat().st_size < 20 * 2**20  # the adapter alone, not the base


def test_argument_free_runs_say_first_what_they_will_do(monkeypatch, tmp_path):
    """Models, data and its download, time, where results go and the other run, before anything starts."""
    from duallora.app.cli import announcement

    monkeypatch.setenv("DUALLORA_CACHE", str(tmp_path))  # nothing cached yet: the download is announced
    default, quick = announcement("default"), announcement("quick")
    assert "all-MiniLM-L6-v2" in default and "rated-sentiment: 23,703 sentences" in default
    assert "data from vaderSentiment==3.3.2 on the package index (MIT;" in default and "once (2.5 MB)" in default
    assert "about 12 minutes" in default and "duallora quick" in default and "runs/default-compare/" in default
    assert "BBC News" in quick and "nothing to download" in quick and "about 2 minutes" in quick
    assert "duallora compare --methods dual,lora --seeds 0 --model minilm --task news-topics" in quick


def test_quick_runs_the_comparison_on_installed_data_and_takes_overrides(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["quick", "--model", str(tiny_checkpoints["bert"]), "--max-steps", "2", "--batch-size", "4",
                 "--max-length", "32", "--max-eval-examples", "8", "--output-dir", str(out)]) == 0
    assert "running the quick comparison" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["summary"]] == ["dual", "lora"]
    assert "news-topics" in (out / "results.md").read_text() and (out / "results.png").exists()


@pytest.mark.parametrize(("name", "middle", "end"), [("linear", 0.5, 0.0), ("cosine", 0.5, 0.0),
                                                     ("constant", 1.0, 1.0)])
def test_lr_scheduler_shapes_the_learning_rate_after_its_warm_up(tiny_checkpoints, tiny_csv, tmp_path, name, middle,
                                                                 end):
    """10 steps, 2 of linear warm-up; then at step 6 (half-way through the rest) linear and cosine decay are both at
    half the peak, constant at the peak; at step 10 the decays reach 0."""
    from duallora.app.train import TrainingSession, make_accelerator

    cfg = RunConfig(model=str(tiny_checkpoints["bert"]), task=str(tiny_csv), text_column="text", label_column="label",
                    output_dir=str(tmp_path), max_steps=10, lr_warmup_ratio=0.2, lr=1e-3, lr_scheduler=name,
                    batch_size=8)
    session = TrainingSession(cfg, make_accelerator(1, 8), tmp_path)
    rates = []
    for _ in range(11):
        rates.append(session.scheduler.get_last_lr()[0] / 1e-3)
        session.optimizer.step()
        session.scheduler.step()
    assert rates[1] == pytest.approx(0.5) and rates[2] == pytest.approx(1.0)
    assert rates[6] == pytest.approx(middle) and rates[10] == pytest.approx(end, abs=1e-12)
    with pytest.raises(ValueError, match=r"--lr-scheduler must be one of \['linear', 'cosine', 'constant'\]"):
        RunConfig(lr_scheduler="exponential").validate()


def test_a_run_ends_with_a_summary_of_scores_files_time_and_memory(tiny_checkpoints, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "lora", "--max-steps", "2", *run_args(tiny_checkpoints, tiny_csv, out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tail = capsys.readouterr().err.strip().splitlines()[-4:]
    assert tail[0].startswith("done: lora on ") and " 2 steps in 0 min " in tail[0] and "peak memory" in tail[0]
    assert tail[1] == (f"  test accuracy {metrics['test']['accuracy']:.4f} (majority class "
                       f"{metrics['majority_baseline']:.4f}), validation accuracy "
                       f"{metrics['validation']['accuracy']:.4f}")
    assert tail[2].startswith(f"  adapter: {out}   metrics: {out / 'metrics.json'}")
    assert tail[3] == f"  next: duallora eval --adapter {out}   duallora merge --adapter {out} --output {out}-merged"


def test_predict_labels_new_inputs_from_a_file_stdin_or_a_merged_checkpoint(trained_run, tmp_path, capsys,
                                                                             monkeypatch):
    """The run's classifier on new texts: the label with the largest probability, named as in the data; the same
    from the merged checkpoint; every label's probability with --json."""
    import io

    from duallora.app.train import load_trained

    texts = ["good movie, great cast", "awful plot and worse acting", "an ordinary film"]
    model, tokenizer, _, _ = load_trained(trained_run)
    with torch.no_grad():
        probabilities = model.eval()(**tokenizer(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    expected = [f"{['neg', 'pos'][int(p.argmax())]}\t{float(p.max()):.4f}\t{t}" for p, t in zip(probabilities, texts)]
    path = tmp_path / "new.txt"
    path.write_text("\n".join(texts) + "\n\n")
    assert main(["predict", "--adapter", str(trained_run), "--input", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts)))
    assert main(["predict", "--adapter", str(trained_run), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in records] == [line.split("\t")[0] for line in expected]
    for record, row in zip(records, probabilities):
        assert set(record["scores"]) == {"neg", "pos"}
        assert record["scores"]["pos"] == pytest.approx(float(row[1]), abs=1e-6)
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained_run), "--output", str(merged)]) == 0
    capsys.readouterr()
    rows = tmp_path / "new.jsonl"
    rows.write_text("\n".join(json.dumps({"review": t}) for t in texts))
    assert main(["predict", "--adapter", str(merged), "--input", str(rows), "--text-column", "review"]) == 0
    got = capsys.readouterr().out.splitlines()
    assert [g.split("\t")[0] for g in got] == [e.split("\t")[0] for e in expected]
    for g, e in zip(got, expected):  # the merged model: the same probabilities within float32 merge rounding
        assert abs(float(g.split("\t")[1]) - float(e.split("\t")[1])) <= 1e-4
    assert main(["predict", "--adapter", str(merged), "--input", str(rows)]) == 2
    assert "name the column to classify with --text-column; its columns are ['review']" in capsys.readouterr().err


TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                      "{% if add_generation_prompt %}assistant :{% endif %}")  # a test tokenizer's, words it knows


@pytest.fixture(scope="module")
def chat_adapter(tiny_checkpoints, tmp_path_factory):
    """A Dual LoRA adapter folder on the tiny LLaMA, its tokenizer with a chat template saved beside it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from duallora import DualLoraConfig

    directory = tmp_path_factory.mktemp("chat") / "adapter"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]),
                           DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def greedy_answer(directory, messages, new_tokens: int) -> str:
    """The reference: transformers' generate on the chat-templated conversation (the model loaded by peft)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model, tokenizer = AutoPeftModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(
        directory)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_streams_the_answer_to_the_chat_templated_prompt(chat_adapter, capsys):
    expected = greedy_answer(chat_adapter, [{"role": "user", "content": "good movie"}], 8)
    assert expected.strip()
    assert main(["generate", "--adapter", str(chat_adapter), "--prompt", "good movie", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_answers_each_line_with_the_conversation_so_far_through_a_pipe(chat_adapter):
    """The terminal driven through a pipe: two turns, then an empty line ends the chat; the second answer is the
    model's to the whole conversation (history kept)."""
    result = subprocess.run([sys.executable, "-m", "duallora", "chat", "--adapter", str(chat_adapter),
                             "--max-new-tokens", "6"], input="good movie\nbad plot\n\nignored\n", text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = result.stdout.splitlines()
    messages = [{"role": "user", "content": "good movie"}]
    assert first == greedy_answer(chat_adapter, messages, 6)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "bad plot"}]
    assert second == greedy_answer(chat_adapter, messages, 6)
    assert "an empty line or /exit ends it" in result.stderr


def test_generate_and_chat_refuse_a_classifier_naming_predict(trained_run, capsys):
    assert main(["generate", "--adapter", str(trained_run), "--prompt", "hi"]) == 2
    assert "is a classifier" in capsys.readouterr().err
