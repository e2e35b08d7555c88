"""Mixed-batch inference (peft's ``adapter_names``): each row of a batch through its own adapter, ``"__base__"`` the
base model, in forward and generate, on every layer kind; and LoRA's checks with their messages."""

import pytest
import torch
from conftest import METHODS, MODELS, assert_float32_close, trained_like
from peft import get_peft_model

from duallora.core.layer import AdaptedLayer

ROWS = ["one", "two", "__base__", "one"]


def with_two_adapters(model_name: str, method: str, base=None):
    """Adapters "one" and "two" with different, trained-looking factors (two targets differ: "two" leaves the MLP
    down projection alone, so its rows there go through the base layer)."""
    base = MODELS[model_name]() if base is None else base
    config = METHODS[method](r=4, lora_alpha=8, target_modules="all-linear")
    if model_name == "bert":
        config.modules_to_save = ["classifier"]
    torch.manual_seed(1)
    model = trained_like(get_peft_model(base, config, adapter_name="one"))
    second = METHODS[method](r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["down_proj"])
    if model_name == "bert":
        second.modules_to_save = ["classifier"]
    model.add_adapter("two", second)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".two" in name:
                p.copy_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape))
    return model.eval()


def row_by_row_reference(model, inputs, names) -> torch.Tensor:
    """Each row's output with its adapter alone active (or all disabled for "__base__")."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(inputs[i:i + 1]).logits)
        else:
            model.set_adapter(name)
            rows.append(model(inputs[i:i + 1]).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("model_name", ["llama", "bert", "gpt2"])  # Linear, Linear + modules_to_save, Conv1D
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_each_row_equals_the_output_of_its_adapter_alone(model_name, method):
    model = with_two_adapters(model_name, method)
    inputs = torch.randint(0, 64, (len(ROWS), 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = model(inputs, adapter_names=ROWS).logits
        expected = row_by_row_reference(model, inputs, ROWS)
        assert_float32_close(mixed, expected)
        # the rows differ: a row answered by the wrong adapter would not pass
        assert (expected[0] - expected[1]).abs().max() > 1e-3 and (expected[0] - expected[2]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_rows_are_grouped_one_pass_per_distinct_adapter(method, monkeypatch):
    model = with_two_adapters("llama", method)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    original = type(layer)._adapted_forward

    def counting(self, active, x, *args, **kwargs):
        if self is layer:
            calls.append((tuple(active), x.shape[0]))
        return original(self, active, x, *args, **kwargs)

    monkeypatch.setattr(type(layer), "_adapted_forward", counting)
    with torch.no_grad():
        model(torch.zeros(len(ROWS), 5, dtype=torch.long), adapter_names=ROWS)
    assert sorted(calls) == [(("one",), 2), (("two",), 1)]  # the base row through the base layer


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_generate_with_adapter_names_gives_each_row_its_adapters_tokens(method):
    model = with_two_adapters("llama", method)
    prompts = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    names = ["two", "__base__", "one"]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=prompts, adapter_names=names, **settings)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=prompts[i:i + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=prompts[i:i + 1], **settings)
            # a row that reached the end-of-sequence token alone is padded in the batch
            assert torch.equal(mixed[i:i + 1, :alone.shape[1]], alone), name
            assert (mixed[i, alone.shape[1]:] == settings["pad_token_id"]).all(), name


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_bad_adapter_names_get_loras_errors_and_change_nothing(method):
    model = with_two_adapters("llama", method)
    inputs = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad():
        before = model(inputs).logits
        with pytest.raises(ValueError, match=r"non-existing adapter\(s\): three\. This model holds \['one', 'two'\]"):
            model(inputs, adapter_names=["one", "three"])
        with pytest.raises(ValueError, match=r"Length of `adapter_names` should be the same as the number of inputs, "
                                             r"but got 3 and 2"):
            model(inputs, adapter_names=["one", "two", "one"])
        with pytest.raises(TypeError, match=r"must be a list of adapter names"):
            model(inputs, adapter_names="one")
        model.train()
        with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when the model is in training mode"):
            model(inputs, adapter_names=["one", "two"])
        model.eval()
        model.merge_adapter()
        with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when there are merged adapters"):
            model(inputs, adapter_names=["one", "two"])
        model.unmerge_adapter()
        assert_float32_close(model(inputs).logits, before)
    # no hook is left behind: a plain call takes no adapter_names
    assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, AdaptedLayer))
