"""Dual LoRA: ``dW = lam_t * s * ReLU(B A) * Sign(D C)`` (arXiv 2512.03402).

::

    x (.., in) --> y = x (W0 + dW)^T + b          one matmul when lora_dropout = 0
                          |
          dW = lam_t * s * m(B @ A) * d(D @ C)     s = lora_alpha / sqrt(r1 * r2)
                              |  (out,r1)(r1,in)   magnitude group: A, B
                              +- (out,r2)(r2,in)   direction group: C, D      r1 + r2 = r

``dW`` is full rank although the four factors hold exactly LoRA's parameter count at ``r``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..core.blocked import autocast_dtype, weight_blocks
from ..core.layer import AdaptedLayer
from ..core.combine import copy_into
from . import warmup
from .config import DualLoraConfig, init_std
from .maths import (dual_delta_weight, dual_efficient_weight, dual_linear, dual_warmup_coef, dual_weight_rows,
                    dual_weighted_factors)


@dataclass(frozen=True)
class DualOptions:
    """Per-adapter constants of one Dual LoRA layer."""

    r1: int
    r2: int
    scaling: float  # s = lora_alpha / sqrt(r1 * r2)
    warmup_steps: int
    ste: str
    magnitude_activation: str
    direction_activation: str


class DualLoraLayer(AdaptedLayer):
    """A Linear/Conv1D adapted with Dual LoRA. The warm-up step counter ``dual_lora_step`` is a buffer saved
    with the adapter; it counts the updates of this adapter's factors (see :mod:`duallora.warmup`)."""

    prefix = "dual_lora_"
    adapter_layer_names = ("dual_lora_A", "dual_lora_B", "dual_lora_C", "dual_lora_D")
    other_param_names = ("dual_lora_step", "dual_lora_dropout", "dual_options", "memory_efficient",
                         "kernel_options", "eval_cache", "warmup_clocks")
    # which dimension of the base layer each factor's shape carries (checked when loading a saved adapter)
    factor_dims = {"dual_lora_A": (None, "in"), "dual_lora_B": ("out", None),
                   "dual_lora_C": (None, "in"), "dual_lora_D": ("out", None)}

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DualLoraConfig, **kwargs) -> None:
        self.dual_options: dict[str, DualOptions] = {}
        self.warmup_clocks: dict[str, warmup.WarmupClock] = {}
        super().__init__(base_layer, adapter_name, config, **kwargs)
        self.register_state_dict_pre_hook(warmup.sync_before_state_dict)

    def create_adapter(self, adapter_name: str, config: DualLoraConfig, r: int, lora_alpha: float) -> None:
        if not hasattr(self, "dual_lora_step"):
            self.dual_lora_step = BufferDict(persistent=True)
        r1, r2 = config.layer_ranks(r)
        self.dual_options[adapter_name] = DualOptions(
            r1=r1, r2=r2, scaling=lora_alpha / math.sqrt(r1 * r2), warmup_steps=config.resolved_warmup_steps,
            ste=config.ste, magnitude_activation=config.magnitude_activation,
            direction_activation=config.direction_activation,
        )
        stack = self.stack_shape  # () for a Linear; (experts,) for a stack of expert matrices
        shapes = {"dual_lora_A": (*stack, r1, self.in_features), "dual_lora_B": (*stack, self.out_features, r1),
                  "dual_lora_C": (*stack, r2, self.in_features), "dual_lora_D": (*stack, self.out_features, r2)}
        # All four Gaussian (paper Sec. 3.3): a zero magnitude factor would leave ReLU without gradient forever.
        self.add_factors(adapter_name, {name: torch.randn(shape) * init_std(config.init_std, self.in_features,
                                                                            fan_in=shape[-1])
                                        for name, shape in shapes.items()})
        self.dual_lora_step[adapter_name] = torch.zeros((), dtype=torch.long)
        self.warmup_clocks[adapter_name] = warmup.WarmupClock(self, adapter_name, config.resolved_warmup_steps,
                                                              auto=config.warmup_steps == "auto")
        warmup.track(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        warmup.track(self)  # a deep copy is a new layer whose optimizer steps must count too

    def warmup_coef(self, adapter_name: str) -> torch.Tensor:
        """``lam_t * s`` for this adapter (a 0-dim float32 tensor)."""
        opts = self.dual_options[adapter_name]
        return dual_warmup_coef(self.dual_lora_step[adapter_name], opts.warmup_steps, opts.scaling)

    def factor_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        return [*self.factors(adapter_name), self.dual_lora_step[adapter_name]]

    def delta(self, adapter_name: str, factors=None, coef=None) -> torch.Tensor:
        """``dW`` of this adapter (differentiable; Sign through the configured STE), from ``factors`` and ``coef``
        (default: the adapter's own, at the current warm-up step)."""
        opts = self.dual_options[adapter_name]
        return dual_delta_weight(
            *(factors or self.compute_factors(adapter_name)), self.warmup_coef(adapter_name) if coef is None else coef,
            opts.magnitude_activation, opts.direction_activation, opts.ste,
        )

    def adapted_weight(self, adapter_name: str, w_in: torch.Tensor, factors=None) -> torch.Tensor:
        dw = self.delta(adapter_name, factors)
        return w_in.to(dw.dtype) + dw

    def fused_linear(self, adapter_name, x, w0, bias, with_base: bool) -> torch.Tensor:
        opts = self.dual_options[adapter_name]
        return dual_linear(x, w0, bias, *self.compute_factors(adapter_name), self.warmup_coef(adapter_name), with_base,
                           opts.magnitude_activation, opts.direction_activation, opts.ste,
                           self.kernel_options[adapter_name])

    def efficient_weight(self, adapter_name: str, w0) -> torch.Tensor:
        opts = self.dual_options[adapter_name]
        return dual_efficient_weight(w0.tensor, *self.compute_factors(adapter_name), self.warmup_coef(adapter_name),
                                     opts.magnitude_activation, opts.direction_activation, opts.ste,
                                     self.kernel_options[adapter_name])

    def weight_rows(self, adapter_name: str, w0: torch.Tensor, factors):
        opts, coef = self.dual_options[adapter_name], self.warmup_coef(adapter_name)
        blocks = weight_blocks(w0, factors[0].dtype, self.kernel_options[adapter_name])
        return blocks, lambda s: dual_weight_rows(s, w0, *factors, coef, opts.magnitude_activation,
                                                  opts.direction_activation)

    def merge_weight(self, adapter_name: str, w_in: torch.Tensor, factors):
        """``W0 + dW``, and the ``lam_t * s`` of this merge: unmerge subtracts the same ``dW`` after the clock
        moved."""
        coef = self.warmup_coef(adapter_name)
        return w_in + self.delta(adapter_name, factors, coef), coef

    def unmerge_weight(self, adapter_name: str, w_out: torch.Tensor, factors, coef) -> torch.Tensor:
        return w_out - self.delta(adapter_name, factors, coef)  # dW is additive, so W0 = (W0 + dW) - dW

    def before_adapter_forward(self, active: list[str], x: torch.Tensor) -> None:
        """Tick the warm-up clocks (:mod:`duallora.warmup`): a training forward marks the adapter pending, any
        forward first counts an in-place update of its factors made since then."""
        training = self.training and torch.is_grad_enabled()
        for name in active:
            if training and self.dual_lora_A[name].weight.requires_grad:
                self.warmup_clocks[name].training_pass()
                _warn_if_clip_sees_scaled_gradients(self.dual_options[name], autocast_dtype(x))
            elif not torch.compiler.is_compiling():
                self.warmup_clocks[name].sync()

    def fill_weighted(self, adapter_name: str, adapters: list[str], weights: list[float]) -> None:
        """Make ``adapter_name`` hold ``w dW`` of the one adapter in ``adapters``, its warm-up clock included."""
        (source,), (weight,) = adapters, weights
        factors = dual_weighted_factors(*self.float_factors(source), weight)
        copy_into(self, adapter_name, dict(zip(self.adapter_layer_names, factors)))
        self.dual_lora_step[adapter_name].copy_(self.dual_lora_step[source])  # lam_t is part of dW


_clip_warned = False


def _warn_if_clip_sees_scaled_gradients(opts: DualOptions, compute_dtype: torch.dtype) -> None:
    """Warn once when the clip STE trains in float16: there the loss is scaled (GradScaler), and the layer sees only
    scaled gradients, with no way to know the scale, so clipping at 1 acts at 1 / scale of the true gradient."""
    global _clip_warned
    if _clip_warned or compute_dtype != torch.float16 or opts.ste != "clip" or opts.direction_activation != "sign":
        return
    _clip_warned = True
    warnings.warn(
        "Dual LoRA with ste='clip' trains in float16: a GradScaler scales the loss (65536 at the start), and the "
        "straight-through estimator clips the gradients it sees at [-1, 1], i.e. the true gradient at "
        "[-1/scale, 1/scale], so the result depends on the loss scale. Train in bfloat16 (no loss scaling), or choose "
        "ste='identity' (what clip computes whenever the gradients stay below 1, as they do at the default init).",
        UserWarning, stacklevel=3,
    )
