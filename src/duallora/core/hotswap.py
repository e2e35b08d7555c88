"""Hotswapping: an adapter's factors replaced in place by those of another adapter, so that a ``torch.compile``d
model is not recompiled (servers swap adapters this way).

A compiled graph reads the factor tensors themselves, and it is specialised on their shapes and on the constants
that the layer computes with (scale, tau, the warm-up length, the activations). So hotswapping copies new values into
the same tensors (``Tensor.copy_``, through peft's ``set_peft_model_state_dict``) and refuses any other shape or
constant before it changes anything. Dual LoRA's warm-up clock is a tensor as well, and it is copied with the rest.
On an FSDP2-sharded model, each rank keeps its own shard of the source's values.
"""

from __future__ import annotations

import os
from typing import Union

import torch
from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch.distributed.tensor import DTensor, distribute_tensor

# The config fields that fix a layer's shapes or constants; a swap between adapters that differ in one is refused
UPDATE_FIELDS = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "r1", "r2", "ste",
                 "magnitude_activation", "direction_activation", "tau", "norm_axis", "detach_norm")


def hotswap_adapter(model, source: Union[str, os.PathLike, dict], adapter_name: str = "default") -> None:
    """Replace the factors of ``adapter_name`` in ``model`` (a PeftModel) in place with those of ``source``.

    ``source``: an adapter folder (its config is checked against the live adapter's) or a state dict as
    ``get_peft_model_state_dict`` gives it (shapes checked; the constants are assumed to be the live adapter's). The
    outputs then equal those of ``source`` loaded afresh, and a compiled model runs on without recompiling. Anything
    that does not fit (other ranks, scale, tau, activations, missing or extra entries), or an adapter merged into
    the base weights (as peft's hotswap, which refuses it too), raises before any value changes.
    """
    if adapter_name not in model.peft_config:
        raise ValueError(f"hotswap_adapter: no adapter named {adapter_name!r}; this model holds "
                         f"{sorted(model.peft_config)}.")
    merged = [name for name, module in model.named_modules() if adapter_name in getattr(module, "merged_adapters", ())]
    if merged:  # W0 holds the old update: swapping the factors alone would change nothing the model computes
        raise ValueError(f"hotswap_adapter: the adapter {adapter_name!r} is merged into the base weights of "
                         f"{len(merged)} layer(s), such as {merged[0]!r}: new factors would not reach the outputs. "
                         "Call model.unmerge_adapter() first, swap, then merge again if you need to.")
    live = model.peft_config[adapter_name]
    if isinstance(source, (str, os.PathLike)):
        source_config = PeftConfig.from_pretrained(str(source))
        _check_same_constants(live, source_config, str(source))
        incoming = load_peft_weights(str(source), device="cpu")
        _check_same_warmup(live, source_config, incoming, str(source))
    else:
        incoming = dict(source)
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    _check_same_entries(expected, incoming)
    incoming = {key: _placed_like(expected[key], value) for key, value in incoming.items()}
    with torch.no_grad():  # load_state_dict copies into the existing tensors: the compiled graph keeps reading them
        set_peft_model_state_dict(model, incoming, adapter_name=adapter_name)


def _placed_like(live: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor from the source) as ``live`` is held: on an FSDP2-sharded model, this rank's shard
    of it as a DTensor (every rank calls hotswap_adapter with the same source, so each cuts its own shard: no
    communication), which loading into the sharded factor needs."""
    if not isinstance(live, DTensor):
        return value
    return distribute_tensor(value.to(live.device), live.device_mesh, live.placements, src_data_rank=None)


def _check_same_constants(live, incoming, where: str) -> None:
    differing = [(name, getattr(live, name, None), getattr(incoming, name, None)) for name in UPDATE_FIELDS
                 if _normalised(getattr(live, name, None)) != _normalised(getattr(incoming, name, None))]
    if differing:
        listed = "; ".join(f"{name}: {here!r} here, {there!r} in {where}" for name, here, there in differing)
        raise ValueError(
            f"hotswap_adapter: the adapters differ in what the compiled layers are specialised on ({listed}). Only "
            "an adapter with the same ranks and constants can be swapped in place; load this one as an adapter of "
            "its own instead (model.load_adapter(path, adapter_name=...)), which recompiles."
        )


def _check_same_warmup(live, incoming_config, incoming: dict, where: str) -> None:
    """Dual LoRA adapters of other warm-up lengths compute the same ``lam_t = 1`` once both are past their warm-up
    (two runs of other lengths, each with the warm-up fitted to it): swapped then; refused while either still ramps."""
    here, there = (getattr(c, "resolved_warmup_steps", None) for c in (live, incoming_config))
    if here == there:
        return
    steps = [int(v) for k, v in incoming.items() if "dual_lora_step" in k]
    taken = min(steps, default=0)
    if taken < max(here, there):
        raise ValueError(
            f"hotswap_adapter: the adapters have other warm-up lengths (warmup_steps {here} here, {there} in {where}) "
            f"and the source is at warm-up step {taken}: lam_t = min(1, t / warmup_steps) would differ, so its "
            "outputs would not be the source's. Only adapters past both warm-ups (lam_t = 1) swap across lengths; "
            "load this one as an adapter of its own instead (model.load_adapter(path, adapter_name=...))."
        )


def _check_same_entries(expected: dict, incoming: dict) -> None:
    missing, extra = sorted(expected.keys() - incoming.keys()), sorted(incoming.keys() - expected.keys())
    shapes = [(key, tuple(expected[key].shape), tuple(incoming[key].shape))
              for key in expected.keys() & incoming.keys() if expected[key].shape != incoming[key].shape]
    if missing or extra or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} entries missing, such as {missing[0]!r}")
        if extra:
            problems.append(f"{len(extra)} entries this adapter does not have, such as {extra[0]!r}")
        if shapes:
            key, here, there = sorted(shapes)[0]
            problems.append(f"{len(shapes)} of other shapes, such as {key!r}: {here} here, {there} in the source "
                            "(another rank)")
        raise ValueError(f"hotswap_adapter: the source does not fit this adapter: {'; '.join(problems)}. Nothing "
                         "was changed. Swap in an adapter of the same method, modules and ranks, or load it as an "
                         "adapter of its own (model.load_adapter(path, adapter_name=...)).")


def _normalised(value):
    """Sets and lists of module names compare as sets; enums as their values."""
    if isinstance(value, (set, list, tuple)):
        return frozenset(value)
    return getattr(value, "value", value)
