"""Both methods through PEFT's own machinery, on tiny LLaMA, BERT and GPT-2 (Conv1D) models: parameter budget,
merge, save/load, several adapters, target selection, the warm-up clock's basics, unload, a new process."""

import copy
import math

import pytest
import torch
from conftest import (FLOAT32_REORDER_RTOL, METHODS, MODELS, adapted, assert_float32_close, model_output,
                      tiny_llama, trained_like)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from duallora import D2LoraConfig, DualLoraConfig, set_warmup_step, warmup_steps_taken
from duallora.core.layer import AdaptedLayer


def unmerge_bound(layer: AdaptedLayer) -> float:
    """How far unmerge may leave W0, read off a merged layer: the merged weight was rounded to float32 once and each
    step undoing it rounds once more (a few ulps of the largest merged element), and D2-LoRA's inversion divides
    by its unit scale k = n(W0) / n(W'), which magnifies them by 1 / k."""
    k = min(float(record[1].min()) if isinstance(record[1], torch.Tensor) and record[1].dim() else 1.0
            for record in layer._merge_records.values())
    return 4 * torch.finfo(torch.float32).eps * layer.base_weight().abs().max().item() / k


# ----------------------------------------------------------------------------- parameter budget
@pytest.mark.parametrize("model_name", ["llama", "bert", "gpt2"])
def test_dual_has_lora_parameter_count_and_d2_has_lora_2r(model_name):
    def count(config):
        return get_peft_model(MODELS[model_name](), config).get_nb_trainable_parameters()[0]

    lora_r = count(LoraConfig(r=8, target_modules="all-linear"))
    lora_2r = count(LoraConfig(r=16, target_modules="all-linear"))
    assert count(DualLoraConfig(r=8, target_modules="all-linear")) == lora_r
    assert count(DualLoraConfig(r=8, r1=3, target_modules="all-linear")) == lora_r
    assert count(D2LoraConfig(r=8, target_modules="all-linear")) == lora_2r


def test_parameter_names_and_shapes_follow_the_spec():
    model = get_peft_model(tiny_llama(), DualLoraConfig(r=6, r1=2, target_modules=["up_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.up_proj  # Linear(32 -> 64)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters() if p.requires_grad}
    # each factor the weight of a leaf module of its own, as LoRA's lora_A.default.weight (FSDP1 wraps such leaves)
    assert shapes == {"dual_lora_A.default.weight": (2, 32), "dual_lora_B.default.weight": (64, 2),
                      "dual_lora_C.default.weight": (4, 32), "dual_lora_D.default.weight": (64, 4)}
    model = get_peft_model(tiny_llama(), D2LoraConfig(r=3, target_modules=["up_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters() if p.requires_grad}
    assert shapes == {"d2_lora_A_pos.default.weight": (64, 3), "d2_lora_B_pos.default.weight": (3, 32),
                      "d2_lora_A_neg.default.weight": (64, 3), "d2_lora_B_neg.default.weight": (3, 32)}


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize("training", [False, True])  # eval: the cached weight; train: the fused Function
@pytest.mark.parametrize("model_name", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_merged_equals_unmerged_and_unmerge_restores(model_name, method, training, inputs):
    model = adapted(model_name, method)
    model.train(training)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model_output(model, inputs)
        model.merge_adapter()
        merged = model_output(model, inputs)
        bounds = {f"{name}.base_layer.weight": unmerge_bound(m) for name, m in model.named_modules()
                  if isinstance(m, AdaptedLayer)}
        model.unmerge_adapter()
        again = model_output(model, inputs)
    assert_float32_close(merged, unmerged)
    assert_float32_close(again, unmerged)
    for name, p in model.named_parameters():
        if name in base_weights:  # biases are never written: bound 0
            assert (p - base_weights[name]).abs().max() <= bounds.get(name, 0.0), name
    plain = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    with torch.no_grad():
        assert_float32_close(model_output(plain, inputs), unmerged)


def test_merge_and_unload_gives_a_plain_transformers_model(inputs):
    model = adapted("gpt2", "dual")
    with torch.no_grad():
        expected = model_output(model, inputs)
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "GPT2LMHeadModel"
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert_float32_close(model_output(plain, inputs), expected)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_safe_merge_refuses_nan_and_leaves_every_base_weight_untouched(method):
    model = adapted("llama", method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    last = [m for m in model.modules() if isinstance(m, AdaptedLayer)][-1]
    with torch.no_grad():
        last.factors("default")[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, before[n]), n
    assert not any(m.merged for m in model.modules() if isinstance(m, AdaptedLayer))


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("model_name", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_save_load_round_trip_in_a_fresh_model(model_name, method, inputs, tmp_path):
    model = adapted(model_name, method, **({"warmup_steps": 50} if method == "dual" else {}))
    if method == "dual":
        set_warmup_step(model, 17)
    model.eval()  # the loaded model is in eval mode: compare like with like (the eval path builds W eagerly)
    with torch.no_grad():
        expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(MODELS[model_name](), tmp_path)
    saved = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        if "_lora_" in name or "modules_to_save" in name:
            assert torch.equal(p, saved[name]), name
    with torch.no_grad():
        assert torch.equal(model_output(loaded, inputs), expected)
    if method == "dual":
        assert warmup_steps_taken(loaded) == 17
        assert "dual_lora_step" in " ".join(load_file(tmp_path / "adapter_model.safetensors"))


def test_loaded_config_round_trips_every_method_field(tmp_path):
    config = DualLoraConfig(r=6, r1=4, lora_alpha=3, warmup_steps=7, ste="hardtanh", magnitude_activation="tanh",
                            direction_activation="tanh", init_std=0.1, target_modules=["q_proj"])
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).peft_config["default"]
    for field in ("r", "r1", "r2", "lora_alpha", "warmup_steps", "ste", "magnitude_activation",
                  "direction_activation", "init_std"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert type(loaded) is DualLoraConfig


# ----------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_several_adapters_switching_deleting_and_disabling(method, inputs):
    base_model = tiny_llama()
    with torch.no_grad():
        base_out = model_output(base_model, inputs)
    model = get_peft_model(base_model, METHODS[method](r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", METHODS[method](r=2, target_modules=["q_proj", "v_proj", "o_proj"]))
    trained_like(model)
    with torch.no_grad():
        out_default = model_output(model, inputs)
        model.set_adapter("second")
        out_second = model_output(model, inputs)
        model.set_adapter("default")
        assert torch.equal(model_output(model, inputs), out_default)
        with model.disable_adapter():
            assert torch.equal(model_output(model, inputs), base_out)  # the base layers alone: the same operations
    assert (out_default - out_second).abs().max() > 1e-3
    assert (out_default - base_out).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    model.delete_adapter("second")
    assert not any(".second" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model_output(model, inputs), out_default)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_two_active_adapters_compose_and_merge_the_same_way(method, inputs):
    model = get_peft_model(tiny_llama(), METHODS[method](r=4, target_modules=["q_proj", "down_proj"]))
    model.add_adapter("other", METHODS[method](r=2, target_modules=["q_proj", "down_proj"]))
    trained_like(model)
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        unmerged = model_output(model, inputs)
        model.merge_adapter()
        merged = model_output(model, inputs)
    assert_float32_close(merged, unmerged)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_only_adapter_parameters_receive_gradients(method, inputs):
    model = adapted("bert", method)
    model.train()
    model(inputs, labels=torch.tensor([0, 2])).loss.backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        expected = "_lora_" in name or "modules_to_save" in name
        assert has_grad == expected, name


def test_inference_mode_freezes_the_adapter():
    model = get_peft_model(tiny_llama(), DualLoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    assert not any(p.requires_grad for p in model.parameters())


def test_rank_and_alpha_patterns_apply_per_layer():
    config = DualLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            rank_pattern={"v_proj": 8}, alpha_pattern={"v_proj": 2})
    model = get_peft_model(tiny_llama(), config)
    attn = model.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.dual_options["default"].r1 == 2 and attn.v_proj.dual_options["default"].r1 == 4
    assert attn.v_proj.dual_options["default"].scaling == pytest.approx(2 / math.sqrt(4 * 4))


def test_layers_to_transform_and_exclude_modules():
    config = D2LoraConfig(r=2, target_modules=["q_proj", "k_proj"], layers_to_transform=[1], layers_pattern="layers")
    model = get_peft_model(tiny_llama(), config)
    assert sorted(model.targeted_module_names) == ["model.layers.1.self_attn.k_proj",
                                                   "model.layers.1.self_attn.q_proj"]
    model = get_peft_model(tiny_llama(), DualLoraConfig(r=2, target_modules="all-linear", exclude_modules=["k_proj"]))
    assert not any("k_proj" in n for n in model.targeted_module_names) and len(model.targeted_module_names) == 12


def test_regex_target_modules():
    model = get_peft_model(tiny_llama(), DualLoraConfig(r=2, target_modules=r".*layers\.0\.mlp\.(up|down)_proj"))
    assert sorted(model.targeted_module_names) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]


# ----------------------------------------------------------------------------- warm-up
def test_warmup_starts_at_the_base_model_and_counts_optimizer_steps(inputs):
    base = tiny_llama()
    with torch.no_grad():
        base_out = model_output(base, inputs)
    model = get_peft_model(base, DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=4))
    model.train()
    with torch.no_grad():
        assert torch.equal(model_output(model, inputs), base_out)  # lam_0 = 0: dW = 0 exactly
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for micro_batch in range(3):  # gradient accumulation: three backward passes, one optimizer step
        model(inputs, labels=inputs).loss.backward()
    assert warmup_steps_taken(model) == 0
    optimizer.step()
    assert warmup_steps_taken(model) == 1
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert float(layer.warmup_coef("default")) == pytest.approx(0.25 * layer.dual_options["default"].scaling)
    with torch.no_grad():
        assert (model_output(model, inputs) - base_out).abs().max() > 1e-4


def test_warmup_ignores_optimizers_that_do_not_hold_the_adapter(inputs):
    model = get_peft_model(tiny_llama(), DualLoraConfig(r=4, target_modules=["q_proj"], warmup_steps=4))
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    other.step()
    assert warmup_steps_taken(model) == 0


def test_resumed_training_continues_the_warmup(tmp_path, inputs):
    model = get_peft_model(tiny_llama(), DualLoraConfig(r=4, target_modules=["q_proj"], warmup_steps=10))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert warmup_steps_taken(resumed) == 3
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    resumed(inputs, labels=inputs).loss.backward()
    opt2.step()
    assert warmup_steps_taken(resumed) == 4


def test_deep_copied_model_keeps_counting(inputs):
    model = copy.deepcopy(get_peft_model(tiny_llama(), DualLoraConfig(r=4, target_modules=["q_proj"])))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(inputs, labels=inputs).loss.backward()
    optimizer.step()
    assert warmup_steps_taken(model) == 1


def test_unload_returns_the_base_model_unchanged(inputs):
    base = tiny_llama()
    with torch.no_grad():
        expected = model_output(base, inputs)
    model = trained_like(get_peft_model(base, DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=0)))
    plain = model.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(model_output(plain, inputs), expected)


def test_peft_version_guard(monkeypatch):
    import peft

    from duallora.core.registration import check_peft_version

    monkeypatch.setattr(peft, "__version__", "0.17.1")
    with pytest.raises(ImportError, match=r"duallora needs peft >= 0.21.0, found peft 0.17.1.*pip install"):
        check_peft_version()


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_saved_adapter_loads_in_a_new_process(method, tmp_path, inputs):
    import subprocess
    import sys
    from pathlib import Path

    model = adapted("llama", method)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()  # as the loaded one: both build W through the eval cache (compiled kernels compiled per process)
    with torch.no_grad():
        torch.save(model_output(model, inputs), tmp_path / "expected.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import duallora
from conftest import tiny_llama
from peft import PeftModel
model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / 'adapter')!r})
with torch.no_grad():
    out = model(torch.load({str(tmp_path / 'inputs.pt')!r})).logits
expected = torch.load({str(tmp_path / 'expected.pt')!r})
assert (out - expected).abs().max() <= {FLOAT32_REORDER_RTOL!r} * expected.abs().max(), (out - expected).abs().max()
print("same outputs", type(model.peft_config["default"]).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "same outputs" in result.stdout


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_transformers_own_adapter_api_adds_switches_reads_and_deletes_adapters(method):
    """base.add_adapter / set_adapter / disable_adapters / get_adapter_state_dict / delete_adapter on a transformers
    model (not PeftModel): what transformers 5.24 refuses with peft < 0.22 (scripts/compat.sh runs this file)."""
    base, ids = tiny_llama(), torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(ids).logits
    for name in ("one", "two"):
        base.add_adapter(METHODS[method](r=4, target_modules=["q_proj", "v_proj"]), adapter_name=name)
    trained_like(base)
    base.set_adapter("two")
    assert base.active_adapters() == ["two"]
    state = base.get_adapter_state_dict("two")
    assert state and all(f"{method}_lora_" in key for key in state)
    with torch.no_grad():
        adapted_logits = base(ids).logits
        base.disable_adapters()
        assert torch.equal(base(ids).logits, reference)
        base.enable_adapters()
        assert torch.equal(base(ids).logits, adapted_logits) and not torch.equal(adapted_logits, reference)
    base.delete_adapter("one")
    assert base.active_adapters() == ["two"]
