"""``duallora inspect``'s rank report for peft's own methods, the comparison rows of the rank figure: LoRA's update
is bounded by r, HiRA's (``W0 * (B A)``) is not."""

import pytest
import torch
from conftest import tiny_llama
from peft import HiraConfig, LoraConfig, get_peft_model

from duallora.app.inspect import inspect_peft

PREFIX = "base_model.model."


def with_random_factors(model):
    """Every trainable factor random, so that dW != 0 (LoRA's B starts at zero) and its rank is the generic one."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("method", ["lora", "hira"])
def test_inspect_reports_peft_layers_rank_against_the_bound_and_the_base_weight_norm(method):
    base = tiny_llama()
    weights = {name: m.weight.detach().clone() for name, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    config = (LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if method == "lora"
              else HiraConfig(r=4, target_modules="all-linear"))
    model = with_random_factors(get_peft_model(base, config))
    rows = inspect_peft(model)
    layers = dict(model.named_modules())
    assert {row["layer"].removeprefix(PREFIX) for row in rows} == set(weights)  # 7 linears x 2 decoder layers
    for row in rows:
        w0 = weights[row["layer"].removeprefix(PREFIX)]
        assert row["shape"] == list(w0.shape) and row["lora_bound"] == 4
        # random factors: B A has rank exactly r; its Hadamard product with a generic W0 (rank up to 32 x 4) is
        # full rank
        assert row["rank_dW"] == (4 if method == "lora" else min(w0.shape))
        assert row["norm_W0"] == pytest.approx(w0.norm().item(), rel=1e-6)
        layer = layers[row["layer"]]
        if method == "lora":  # dW = (alpha / r) B A
            dw = 2 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        else:  # dW = W0 * (B A), the Hadamard product
            dw = w0 * (layer.hira_B["default"] @ layer.hira_A["default"])
        assert row["norm_dW"] == pytest.approx(dw.norm().item(), rel=1e-5)  # float32 products summed in another order
        assert row["relative_norm"] == pytest.approx(row["norm_dW"] / row["norm_W0"], rel=1e-6)
