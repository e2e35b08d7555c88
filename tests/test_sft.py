"""Supervised fine-tuning from the command line: each format trains (TRL's SFTTrainer under the hood) on a tiny
LLaMA whose tokenizer has a chat template, lowers the validation loss below the base model's, writes the run folder
with generations, merges and answers; bad files stop in one line with nothing written."""

import json
import shutil

import pytest
import torch
from conftest import WORDS, assert_float32_close

from duallora.app.cli import main
from duallora.dual.warmup import UnknownRunLengthWarning, WarmingUpWarning

# the tiny tokenizer's words only; the template is the test tokenizer's (a real chat model ships its own)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
PAIRS = [(f"{a} {b}", "yes" if a in ("good", "great") else "no") for a in ("good", "great", "bad", "awful")
         for b in WORDS[2:12]]  # a learnable skill: is the review positive


@pytest.fixture(scope="module")
def chat_model(tiny_checkpoints, tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(tiny_checkpoints["llama"], directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "."  # a causal LM's tokenizer has one; SFT ends each example with it
    tokenizer.save_pretrained(directory)
    return directory


def rows(fmt: str) -> list[dict]:
    if fmt == "messages":
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    if fmt == "conversational prompt-completion":
        return [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
                for q, a in PAIRS]
    if fmt == "prompt-completion":
        return [{"prompt": q + " :", "completion": " " + a} for q, a in PAIRS]
    if fmt == "alpaca":
        return [{"instruction": "is it good ?", "input": q, "output": a} for q, a in PAIRS]
    return [{"text": f"{q} : {a} ."} for q, a in PAIRS]


def write(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def sft(model, task, out, *extra) -> int:
    return main(["train", "--method", "dual", "--model", str(model), "--task", task, "--output-dir", str(out),
                 "--max-steps", "12", "--batch-size", "4", "--max-length", "32", "--lr", "1e-2", "--warmup-steps", "2",
                 "--eval-every", "6", *extra])


@pytest.mark.parametrize("fmt", ["messages", "conversational prompt-completion", "prompt-completion", "alpaca",
                                 "text"])
def test_each_format_trains_below_the_base_models_loss_and_writes_the_run(chat_model, tmp_path, capsys, fmt):
    task = write(tmp_path / "data.jsonl", rows(fmt))
    out = tmp_path / "run"
    assert sft(chat_model, task, out) == 0
    err = capsys.readouterr().err
    name = "prompt-completion" if "prompt-completion" in fmt else fmt
    loss_on = "every token" if fmt == "text" else "the completion (the answer) only"
    assert (f"SFT on data.jsonl: {name} data (" in err and "36 train / 4 validation examples; 0 longer than "
            f"--max-length 32 tokens are truncated; loss on {loss_on}." in err), err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["format"] == name and metrics["steps"] == 12 and len(metrics["evaluations"]) == 2
    assert metrics["validation"]["loss"] < metrics["base_validation"]["loss"], metrics  # the adapter learned
    assert (out / "adapter_model.safetensors").exists() and (out / "training.png").exists()
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == (0 if fmt == "text" else 3) and all("generated" in g for g in generations)
    assert f"validation loss {metrics['validation']['loss']:.4f} (base model " in err  # the summary


def test_a_short_dual_sft_run_with_the_default_warm_up_moves_the_model(chat_model, tmp_path, capsys, recwarn):
    """No --warmup-steps: TRL's trainer gets DualLoraWarmupCallback, so the 12-step run ramps over ceil(12 / 10) = 2
    steps and ends at lam_t = 1, not at the 0.12 a fixed 100-step warm-up would leave, and nothing warns."""
    out = tmp_path / "run"
    argv = ["train", "--method", "dual", "--model", str(chat_model), "--task",
            write(tmp_path / "chat.jsonl", rows("messages")), "--output-dir", str(out), "--max-steps", "12",
            "--batch-size", "4", "--max-length", "32", "--lr", "1e-2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    told = [str(w.message) for w in recwarn if issubclass(w.category, (WarmingUpWarning, UnknownRunLengthWarning))]
    assert told == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dual_warmup_steps"] == 2 and "Dual LoRA warm-up 2 steps" in err
    assert json.loads((out / "adapter_config.json").read_text())["warmup_steps"] == 2
    assert metrics["validation"]["loss"] < metrics["base_validation"]["loss"], metrics


def test_report_to_tensorboard_keeps_the_trainers_logs_in_the_run_folder(chat_model, tmp_path, monkeypatch):
    from conftest import tensorboard_scalars

    monkeypatch.chdir(tmp_path)  # where a writer opened before training would have put ./runs
    out = tmp_path / "run"
    assert sft(chat_model, write(tmp_path / "chat.jsonl", rows("messages")), out, "--report-to", "tensorboard") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    scalars = tensorboard_scalars(out / "logs")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 13))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(metrics["losses"], rel=2 ** -23)
    logged = {step: loss for step, loss in scalars["eval/loss"]}  # the base model's evaluation is at step 0
    assert logged[0] == pytest.approx(metrics["base_validation"]["loss"], rel=2 ** -23)
    assert logged[12] == pytest.approx(metrics["validation"]["loss"], rel=2 ** -23)
    assert not (tmp_path / "runs").exists()


def test_keep_best_publishes_the_adapter_of_the_lowest_validation_loss(chat_model, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert sft(chat_model, write(tmp_path / "chat.jsonl", rows("messages")), out, "--keep-best", "--eval-every", "3",
               "--lr", "1e-1") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [(e["step"], e["loss"]) for e in metrics["evaluations"]]
    best_step, best = min(losses, key=lambda s: s[1])
    assert [s for s, _ in losses] == [3, 6, 9, 12] and metrics["kept_step"] == best_step
    assert metrics["validation"]["loss"] == best
    clocks = {int(v) for k, v in load_file(out / "adapter_model.safetensors").items() if "dual_lora_step" in k}
    assert clocks == {best_step}  # Dual LoRA's clock counts optimizer steps: the adapter saved at the best step


def test_an_sft_run_merges_and_answers_the_same_before_and_after(chat_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert sft(chat_model, write(tmp_path / "chat.jsonl", rows("messages")), out) == 0
    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")]) == 0
    assert main(["eval", "--adapter", str(out)]) == 2
    assert "is an SFT run: its validation loss and perplexity" in capsys.readouterr().err
    answers = []
    for model in (out, tmp_path / "merged"):
        assert main(["generate", "--adapter", str(model), "--prompt", "good plot", "--max-new-tokens", "4"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
    # the merged model computes what the run's base + adapter computes, within float32 reordering
    from transformers import AutoModelForCausalLM

    from duallora.app.generate import load_generator, prompt_ids

    adapted, tokenizer = load_generator(out)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "good plot"}])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        assert_float32_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits,
                             expected)
        with adapted.disable_adapter():
            assert (adapted(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter is not a no-op


def test_eval_file_is_used_for_validation(chat_model, tmp_path):
    train = write(tmp_path / "train.jsonl", rows("alpaca"))
    held = write(tmp_path / "held.jsonl", rows("alpaca")[:5])
    assert sft(chat_model, train, tmp_path / "run", "--eval-file", held) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["train_examples"], metrics["validation_examples"]) == (40, 5)


def test_bad_sft_files_stop_in_one_line_and_write_nothing(chat_model, tiny_checkpoints, tmp_path, capsys):
    no_answer = [{"messages": [{"role": "user", "content": "good"}]}] + rows("messages")
    cases = [
        (chat_model, write(tmp_path / "a.jsonl", rows("messages")[:3] + no_answer),
         "a.jsonl, example 4: a chat with no assistant turn, so nothing to learn from"),
        (chat_model, write(tmp_path / "b.jsonl", [{"question": "q", "answer": "a"}] * 5),
         "b.jsonl: no instruction or chat format in its columns ['answer', 'question']. Accepted: messages: "),
        (tiny_checkpoints["llama"], write(tmp_path / "c.jsonl", rows("messages")),
         "tokenizer has no chat template, which messages data needs"),
        (tiny_checkpoints["bert"], write(tmp_path / "d.jsonl", rows("alpaca")), "needs a causal language model"),
    ]
    for number, (model, task, message) in enumerate(cases):
        assert sft(model, task, tmp_path / f"out{number}") == 2, task
        err = capsys.readouterr().err
        assert message in err and len([line for line in err.splitlines() if "error:" in line]) == 1, (message, err)
        assert not (tmp_path / f"out{number}").exists()


def test_sft_options_on_a_classification_run_are_refused(tiny_checkpoints, tiny_csv, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_checkpoints["bert"]), "--task", str(tiny_csv), "--text-column", "text",
                 "--label-column", "label", "--packing", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--packing: for SFT runs (instruction or chat data, no --label-column)" in capsys.readouterr().err
