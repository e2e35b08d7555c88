"""The correctness half of ``gpu_check.py``: on one adapted layer, per method and precision, the compiled kernels
against the eager reference (forward, every factor gradient, the input gradient), the memory-efficient path against
plain autograd, and merged against unmerged outputs, each within a bound derived from the precision.

Precisions are those of training: ``fp32``; ``bf16``, autocast over float32 factors; ``fp16``, autocast with a
``torch.amp.GradScaler`` (its scaled gradients compared, the scale being equal on both sides). One more check per
method: ``dW`` with TF32 on equals ``dW`` with it off (the factor products run in IEEE float32 whatever the setting).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}


def bound(precision: str, terms: int) -> float:
    """Relative bound (of the reference's largest value) on the difference of two computations of the same value.

    Each compared value is a sum of ``terms`` products whose inputs were rounded once to ``precision`` (under
    autocast the weight and activations are cast to it): the two computations differ in that rounding and in the
    order of the sum. For independent rounding errors of random sign the difference grows like sqrt(terms) unit
    roundoffs of the terms' size, which is at most the largest value's: 4 sqrt(terms) u covers the two sides and
    two standard deviations each.
    """
    return 4 * math.sqrt(terms) * UNIT_ROUNDOFF[precision]


@dataclass
class Check:
    method: str
    precision: str
    what: str
    difference: float  # the largest |got - expected|, relative to the largest |expected|
    bound: float

    @property
    def holds(self) -> bool:
        return math.isfinite(self.difference) and self.difference <= self.bound

    def as_dict(self) -> dict:
        return {**asdict(self), "holds": self.holds}


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((got.detach().float() - expected.detach().float()).abs().max() / scale).item()


def adapted_layer(method: str, out_features: int, in_features: int, device: str, memory_efficient: bool = True):
    """One Linear adapted with the method, its factors random at the scale training reaches (a fresh adapter has
    dW = 0, which would compare nothing)."""
    from peft import get_peft_model

    from duallora import D2LoraConfig, DualLoraConfig

    torch.manual_seed(0)
    config = (DualLoraConfig(r=16, warmup_steps=0, target_modules=["0"], memory_efficient=memory_efficient)
              if method == "dual" else D2LoraConfig(r=16, target_modules=["0"], memory_efficient=memory_efficient))
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(in_features, out_features)), config).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_lora_" in name:
                p.normal_(0, 2 / math.sqrt(max(p.shape)))
    return model


def step(model, x: torch.Tensor, target: torch.Tensor, precision: str) -> tuple[torch.Tensor, dict]:
    """Forward, loss and backward in ``precision``; the output and the gradients of the factors and the input."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    dtype = AUTOCAST[precision]
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = model(x)
        loss = torch.nn.functional.mse_loss(y.float(), target)
    if precision == "fp16":
        torch.amp.GradScaler(x.device.type).scale(loss).backward()
    else:
        loss.backward()
    grads = {name.split("lora_")[-1].split(".")[0]: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return y, {**grads, "x": x.grad}


def with_compile(enabled: bool, fn: Callable):
    """Run ``fn`` with duallora's fused kernels compiled (``enabled``) or eager."""
    import duallora.core.fused as fused

    before = fused._disabled
    fused._disabled = not enabled
    try:
        return fn()
    finally:
        fused._disabled = before


def check_layer(method: str, precision: str, out_features: int, in_features: int, tokens: int,
                device: str) -> list[Check]:
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, in_features, generator=g).to(device)
    target = torch.randn(tokens, out_features, generator=g).to(device)
    fused_model = adapted_layer(method, out_features, in_features, device)
    compiled = with_compile(True, lambda: step(fused_model, x, target, precision))
    eager = with_compile(False, lambda: step(fused_model, x, target, precision))
    autograd = with_compile(False, lambda: step(adapted_layer(method, out_features, in_features, device,
                                                              memory_efficient=False), x, target, precision))
    checks = []
    for label, (y, grads), reduction in (("compiled vs eager", compiled, in_features),
                                         ("memory-efficient vs plain autograd", autograd, in_features)):
        reference_y, reference_grads = eager
        checks.append(Check(method, precision, f"{label}: output", relative(y, reference_y),
                            bound(precision, reduction)))
        for name, grad in grads.items():  # factor gradients sum over tokens and one dimension: tokens terms at least
            checks.append(Check(method, precision, f"{label}: grad {name}", relative(grad, reference_grads[name]),
                                bound(precision, tokens + max(out_features, in_features))))
    checks.append(merge_parity(fused_model, x, method, precision))
    return checks


def merge_parity(model, x: torch.Tensor, method: str, precision: str) -> Check:
    """Merged against unmerged, in eval mode, in the precision's own dtype for the model (a bf16 model merges in
    float32 and rounds once to bf16; the unmerged forward rounds its built weight once too)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = model.to(dtype).eval()
    with torch.no_grad():
        unmerged = model(x.to(dtype))
        model.merge_adapter()
        merged = model(x.to(dtype))
        model.unmerge_adapter()
    return Check(method, precision, "merged vs unmerged output", relative(merged, unmerged),
                 bound(precision, x.shape[-1]))


def reduced_precision_parity(method: str, out_features: int, in_features: int, tokens: int, device: str) -> Check:
    """The update ``dW`` built with float32 matmuls at reduced precision (TF32 on a GPU:
    ``set_float32_matmul_precision("high")``, as the Trainer's ``tf32=True``) against IEEE: the factor products run in
    IEEE float32 either way (:mod:`duallora.core.precision`), so the same bits; under TF32 itself Sign(D C) would flip
    wherever |D C| is below its resolution."""
    layer = next(m for m in adapted_layer(method, out_features, in_features, device).modules()
                 if hasattr(m, "delta_weight"))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        ieee = layer.delta_weight("default")
        torch.set_float32_matmul_precision("high")
        reduced = layer.delta_weight("default")
    finally:
        torch.set_float32_matmul_precision(before)
    return Check(method, "fp32", "TF32 on vs off: dW", relative(reduced, ieee), UNIT_ROUNDOFF["fp32"])


def run_checks(sizes: dict, device: str, deadline: Callable[[], bool]) -> tuple[list[dict], list[str]]:
    """Every method x precision on one layer of ``sizes`` (out, in, tokens); the skipped ones when time is up."""
    checks, skipped = [], []
    for method in ("dual", "d2"):
        for precision in PRECISIONS:
            if deadline():
                skipped.append(f"correctness {method} {precision}")
                continue
            checks += [c.as_dict() for c in check_layer(method, precision, device=device, **sizes)]
        if deadline():
            skipped.append(f"correctness {method} tf32")
            continue
        checks.append(reduced_precision_parity(method, device=device, **sizes).as_dict())
    return checks, skipped
