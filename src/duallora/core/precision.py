"""IEEE float32 for the factor products, whatever the global float32 matmul precision.

The products ``B A`` and ``D C`` decide Dual LoRA's mask (ReLU) and signs (Sign); ``A_pos B_pos`` and ``A_neg B_neg``
give D2-LoRA's update, whose unit norms project ``W``. A reduced-precision float32 matmul (TF32 on NVIDIA GPUs, 10
mantissa bits; bfloat16 through oneDNN on CPUs) rounds each product to about 1e-3 of its size, so wherever ``D C``
is near zero its sign comes out at random: ``Sign(D C)`` changes by 2 there, a change of ``2 |dW|``, not a rounding.
The setting is global (``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
``torch.set_float32_matmul_precision("high")``, the Trainer's ``tf32=True``), so each product switches it to IEEE
for its own length and puts it back; the model's other matmuls keep it.

Under ``torch.compile`` the switch is not made (dynamo cannot trace it, and a graph break per product would cost
more than the product): compiled, the products follow the setting the graph runs with (docs/performance.md).
"""

from __future__ import annotations

import torch

# the float32 matmul precision setting of each device type's matmul library
MATMUL_BACKENDS = {"cuda": torch.backends.cuda.matmul, "cpu": torch.backends.mkldnn.matmul}


def factor_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (matrices or stacks of them), in IEEE float32 when the operands are float32."""
    backend = MATMUL_BACKENDS.get(a.device.type)
    if (backend is None or a.dtype != torch.float32 or torch.compiler.is_compiling()
            or backend.fp32_precision == "ieee"):
        return a @ b
    before = backend.fp32_precision
    backend.fp32_precision = "ieee"
    try:
        return a @ b
    finally:
        backend.fp32_precision = before
