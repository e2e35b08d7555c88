"""The papers' other baselines, from peft: LoRA+ (`loraplus`: LoRA's adapter, B at 16x the learning rate through
peft's create_loraplus_optimizer) and HiRA (`hira`: peft's HiraConfig) as methods of `duallora train`, compare and
the suite; their claims in the report."""

import json
import shutil

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from duallora.app import experiments
from duallora.app.cli import main
from duallora.app.run_config import DEFAULT_LORAPLUS_LR_RATIO, RunConfig, optimizer
from test_suite import comparison, fabricate, suite_template, write_experiment


@pytest.mark.parametrize("method,ratio", [("lora", 1.0), ("loraplus", DEFAULT_LORAPLUS_LR_RATIO),
                                          ("loraplus", 4.0)])
def test_loraplus_steps_b_at_ratio_times_the_learning_rate(method, ratio):
    """AdamW's first step moves each weight by lr * g / (|g| + eps): by the learning rate itself wherever the
    gradient is far above eps. B starts at zero, so only B has a gradient at the first step."""
    lr = 1e-3
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    opt = (optimizer(model, method, lr, loraplus_lr_ratio=ratio) if method == "loraplus"
           else optimizer(model, method, lr))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    eps = opt.param_groups[0]["eps"]
    for name, p in model.named_parameters():
        if "lora_B" in name:
            moved = (p.detach() - before[name]).abs().max().item()
            expected = lr * ratio * grads[name] / (grads[name] + eps)
            # the update lr_B * g / (|g| + eps) at the largest |g|, then one float32 rounding of the weight
            assert moved == pytest.approx(expected, rel=1e-5), name
        elif "lora_A" in name:
            assert torch.equal(p.detach(), before[name]), name  # no gradient yet: B was zero


def test_loraplus_ratio_is_refused_for_other_methods():
    with pytest.raises(ValueError, match="--loraplus-lr-ratio sets LoRA\\+'s learning rate of B; --method is 'dual'"):
        RunConfig(method="dual", loraplus_lr_ratio=8.0).validate()


@pytest.mark.parametrize("method,peft_type", [("loraplus", "LORA"), ("hira", "HIRA")])
def test_train_reload_and_score_the_peft_baselines(method, peft_type, tiny_checkpoints, tiny_csv, tmp_path):
    out = tmp_path / method
    assert main(["train", "--method", method, "--max-steps", "6", "--model", str(tiny_checkpoints["bert"]),
                 "--task", str(tiny_csv), "--text-column", "text", "--label-column", "label", "--output-dir",
                 str(out), "--max-length", "16", "--batch-size", "8", "--lr", "5e-3", "--max-eval-examples",
                 "24"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["steps"] == 6
    assert metrics["losses"][-1] < metrics["losses"][0] + 1.0  # finite, trained
    from duallora.app.train import load_trained

    model, _, _, cfg = load_trained(out)
    assert isinstance(model, PeftModel) and cfg.method == method
    trainable = metrics["trainable_params"]
    # HiRA and LoRA+ hold LoRA's parameter count at r (plus the same classification head)
    lora = tmp_path / "lora"
    assert main(["train", "--method", "lora", "--max-steps", "1", "--model", str(tiny_checkpoints["bert"]),
                 "--task", str(tiny_csv), "--text-column", "text", "--label-column", "label", "--output-dir",
                 str(lora), "--max-length", "16", "--batch-size", "8", "--max-eval-examples", "8"]) == 0
    assert json.loads((lora / "metrics.json").read_text())["trainable_params"] == trainable


@pytest.mark.parametrize("method,zero_initialised", [("loraplus", lambda layer: layer.lora_B["default"].weight),
                                                     ("hira", lambda layer: layer.hira_B["default"])],
                         ids=["loraplus", "hira"])
def test_the_peft_baselines_train_on_a_4bit_base(method, zero_initialised, tiny_checkpoints, bigbench_env, tmp_path):
    """QLoRA's setting for LoRA+ and HiRA: peft's bitsandbytes layers of each method wrap the Linear4bit base, and
    the factors that start at zero (LoRA's B; HiRA's B) have trained away from it."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / method
    assert main(["train", "--method", method, "--quantize", "4bit", "--model", str(tiny_checkpoints["llama64"]),
                 "--task", "strategyqa", "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4",
                 "--max-length", "48", "--max-eval-examples", "4", "--lr", "1e-2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["quantize"] == "4bit" and "accuracy" in metrics["test"]
    assert all(loss == loss for loss in metrics["losses"])
    from duallora.app.train import load_trained

    model, _, _, cfg = load_trained(out)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.endswith(".bnb") and type(layer.base_layer).__name__ == "Linear4bit"
    assert zero_initialised(layer).abs().max() > 0


def test_claims_over_loraplus_and_hira_and_hira_as_the_best_baseline(tiny_checkpoints, tiny_csv, tmp_path):
    config = comparison(tiny_checkpoints, tiny_csv)
    config.update(methods=["lora", "loraplus", "hira", "dual"], lr_grid=[0.01], seeds=[0, 1, 2])
    root = tmp_path / "experiments"
    experiment = experiments.load_experiment(write_experiment(root, "cmp", config))
    scores = {"lora": 0.60, "loraplus": 0.62, "hira": 0.70, "dual": 0.75}
    for label, score in scores.items():
        for seed, shift in enumerate((-0.01, 0.0, 0.01)):
            fabricate(experiment, label, 0.01, seed, score + shift, kind="multiple_choice")
    shutil.copy(suite_template(), root / "report_template.md")
    assert main(["suite", "--root", str(root), "--report", "--docs-dir", str(tmp_path / "docs")]) == 0
    lines = (tmp_path / "docs" / "RESULTS.md").read_text().splitlines()
    over_plus = next(line for line in lines if "above LoRA+" in line)
    over_hira = next(line for line in lines if "above HiRA" in line)
    # 75.0 - 62.0 and 75.0 - 70.0, each ± 1.0 over 3 seeds: standard error sqrt(2 / 3) = 0.8; the spec quotes no
    # figure for these claims, so the verdict compares none
    assert "| dual - loraplus | +13.0 ± 0.8 (" in over_plus and over_plus.endswith("a gain beyond 2 standard errors |")
    assert "| dual - hira | +5.0 ± 0.8 (" in over_hira and "paper's figure" not in over_hira
    best = next(line for line in lines if "over the best baseline at its parameter count" in line)
    assert "(vs hira)" in best and "| +5.0 ± 0.8 (" in best
