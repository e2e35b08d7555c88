"""TRL's trainers with a Dual LoRA or D2-LoRA ``peft_config``: SFT trains, counts the warm-up clock per optimizer step
under gradient accumulation, checkpoints, resumes, and its adapter reloads and merges; DPO trains a Dual LoRA adapter
against the adapter-disabled model as its reference."""

import pytest
import torch
from conftest import assert_float32_close
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from duallora import D2LoraConfig, DualLoraConfig, warmup_steps_taken

trl = pytest.importorskip("trl")  # a test-only dependency (the test extra, pinned in constraints.txt)
datasets = pytest.importorskip("datasets")

TEXTS = ["the movie was good", "the plot was awful", "a fine film, well made", "dull and far too long"] * 4


def tokenizer_of(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", "[PAD]"  # the tiny WordPiece tokenizer names neither
    return tokenizer


def factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "_lora_" in n}


def sft_trainer(path, config, out, max_steps, **kw):
    args = trl.SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-2, save_steps=2, logging_steps=1,
                         max_length=16, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                         bf16=False, **kw)  # TRL's default bf16 autocast would wrap model.forward: compare in fp32
    return trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, peft_config=config,
                          train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                          processing_class=tokenizer_of(path))


@pytest.mark.parametrize("config", [
    lambda: DualLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", warmup_steps=2),
    lambda: D2LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
], ids=["dual", "d2"])
def test_sft_trainer_trains_checkpoints_resumes_and_the_adapter_reloads_and_merges(tiny_checkpoints, config,
                                                                                    tmp_path):
    path, out = tiny_checkpoints["llama"], tmp_path / "sft"
    trainer = sft_trainer(path, config(), out, max_steps=4)
    before = factors(trainer.model)
    trainer.train()
    after = factors(trainer.model)
    assert before.keys() == after.keys() and all(not torch.equal(before[n], after[n]) for n in before)
    dual = isinstance(trainer.model.peft_config["default"], DualLoraConfig)
    if dual:
        assert warmup_steps_taken(trainer.model) == 4  # optimizer steps, not the 8 micro-batches
    assert {p.name for p in out.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-2", "checkpoint-4"}
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists()

    resumed = sft_trainer(path, config(), out, max_steps=6)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert resumed.state.global_step == 6
    if dual:
        assert warmup_steps_taken(resumed.model) == 6  # the clock came back with the checkpoint and went on
    resumed.model.save_pretrained(tmp_path / "adapter")

    model = resumed.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter").eval()
    ids = tokenizer_of(path)(["the film was good"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert_float32_close(reloaded(input_ids=ids).logits, expected)
        assert_float32_close(reloaded.merge_and_unload()(input_ids=ids).logits, expected)


def test_dpo_trainer_trains_a_dual_lora_adapter_against_the_disabled_adapter(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    pairs = datasets.Dataset.from_dict({
        "prompt": ["the movie was", "the plot was"] * 4,
        "chosen": [" good", " fine"] * 4,
        "rejected": [" awful", " dull"] * 4,
    })
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=3, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-2, beta=0.1, max_length=16, report_to=[],
                         use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0, bf16=False)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, train_dataset=pairs,
                             processing_class=tokenizer_of(path),
                             peft_config=DualLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        warmup_steps=1))
    before = factors(trainer.model)
    trainer.train()
    after = factors(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert warmup_steps_taken(trainer.model) == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
