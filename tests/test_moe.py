"""Both methods on mixture-of-experts models whose experts are 3-D parameters (``target_parameters``): tiny Mixtral
and Qwen3-MoE (experts stored (experts, out, in)) and gpt-oss ((experts, in, out), with expert biases).

The reference is independent of the wrappers: each expert's adapted matrix from the methods' pure functions, one
expert at a time, put into the bare base model with ``torch.func.functional_call``."""

import copy
import warnings

import pytest
import torch
from conftest import EXPERTS, METHODS, MOE_MODELS, assert_float32_close, tiny_moe, trained_like
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from duallora import D2LoraConfig, DualLoraConfig
from duallora.core.param_wrapper import AdaptedParameter
from duallora.d2.maths import d2_weight, frozen_unit_norm
from duallora.dual.maths import dual_delta_weight
from duallora.dual.warmup import warmup_steps_taken

IDS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))


def adapted(kind, method, seed=0, **kw):
    kw.setdefault("target_modules", [])
    kw.setdefault("target_parameters", EXPERTS)
    return trained_like(get_peft_model(tiny_moe(kind, seed), METHODS[method](r=4, **kw)))


def wrappers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedParameter)}


def reference_weight(wrapper, adapter="default"):
    """``f(W0)`` of every expert, one at a time, from the pure functions; in the stored layout; differentiable in
    the factors."""
    w0 = wrapper.get_base_layer()._parameters[wrapper.parameter_name].detach()
    w0 = w0.mT if wrapper.transposed else w0
    factors = wrapper.factors(adapter)
    experts = []
    for e in range(w0.shape[0]):
        f = [t[e] for t in factors]
        if hasattr(wrapper, "dual_options"):
            o = wrapper.dual_options[adapter]
            w = w0[e] + dual_delta_weight(*f, wrapper.warmup_coef(adapter), o.magnitude_activation,
                                          o.direction_activation, o.ste)
        else:
            o = wrapper.d2_options[adapter]
            norm = frozen_unit_norm(w0[e], o.norm_axis, [slice(0, w0.shape[1])])
            w = d2_weight(w0[e], *f, o.scaling, o.tau, norm, o.norm_axis, o.detach_norm)
        experts.append(w)
    stack = torch.stack(experts)
    return stack.mT if wrapper.transposed else stack


def reference_logits(peft_model, base):
    params = {}
    for name, wrapper in wrappers(peft_model).items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        params[f"{key}.{wrapper.parameter_name}"] = reference_weight(wrapper)
    return torch.func.functional_call(base, params, (IDS,)).logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", MOE_MODELS)
def test_trainable_count_is_loras_and_twice_for_d2(kind, method):
    lora = get_peft_model(tiny_moe(kind), LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    ours = get_peft_model(tiny_moe(kind), METHODS[method](r=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    count = lora.get_nb_trainable_parameters()[0]
    assert ours.get_nb_trainable_parameters()[0] == (count if method == "dual" else 2 * count)
    # each expert its own factors: a leading experts dimension
    for wrapper in wrappers(ours).values():
        assert all(f.shape[0] == 4 for f in wrapper.factors("default"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", MOE_MODELS)
def test_forward_and_gradients_match_the_per_expert_reference(kind, method):
    model = adapted(kind, method).train()
    base = tiny_moe(kind).train()
    logits = model(IDS).logits
    expected = reference_logits(model, base)
    assert_float32_close(logits, expected)
    factors = [p for n, p in model.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(logits.square().mean(), factors)
    want = torch.autograd.grad(expected.square().mean(), factors)
    for g, w in zip(got, want):
        assert_float32_close(g, w)
    assert all(g.abs().sum() > 0 for g in got)
    assert (logits - base(IDS).logits).abs().max() > 1e-3  # the experts were adapted


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", MOE_MODELS)
def test_merge_unmerge_and_merge_and_unload_give_a_plain_moe(kind, method):
    model = adapted(kind, method, target_modules=["q_proj"])
    model.eval()
    with torch.no_grad():
        unmerged = model(IDS).logits
        model.merge_adapter()
        merged = model(IDS).logits
        model.unmerge_adapter()
        again = model(IDS).logits
    assert_float32_close(merged, unmerged)
    assert_float32_close(again, unmerged)
    w0 = dict(tiny_moe(kind).named_parameters())
    for name, wrapper in wrappers(model).items():  # unmerge restored each W0 itself, within float32 rounding
        key = f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}.{wrapper.parameter_name}"
        assert_float32_close(wrapper.get_base_layer()._parameters[wrapper.parameter_name], w0[key])
    plain = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert type(plain.model.layers[0].mlp.experts).__module__.startswith("transformers.")
    with torch.no_grad():
        assert_float32_close(plain(IDS).logits, unmerged)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_are_exact_with_the_warmup_clock(tmp_path, method):
    kw = {"warmup_steps": 5} if method == "dual" else {}
    model = adapted("gpt_oss", method, **kw).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_moe("gpt_oss"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)
    if method == "dual":
        assert warmup_steps_taken(loaded) == 2
    assert loaded.peft_config["default"].target_parameters is not None


@pytest.mark.parametrize("method", METHODS)
def test_several_adapters_disable_adapter_and_mixed_batches(method):
    model = adapted("mixtral", method, target_modules=["q_proj"])
    model.add_adapter("other", METHODS[method](r=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    trained_like(model, std=0.2)
    model.eval()
    outputs = {}
    with torch.no_grad():
        for name in ("default", "other"):
            model.set_adapter(name)
            outputs[name] = model(IDS).logits
        with model.disable_adapter():
            outputs["__base__"] = model(IDS).logits
        base = tiny_moe("mixtral")(IDS).logits
        assert_float32_close(outputs["__base__"], base)
        assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
        names = ["other", "__base__", "default"]
        mixed = model(IDS, adapter_names=names).logits
    for row, name in enumerate(names):
        assert_float32_close(mixed[row], outputs[name][row])
        generated = model.generate(input_ids=IDS[:2], adapter_names=names[:2], max_new_tokens=3, do_sample=False)
        model.set_adapter("other")
        assert torch.equal(generated[0], model.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False)[0])
        with model.disable_adapter():
            assert torch.equal(generated[1], model.generate(input_ids=IDS[1:2], max_new_tokens=3, do_sample=False)[0])


def tiny_llama4(seed: int = 0) -> nn.Module:
    """A tiny Llama-4 text model: its experts see every token once per expert, expert-major
    (``hidden.repeat(experts, 1)``), and compute ``x @ W[e]``; its router is a Linear subclass with a forward of its
    own; its shared expert's Linears see the tokens flattened, ``(batch * seq, hidden)``."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, intermediate_size_mlp=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1))
    for module in model.modules():
        if type(module).__name__ == "Llama4TextExperts":
            module.is_transposed = True  # what the layout refusal asks for: the module computes x @ W[e]
            for stack in (module.gate_up_proj, module.down_proj):
                nn.init.normal_(stack, std=0.2)  # down_proj is torch.empty in transformers' __init__
    return model.eval()


def each_row_as_its_adapter(model, base_logits, names):
    """The mixed batch's logits equal, row by row, the logits of the row's adapter run alone (``__base__``: the
    bare base model's), and a mixed generate the per-adapter generates."""
    outputs = {"__base__": base_logits}
    with torch.no_grad():
        for name in set(names) - {"__base__"}:
            model.set_adapter(name)
            outputs[name] = model(IDS).logits
        assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3  # the adapters differ: the test can fail
        mixed = model(IDS, adapter_names=names).logits
        for row, name in enumerate(names):
            assert_float32_close(mixed[row], outputs[name][row])
        generated = model.generate(input_ids=IDS[:2], adapter_names=names[:2], max_new_tokens=3, do_sample=False)
        for row, name in enumerate(names[:2]):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=IDS[row:row + 1], max_new_tokens=3, do_sample=False)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=IDS[row:row + 1], max_new_tokens=3, do_sample=False)
            assert torch.equal(generated[row], alone[0]), name


@pytest.mark.parametrize("method", METHODS)
def test_llama4_expert_major_experts_router_and_shared_expert_in_mixed_batches(method):
    """Llama-4 hands its experts the tokens expert-major and its shared expert token-major: each mixed-batch row is
    its adapter's, ``__base__`` rows the base model's (before: every row wrong, or a length error)."""
    config = dict(r=4, target_modules=["q_proj", "gate_proj"], target_parameters=[*EXPERTS, "router.weight"])
    model = get_peft_model(tiny_llama4(), METHODS[method](**config))
    model.add_adapter("other", METHODS[method](**config))
    trained_like(model, std=0.2)
    assert {type(m.get_base_layer()).__name__ for m in wrappers(model).values()} == {"Llama4TextExperts",
                                                                                     "Llama4Router"}
    with torch.no_grad():
        base = tiny_llama4()(IDS).logits
    each_row_as_its_adapter(model.eval(), base, ["other", "__base__", "default"])


@pytest.mark.parametrize("method", METHODS)
def test_qwen2_moe_shared_expert_linears_in_mixed_batches(method):
    """Qwen2-MoE's shared expert is a Linear MLP on the flattened tokens: a mixed batch splits them by row (LoRA and
    0.2 stopped with a length error that counted tokens as inputs)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    def base():
        torch.manual_seed(0)
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(
            hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=1,
            shared_expert_intermediate_size=24, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
            num_experts=4, num_experts_per_tok=2)).eval()

    config = dict(r=4, target_modules=["q_proj", "shared_expert.gate_proj", "shared_expert.down_proj",
                                       "shared_expert_gate"], target_parameters=["mlp.experts.gate_up_proj"])
    model = get_peft_model(base(), METHODS[method](**config))
    model.add_adapter("other", METHODS[method](**config))
    trained_like(model, std=0.2)
    assert any("shared_expert." in name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    with torch.no_grad():
        base_logits = base()(IDS).logits
    each_row_as_its_adapter(model.eval(), base_logits, ["default", "other", "__base__"])


@pytest.mark.parametrize("length", [9, 2])
def test_adapter_names_are_checked_against_the_batch_with_expert_adapters_only(length):
    """With adapters on expert stacks alone no Linear checks the names' count; 9 names for 3 rows of 9 tokens used
    to split the 27 tokens into 9 runs, silently. LoRA's message."""
    model = adapted("mixtral", "dual").eval()
    model.add_adapter("other", DualLoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    names = (["default", "other", "__base__"] * 3)[:length]
    with torch.no_grad(), pytest.raises(ValueError, match=f"Length of `adapter_names` should be the same as the "
                                                          f"number of inputs, but got {length} and 3 respectively"):
        model(IDS, adapter_names=names)


def test_a_layer_whose_input_fits_no_layout_is_refused_naming_the_counts():
    from duallora.core.mixed_batch import RowAdapters, input_layout, layout_error

    assert input_layout(27, 3, 27, 4) == "tokens" and input_layout(108, 3, 27, 4) == "expert-major"
    assert input_layout(3, 3, 27, 4) == "rows" and input_layout(11, 3, 27, 4) is None  # 11: tokens routed to it
    names = RowAdapters(["a", "b", "c"])
    names.tokens = 27
    message = str(layout_error("an expert Linear", 11, names, 4))
    assert "received 11 input rows, while the model's input holds 27 tokens in 3 rows" in message
    assert "Expected 3 (one per row) or 27 (one per token) or 108 (one per expert and token)" in message
    assert "model.set_adapter(name)" in message


def test_a_linear_subclass_with_a_forward_of_its_own_is_refused_naming_target_parameters():
    """Llama-4's router computes top-k and a sigmoid after x W^T: an adapted layer would drop them (LoRA crashes on
    the tuple it returns). Refused before the model changes; its weight can be adapted instead (above)."""
    assert_refused(tiny_llama4(), DualLoraConfig(target_modules=["router"]),
                   r"Llama4Router, whose forward does more than x W\^T \+ b.*"
                   r"target_parameters=\['model\.layers\.0\.feed_forward\.router\.weight'\]")


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method):
    grads = []
    for checkpointing in (False, True):
        model = adapted("qwen3_moe", method).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(IDS, labels=IDS).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert_float32_close(b, a)


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_model_trains_its_experts(method):
    """A bf16 model computes with bf16 expert weights, as without the adapter: each expert's f(W0) is built in
    float32 from float32 factors and rounded to bf16 once, so it is the reference rounded (half a bf16 ulp, 2^-9 of
    the largest weight, plus the float32 reordering). The factors stay float32, get gradients, and the loss falls."""
    model = adapted("mixtral", method).to(torch.bfloat16).train()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    for wrapper in wrappers(model).values():
        built = wrapper.adapted_parameter(["default"])
        assert built.dtype == torch.bfloat16
        expected = reference_weight(wrapper)
        torch.testing.assert_close(built.float(), expected, rtol=0, atol=2.0**-8 * expected.abs().max().item())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=IDS).loss
        assert loss.dtype == torch.float32 or loss.dtype == torch.bfloat16
        loss.backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in model.parameters() if p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", METHODS)
def test_safe_merge_refuses_a_broken_expert_adapter_untouched(method):
    model = adapted("mixtral", method)
    wrapper = next(iter(wrappers(model).values()))
    with torch.no_grad():
        wrapper.factors("default")[0][2, 0, 0] = float("nan")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0, equal_nan=True)


def test_training_lowers_the_loss_and_moves_every_expert():
    model = get_peft_model(tiny_moe("mixtral"), D2LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    model.train()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for wrapper in wrappers(model).values():
        delta = wrapper.delta_weight("default")  # zero at init (A = 0): nonzero only where the expert trained
        assert (delta.flatten(1).abs().amax(1) > 0).all(), "an expert got no update"


def test_dual_lora_gives_every_expert_a_full_rank_update():
    model = adapted("mixtral", "dual")
    for wrapper in wrappers(model).values():
        for e, delta in enumerate(wrapper.delta_weight("default")):
            assert torch.linalg.matrix_rank(delta) > 4, f"expert {e}: rank {torch.linalg.matrix_rank(delta)}"


def test_the_router_weight_2d_is_supported():
    model = adapted("mixtral", "dual", target_parameters=["gate.weight"])
    (wrapper,) = {type(m.get_base_layer()).__name__ for m in wrappers(model).values()}
    assert wrapper == "MixtralTopKRouter"
    model.eval()
    with torch.no_grad():
        before = model(IDS).logits
        assert_float32_close(model.merge_and_unload()(IDS).logits, before)


# ----------------------------------------------------------------------------- all-linear and the warning
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "olmoe"])
def test_all_linear_covers_the_experts_as_loras_conversion_does(kind, method):
    lora = LoraConfig(r=4, target_modules="all-linear")
    get_peft_model(tiny_moe(kind), lora)
    ours = METHODS[method](r=4, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no unadapted-experts warning here
        model = get_peft_model(tiny_moe(kind), ours)
    assert set(ours.target_parameters) == set(lora.target_parameters) == {"gate.weight", "gate_up_proj", "down_proj"}
    assert ours.rank_pattern == lora.rank_pattern == {r".*\.gate_up_proj": 8}
    ranks = {w.parameter_name: w.factors("default")[0].shape for w in wrappers(model).values()}
    assert ranks["gate_up_proj"][-2 if method == "dual" else -1] == (4 if method == "dual" else 8)


@pytest.mark.parametrize("method", METHODS)
def test_expert_stacks_left_without_an_adapter_are_named_once(method):
    with pytest.warns(UserWarning, match="get no adapter") as caught:
        get_peft_model(tiny_moe("gpt_oss"), METHODS[method](r=4, target_modules="all-linear"))
    message = [str(w.message) for w in caught if "get no adapter" in str(w.message)]
    assert len(message) == 1
    assert "mlp.experts.gate_up_proj" in message[0] and "target_parameters" in message[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(tiny_moe("gpt_oss"), METHODS[method](r=4, target_modules=["q_proj"],
                                                            target_parameters=EXPERTS))


def test_qwen2_moe_all_linear_is_not_converted_by_peft_and_the_warning_names_the_fix():
    """peft 0.21.2 converts all-linear for Mixtral, Qwen3-MoE and OLMoE, not Qwen2-MoE (docs/moe.md says so): LoRA
    adapts no expert there either, and ours says which target_parameters would."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
                            shared_expert_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=64, num_experts=4, num_experts_per_tok=2)
    lora = LoraConfig(r=4, target_modules="all-linear")
    get_peft_model(Qwen2MoeForCausalLM(config), lora)
    assert lora.target_parameters is None
    with pytest.warns(UserWarning, match="get no adapter") as caught:
        get_peft_model(Qwen2MoeForCausalLM(config), METHODS["dual"](r=4, target_modules="all-linear"))
    message = next(str(w.message) for w in caught if "get no adapter" in str(w.message))
    assert "target_parameters=['mlp.experts.down_proj', 'mlp.experts.gate_up_proj']" in message


# ----------------------------------------------------------------------------- bad input
def assert_refused(model, config, match):
    before = copy.deepcopy(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    with pytest.raises((ValueError, TypeError), match=match):
        get_peft_model(model, config)
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_name_matching_no_parameter_lists_the_expert_stacks_and_similar_names():
    assert_refused(tiny_moe("mixtral"), DualLoraConfig(target_modules=[], target_parameters=["gate_up_projj"]),
                   r"matches no parameter.*mlp\.experts\.down_proj.*Similar names: \['mlp.experts.gate_up_proj'")


def test_one_dimensional_parameters_are_refused_with_the_alternative():
    assert_refused(tiny_moe("gpt_oss"), DualLoraConfig(target_modules=[], target_parameters=["router.bias"]),
                   "1 dimension.*bias='all'")


def test_a_parameter_of_a_module_adapted_as_a_whole_is_refused_naming_both():
    assert_refused(tiny_moe("mixtral"), DualLoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]),
                   r"q_proj\.weight.*target_modules adapts as a whole")


def test_dropout_on_parameters_is_refused():
    assert_refused(tiny_moe("mixtral"), D2LoraConfig(target_modules=[], target_parameters=EXPERTS, lora_dropout=0.1),
                   "lora_dropout=0.1 cannot apply to target_parameters")


def test_a_stack_whose_layout_cannot_be_told_is_refused():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8, 8))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

    assert_refused(Model(), DualLoraConfig(target_modules=[], target_parameters=["experts.w"]),
                   r"Cannot tell the layout of Experts\.w.*is_transposed")
    model = Model()
    model.experts.is_transposed = False  # the fix the message names
    get_peft_model(model, DualLoraConfig(target_modules=[], target_parameters=["experts.w"]))


# ----------------------------------------------------------------------------- the command line
def test_the_command_line_trains_inspects_merges_and_exports_the_experts(tiny_checkpoints, tiny_csv, tmp_path):
    """`duallora train --target-parameters` on a Mixtral classifier, then `inspect` (one row per expert), `merge` (a
    plain checkpoint with the adapter's outputs) and `export --to-lora` (a peft LoRA target_parameters adapter that
    peft loads, with its error per expert)."""
    import json

    from transformers import AutoModelForSequenceClassification

    from duallora.app.cli import main
    from duallora.app.export import load_lora
    from duallora.app.train import load_trained

    out = tmp_path / "run"
    assert main(["train", "--method", "dual", "--model", str(tiny_checkpoints["mixtral"]), "--task", str(tiny_csv),
                 "--text-column", "text", "--label-column", "label", "--output-dir", str(out), "--max-length", "16",
                 "--batch-size", "8", "--max-steps", "3", "--warmup-steps", "1", "--rank", "4", "--max-eval-examples",
                 "8", "--target-modules", ".*q_proj", "--target-parameters", "gate_up_proj,down_proj"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(EXPERTS)

    assert main(["inspect", "--adapter", str(out)]) == 0
    rows = json.loads((out / "inspect.json").read_text())
    experts = [r for r in rows if ".experts.gate_up_proj[" in r["layer"]]
    assert len(experts) == 2 * 4 and all(r["rank_dW"] > r["lora_bound"] for r in experts)

    model, tokenizer, _, _ = load_trained(out)
    batch = tokenizer(["good food", "bad service here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert_float32_close(plain(**batch).logits, expected)

    assert main(["export", "--adapter", str(out), "--to-lora", "--rank", "64", "--output", str(tmp_path / "x")]) == 0
    report = json.loads((tmp_path / "x" / "export.json").read_text())
    layers = {row["layer"]: row for row in report["exports"][0]["layers"]}
    assert {f"mlp.experts.down_proj[{e}]" for e in range(4)} <= {k.split("layers.0.")[-1] for k in layers}
    assert max(row["relative_error"] for row in layers.values()) < 1e-5  # K = 64 = full rank: exact
    lora = load_lora(load_trained(out)[3], tmp_path / "x" / "lora-r64")  # a fresh base, peft's LoRA
    assert isinstance(lora.peft_config["default"], LoraConfig)
    with torch.no_grad():
        assert_float32_close(lora(**batch).logits, expected)


# ----------------------------------------------------------------------------- 4-bit bases
@pytest.mark.parametrize("method", METHODS)
def test_a_4bit_moe_trains_quantized_attention_and_16bit_experts(tiny_checkpoints, method, tmp_path):
    """bitsandbytes quantizes Linear layers only: attention is 4-bit (QDual / QD2 there), the experts and the router
    stay dense (Dual / D2 on target_parameters). Training moves every factor and leaves the base; merge_and_dequantize
    gives a dense Mixtral with the adapter's outputs; the saved adapter reloads onto a fresh 4-bit base."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, MixtralForCausalLM

    from duallora.core.layer import AdaptedLayer

    def base():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        return MixtralForCausalLM.from_pretrained(tiny_checkpoints["mixtral"], quantization_config=quantization)

    quantized = base()
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert quantized.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    torch.manual_seed(1)
    model = get_peft_model(prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=True),
                           METHODS[method](r=4, target_modules="all-linear"))
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert any(m.base.quantized for m in layers) and any(isinstance(m, AdaptedParameter) for m in layers)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stacks = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3 and not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, stacks[n]) for n, p in model.named_parameters() if n in stacks)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base(), tmp_path).eval()
    with torch.no_grad():
        assert_float32_close(reloaded(input_ids=ids).logits, expected)
    dense = reloaded.merge_and_dequantize(dtype=torch.float32)
    assert not any(type(m).__module__.startswith(("bitsandbytes", "peft", "duallora")) for m in dense.modules())
    with torch.no_grad():
        assert_float32_close(dense(input_ids=ids).logits, expected)


# ----------------------------------------------------------------------------- several processes
@pytest.mark.slow
def test_fsdp2_with_sharded_experts_trains_like_one_process(tmp_path):
    """The FSDP2 check of tests/test_distributed.py on a Mixtral whose expert stacks are sharded with their decoder
    layers: losses, gradients and eval logits within float32 reordering of one process on the whole batch."""
    import json

    from test_distributed import WORKERS, torchrun

    from conftest import FLOAT32_REORDER_RTOL

    torchrun(str(WORKERS / "fsdp2_step.py"), str(tmp_path / "fsdp.json"), "mixtral")
    report = json.loads((tmp_path / "fsdp.json").read_text())
    for method in METHODS:
        result = report[method]
        assert result["base_weight_sharded"], method  # the expert stacks really are split across processes
        assert max(result["loss"]) <= FLOAT32_REORDER_RTOL, method
        assert max(result["grads"]) <= FLOAT32_REORDER_RTOL, method
        assert result["eval_logits"] <= FLOAT32_REORDER_RTOL, method
        assert result["eval_cache_off_when_sharded"] and result["eval_cache_on_when_not"], method


# ----------------------------------------------------------------------------- combining, hotswap
@pytest.mark.parametrize("method", METHODS)
def test_add_weighted_adapter_and_hotswap_on_expert_stacks(method, tmp_path):
    """add_weighted_adapter is exact on stacks as on Linear layers (D2: the branch updates add, sum_i w_i dW_i; Dual:
    one adapter times a weight), and hotswap_adapter puts another adapter's expert factors in place."""
    import duallora
    from duallora.d2.maths import d2_delta_weight

    model = adapted("mixtral", method, target_modules=["q_proj"])
    model.add_adapter("b", METHODS[method](r=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    trained_like(model)
    sources, weights = (["default", "b"], [0.5, 1.5]) if method == "d2" else (["default"], [0.7])
    model.add_weighted_adapter(sources, weights, "sum", combination_type="cat")
    for wrapper in wrappers(model).values():
        if method == "d2":
            branch = lambda a: d2_delta_weight(*wrapper.float_factors(a), wrapper.d2_options[a].scaling,  # noqa: E731
                                               wrapper.d2_options[a].tau)
            got, want = branch("sum"), sum(w * branch(a) for a, w in zip(sources, weights))
        else:
            got, want = wrapper.delta_weight("sum"), 0.7 * wrapper.delta_weight("default")
        assert_float32_close(got, want)
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    model.set_adapter("b")
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
        model.set_adapter("default")
        duallora.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
        assert torch.equal(model(IDS).logits, expected)


def test_an_expert_adapter_whose_update_stays_zero_is_reported():
    """Dual LoRA's dW is 0 until its warm-up clock moves; a clock that never moves (factors updated where no
    optimizer step is seen) is reported for expert stacks as for Linear layers."""
    from duallora.dual.warmup import FrozenWarmupWarning, frozen_clock_passes

    model = get_peft_model(tiny_moe("mixtral"), DualLoraConfig(r=4, warmup_steps=2, target_modules=[],
                                                               target_parameters=EXPERTS)).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(frozen_clock_passes(2) + 5):
            model(IDS)
    frozen = [w for w in caught if issubclass(w.category, FrozenWarmupWarning)]
    assert len(frozen) == 1 and "lam_t = 0" in str(frozen[0].message)


def test_the_run_config_takes_target_parameters_for_the_methods_that_adapt_parameters():
    from duallora.app.run_config import RunConfig, adapter_config

    cfg = RunConfig(method="d2", target_parameters="gate_up_proj, down_proj")
    cfg.validate()
    assert adapter_config(cfg, "generation").target_parameters == EXPERTS
    lora = adapter_config(RunConfig(method="lora", target_parameters=EXPERTS), "generation")
    assert lora.target_parameters == EXPERTS
    for method in ("dora", "hira", "full"):
        with pytest.raises(ValueError, match=f"--method {method} cannot"):
            RunConfig(method=method, target_parameters="gate_up_proj").validate()



@pytest.mark.parametrize("kind", ["gpt_oss", "qwen3_moe"])
def test_the_lora_export_of_expert_stacks_loads_in_peft_with_the_same_outputs(kind, tmp_path):
    """Both layouts: at full rank the exported LoRA target_parameters adapter is the adapter itself."""
    import duallora

    model = adapted(kind, "dual", target_modules=["q_proj"]).eval()
    with torch.no_grad():
        expected = model(IDS).logits
    errors = duallora.save_as_lora(tmp_path / "lora", model, rank=64)
    assert len([e for e in errors if "experts" in e["layer"]]) == 2 * 2 * 4  # layers x stacks x experts
    assert max(e["relative_error"] for e in errors) < 1e-5
    lora = PeftModel.from_pretrained(tiny_moe(kind), str(tmp_path / "lora")).eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    with torch.no_grad():
        assert_float32_close(lora(IDS).logits, expected)


def test_an_all_linear_adapter_reloads_with_its_converted_targets(tmp_path):
    model = trained_like(get_peft_model(tiny_moe("mixtral"), DualLoraConfig(r=4, target_modules="all-linear")))
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_moe("mixtral"), tmp_path)
    assert set(loaded.peft_config["default"].target_parameters) == {"gate.weight", "gate_up_proj", "down_proj"}
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)
