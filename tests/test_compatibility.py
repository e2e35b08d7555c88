"""Adapters saved by duallora 0.1 (tests/fixtures/adapter-0.1-*: a tiny LLaMA adapter after 3 AdamW steps, its
config without the fields added since, and the logits 0.1 computed with it) load and compute what they did."""

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
