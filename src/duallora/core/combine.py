"""``add_weighted_adapter``: a new adapter whose update is ``sum_i w_i dW_i`` of existing ones, where that is exact.

What is exact differs per method (docs/combining.md): D2-LoRA's update is linear in its branch products, so any
number of adapters concatenate ("cat"); Dual LoRA's ``m(B A) * d(D C)`` is not linear in its factors, so only one
adapter times a weight is (its size into B, its sign into D). Everything else is refused, before anything changes.
Modules trained whole (``modules_to_save``: a classifier head) are not weighted: the new adapter takes the one
source adapter's trained copies, and adapters of which more than one trains such modules are refused.
"""

from __future__ import annotations

import math

import torch

COMBINATION_TYPES = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ALTERNATIVES = (
    "Instead: merge the adapters into the base weights one after another (model.set_adapter(name); "
    "model.merge_adapter() for each), or export each one to LoRA (duallora.convert_to_lora) and combine the LoRA "
    "adapters with peft's add_weighted_adapter (lossy for Dual LoRA: see docs/combining.md)."
)
# LoRA's options that only its svd, ties and dare combinations read: set here, they would be silently ignored
LORA_ONLY_OPTIONS = ("svd_rank", "svd_clamp", "svd_full_matrices", "svd_driver", "density", "majority_sign_method")
LORA_OPTION_DEFAULTS = {"svd_full_matrices": True, "majority_sign_method": "total"}


def refuse(method: str, reason: str) -> None:
    raise ValueError(f"add_weighted_adapter for {method}: {reason}. {ALTERNATIVES}")


def check_request(tuner, adapters, weights, adapter_name: str, combination_type: str, lora_options: dict) -> None:
    """The checks every method shares: names, weights, the combination type, LoRA-only options."""
    method = tuner.method_title
    unknown = [name for name in adapters if name not in tuner.peft_config]
    if unknown or not adapters:
        raise ValueError(f"add_weighted_adapter: unknown adapters {unknown or adapters}; this model holds "
                         f"{sorted(tuner.peft_config)}.")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} exists already; choose a new "
                         f"name, or delete_adapter({adapter_name!r}) first.")
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; give one "
                         f"weight per adapter.")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w == 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"add_weighted_adapter: weights must be finite non-zero numbers, got {list(weights)} (an "
                         f"adapter of weight 0 contributes nothing: leave it out of the list).")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"add_weighted_adapter: unknown combination_type {combination_type!r}; peft's are "
                         f"{list(COMBINATION_TYPES)}.")
    set_options = [k for k, v in lora_options.items() if v != LORA_OPTION_DEFAULTS.get(k)]
    if set_options:
        refuse(method, f"{set_options} belong to LoRA's svd/ties/dare combinations, which {method} does not have")
    if any(tuner.peft_config[name].rank_pattern or tuner.peft_config[name].alpha_pattern for name in adapters):
        refuse(method, "adapters with rank_pattern or alpha_pattern cannot be combined yet")
    layers_of = {name: {key for key, layer in tuner._adapted_layers() if holds(layer, name)} for name in adapters}
    if any(layers_of[name] != layers_of[adapters[0]] for name in adapters):
        refuse(method, "the adapters adapt different modules; combine adapters with the same target_modules")
    with_heads = [name for name in adapters if trained_modules_of(tuner.model, name)]
    if len(with_heads) > 1:  # a head (classifier, embeddings) is a whole module: no sum of two is either one
        refuse(method, f"the adapters {with_heads} each train their own modules_to_save (such as "
                       f"{trained_modules_of(tuner.model, with_heads[0])[0]!r}), and whole modules cannot be added "
                       "up; combine adapters of which at most one has modules_to_save")


def trained_modules_of(model, adapter_name: str) -> list[str]:
    """The modules_to_save wrappers (peft's ModulesToSaveWrapper) that hold a copy trained by this adapter."""
    from peft.utils import ModulesToSaveWrapper

    return [name for name, module in model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save]


def copy_trained_modules(model, source: str, adapter_name: str) -> None:
    """The new adapter's copies of the modules_to_save are the source adapter's trained ones (peft makes them
    copies of the original, untrained module: one adapter times 1.0 then differed from the adapter)."""
    from peft.utils import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and source in module.modules_to_save:
            module.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[source].state_dict())


def holds(layer, adapter_name: str) -> bool:
    return adapter_name in getattr(layer, layer.adapter_layer_names[0])


def add_weighted_adapter(tuner, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str, lora_options: dict) -> None:
    """Check, add the new adapter with the method's config, fill its factors; on any failure remove it again."""
    adapters, weights = list(adapters), list(weights)
    check_request(tuner, adapters, weights, adapter_name, combination_type, lora_options)
    weights = [float(w) for w in weights]
    config = tuner.combined_config([tuner.peft_config[name] for name in adapters], weights, combination_type)
    tuner.peft_config[adapter_name] = config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        with torch.no_grad():
            for _, layer in tuner._adapted_layers():
                if holds(layer, adapter_name):
                    layer.fill_weighted(adapter_name, adapters, weights)
            for source in adapters:  # at most one has modules_to_save (check_request)
                copy_trained_modules(tuner.model, source, adapter_name)
    except BaseException:
        if adapter_name in tuner.peft_config:
            tuner.delete_adapter(adapter_name)
        raise


def copy_into(layer, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy combined factors into the new adapter's (its dtype and device kept, as the injection made them)."""
    for name, module in zip(layer.adapter_layer_names, layer.factor_modules(adapter_name)):
        module.weight.copy_(tensors[name])
