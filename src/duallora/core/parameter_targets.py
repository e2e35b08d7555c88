"""``target_parameters``: which parameters an adapter wraps, checked before the model changes, and the MoE targets
that ``target_modules`` alone would leave untrained.

The matching is peft's (``BaseTuner._inject_parameters``, which does the wrapping): a parameter's key is its module's
name, without the ``.base_layer`` of wrappers, and its own name; a target matches a key that equals it or ends with
``"." + target``.
"""

from __future__ import annotations

import difflib
import warnings

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .param_wrapper import AdaptedParameter, stored_layout_is_transposed


def unwrapped_name(module_name: str) -> str:
    """``a.experts.base_layer`` -> ``a.experts``: the name the module had before wrappers were put around it."""
    return ".".join(part for part in module_name.split(".") if part != "base_layer")


def parameter_keys(model: nn.Module) -> list[tuple[str, str, str, nn.Module]]:
    """``(key, module_name, parameter_name, module)`` for every parameter the injection could wrap: those held
    directly by a module that is not an adapter's own (factor modules, the Linear inside an adapted layer)."""
    adapters = {name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    found = []
    for module_name, module in model.named_modules():
        if not module_name or isinstance(module, BaseTunerLayer):
            continue
        inside = [a for a in adapters if module_name.startswith(a + ".")]
        if any(set(module_name[len(a) + 1:].split(".")) != {"base_layer"} for a in inside):
            continue  # an adapter's own module (a factor, a dropout), not a wrapped one
        for param_name, _ in module.named_parameters(recurse=False):
            found.append((f"{unwrapped_name(module_name)}.{param_name}", module_name, param_name, module))
    return found


def matches(key: str, targets) -> bool:
    return key in targets or any(key.endswith(f".{target}") for target in targets)


def check_parameter_targets(model: nn.Module, config, module_targets: list[str]) -> None:
    """Raise, before anything is replaced, for a target that matches no parameter (listing the model's 3-D ones and
    the nearest names), a matched parameter that cannot be adapted (its layout, dimensions or dtype), and one whose
    module is also adapted as a whole (``target_modules``, or an adapted layer already)."""
    targets = sorted(set(config.target_parameters))
    keys = parameter_keys(model)
    for target in targets:
        if not any(matches(key, [target]) for key, *_ in keys):
            raise ValueError(no_parameter_error(target, keys))
    adapted_modules = {unwrapped_name(name) for name, m in model.named_modules()
                       if isinstance(m, BaseTunerLayer) and not isinstance(m, AdaptedParameter)}
    for key, module_name, param_name, module in keys:
        if not matches(key, targets):
            continue
        owner = unwrapped_name(module_name)
        if owner in adapted_modules or owner in module_targets:
            raise ValueError(
                f"target_parameters matches {key}, a parameter of {owner}, which target_modules adapts as a whole "
                f"({type(module).__name__}): a weight can have one adapter path, not two. Drop "
                f"{owner.rsplit('.', 1)[-1]!r} from target_modules, or the parameter from target_parameters."
            )
        stored_layout_is_transposed(module, param_name)  # raises for a layout, dimension or dtype it cannot adapt


def no_parameter_error(target: str, keys: list) -> str:
    stacks = sorted({_short(key) for key, _, name, module in keys if module._parameters[name].dim() == 3})
    near = difflib.get_close_matches(target, sorted({_short(key) for key, *_ in keys}), n=4, cutoff=0.5)
    listing = f"Its 3-D parameters (expert stacks) are {stacks}." if stacks else "It has no 3-D parameter."
    hint = f" Similar names: {near}." if near else ""
    return (f"target_parameters entry {target!r} matches no parameter of this model. {listing}{hint} An entry "
            "names a parameter by its full key or a suffix of it, e.g. 'mlp.experts.gate_up_proj' or "
            "'gate_up_proj' (see model.named_parameters()).")


def _short(key: str) -> str:
    """``model.layers.3.mlp.experts.gate_up_proj`` -> ``mlp.experts.gate_up_proj``: the name without the layer."""
    parts = key.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[-1] + 1:]) if digits else key


def warn_unadapted_experts(model: nn.Module) -> None:
    """Warn once when 3-D parameters (expert stacks: most of a MoE model's weights) are left without an adapter."""
    wrapped = {(id(m.get_base_layer()), m.parameter_name) for m in model.modules() if isinstance(m, AdaptedParameter)}
    left = [key for key, _, name, module in parameter_keys(model)
            if module._parameters[name].dim() == 3 and module._parameters[name].is_floating_point()
            and (id(module), name) not in wrapped]
    if left:
        names = sorted({_short(key) for key in left})
        warnings.warn(
            f"{len(left)} 3-D parameter(s) of this model get no adapter: {names} (e.g. {left[0]}). In a mixture-of-"
            "experts model these are the expert weights, most of the model; target_modules reaches only Linear "
            f"layers. To train them, add target_parameters={names}.", UserWarning, stacklevel=4,
        )


def convert_moe_targets(config, model: nn.Module) -> None:
    """peft's conversion of ``target_modules`` for MoE models whose experts transformers 5 holds as 3-D parameters
    (Mixtral, Qwen3-MoE, OLMoE; not Qwen2-MoE in peft 0.21.2, where the unadapted-experts warning names the
    ``target_parameters`` to add): ``"all-linear"`` or the old per-expert names become ``target_parameters`` for
    the expert stacks and the router (``gate_up_proj`` with twice the rank and alpha: it fuses two projections).
    peft applies it to LoRA only; here to these methods too, in place, as peft does."""
    try:
        from peft.utils.transformers_weight_conversion import _convert_peft_config_moe
    except ImportError:  # a peft without the conversion: the unadapted-experts warning still names the fix
        return
    if config.target_modules is not None and hasattr(getattr(model, "config", None), "model_type"):
        _convert_peft_config_moe(config, model)
