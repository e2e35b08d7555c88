"""add_weighted_adapter: exact where the maths allows it (D2 "cat" of any number; Dual one adapter times a weight),
checked against the weighted sum of the updates from the methods' own functions; refused otherwise, model untouched."""

import pytest
import torch
from conftest import FLOAT32_REORDER_RTOL, METHODS, assert_float32_close, tiny_llama, trained_like
from peft import get_peft_model

from duallora import set_warmup_step, warmup_steps_taken
from duallora.d2.maths import d2_delta_weight
from duallora.dual.maths import dual_delta_weight

TARGETS = ["q_proj", "v_proj", "down_proj"]


def two_adapters(method: str, **kw):
    model = get_peft_model(tiny_llama(), METHODS[method](r=4, target_modules=TARGETS, **kw), adapter_name="one")
    model.add_adapter("two", METHODS[method](r=2 if method == "d2" else 4, lora_alpha=8, target_modules=TARGETS, **kw))
    return trained_like(model)


def layers(model):
    return [m for n, m in model.named_modules() if n.endswith(tuple(TARGETS)) and hasattr(m, "base_layer")]


def d2_update(layer, name):
    opts = layer.d2_options[name]
    return d2_delta_weight(*layer.float_factors(name), opts.scaling, opts.tau)


def dual_update(layer, name):
    return dual_delta_weight(*layer.float_factors(name), layer.warmup_coef(name).item())


def test_d2_cat_of_two_adapters_is_the_weighted_sum_of_their_updates_and_the_model_computes_with_it():
    model = two_adapters("d2", tau=0.5)
    model.add_weighted_adapter(["one", "two"], [0.7, -1.3], "both", combination_type="cat")
    assert model.active_adapters == ["one"]  # not activated, as with LoRA
    for layer in layers(model):
        expected = 0.7 * d2_update(layer, "one") - 1.3 * d2_update(layer, "two")
        # float32 products of rank 4 + 2 summed in another order: within the reorder bound of the tiny models
        assert_float32_close(d2_update(layer, "both"), expected)
        assert layer.d2_lora_A_pos["both"].weight.shape[1] == 6
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        first = model(ids).logits
        model.set_adapter("both")
        combined = model(ids).logits
        model.merge_adapter()  # the combined adapter is a D2 adapter like any other: it merges to the same outputs
        assert_float32_close(model(ids).logits, combined)
    assert (combined - first).abs().max() > 100 * FLOAT32_REORDER_RTOL * first.abs().max()


@pytest.mark.parametrize("weight", [0.6, -2.0])
def test_dual_one_adapter_times_a_weight_is_exact_and_keeps_its_warmup_clock(weight):
    model = get_peft_model(tiny_llama(), METHODS["dual"](r=4, target_modules=TARGETS, warmup_steps=10),
                           adapter_name="one")
    trained_like(model)
    set_warmup_step(model, 3, "one")
    model.add_weighted_adapter(["one"], [weight], "scaled")
    for layer in layers(model):
        assert layer.dual_lora_step["scaled"].item() == 3
        assert_float32_close(dual_update(layer, "scaled"), weight * dual_update(layer, "one"))


@pytest.mark.parametrize("method, call, message", [
    ("dual", dict(adapters=["one", "two"], weights=[1.0, 1.0]), "2 adapters cannot be combined exactly"),
    ("dual", dict(adapters=["one"], weights=[1.0], combination_type="svd"), "combination_type='svd'"),
    ("d2", dict(adapters=["one", "two"], weights=[1.0, 1.0], combination_type="svd"), "'cat' is"),
    ("d2", dict(adapters=["one", "two"], weights=[1.0, 1.0], combination_type="linear"), "'cat' is"),
    ("d2", dict(adapters=["one"], weights=[1.0], svd_rank=4), "['svd_rank'] belong to LoRA's"),
    ("d2", dict(adapters=["one", "three"], weights=[1.0, 1.0]), "unknown adapters ['three']"),
    ("d2", dict(adapters=["one", "two"], weights=[1.0]), "2 adapters but 1 weights"),
    ("d2", dict(adapters=["one", "two"], weights=[1.0, 0]), "finite non-zero numbers"),
    ("d2", dict(adapters=["one", "two"], weights=[1.0, float("inf")]), "finite non-zero numbers"),
    ("d2", dict(adapters=["one"], weights=[1.0], adapter_name="two"), "exists already"),
])
def test_what_is_not_exact_is_refused_naming_the_alternatives_and_nothing_changes(method, call, message):
    model = two_adapters(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        model.add_weighted_adapter(**{"adapter_name": "new", "combination_type": "cat", **call})
    assert message in str(error.value)
    if "belong" in message or "exactly" in message or "'cat' is" in message:
        assert "merge_adapter()" in str(error.value) and "duallora.convert_to_lora" in str(error.value)
    assert set(model.peft_config) == {"one", "two"}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_dual_with_a_non_homogeneous_magnitude_refuses_a_weight():
    model = get_peft_model(tiny_llama(), METHODS["dual"](r=4, target_modules=TARGETS,
                                                         magnitude_activation="sigmoid"), adapter_name="one")
    with pytest.raises(ValueError, match="magnitude_activation='sigmoid' cannot carry a weight"):
        model.add_weighted_adapter(["one"], [0.5], "half")
    model.add_weighted_adapter(["one"], [-1.0], "negated")  # a sign alone goes into D: exact for any magnitude
    for layer in layers(model):
        assert_float32_close(dual_update(layer, "negated"), -dual_update(layer, "one"))
    assert warmup_steps_taken(model, "one") == 0 and set(model.peft_config) == {"one", "negated"}


@pytest.mark.parametrize("method, combination", [("dual", "linear"), ("d2", "cat")])
def test_the_new_adapter_takes_the_trained_head_and_two_trained_heads_are_refused(method, combination):
    """modules_to_save (a head trained whole): one adapter times 1.0 equals the adapter, head included (before, the
    new adapter got the original, untrained head: 1.9 apart in the logits); two trained heads cannot be summed."""
    model = get_peft_model(tiny_llama(), METHODS[method](r=4, target_modules=TARGETS, modules_to_save=["lm_head"]),
                           adapter_name="one")
    trained_like(model)
    with torch.no_grad():
        for p in model.base_model.model.lm_head.modules_to_save["one"].parameters():
            p.add_(torch.randn_like(p))  # a trained head
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    model.add_weighted_adapter(["one"], [1.0], "copy", combination_type=combination)
    with torch.no_grad():
        own = model(ids).logits
        model.set_adapter("copy")
        assert_float32_close(model(ids).logits, own)
    model.add_adapter("two", METHODS[method](r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"the adapters \['one', 'two'\] each train their own modules_to_save "
                                         r"\(such as 'lm_head'\)"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "both", combination_type="cat")
    assert "both" not in model.peft_config and model.state_dict().keys() == before.keys()
