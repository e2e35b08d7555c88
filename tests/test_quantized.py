"""Dual LoRA and D2-LoRA on bitsandbytes 4-bit and 8-bit bases (QLoRA-style), run on this CPU with real bnb layers.

The reference for every check is the same adapter on a dense model whose Linear weights are peft's own
dequantization of the quantized ones (``peft.utils.integrations.dequantize_bnb_weight``): on a quantized base the
adapted model must compute exactly what it computes on ``W0 = dequant(Q)``, up to float32 reordering.
"""

import pytest
import torch
from conftest import METHODS, assert_float32_close
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils.integrations import dequantize_bnb_weight
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from duallora.core.layer import AdaptedLayer

bnb = pytest.importorskip("bitsandbytes")  # the `quantized` extra; CI installs it with the test extra

QUANTIZATIONS = {
    "nf4-double": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True),
    "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}
QUANTIZED_CLASS = {"nf4-double": "Linear4bit", "nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}
# 12 rows of a 64-wide float32 block: several row blocks per layer, cut at rows that are not a power of two
SMALL_BLOCKS = 12 * 64 * 4 / 2**20


def llama_config(hidden: int) -> LlamaConfig:
    """A tiny LLaMA whose widths are whole 4-bit quantization blocks (64 values) at hidden=64, or not at 32."""
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for hidden in (64, 32):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"llama{hidden}")
        LlamaForCausalLM(llama_config(hidden)).save_pretrained(path)
        paths[hidden] = path
    return paths


def quantized_base(path, quantization: str):
    return LlamaForCausalLM.from_pretrained(path, quantization_config=QUANTIZATIONS[quantization]())


def as_held_after_the_repack(layer) -> torch.Tensor:
    """What a 4-bit weight holds once repacked, by bitsandbytes' own dequantization: its codes times its absmax
    rounded to bfloat16 (the repacking stores the absmax so, and its kernel computes with it)."""
    state = layer.weight.quant_state
    absmax = state.absmax.float()
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    rounded = bnb.functional.QuantState(absmax=absmax.float().bfloat16().float(), shape=state.shape, code=state.code,
                                        blocksize=state.blocksize, quant_type=state.quant_type, dtype=torch.float32)
    return bnb.functional.dequantize_4bit(layer.weight.data, rounded).float()


def as_read(layer) -> torch.Tensor:
    """What the adapted layer reads as W0: peft's dequantization of the weight, with the absmax rounded to bfloat16
    where bitsandbytes repacks for its AVX512-BF16 CPU kernel (its flag, set by bitsandbytes from the CPU or by hand
    in a test: both paths are checked on every machine)."""
    if type(layer).__name__ == "Linear4bit" and layer.support_avx512bf16_for_cpu:
        return as_held_after_the_repack(layer)
    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()


def dequantized_twin(quantized: torch.nn.Module, path) -> torch.nn.Module:
    """The dense model whose every Linear weight is the quantized model's W0 as the adapted layers read it."""
    dense = LlamaForCausalLM.from_pretrained(path)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in dense.named_modules():
            q = modules[name]
            if type(q).__name__ in ("Linear4bit", "Linear8bitLt"):
                m.weight.copy_(as_read(q))
    return dense


def with_adapter(model, method, seed=1, **kw):
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, METHODS[method](r=4, lora_alpha=8, target_modules="all-linear", **kw))
    with torch.no_grad():  # trained-looking factors, so that dW != 0 and every gradient is non-trivial
        for name, p in peft_model.named_parameters():
            if "_lora_" in name:
                p.normal_(0, 0.1)
    return peft_model


def copy_adapter(source, target):
    own = {n: p for n, p in source.named_parameters() if "_lora_" in n}
    with torch.no_grad():
        for n, p in target.named_parameters():
            if "_lora_" in n:
                p.copy_(own[n])


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def adapted_layers(model):
    return [m for m in model.modules() if isinstance(m, AdaptedLayer)]


IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
@pytest.mark.parametrize("hidden", [64, 32])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_on_a_quantized_base_outputs_and_factor_gradients_equal_the_adapter_on_the_dequantized_weight(
        checkpoints, method, quantization, hidden, memory_efficient):
    quantized = quantized_base(checkpoints[hidden], quantization)
    assert type(quantized.model.layers[0].mlp.down_proj).__name__ == QUANTIZED_CLASS[quantization]
    dense = dequantized_twin(quantized, checkpoints[hidden])
    kw = dict(memory_efficient=memory_efficient, block_mib=SMALL_BLOCKS)
    on_quantized, on_dense = with_adapter(quantized, method, **kw), with_adapter(dense, method, **kw)
    copy_adapter(on_quantized, on_dense)
    on_quantized.train(), on_dense.train()
    loss_q, grads_q = loss_and_grads(on_quantized, IDS)
    loss_d, grads_d = loss_and_grads(on_dense, IDS)
    assert grads_q.keys() == grads_d.keys() and len(grads_d) == 2 * 7 * 4  # every factor of every layer
    assert_float32_close(loss_q, loss_d)
    for name in grads_d:
        assert_float32_close(grads_q[name], grads_d[name], msg=name)
    on_quantized.eval(), on_dense.eval()
    with torch.no_grad():
        assert_float32_close(on_quantized(input_ids=IDS).logits, on_dense(input_ids=IDS).logits)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_the_memory_efficient_path_dequantizes_one_row_block_at_a_time(checkpoints, method, monkeypatch):
    """The block_mib bound holds for a 4-bit W0: forward and backward never dequantize a whole weight."""
    model = with_adapter(quantized_base(checkpoints[64], "nf4-double"), method, block_mib=SMALL_BLOCKS)
    seen = []
    dequantize = bnb.functional.dequantize_4bit

    def recording(A, quant_state=None, *args, **kwargs):
        out = dequantize(A, quant_state, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", recording)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert seen, "the 4-bit weights were never read"
    widest = {64: 12, 128: 6}  # rows per block = SMALL_BLOCKS // (in * 4 bytes)
    assert all(rows <= widest[cols] for rows, cols in seen), sorted(set(seen))


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_disabling_the_adapter_gives_the_quantized_base_and_several_adapters_compose(checkpoints, method):
    quantized = quantized_base(checkpoints[64], "nf4-double")
    # the twin first: bitsandbytes' own eval-mode call below repacks 4-bit weights on AVX512-BF16 CPUs, and peft's
    # dequantize_bnb_weight would misread them afterwards (the repacked reading is the next test's)
    dense = dequantized_twin(quantized, checkpoints[64])
    with torch.no_grad():
        base_logits = quantized_base(checkpoints[64], "nf4-double")(input_ids=IDS).logits  # the same bytes, unadapted
    models = [with_adapter(quantized, method), with_adapter(dense, method)]
    copy_adapter(*models)
    for model in models:
        # every layer: a layer without an active adapter runs bitsandbytes' own kernel, which under no_grad on
        # this CPU is not x dequant(W)^T (it differs by ~1e-3); the adapted path always is
        model.add_adapter("second", METHODS[method](r=2, lora_alpha=4, target_modules="all-linear"))
    copy_adapter(models[0], models[1])  # also the second adapter's factors
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "_lora_" in name and ".second" in name:
                    p.copy_(torch.linspace(-0.2, 0.2, p.numel()).reshape(p.shape))
        for active in (["second"], ["default", "second"]):
            outputs = []
            for model in models:
                model.base_model.set_adapter(active)
                outputs.append(model(input_ids=IDS).logits)
            assert_float32_close(*outputs, msg=str(active))
        assert not torch.allclose(outputs[0], base_logits, atol=1e-3)
        with models[0].disable_adapter():
            assert torch.equal(models[0](input_ids=IDS).logits, base_logits)


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_mixed_batches_on_a_quantized_base_give_each_row_its_adapter(checkpoints, method, quantization):
    model = with_adapter(quantized_base(checkpoints[64], quantization), method)
    model.add_adapter("second", METHODS[method](r=2, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".second" in name:
                p.copy_(torch.linspace(-0.2, 0.2, p.numel()).reshape(p.shape))
    model.eval()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(4))
    names = ["second", "__base__", "default"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":  # bitsandbytes' own kernel, in both
                with model.disable_adapter():
                    alone = model(input_ids=ids[i:i + 1]).logits
            else:
                model.base_model.set_adapter(name)
                alone = model(input_ids=ids[i:i + 1]).logits
            assert_float32_close(mixed[i:i + 1], alone, msg=name)


def repack_for_the_cpu_kernel(model) -> None:
    """Every 4-bit weight in bitsandbytes' AVX512-BF16 CPU layout: by bitsandbytes' own eval-mode forward where this
    CPU has the kernel, else by the same conversion applied by hand (so both layouts are read on every machine)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    if bnb.functional.has_avx512bf16():
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=IDS)
    for m in model.modules():
        if type(m).__name__ == "Linear4bit" and not getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_saving_a_repacked_4bit_model_leaves_its_weights_as_they_were(checkpoints, method, tmp_path):
    """bitsandbytes 0.50's ``state_dict()`` undoes its CPU repacking but leaves a non-nested absmax transposed (a
    down_proj 64 x 128 has two absmax per row, so the order matters); the adapted layers put it back, so outputs
    after a save equal those before (peft's LoRA on such a base: 8 % off after its own save)."""
    model = with_adapter(quantized_base(checkpoints[64], "nf4"), method).eval()
    repack_for_the_cpu_kernel(model)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    states = [m.weight.quant_state for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert not any(s.packing_format_for_cpu for s in states)  # the save undid the repacking
    assert all(s.absmax.dim() == 1 for s in states)
    with torch.no_grad():
        assert_float32_close(model(input_ids=IDS).logits, before)


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("quantization", ["nf4-double", "nf4"])
@pytest.mark.parametrize("repacking_cpu", [True, False])
def test_outputs_do_not_depend_on_a_base_only_call_before(checkpoints, method, quantization, repacking_cpu,
                                                           tmp_path):
    """A base-only eval call (``disable_adapter()``, TRL's reference pass) makes bitsandbytes repack a 4-bit weight
    on an AVX512-BF16 CPU, rounding its absmax to bfloat16. The adapter's outputs are the same before and after it,
    and an adapter saved after it gives the same outputs on a fresh base (0.2 moved by 0.003 and 2.3e-3). Both
    CPUs on every machine: bitsandbytes' flag set by hand, and the repack applied by hand (its own kernel is not
    run where the CPU lacks it)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    def base():
        model = quantized_base(checkpoints[64], quantization)
        for m in model.modules():
            if type(m).__name__ == "Linear4bit":
                m.support_avx512bf16_for_cpu = repacking_cpu
        return model

    model = with_adapter(base(), method).eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        if repacking_cpu:  # what the base-only eval call does on such a CPU
            for m in model.modules():
                if type(m).__name__ == "Linear4bit":
                    m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data,
                                                                                         m.weight.quant_state)
        else:
            with model.disable_adapter():
                model(input_ids=IDS)
        after = model(input_ids=IDS).logits
        # the same W0 in either layout; only the row blocks differ (tiles of 32 rows once repacked), which reorders
        # no sum within a row
        assert_float32_close(after, before)
        model.save_pretrained(tmp_path)
        reloaded = PeftModel.from_pretrained(base(), tmp_path).eval()
        assert_float32_close(reloaded(input_ids=IDS).logits, before)
        if repacking_cpu and not bnb.functional.has_avx512bf16():
            return  # bitsandbytes' own forward would run its AVX512-BF16 kernel on a repacked weight
        with model.disable_adapter():
            assert (after - model(input_ids=IDS).logits).abs().max() > 1e-3  # the adapter acts: the test can fail


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("quantization", ["nf4-double", "nf4"])
def test_a_4bit_weight_repacked_for_the_cpu_kernel_is_read_as_bitsandbytes_holds_it(checkpoints, method,
                                                                                    quantization):
    """Once bitsandbytes repacks a 4-bit weight (any eval-mode call of the base layer on an AVX512-BF16 CPU, e.g.
    under disable_adapter), outputs, gradients and merges are those of the dense model holding what bitsandbytes
    now holds, as before the repack they were those of the weight it held then."""
    quantized = quantized_base(checkpoints[64], quantization)
    held = {name: as_held_after_the_repack(m) for name, m in quantized.named_modules()
            if type(m).__name__ == "Linear4bit"}
    before, after = dequantized_twin(quantized, checkpoints[64]), LlamaForCausalLM.from_pretrained(checkpoints[64])
    with torch.no_grad():
        for name, m in after.named_modules():
            if name in held:
                m.weight.copy_(held[name])
    models = [with_adapter(m, method) for m in (quantized, before, after)]
    copy_adapter(models[0], models[1]), copy_adapter(models[0], models[2])
    for model in models:
        model.eval()
    with torch.no_grad():
        logits_before = models[0](input_ids=IDS).logits  # through the adapted layers only: nothing repacked yet
        assert_float32_close(logits_before, models[1](input_ids=IDS).logits)
    repack_for_the_cpu_kernel(models[0])
    layers = dict(models[0].named_modules())
    for name, wanted in held.items():
        layer = layers["base_model.model." + name]
        assert layer.get_base_layer().weight.quant_state.packing_format_for_cpu, name
        assert torch.equal(layer.base.full(), wanted), name
        # the repack moved W0 by the bfloat16 rounding of its absmax only: half a bf16 ulp, 2^-8 relative
        w0 = dict(models[1].named_modules())["base_model.model." + name].base.full()
        assert ((wanted - w0).abs() <= 2.0**-8 * w0.abs()).all(), name
    with torch.no_grad():
        assert_float32_close(models[0](input_ids=IDS).logits, models[2](input_ids=IDS).logits)
    models[0].train(), models[2].train()
    loss_q, grads_q = loss_and_grads(models[0], IDS)
    loss_d, grads_d = loss_and_grads(models[2], IDS)
    assert_float32_close(loss_q, loss_d)
    for name in grads_d:
        assert_float32_close(grads_q[name], grads_d[name], msg=name)
    models[0].eval(), models[2].eval()
    # a merge into the repacked base requantizes in bitsandbytes' own layout; unmerge puts the repacked weight back
    repacked, expected = packed(models[0]), models[2](input_ids=IDS).logits.detach()
    with pytest.warns(UserWarning, match="quantized again"):
        models[0].merge_adapter()
    models[0].unmerge_adapter()
    assert_same_packed(packed(models[0]), repacked)
    with torch.no_grad():
        assert_float32_close(models[0](input_ids=IDS).logits, expected)
    merged = models[0].merge_and_dequantize(dtype=torch.float32)
    with torch.no_grad():
        assert_float32_close(merged(input_ids=IDS).logits, models[2].merge_and_unload()(input_ids=IDS).logits)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_a_4bit_weight_that_fsdp_replaced_by_a_plain_parameter_is_read_with_the_modules_state(checkpoints, method):
    """FSDP's flat-parameter views are plain Parameters without ``quant_state``; bitsandbytes keeps the state on the
    module for that case, and the adapters read it there (before: "object has no attribute 'base'")."""
    model = with_adapter(quantized_base(checkpoints[64], "nf4"), method).eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    for m in layers:
        m.weight = torch.nn.Parameter(m.weight.data, requires_grad=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)
    del layers[0].quant_state  # neither on the weight nor on the module: the error says so, under its own name
    with pytest.raises(ValueError, match=r"Linear4bit has not been quantized yet"):
        model(input_ids=IDS)


def packed(model):
    """Every quantized weight's stored values (4-bit bytes and absmax, or int8 rows and their scales)."""
    out = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "Linear4bit":
            out[name] = (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
        elif type(m).__name__ == "Linear8bitLt":
            out[name] = (m.weight.data.clone(), (m.weight.SCB if m.weight.SCB is not None else m.state.SCB).clone())
    return out


def assert_same_packed(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert all(torch.equal(a, b) for a, b in zip(got[name], expected[name])), name


def requantization_bound(quantization: str) -> float:
    """The most that rounding to the nearest code can move a weight, relative to the largest weight: half the widest
    gap between neighbouring NF4 codes (of a block's absmax, itself at most the largest weight), or half a step of
    int8's 127 per row's absmax after the float16 cast that LLM.int8() quantizes from (2^-11 of the row's absmax)."""
    if quantization == "int8":
        return 0.5 / 127 + 2.0**-11
    code = bnb.functional.get_4bit_type("nf4", device="cpu").sort().values
    return (code.diff().max() / 2).item() * (1 + 4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_merge_requantizes_reports_the_rounding_and_unmerge_restores_the_quantized_weight(
        checkpoints, method, quantization):
    model = with_adapter(quantized_base(checkpoints[64], quantization), method).eval()
    before = packed(model)
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
        exact = {layer: layer.base.full() + layer.delta_weight("default") for layer in adapted_layers(model)}
    with pytest.warns(UserWarning, match=r"quantized again, moving them by up to \d+\.\d+% .*merge_and_dequantize"):
        model.merge_adapter()
    for layer, wanted in exact.items():
        # the requantized weight is the merged one rounded to 4 or 8 bits, by the error the layer reports
        err = ((layer.base.full() - wanted).abs().max() / wanted.abs().max()).item()
        assert layer.rounding_error == pytest.approx(err, rel=1e-6)
        assert 0 < layer.rounding_error <= requantization_bound(quantization)
    with torch.no_grad():
        merged = model(input_ids=IDS).logits
    assert not torch.equal(merged, adapted)
    model.unmerge_adapter()
    assert_same_packed(packed(model), before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, adapted)


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("quantization", ["nf4-double", "int8"])
def test_merge_and_dequantize_gives_a_dense_model_with_the_adapters_outputs(checkpoints, method, quantization):
    model = with_adapter(quantized_base(checkpoints[64], quantization), method).eval()
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
    merged = model.merge_and_dequantize(dtype=torch.float32)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    assert not getattr(merged.config, "quantization_config", None)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert_float32_close(merged(input_ids=IDS).logits, adapted)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_safe_merge_on_a_quantized_base_refuses_a_nan_factor_and_leaves_the_weights(checkpoints, method):
    model = with_adapter(quantized_base(checkpoints[64], "nf4-double"), method)
    before = packed(model)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.factors("default")[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: .*holds NaN/Inf"):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(ValueError, match=r"holds NaN/Inf"):
        model.merge_and_dequantize(safe_merge=True)
    assert_same_packed(packed(model), before)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_kbit_training_trains_the_factors_saves_the_adapter_alone_and_reloads_on_a_quantized_base(
        checkpoints, method, tmp_path):
    """The QLoRA recipe: prepare_model_for_kbit_training, a few AdamW steps, save_pretrained, from_pretrained."""
    base = prepare_model_for_kbit_training(quantized_base(checkpoints[64], "nf4-double"),
                                           use_gradient_checkpointing=True)
    torch.manual_seed(1)
    model = get_peft_model(base, METHODS[method](r=4, lora_alpha=8, target_modules="all-linear"))
    before, start = packed(model), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert_same_packed(packed(model), before)  # the base stays as it was
    model.save_pretrained(tmp_path)
    saved = {f.name for f in tmp_path.iterdir()}
    assert saved == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 200_000  # factors only, no base weight
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        reloaded = PeftModel.from_pretrained(quantized_base(checkpoints[64], "nf4-double"), tmp_path).eval()
        assert_float32_close(reloaded(input_ids=IDS).logits, expected)


def test_unquantized_bitsandbytes_layers_and_old_bitsandbytes_get_errors_that_say_what_to_do(checkpoints,
                                                                                            monkeypatch):
    from duallora.core import base_weight

    with pytest.raises(ValueError, match=r"has_fp16_weights=True .*load_in_8bit=True"):
        get_peft_model(torch.nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True)),
                       METHODS["dual"](target_modules=["0"]))
    with pytest.raises(ValueError, match=r"Linear4bit has not been quantized yet .*quantization_config"):
        get_peft_model(torch.nn.Sequential(bnb.nn.Linear4bit(64, 64)), METHODS["d2"](target_modules=["0"]))
    monkeypatch.setattr(bnb, "__version__", "0.44.1")
    base_weight._bitsandbytes_version.cache_clear()
    try:
        with pytest.raises(ImportError,
                           match=r"bitsandbytes 0\.44\.1 is too old .*>= 0\.45\.0.*duallora\[quantized\]"):
            get_peft_model(quantized_base(checkpoints[64], "nf4-double"), METHODS["dual"](target_modules=["q_proj"]))
    finally:
        monkeypatch.undo()
        base_weight._bitsandbytes_version.cache_clear()



@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("repacking_cpu", [True, False])
def test_row_blocks_of_a_4bit_weight_equal_its_whole_dequantization(double_quant, repacking_cpu):
    """A 512 x 256 NF4 weight: 2048 absmax values, with double quantization in 8 second-level blocks of 256. Rows
    read at cuts that fall inside first- and second-level blocks are, bitwise, the rows of bitsandbytes' own
    dequantization of the whole weight (the same elementwise arithmetic on each element), with the absmax rounded to
    bfloat16 where bitsandbytes repacks for its CPU kernel (its flag, set by hand: both CPUs on every machine)."""
    from duallora.core.base_weight import base_weight_of

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 512, bias=False, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(512, 256), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant).to("cpu")
    layer.support_avx512bf16_for_cpu = repacking_cpu
    assert layer.weight.quant_state.nested == double_quant
    whole = as_read(layer)
    reader = base_weight_of(layer)
    for cut in ([0, 512], [0, 3, 67, 130, 257, 512], list(range(0, 513, 64))):
        rows = torch.cat([reader.rows(slice(a, b), torch.float32) for a, b in zip(cut, cut[1:])])
        assert torch.equal(rows, whole), cut


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_inspect_reads_a_quantized_lora_base_as_the_weight_it_dequantizes_to(checkpoints, quantization):
    from peft import LoraConfig

    from duallora.app.inspect import inspect_peft

    model = quantized_base(checkpoints[64], quantization)
    expected = {name: dequantize_bnb_weight(m.weight, state=getattr(m, "state", None)).float()
                for name, m in model.named_modules() if type(m).__name__ == QUANTIZED_CLASS[quantization]}
    rows = inspect_peft(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    assert {row["layer"].removeprefix("base_model.model.") for row in rows} == set(expected)
    for row in rows:  # the packed bytes would give another norm and shape
        w0 = expected[row["layer"].removeprefix("base_model.model.")]
        assert row["shape"] == list(w0.shape) and row["norm_W0"] == pytest.approx(w0.norm().item(), rel=1e-6)
