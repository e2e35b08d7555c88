"""Dual LoRA's warm-up clock: ``lam_t = min(1, t / warmup_steps)``, with ``t`` the optimizer steps taken.

``t`` lives in each layer's ``dual_lora_step`` buffer, so it is saved with the adapter and a resumed run goes on
where it stopped. It advances by itself: a global ``torch.optim`` step post-hook counts one step for every Dual
LoRA adapter whose factors the stepping optimizer holds. This works with any training loop (plain PyTorch,
``transformers.Trainer``, accelerate) without a callback, counts one step per gradient-accumulation cycle, and
does not count steps that a ``GradScaler`` skipped (it never calls ``optimizer.step``).
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import nn

_tracked_layers: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def track(layer: nn.Module) -> None:
    """Let optimizer steps advance this layer's warm-up clock (layers call this themselves)."""
    _tracked_layers.add(layer)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _tracked_layers:
        return  # no Dual LoRA layer alive: a plain fine-tuning run pays one set check
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
    for layer in list(_tracked_layers):
        layer.advance_warmup(stepped)


_hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


def warmup_steps_taken(model: nn.Module, adapter_name: str = "default") -> int:
    """The warm-up clock ``t`` of ``adapter_name`` (the same in every layer)."""
    for module in model.modules():
        steps = getattr(module, "dual_lora_step", None)
        if steps is not None and adapter_name in steps:
            return int(steps[adapter_name])
    raise ValueError(f"No Dual LoRA adapter named {adapter_name!r} in this model.")


@torch.no_grad()
def set_warmup_step(model: nn.Module, step: int, adapter_name: str = "default") -> None:
    """Set the warm-up clock ``t`` of ``adapter_name`` in every layer (e.g. to restart the ramp)."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be an integer >= 0; got {step!r}.")
    found = False
    for module in model.modules():
        steps = getattr(module, "dual_lora_step", None)
        if steps is not None and adapter_name in steps:
            steps[adapter_name].fill_(step)
            found = True
    if not found:
        raise ValueError(f"No Dual LoRA adapter named {adapter_name!r} in this model.")
