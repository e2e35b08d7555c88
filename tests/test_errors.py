"""Bad input gets an error that names the problem and the fix, and a failed call changes nothing."""

import os
import re

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from duallora import D2LoraConfig, DualLoraConfig
from duallora.core.layer import AdaptedLayer


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("config_cls", [DualLoraConfig, D2LoraConfig])
@pytest.mark.parametrize("r", [0, -3])
def test_rank_must_be_positive(config_cls, r):
    with pytest.raises(ValueError, match=r"`r` must be .*>= "):
        config_cls(r=r)


def test_dual_rank_split_must_add_up():
    with pytest.raises(ValueError, match=r"`r1 \+ r2` must equal `r` = 8.*r1=4, r2=6"):
        DualLoraConfig(r=8, r1=4, r2=6)
    with pytest.raises(ValueError, match=r"`r1` must be an integer in \[1, r - 1\] = \[1, 7\]; got 8"):
        DualLoraConfig(r=8, r1=8)
    with pytest.raises(ValueError, match=r"`r` must be an integer >= 2"):
        DualLoraConfig(r=1)
    assert (DualLoraConfig(r=7).r1, DualLoraConfig(r=7).r2) == (3, 4)
    assert (DualLoraConfig(r=8, r2=2).r1, DualLoraConfig(r=8, r2=2).r2) == (6, 2)


@pytest.mark.parametrize("config_cls", [DualLoraConfig, D2LoraConfig])
@pytest.mark.parametrize("alpha", [0, -1.0])
def test_alpha_must_be_positive(config_cls, alpha):
    with pytest.raises(ValueError, match=r"`lora_alpha` must be > 0"):
        config_cls(lora_alpha=alpha)


def test_out_of_range_fields_name_field_and_range():
    with pytest.raises(ValueError, match=r"`tau` must be >= 0; got -0.1"):
        D2LoraConfig(tau=-0.1)
    with pytest.raises(ValueError, match=r"`lora_dropout` must be in \[0, 1\)"):
        DualLoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"`warmup_steps` must be an integer >= 0"):
        DualLoraConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"`init_std` must be a number > 0, 'fan_in' or None"):
        DualLoraConfig(init_std=0.0)
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]"):
        DualLoraConfig(rank_pattern={"q_proj": 1})


@pytest.mark.parametrize("kwargs,valid", [
    ({"ste": "sigmoid"}, "['clip', 'identity', 'hardtanh']"),
    ({"magnitude_activation": "gelu"}, "['relu', 'tanh', 'sigmoid', 'identity']"),
    ({"direction_activation": "relu"}, "['sign', 'tanh', 'identity']"),
])
def test_unknown_names_list_the_valid_ones(kwargs, valid):
    with pytest.raises(ValueError, match=f"must be one of {valid.replace('[', '.').replace(']', '.')}"):
        DualLoraConfig(**kwargs)


def test_unknown_norm_axis_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"`norm_axis` must be one of \['out', 'in'\]; got 'rows'"):
        D2LoraConfig(norm_axis="rows")


@pytest.mark.parametrize("config_cls", [DualLoraConfig, D2LoraConfig])
def test_targets_that_match_nothing_list_the_linear_modules(config_cls):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*\['down_proj', 'gate_proj', 'k_proj', 'lm_head', "
                                         r"'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        get_peft_model(model, config_cls(target_modules=["query", "value"]))
    assert_unchanged(model, snap)


def test_unsupported_target_type_is_a_type_error_and_changes_nothing():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"model.embed_tokens.*Embedding.*Supported: torch.nn.Linear and "
                                        r"transformers' Conv1D .* bitsandbytes' Linear4bit and Linear8bitLt"):
        get_peft_model(model, DualLoraConfig(target_modules=["q_proj", "embed_tokens"]))
    assert_unchanged(model, snap)


TORCHAO_REFUSAL = """
import torch
from conftest import tiny_llama
from peft import get_peft_model
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from duallora import D2LoraConfig, DualLoraConfig

model = tiny_llama()
quantize_(model.model.layers[0].self_attn, Int8WeightOnlyConfig())
weight = model.model.layers[0].self_attn.q_proj.weight
assert type(weight).__module__.startswith("torchao"), type(weight)
types = [type(m) for m in model.modules()]
for config_cls in (DualLoraConfig, D2LoraConfig):
    try:
        get_peft_model(model, config_cls(target_modules=["q_proj", "v_proj"]))
    except TypeError as err:
        print("REFUSED", err)
    assert [type(m) for m in model.modules()] == types  # nothing replaced
    assert model.model.layers[0].self_attn.q_proj.weight is weight  # torchao's tensors have no equal()
"""


@pytest.mark.slow
def test_a_torchao_quantized_base_is_refused_by_name_and_changes_nothing(tmp_path):
    """A quantized layer of a kind no reader here knows (torchao's, as GPTQ, AWQ or HQQ ones) keeps its nn.Linear type
    but holds a packed weight: refused with the class, what is supported and what to do, before any change. torchao
    is installed for this test only (into a folder of its own): installed beside peft, every import of peft would
    import it."""
    import subprocess
    import sys
    from pathlib import Path

    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path),
                              "torchao==0.18.0"], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    tests = Path(__file__).parent
    run = subprocess.run([sys.executable, "-c", TORCHAO_REFUSAL], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}:{tests}"})
    assert run.returncode == 0, run.stderr[-3000:]
    refusals = [line for line in run.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refusals) == 2, run.stdout
    for line in refusals:
        assert re.search(r"model\.layers\.0\.self_attn\.q_proj.*torch\.nn\.modules\.linear\.Linear.*quantized "
                         r"weight of a kind .* cannot read.*bitsandbytes .*Linear4bit", line), line


def _saved_adapter(tmp_path, config):
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config", [DualLoraConfig(target_modules=["q_proj", "up_proj"]),
                                    D2LoraConfig(target_modules=["q_proj", "up_proj"])])
def test_adapter_for_other_shapes_names_layer_and_both_shapes(config, tmp_path):
    path = _saved_adapter(tmp_path, config)
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.up_proj' has weight shape \(out=48, in=32\).*"
                                         r"made for a layer with out=64"):
        PeftModel.from_pretrained(other, path)
    assert_unchanged(other, snap)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_adapter_file_is_refused_and_the_model_is_untouched(damage, tmp_path):
    path = _saved_adapter(tmp_path, DualLoraConfig(target_modules=["q_proj"]))
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x00garbage" + data[10:])
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is corrupt or truncated.*model was not changed"):
        PeftModel.from_pretrained(model, path)
    assert_unchanged(model, snap)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_corrupt_file_through_load_adapter_keeps_the_existing_adapter(tmp_path):
    good = get_peft_model(tiny_llama(), DualLoraConfig(target_modules=["q_proj"]))
    path = _saved_adapter(tmp_path, DualLoraConfig(target_modules=["q_proj"]))
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    snap = snapshot(good)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        good.load_adapter(str(path), adapter_name="broken")
    assert_unchanged(good, snap)


@pytest.mark.parametrize("config_cls", [DualLoraConfig, D2LoraConfig])
def test_a_zero3_partition_that_was_not_gathered_is_refused_in_forward_and_merge(config_cls):
    """What DeepSpeed ZeRO-3 leaves outside a gather (and under torch.compile, whose tracing its getter does not
    gather in): an empty placeholder and the full shape in ``ds_shape``. The real ZeRO-3 run is in
    tests/test_deepspeed.py; here the placeholder is made by hand, as DeepSpeed makes it, to reach both refusals."""
    model = get_peft_model(tiny_llama(), config_cls(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight
    whole = weight.data
    weight.ds_shape, weight.data = whole.shape, torch.empty(0)
    placeholder = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    before = {k: v.clone() for k, v in model.state_dict().items() if k != placeholder}
    with pytest.raises(RuntimeError, match=r"ZeRO-3 partition that was not gathered .*without torch\.compile"):
        model(torch.zeros(1, 4, dtype=torch.long))
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(RuntimeError, match=r"(?s)needs the whole weights.*q_proj\.base_layer\.weight.*Nothing was "
                                               r"changed.*GatheredParameters"):
            merge()
    assert not layer.merged and all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
    weight.data = whole  # gathered: both work again
    del weight.ds_shape
    model.merge_adapter()
    assert layer.merged
