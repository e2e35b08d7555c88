"""duallora.hotswap_adapter: another adapter's factors (and warm-up clock) copied in place give the outputs of that
adapter loaded afresh, a compiled model runs on without recompiling, and what does not fit is refused untouched."""

import pytest
import torch
from conftest import METHODS, assert_float32_close, tiny_llama, trained_like
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

from duallora import hotswap_adapter, set_warmup_step, warmup_steps_taken

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def adapter(method: str, seed: int, clock: int = 0, **kw):
    extra = {"warmup_steps": 10} if method == "dual" else {}
    model = get_peft_model(tiny_llama(), METHODS[method](**{"r": 4, "target_modules": TARGETS, **extra, **kw}))
    torch.manual_seed(seed)  # after tiny_llama, which seeds with 0: each seed its own factor values
    trained_like(model)
    if method == "dual":
        set_warmup_step(model, clock)
    return model.eval()


def saved(tmp_path, method, seed, clock=0, **kw):
    folder = tmp_path / f"adapter-{seed}"
    adapter(method, seed, clock, **kw).save_pretrained(folder)
    with torch.no_grad():
        fresh = PeftModel.from_pretrained(tiny_llama(), folder).eval()(IDS).logits
    return folder, fresh


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_a_swapped_adapter_gives_the_outputs_of_a_fresh_load_clock_included(tmp_path, method):
    model = adapter(method, seed=1, clock=0)
    folder, fresh = saved(tmp_path, method, seed=2, clock=6)
    with torch.no_grad():
        before = model(IDS).logits  # fills the eval cache, which the swap must not leave stale
    tensors = [p for p in model.parameters()]
    hotswap_adapter(model, folder)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, fresh) and not torch.equal(before, fresh)
    assert all(a is b for a, b in zip(tensors, model.parameters()))  # the same tensors, new values
    if method == "dual":
        assert warmup_steps_taken(model) == 6
    hotswap_adapter(model, get_peft_model_state_dict(adapter(method, seed=1)))  # a state dict swaps back
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_a_compiled_model_is_not_recompiled_by_a_swap(tmp_path, method):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = adapter(method, seed=1, clock=3)
    folder, fresh = saved(tmp_path, method, seed=2, clock=7)
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(IDS)
        graphs = counters["stats"]["unique_graphs"]
        hotswap_adapter(model, folder)
        swapped = compiled(IDS).logits
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph: no recompilation
    assert_float32_close(swapped, fresh)  # compiled against eager: float32 reordering only


@pytest.mark.parametrize("method, change, message", [
    ("dual", dict(r=8), "r: 4 here, 8 in"),
    ("d2", dict(r=8), "r: 4 here, 8 in"),
    ("d2", dict(tau=0.25), "tau: 0.5 here, 0.25 in"),
    ("dual", dict(lora_alpha=32), "lora_alpha: 16 here, 32 in"),
])
def test_an_adapter_that_does_not_fit_is_refused_and_nothing_changes(tmp_path, method, change, message):
    model = adapter(method, seed=1)
    folder, _ = saved(tmp_path, method, seed=2, **change)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="hotswap_adapter: the adapters differ") as error:
        hotswap_adapter(model, folder)
    assert message in str(error.value) and "load_adapter" in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("source_clock, fits", [(4, False), (9, False), (10, True), (25, True)])
def test_another_warmup_length_swaps_only_once_both_warmups_are_over(tmp_path, source_clock, fits):
    """Two runs of other lengths get other warm-ups (warmup_steps="auto"); lam_t = min(1, t / w) is 1 in both only
    once the source's clock t has reached both lengths (here 10, live, and 4, source)."""
    model = adapter("dual", seed=1, clock=30)
    folder, fresh = saved(tmp_path, "dual", seed=2, clock=source_clock, warmup_steps=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if not fits:
        with pytest.raises(ValueError, match=rf"other warm-up lengths \(warmup_steps 10 here, 4 in .*\) and the "
                                             rf"source is at warm-up step {source_clock}"):
            hotswap_adapter(model, folder)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    hotswap_adapter(model, folder)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, fresh)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_a_merged_adapter_is_refused_untouched_and_swaps_once_unmerged(tmp_path, method):
    """Before: the factors changed, W0 kept the old update, the outputs stayed the old adapter's (peft refuses)."""
    model = adapter(method, seed=1)
    folder, fresh = saved(tmp_path, method, seed=2)
    model.merge_adapter()
    with torch.no_grad():
        merged = model(IDS).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'default' is merged into the base weights of 6 layer\(s\).*"
                                         r"unmerge_adapter\(\) first"):
        hotswap_adapter(model, folder)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, merged)
    model.unmerge_adapter()
    hotswap_adapter(model, folder)
    with torch.no_grad():
        assert_float32_close(model(IDS).logits, fresh)  # unmerge restores W0 up to float32 rounding of W0 + dW - dW


def test_a_state_dict_of_another_rank_or_an_unknown_adapter_is_refused():
    model = adapter("d2", seed=1)
    with pytest.raises(ValueError, match=r"of other shapes, such as .*: \(32, 4\) here, \(32, 8\) in the source"):
        hotswap_adapter(model, get_peft_model_state_dict(adapter("d2", seed=2, r=8)))
    with pytest.raises(ValueError, match="entries missing"):
        hotswap_adapter(model, {})
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        hotswap_adapter(model, {}, adapter_name="other")


@pytest.mark.slow
def test_the_serving_page_hotswap_snippet_runs_as_pasted():
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    snippet = page.split("## Swapping adapters", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(snippet, "docs/serving.md", "exec"), {})
