"""The PEFT tuners: find the target modules, check everything, then replace them with adapted layers.

Every check runs before the model is touched, so a call that fails leaves the model as it was: target modules
that match nothing or are of an unsupported type, a saved adapter file that is corrupt or was made for other
shapes, a safe merge that would write NaN/Inf into any layer.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Optional

from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from peft.tuners.tuners_utils import _ExcludedModule
from safetensors import SafetensorError, safe_open
from torch import nn

from .layer import AdaptedLayer, Conv1D, is_adaptable, unsupported_layer_error

_PEFT_KEY_PREFIX = "base_model.model."


class AdaptedWeightTuner(BaseTuner):
    """Shared tuner; subclasses name their prefix and layer class."""

    tuner_layer_cls: type[AdaptedLayer]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        if state_dict is None:
            self._check_targets(model, config)
        adapter_dir = getattr(config, "_adapter_dir", None)
        if adapter_dir is not None:
            check_adapter_file(model, adapter_dir, self.tuner_layer_cls)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _check_targets(self, model: nn.Module, config) -> None:
        """Dry run of the target matching: raise before any module is replaced."""
        trial = copy.deepcopy(config)
        trial = self._prepare_adapter_config(trial, self.get_model_config(model))
        trial = _maybe_include_all_linear_layers(trial, model)
        inside_adapters = [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        matched, excluded = [], []
        for name, module in model.named_modules():
            if not name or any(name.startswith(prefix) for prefix in inside_adapters):
                continue
            result = check_target_module_exists(trial, name)
            if isinstance(result, _ExcludedModule):
                excluded.append(name)
            elif result:
                matched.append((name, module))
        bad = [(name, m) for name, m in matched
               if not is_adaptable(m.get_base_layer() if isinstance(m, BaseTunerLayer) else m)
               or (isinstance(m, BaseTunerLayer) and not isinstance(m, self.tuner_layer_cls))]
        if bad:
            name, module = bad[0]
            raise unsupported_layer_error(module, name)
        if not matched:
            names = adaptable_module_names(model)
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            hint = f" All of them were excluded by exclude_modules={config.exclude_modules}." if excluded else ""
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no module of this model.{hint} "
                f"The Linear/Conv1D modules it has are named {leaves} ({len(names)} in all, e.g. "
                f"{names[:6]}). Pass some of these names, a regex, or 'all-linear'."
            )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.lora_alpha)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, r=r, lora_alpha=alpha)
            return
        if isinstance(target, BaseTunerLayer) or not is_adaptable(target):
            raise unsupported_layer_error(target, current_key)
        _align_fan_in_fan_out(config, target, current_key)
        new_module = self.tuner_layer_cls(target, adapter_name, config, r=r, lora_alpha=alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter does not train
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ merging
    def _check_merge_finite(self, adapter_names: Optional[list[str]]) -> None:
        bad = [f"{name}: {'; '.join(problems)}" for name, m in self.model.named_modules()
               if isinstance(m, AdaptedLayer) and (problems := m.merge_problems(adapter_names))]
        if bad:
            raise ValueError(
                f"safe_merge: merging would write NaN/Inf into {len(bad)} layer(s): {' | '.join(bad[:5])}"
                f"{' | ...' if len(bad) > 5 else ''}; no weight was changed. The adapter is broken: check its training "
                "(learning rate, loss scaling)."
            )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_merge_finite(adapter_names)  # all layers first: a failure must not leave half a merge
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self._check_merge_finite(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Names of the modules these methods can adapt (Linear and Conv1D with a floating-point weight)."""
    return [name for name, m in model.named_modules() if is_adaptable(m)]


def _align_fan_in_fan_out(config, target: nn.Module, key: str) -> None:
    """The layer type decides the weight orientation; warn when the config says otherwise (as PEFT's LoRA)."""
    is_conv1d = isinstance(target, Conv1D)
    if config.fan_in_fan_out != is_conv1d:
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out} but {key} is a {type(target).__name__}; "
            f"using fan_in_fan_out={is_conv1d}."
        )
        config.fan_in_fan_out = is_conv1d


def check_adapter_file(model: nn.Module, adapter_dir: str, layer_cls: type[AdaptedLayer]) -> None:
    """Check a saved adapter against the base model before anything is loaded.

    Reads only the safetensors header: a corrupt or truncated file, or factors made for layers of other shapes,
    raise a ValueError naming the file, the layer and both shapes.
    """
    path = os.path.join(adapter_dir, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return  # peft reports a missing weights file itself, before touching the model
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        size = os.path.getsize(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"The adapter file {path} is corrupt or truncated ({err}); the model was not changed. "
            "Save the adapter again or restore the file."
        ) from err
    if size == 0:
        raise ValueError(f"The adapter file {path} is empty; the model was not changed.")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for key, shape in shapes.items():
        bare = key.removeprefix(_PEFT_KEY_PREFIX)
        module_name, _, param_name = bare.rpartition(".")
        if param_name in layer_cls.factor_dims:
            _check_factor_shape(path, modules, module_name, param_name, shape, layer_cls.factor_dims[param_name])
        elif bare in params and tuple(params[bare].shape) != shape:
            raise ValueError(
                f"The adapter {path} does not fit this base model: it holds {bare} with shape {shape}, but the model's "
                f"{bare} has shape {tuple(params[bare].shape)}. Load it onto the base model it was trained with."
            )


def _check_factor_shape(path, modules, module_name, param_name, shape, dims) -> None:
    module = modules.get(module_name)
    if module is None:
        raise ValueError(
            f"The adapter {path} has weights for layer {module_name!r}, which this base model does not have. "
            "Load it onto the base model it was trained with."
        )
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"The adapter {path} targets {module_name!r}, a {type(module).__name__} without a 2-d weight.")
    out_f, in_f = (weight.shape[1], weight.shape[0]) if isinstance(module, Conv1D) else tuple(weight.shape)
    sizes = {"out": out_f, "in": in_f}
    for axis, dim_name in enumerate(dims):
        if dim_name is not None and shape[axis] != sizes[dim_name]:
            raise ValueError(
                f"The adapter {path} does not fit this base model: layer {module_name!r} has weight shape "
                f"(out={out_f}, in={in_f}), but the adapter's {param_name} has shape {shape}, made for a layer with "
                f"{dim_name}={shape[axis]}. Load it onto the base model it was trained with."
            )
