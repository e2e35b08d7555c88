"""Each trainable factor of an adapter in a leaf module of its own, as peft's LoRA holds ``lora_A`` and ``lora_B``.

Why not a ``ParameterDict`` on the layer: FSDP1's auto-wrap (peft's ``fsdp_auto_wrap_policy``, which accelerate
applies to a PEFT model) makes every leaf module whose ``weight`` trains an FSDP unit of its own, so that the frozen
base weights and the trainable factors go into different flat parameters: with ``use_orig_params=False`` a flat
parameter must have one ``requires_grad``, and with any setting one dtype (a bf16 base, float32 factors). Factors
held by the layer itself would share the decoder layer's flat parameter with ``W0`` and fail there.

An FSDP1 unit holds its parameter whole only inside its own forward (and its backward), so the layer runs its whole
computation inside the forwards of its factors' modules, nested (:func:`run_inside`): each unit gathers its factor
before, and frees it after, the computation; FSDP's hooks on the result gather them again for the backward. Without
FSDP the nesting is a few plain calls.

The saved format is LoRA's too: ``...dual_lora_A.weight``. Adapters saved by duallora 0.1 hold ``...dual_lora_A``
(the factor itself); :func:`current_key` maps them on load (the tuner's remap of adapter files, the layer's
``load_state_dict`` pre-hook for module state dicts).
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class Factor(nn.Module):
    """One factor of one adapter: a leaf module with the factor as its ``weight``."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)

    def forward(self, compute: Callable[[], T]) -> T:
        """``compute()``, run while this module's forward is in progress (an FSDP1 unit holds ``weight`` whole)."""
        return compute()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


def run_inside(modules: Sequence[nn.Module], compute: Callable[[], T]) -> T:
    """``compute()`` inside the forwards of ``modules``, nested in order: the first module's forward calls the
    second's, ..., the last one's calls ``compute``."""
    if not modules:
        return compute()
    return modules[0](lambda: run_inside(modules[1:], compute))


def current_key(key: str, factor_names: Sequence[str]) -> str:
    """The key of today's layout for a key written by duallora 0.1, which held each factor itself: ``...dual_lora_A``
    in an adapter file, ``...dual_lora_A.<adapter>`` in a module's state dict; both gain ``.weight``. Other keys
    are returned as they are."""
    parts = key.split(".")
    if parts[-1] in factor_names or (len(parts) > 1 and parts[-2] in factor_names and parts[-1] != "weight"):
        return key + ".weight"
    return key


def rename_0_1_keys(state_dict: dict, prefix: str, factor_names: Sequence[str]) -> None:
    """A module state dict saved by duallora 0.1, renamed in place (a ``load_state_dict`` pre-hook of the layer)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + current_key(key[len(prefix):], factor_names)
        if new != key:
            state_dict[new] = state_dict.pop(key)
