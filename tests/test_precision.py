"""The factor products (``B A``, ``D C``; ``A_pos B_pos``, ``A_neg B_neg``) run in IEEE float32 whatever the global
float32 matmul precision: under TF32 (GPU) or oneDNN's bfloat16 (CPU), Sign(D C) would flip wherever |D C| is below
their resolution, a change of 2 |dW| there. This CPU's plain matmuls ignore the setting, so the tests check what
each product runs under (the numbers on a GPU: benchmarks/gpu_correctness.py, the "tf32" case)."""

import pytest
import torch
from conftest import METHODS, adapted
from torch.overrides import TorchFunctionMode

from duallora.core.precision import MATMUL_BACKENDS, factor_product

MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
# conftest's adapted(): r=4, so D2-LoRA's branches have rank 4 and Dual LoRA's r1 = r2 = 2; no other matmul of
# the tiny models has an inner size of 2 or 4
RANKS = {2, 4}


class MatmulSettings(TorchFunctionMode):
    """Records, for every matmul, its inner size and the CPU backend's float32 precision when it ran."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.seen.append((args[0].shape[-1], MATMUL_BACKENDS["cpu"].fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def reduced_precision():
    """The global setting a user turns on: float32 matmuls in bfloat16 on CPUs (TF32 on GPUs)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    assert MATMUL_BACKENDS["cpu"].fp32_precision == "bf16"
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_every_factor_product_runs_in_ieee_float32_and_the_setting_is_put_back(reduced_precision, method,
                                                                              memory_efficient, inputs):
    model = adapted("llama", method, memory_efficient=memory_efficient)
    with MatmulSettings() as settings:
        model.train()
        model(input_ids=inputs, labels=inputs).loss.backward()  # forward and backward, the row rules
        model.eval()
        with torch.no_grad():
            model(input_ids=inputs)  # the eval cache's build
        model.merge_adapter()
        model.unmerge_adapter()
    products = [precision for inner, precision in settings.seen if inner in RANKS]
    assert products and set(products) == {"ieee"}, settings.seen
    assert MATMUL_BACKENDS["cpu"].fp32_precision == "bf16"  # the model's other matmuls keep the user's setting


def test_the_setting_is_put_back_when_the_product_fails(reduced_precision):
    with pytest.raises(RuntimeError):
        factor_product(torch.ones(3, 4), torch.ones(5, 6))
    assert MATMUL_BACKENDS["cpu"].fp32_precision == "bf16"


def test_other_dtypes_and_an_ieee_setting_are_left_alone():
    """bf16 factors have no float32 setting to override; under IEEE nothing is switched."""
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert torch.equal(factor_product(a.bfloat16(), b.bfloat16()), a.bfloat16() @ b.bfloat16())
    assert torch.equal(factor_product(a, b), a @ b)
