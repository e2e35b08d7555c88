"""D2-LoRA's cached ``n(W0)``: every change of ``W0`` computes it again. Each test changes ``W0`` one way, then checks
that the layer's output equals the output with the cache cleared, and that the norm did change (so a kept cache
would have failed the first check)."""

import pytest
import torch
from conftest import METHODS, tiny_llama, trained_like
from peft import get_peft_model
from test_quantized import QUANTIZATIONS, repack_for_the_cpu_kernel

from duallora.d2.layer import D2LoraLayer
from duallora.d2.maths import frozen_unit_norm

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def d2_model(base=None, **kw):
    torch.manual_seed(1)
    model = get_peft_model(base if base is not None else tiny_llama(), METHODS["d2"](r=4, target_modules="all-linear",
                                                                                    eval_cache=False, **kw))
    return trained_like(model)


def layers(model):
    return [m for m in model.modules() if isinstance(m, D2LoraLayer)]


def cached_norms(model):
    return [norm.clone() for m in layers(model) for _, norm in m._norm_cache.values()]


def assert_output_is_fresh(model, before):
    """The output through the cache equals the output after clearing it, and the cached norms moved."""
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        after = cached_norms(model)
        for m in layers(model):
            m._norm_cache.clear()
        assert torch.equal(got, model(input_ids=IDS).logits)
    assert len(after) == len(before) and any(not torch.equal(a, b) for a, b in zip(after, before))


def primed(model):
    """Run once, so that every layer holds its n(W0); return the cached norms."""
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    norms = cached_norms(model)
    assert norms, "nothing was cached"
    return norms


def test_the_cache_is_used_and_equals_the_norm_of_w0():
    model = d2_model()
    primed(model)
    for layer in layers(model):
        (key, norm), = layer._norm_cache.values()
        assert torch.equal(norm, frozen_unit_norm(layer.base, "out", [slice(0, layer.out_features)]))
        assert layer._input_norm("default", layer.base) is norm  # the same tensor: no second pass


def test_a_merge_and_an_unmerge_change_the_key_and_the_output_stays_fresh():
    """While an adapter is merged, layers run W0 alone (as peft's); what matters is that the key moves with each
    write of W0, so the norm used after the unmerge is that of the W0 it restored, computed again."""
    model = d2_model()
    primed(model)
    keys = [m.base.cache_key() for m in layers(model)]
    model.merge_adapter()
    merged = [m.base.cache_key() for m in layers(model)]
    model.unmerge_adapter()
    unmerged = [m.base.cache_key() for m in layers(model)]
    assert all(a != b != c for a, b, c in zip(keys, merged, unmerged))
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        for m in layers(model):
            (key, _), = m._norm_cache.values()
            assert key == m.base.cache_key()  # computed again for the restored W0
            m._norm_cache.clear()
        assert torch.equal(got, model(input_ids=IDS).logits)


def test_a_cast_changes_w0():
    model = d2_model()
    before = primed(model)
    model.to(torch.bfloat16)  # W0 rounded to bf16: its norms move (n is computed in float32 either way)
    assert_output_is_fresh(model, before)


def test_load_state_dict_changes_w0():
    model = d2_model()
    before = primed(model)
    other = dict(tiny_llama(seed=5).named_modules())
    for name, layer in model.get_base_model().named_modules():
        if isinstance(layer, D2LoraLayer):
            layer.get_base_layer().load_state_dict(other[name].state_dict())  # another model's weights, in place
    assert_output_is_fresh(model, before)


def test_a_new_w0_at_the_old_address_is_another_w0():
    """A tensor that lands where a freed W0 was, with the same shape, strides and version, matched every field of the
    old key (storage address included) and was served the old norm. Built here deterministically: a new Parameter
    over the old storage, the version counters made equal; its values are then changed, as a new checkpoint's."""
    model = d2_model()
    primed(model)
    for layer in layers(model):
        old = layer.get_base_layer().weight
        alias = torch.empty(0).set_(old.untyped_storage(), old.storage_offset(), old.shape, old.stride())
        new = torch.nn.Parameter(alias, requires_grad=False)
        with torch.no_grad():
            while old._version != new._version:  # equal version counters: only identity tells the two apart
                (old if old._version < new._version else new).add_(0)
        assert (old.untyped_storage().data_ptr(), old._version) == (new.untyped_storage().data_ptr(), new._version)
        key = layer.base.cache_key()
        layer.get_base_layer().weight = new
        assert layer.base.cache_key() != key
    before = cached_norms(model)
    with torch.no_grad():
        for layer in layers(model):
            layer.get_base_layer().weight.data.mul_(1.5)  # the "new checkpoint": through .data, no version moves
    assert_output_is_fresh(model, before)


def test_checkpoints_swapped_by_assignment_are_never_served_a_stale_norm():
    """load_state_dict(assign=True) in a loop, as a swap between checkpoints does: every output equals a fresh
    model's (before the fix, 7-9 of 20 swaps reused a freed address and the old norm)."""
    model = d2_model()
    checkpoints = [dict(tiny_llama(seed=s).named_modules()) for s in (5, 6)]
    for trial in range(20):
        for name, layer in model.get_base_model().named_modules():
            if isinstance(layer, D2LoraLayer):  # new tensors, often at the addresses the last ones freed
                weights = {k: v.clone() for k, v in checkpoints[trial % 2][name].state_dict().items()}
                layer.get_base_layer().load_state_dict(weights, assign=True)
        with torch.no_grad():
            got = model(input_ids=IDS).logits
            for m in layers(model):
                m._norm_cache.clear()
            assert torch.equal(got, model(input_ids=IDS).logits), f"swap {trial}: a stale norm was served"


def test_an_in_place_edit_changes_w0():
    model = d2_model()
    before = primed(model)
    with torch.no_grad():
        for layer in layers(model):
            layer.get_base_layer().weight.mul_(1.5)
    assert_output_is_fresh(model, before)


def test_adapters_with_another_norm_axis_do_not_share_the_norm():
    model = d2_model()
    model.add_adapter("columns", METHODS["d2"](r=4, target_modules="all-linear", eval_cache=False, norm_axis="in"))
    trained_like(model)
    primed(model)  # caches the row norms
    model.set_adapter("columns")
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        for m in layers(model):
            assert set(m._norm_cache) == {"out", "in"}
            m._norm_cache.clear()
        assert torch.equal(got, model(input_ids=IDS).logits)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama64")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def quantized(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, quantization_config=QUANTIZATIONS["nf4-double"]())


def test_a_requantized_4bit_weight_is_read_again(llama64):
    """A merge into a 4-bit base quantizes again (a new weight); bitsandbytes' CPU repacking changes the layout in
    place: both compute n(W0) again (the repack applied by hand where this CPU lacks the
    kernel, so both layouts are read on every machine)."""
    model = d2_model(quantized(llama64))
    before = primed(model)
    with pytest.warns(UserWarning, match="quantized again"):
        model.merge_adapter()
    model.unmerge_adapter()  # the quantized weight put back as it was: the norm equals the first one again
    with torch.no_grad():
        model(input_ids=IDS)
    assert all(torch.equal(a, b) for a, b in zip(cached_norms(model), before))
    keys = [key for m in layers(model) for key, _ in m._norm_cache.values()]
    repack_for_the_cpu_kernel(model)
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        # every layer read W0 again: its layout changed (the values too where this CPU reads the absmax unrounded
        # before a repack; on an AVX512-BF16 CPU it reads it rounded in both layouts, so they stay)
        assert all(a != b for a, b in zip([key for m in layers(model) for key, _ in m._norm_cache.values()], keys))
        for m in layers(model):
            m._norm_cache.clear()
        assert torch.equal(got, model(input_ids=IDS).logits)


def test_sharded_or_composed_weights_are_not_cached():
    from duallora.core.base_weight import as_rows

    layer = layers(d2_model())[0]
    assert as_rows(layer.base.full()).cache_key() is None  # a merge's float32 intermediate
    layer._sharded = True  # as FSDP or ZeRO-3 would leave it
    layer._norm_cache.clear()
    layer._input_norm("default", layer.base)
    assert not layer._norm_cache


def test_in_eval_mode_a_write_through_data_is_seen_too():
    """The eval cache fingerprints W0's values, so when it finds a change (a write through .data, which version
    counters miss) the norms are computed again with the weight."""
    torch.manual_seed(1)
    model = trained_like(get_peft_model(tiny_llama(), METHODS["d2"](r=4, target_modules="all-linear")))
    before = primed(model)
    for layer in layers(model):
        layer.get_base_layer().weight.data.mul_(1.5)
    assert_output_is_fresh(model, before)
