"""Adapters saved by duallora 0.1 (tests/fixtures/adapter-0.1-*: a tiny LLaMA adapter after 3 AdamW steps, its
config without the fields added since, and the logits 0.1 computed with it) load and compute what they did; a
transformers/peft pair that refuses adapters is named at import."""

import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_float32_close, tiny_llama
from peft import PeftModel

from duallora import warmup_steps_taken

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_an_adapter_saved_by_0_1_loads_and_gives_its_outputs(method):
    directory = FIXTURES / f"adapter-0.1-{method}"
    expected = torch.load(directory / "expected.pt")
    model = PeftModel.from_pretrained(tiny_llama(), directory)
    assert "eval_cache" not in (directory / "adapter_config.json").read_text()  # a field 0.1 did not have
    with torch.no_grad():
        logits = model(expected["inputs"]).logits
    # 0.1 built the eval weight with eager whole-matrix maths, this version in row blocks through the fused kernels
    assert_float32_close(logits, expected["logits"])
    if method == "dual":
        assert warmup_steps_taken(model) == 3  # the warm-up clock was saved with it
    merged = model.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        assert_float32_close(merged(expected["inputs"]).logits, expected["logits"])


def test_a_transformers_that_refuses_this_peft_is_named_with_the_fix_at_import():
    from duallora.core.registration import check_transformers_peft_pair

    with pytest.warns(UserWarning) as caught:
        check_transformers_peft_pair("5.24.0", "0.21.2")
    message = str(caught[0].message)
    assert "transformers 5.24.0 refuses peft 0.21.2" in message and "model.add_adapter()" in message
    assert "pip install 'transformers<5.24.0'" in message and "load_adapter still work" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_peft_pair("5.23.0", "0.21.2")  # the tested pair: silent
        check_transformers_peft_pair("5.24.0", "0.22.0")  # the peft that transformers asks for: silent
