"""Export to plain LoRA (duallora.convert_to_lora / save_as_lora, `duallora export --to-lora`): at full rank the
LoRA adapter, loaded by peft alone in a fresh process's way, gives the adapter's outputs; below it the error per
layer is the truncated SVD's, read off the singular values independently; the head of a classifier comes along;
layers narrower than K are exact; bad input is refused and nothing at the output is lost."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import FLOAT32_REORDER_RTOL, MODELS, adapted, assert_float32_close, model_output
from peft import LoraConfig, PeftModel, convert_to_lora as peft_convert_to_lora, get_peft_model

import duallora
from duallora.app.cli import main
from duallora.core.layer import AdaptedLayer
from duallora.core.lora_export import total_error


def delta_out_in(layer: AdaptedLayer) -> torch.Tensor:
    """dW as (out, in) from the adapted weight itself, not from get_delta_weight: W' - W0 with W' the weight the
    layer's eval forward uses."""
    w0 = layer.base_weight().float()
    with torch.no_grad():
        return layer.adapted_weight("default", w0, layer.float_factors("default")) - w0


@pytest.mark.parametrize("model_name", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_full_rank_export_loads_in_plain_peft_with_the_adapters_outputs(model_name, method, inputs, tmp_path):
    model = adapted(model_name, method).eval()
    with torch.no_grad():
        expected = model_output(model, inputs)
    widest = max(min(m.out_features, m.in_features) for m in model.modules() if isinstance(m, AdaptedLayer))
    errors = duallora.save_as_lora(tmp_path, model, widest)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == model.peft_config["default"].task_type
    # a plain LoRA adapter: peft alone loads it (no duallora layer in the loaded model)
    loaded = PeftModel.from_pretrained(MODELS[model_name](), tmp_path).eval()
    assert not any(isinstance(m, AdaptedLayer) for m in loaded.modules())
    with torch.no_grad():
        got = model_output(loaded, inputs)
    # the exact factorisation, rounded: the SVD's backward error is a few eps of ||dW|| (plus one reorder of B A),
    # then the same forward in another order
    assert max(e["relative_error"] for e in errors) <= FLOAT32_REORDER_RTOL
    assert_float32_close(got, expected)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_truncated_error_is_the_tail_of_the_singular_values(method):
    model = adapted("llama", method)
    rank = 3
    _, state_dict, errors = duallora.convert_to_lora(model, rank)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert {e["layer"] for e in errors} == set(layers)
    for row in errors:
        s = torch.linalg.svdvals(delta_out_in(layers[row["layer"]]).double())
        tail = math.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum())  # Eckart-Young: the best rank-3 error
        assert row["rank"] == rank and state_dict[f"base_model.model.{row['layer']}.lora_A.weight"].shape[0] == rank
        # float32 SVD and products of 32-64 wide matrices against a float64 reference: the reorder bound, relative to
        # ||dW||, carried over to a relative error that is itself at least 0.01 here
        assert abs(row["relative_error"] - tail) <= FLOAT32_REORDER_RTOL / max(tail, 1e-2) + FLOAT32_REORDER_RTOL
        assert 0 < row["relative_error"] < 1
    norms = [r["norm_dW"] for r in errors]
    expected_total = math.sqrt(sum((r["relative_error"] * n) ** 2 for r, n in zip(errors, norms))
                               / sum(n * n for n in norms))
    assert total_error(errors) == pytest.approx(expected_total)


def test_dual_lora_update_needs_more_rank_than_its_factors_hold():
    """Dual LoRA's dW is full rank by design: its rank-r LoRA export (r = the adapter's r) is not exact, where a
    LoRA adapter's own update would be."""
    model = adapted("llama", "dual")  # r = 4
    _, _, errors = duallora.convert_to_lora(model, 4)
    assert min(e["relative_error"] for e in errors) > 0.1


def test_peft_convert_to_lora_also_accepts_our_layers():
    """peft's own converter takes our layers (GPT-2's Conv1D included) and finds the same best rank-8 approximation
    (the factors' signs may differ between SVDs, their product may not)."""
    model = adapted("gpt2", "dual")
    lora_config, theirs = peft_convert_to_lora(model, rank=8)
    ours = duallora.convert_to_lora(model, 8)[1]
    a_keys = [k for k in ours if k.endswith("lora_A.weight")]
    assert a_keys and isinstance(lora_config, LoraConfig)
    for key in a_keys:
        b_key = key.replace("lora_A", "lora_B")
        assert_float32_close(theirs[b_key] @ theirs[key], ours[b_key] @ ours[key])


def test_layers_narrower_than_the_rank_are_exact_at_their_full_rank(inputs, tmp_path):
    model = adapted("llama", "d2").eval()  # k_proj and v_proj: 32 -> 16
    errors = duallora.save_as_lora(tmp_path, model, 24)
    by_layer = {e["layer"]: e for e in errors}
    assert by_layer["model.layers.0.self_attn.k_proj"]["rank"] == 16
    assert by_layer["model.layers.0.self_attn.k_proj"]["relative_error"] <= FLOAT32_REORDER_RTOL
    assert by_layer["model.layers.0.self_attn.q_proj"]["rank"] == 24
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 24 and saved["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 16
    loaded = PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
    assert loaded.base_model.model.model.layers[0].self_attn.k_proj.lora_A["default"].weight.shape[0] == 16


def test_bad_input_is_refused_and_a_good_export_stays(tmp_path):
    model = adapted("llama", "dual")
    duallora.save_as_lora(tmp_path, model, 4)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for rank in (0, 2.5, True):
        with pytest.raises(ValueError, match="rank must be a whole number >= 1"):
            duallora.save_as_lora(tmp_path, model, rank)
    with pytest.raises(ValueError, match=r"No adapter named 'other' to export; the model holds \['default'\]"):
        duallora.save_as_lora(tmp_path, model, 4, adapter_name="other")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights: unmerge it first"):
        duallora.save_as_lora(tmp_path, model, 4)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    lora = get_peft_model(MODELS["llama"](), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="holds no Dual LoRA or D2-LoRA layer"):
        duallora.convert_to_lora(lora, 4)


def test_export_command_writes_adapters_report_and_scores(tiny_checkpoints, tiny_csv, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "dual", "--max-steps", "6", "--warmup-steps", "2", "--model",
                 str(tiny_checkpoints["bert"]), "--task", str(tiny_csv), "--text-column", "text", "--label-column",
                 "label", "--output-dir", str(run), "--max-length", "16", "--batch-size", "8", "--lr", "5e-3",
                 "--max-eval-examples", "24"]) == 0
    out = tmp_path / "export"
    assert main(["export", "--adapter", str(run), "--to-lora", "--rank", "2,32", "--output", str(out),
                 "--evaluate", "--max-examples", "24"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert [e["rank"] for e in report["exports"]] == [2, 32]
    low, full = report["exports"]
    assert full["total_error"] <= FLOAT32_REORDER_RTOL < low["total_error"] < 1
    # at full rank (32: the tiny BERT's width) the LoRA adapter scores what the adapter scores, but for a near-tie
    # that float32 rounding may flip (one of the 24 examples)
    assert abs(full["score_after"] - report["score_before"]) <= 1 / 24
    for name in ("export.md", "export.png", "lora-r2/adapter_model.safetensors", "lora-r32/adapter_config.json"):
        assert (out / name).exists(), name
    assert "| K | error, all layers |" in (out / "export.md").read_text()
    # the written adapter loads in a process without duallora imported (its registration on `import peft` off)
    code = ("import sys, peft, transformers; m = transformers.AutoModelForSequenceClassification.from_pretrained("
            f"{str(tiny_checkpoints['bert'])!r}, num_labels=2); "
            f"peft.PeftModel.from_pretrained(m, {str(out / 'lora-r2')!r}); "
            "assert 'duallora' not in sys.modules; print('LOADED')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DUALLORA_NO_AUTOLOAD": "1"})
    assert "LOADED" in result.stdout, result.stderr[-2000:]
    # a second export to the same place is refused without --overwrite
    assert main(["export", "--adapter", str(run), "--to-lora", "--rank", "2", "--output", str(out)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_export_from_a_quantized_base_loads_onto_the_quantized_base(quantization, tmp_path):
    """dW is taken against the dequantized W0 (what the adapter adds to); the LoRA adapter loads onto the same
    quantized base with peft alone and holds that dW."""
    from peft.tuners.lora import LoraLayer
    from test_quantized import llama_config, quantized_base, with_adapter
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(64)).save_pretrained(tmp_path / "base")
    model = with_adapter(quantized_base(tmp_path / "base", quantization), "dual")
    errors = duallora.save_as_lora(tmp_path / "lora", model, 64)
    assert max(e["relative_error"] for e in errors) <= FLOAT32_REORDER_RTOL
    loaded = PeftModel.from_pretrained(quantized_base(tmp_path / "base", quantization), tmp_path / "lora")
    ours = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    lora_layers = [(n, m) for n, m in loaded.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == len(ours)
    for name, layer in lora_layers:
        expected = ours[name].get_delta_weight("default")
        assert_float32_close(layer.get_delta_weight("default").float(), expected)
