"""The PEFT tuners: find the target modules, check everything, then replace them with adapted layers.

Every check runs before the model is touched, so a call that fails leaves the model as it was: target modules
that match nothing or are of an unsupported type, a saved adapter file that is corrupt or was made for other
shapes, a safe merge that would write NaN/Inf into any layer.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import warnings
from typing import Optional

from peft import PeftModel
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
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors import SafetensorError, safe_open
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .base_weight import ParameterWeight, base_weight_of
from . import combine
from .layer import AdaptedLayer, Conv1D, is_adaptable, is_quantized_bitsandbytes, unsupported_layer_error
from .mixed_batch import BASE_ROWS, RowAdapters
from .sharding import zero3_merge_error
from .factor import current_key
from .param_wrapper import AdaptedParameter, stored_layout_is_transposed
from .parameter_targets import check_parameter_targets, convert_moe_targets, unwrapped_name, warn_unadapted_experts
from .watch import full_shape

_PEFT_KEY_PREFIX = "base_model.model."


class AdaptedWeightTuner(BaseTuner):
    """Shared tuner; subclasses name their prefix and layer class."""

    tuner_layer_cls: type[AdaptedLayer]
    param_wrapper_cls: type[AdaptedParameter]  # the method on target_parameters
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        convert_moe_targets(self.peft_config[adapter_name], model)  # before all-linear is expanded (peft's order)
        config = self.peft_config[adapter_name] = _expand_all_linear(self.peft_config[adapter_name], model)
        if state_dict is None:
            self._check_targets(model, config)
        adapter_dir = getattr(config, "_adapter_dir", None)
        if adapter_dir is not None:
            check_adapter_file(model, adapter_dir, self.tuner_layer_cls)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        if not hasattr(self, "_merge_guard"):  # once per tuner: it runs before any child loads
            self._merge_guard = self.register_load_state_dict_pre_hook(_refuse_new_factors_into_a_merge)
        if not config.inference_mode:
            warn_unadapted_experts(model)

    def _prepare_adapter_config(self, peft_config, model_config):
        """LoRA's rule: no ``target_modules`` means the model type's default ones, and is an error only for a model
        type without defaults when no ``target_parameters`` are given either."""
        if peft_config.target_modules is None:
            defaults = self.target_module_mapping.get(model_config.get("model_type"))
            if defaults is not None:
                peft_config.target_modules = defaults if isinstance(defaults, str) else set(defaults)
            elif not peft_config.target_parameters:
                raise ValueError("Please specify `target_modules` or `target_parameters` in `peft_config`.")
        return peft_config

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
        if trial.target_parameters:
            check_parameter_targets(model, trial, [unwrapped_name(name) for name, _ in matched])
        bad = [(name, m) for name, m in matched
               if not is_adaptable(m.get_base_layer() if isinstance(m, BaseTunerLayer) else m)
               or (isinstance(m, BaseTunerLayer) and not isinstance(m, self.tuner_layer_cls))]
        if bad:
            name, module = bad[0]
            raise unsupported_layer_error(module, name)
        if not matched and (trial.target_modules or not trial.target_parameters):
            names = adaptable_module_names(model)
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            # `excluded` also holds modules_to_save (a classifier head), which is no exclusion of the user's
            hint = (f" All of them were excluded by exclude_modules={config.exclude_modules}."
                    if excluded and config.exclude_modules else "")
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no module of this model.{hint} "
                f"The Linear/Conv1D modules it has are named {leaves} ({len(names)} in all, e.g. "
                f"{names[:6]}). Pass some of these names, a regex, or 'all-linear'."
            )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key,
                            parameter_name: Optional[str] = None, **kwargs):
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.lora_alpha)
        if parameter_name is not None:  # target_parameters (peft's _inject_parameters)
            if isinstance(target, self.param_wrapper_cls) and target.parameter_name == parameter_name:
                target.update_layer(adapter_name, config, r=r, lora_alpha=alpha)
                return
            new_module = self.param_wrapper_cls(target, adapter_name, config, parameter_name=parameter_name, r=r,
                                                lora_alpha=alpha)
        elif isinstance(target, self.tuner_layer_cls) and not isinstance(target, AdaptedParameter):
            target.update_layer(adapter_name, config, r=r, lora_alpha=alpha)
            return
        else:
            if isinstance(target, BaseTunerLayer) or not is_adaptable(target):
                raise unsupported_layer_error(target, current_key)
            _align_fan_in_fan_out(config, target, current_key)
            new_module = self.tuner_layer_cls(target, adapter_name, config, r=r, lora_alpha=alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter does not train
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, AdaptedParameter) and not isinstance(new_module, BaseTunerLayer):
            setattr(parent, child_name, new_module)  # unloading a nest: the module it held, as it was (peft's step
            return  # would copy a weight from the inner wrapper, which has none)
        super()._replace_module(parent, child_name, new_module, child)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft's remap of an adapter file's keys onto the model's, after renaming those of files saved by 0.1
        (``...dual_lora_A``: the factor itself, now ``...dual_lora_A.weight``)."""
        names = cls.tuner_layer_cls.adapter_layer_names
        state_dict = {current_key(key, names): value for key, value in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model=model, config=config, adapter_name=adapter_name,
                                                          state_dict=state_dict)

    # ------------------------------------------------------------------ mixed batches
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """peft's ``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``: each row through
        its own adapter (``"__base__"``: the base model). PeftModel calls this around the forward; the names reach
        every adapted layer (and ``modules_to_save``) through a forward pre-hook. The checks and messages are LoRA's,
        plus the names the model does hold; the count is checked against the batch at every forward of the model
        (LoRA checks it at each Linear, which a model adapted on expert stacks alone has none of)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"`adapter_names` must be a list of adapter names, one per row; got {adapter_names!r}.")
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = {name for _, layer in self._adapted_layers() for name in getattr(layer, layer.adapter_layer_names[0])}
        unknown = {name for name in adapter_names if name != BASE_ROWS} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}. This model "
                             f"holds {sorted(known)}; '{BASE_ROWS}' names the base model.")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats each input num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        rows = RowAdapters(adapter_names)
        hook = functools.partial(_pass_adapter_names, adapter_names=rows)
        handles = [self.model.register_forward_pre_hook(functools.partial(_see_model_input, rows=rows),
                                                        with_kwargs=True)]
        handles += [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.model.modules()
                    if isinstance(m, (AdaptedLayer, AuxiliaryTrainingWrapper))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ merging
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """peft's selection of the adapter's entries. On a model sharded with FSDP2 these are DTensor shards, as
        LoRA's are (what a sharded checkpoint and :func:`~duallora.hotswap_adapter` need); only ``save_pretrained``
        is refused, before it writes: saved as they are, safetensors fails ("invalid python storage", LoRA too) and
        ``safe_serialization=False`` silently writes rank 0's shard as the adapter."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        sharded = [key for key, value in selected.items() if isinstance(value, DTensor)]
        if sharded and called_by_save_pretrained():  # raise, not gather: full_tensor() is a collective, and a save
            # on rank 0 alone would hang
            raise ValueError(
                f"save_pretrained got the adapter of a sharded (FSDP2) model: {len(sharded)} entries such as "
                f"{sharded[0]!r} are DTensor shards, and saving them would write one rank's part. Nothing was "
                "written. Gather the full state dict on every rank, then save from rank 0:\n"
                "    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
                "cpu_offload=True))\n"
                "    model.save_pretrained(path, state_dict=sd, is_main_process=dist.get_rank() == 0)\n"
                "(from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions)."
            )
        return selected

    # ------------------------------------------------------------------ combining
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "cat", svd_rank=None, svd_clamp=None, svd_full_matrices=True,
                             svd_driver=None, density=None, majority_sign_method="total") -> None:
        """Add ``adapter_name`` with the update ``sum_i weights[i] * dW_i`` of ``adapters``, where that is exact
        (:mod:`duallora.core.combine`, docs/combining.md); peft's signature, LoRA's options refused. Not activated,
        as with LoRA: ``model.set_adapter(adapter_name)``."""
        lora_options = dict(svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                            svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method)
        combine.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, lora_options)

    def combined_config(self, configs: list, weights: list[float], combination_type: str):
        """The new adapter's config (raise, via ``combine.refuse``, where the method cannot combine exactly)."""
        raise NotImplementedError

    def _check_merge_finite(self, adapter_names: Optional[list[str]]) -> None:
        bad = [f"{name}: {'; '.join(problems)}" for name, m in self.model.named_modules()
               if isinstance(m, AdaptedLayer) and (problems := m.merge_problems(adapter_names))]
        if bad:
            raise ValueError(
                f"safe_merge: merging would write NaN/Inf into {len(bad)} layer(s): {' | '.join(bad[:5])}"
                f"{' | ...' if len(bad) > 5 else ''}; no weight was changed. The adapter is broken: check its "
                "training (learning rate, loss scaling)."
            )

    def _check_whole_weights(self, action: str) -> None:
        """Every layer first: under ZeRO-3 outside a gather, refuse before any layer is touched."""
        partitioned = [f"{name}.{param}" for name, m in self._adapted_layers() for param in m.partitioned_parameters()]
        if partitioned:
            raise zero3_merge_error(action, partitioned)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_whole_weights("merge_adapter")
        if safe_merge:
            self._check_merge_finite(adapter_names)  # all layers first: a failure must not leave half a merge
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        _report_rounding(self._adapted_layers())

    def unmerge_adapter(self) -> None:
        self._check_whole_weights("unmerge_adapter")
        super().unmerge_adapter()

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_whole_weights("merge_and_unload")
        if merge and safe_merge:
            self._check_merge_finite(adapter_names)
        layers = self._adapted_layers()  # kept: unloading takes them out of the model
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if merge:
            _report_rounding(layers)
        return model

    def _adapted_layers(self) -> list[tuple[str, AdaptedLayer]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, AdaptedLayer)]

    @torch.no_grad()
    def merge_and_dequantize(self, dtype: Optional[torch.dtype] = None, safe_merge: bool = False,
                             adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The base model with the adapters merged and every quantized layer dequantized: each adapted layer becomes
        an ``nn.Linear`` holding ``f(W0)`` computed in float32 from the dequantized ``W0`` and cast once to
        ``dtype`` (default: the model's ``config.dtype``), so the merge is not rounded to 4 or 8 bits again; the
        other quantized layers are dequantized by transformers (``model.dequantize``). On a dense base this is
        ``merge_and_unload``."""
        layers = self._adapted_layers()
        if not any(layer.base.quantized for _, layer in layers):
            return self.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
        self._check_whole_weights("merge_and_dequantize")
        if safe_merge:
            self._check_merge_finite(adapter_names)
        dtype = dtype or _config_dtype(self.model)
        for name, layer in layers:
            if isinstance(layer, AdaptedParameter):  # a dense parameter (bitsandbytes quantizes Linear layers only)
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)  # exact; unload() keeps it
                continue
            if layer.merged:
                layer.unmerge()  # the quantized W0 as it was, not its requantized merge
            held = getattr(layer, layer.adapter_layer_names[0])
            names = [n for n in (adapter_names or layer.active_adapters) if n in held]
            weight = layer._merged_weight(names)[0] if names else layer.base.full()
            bias = layer.get_base_layer().bias
            dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device,
                              dtype=dtype)
            dense.weight.copy_(weight)
            if bias is not None:
                dense.bias.copy_(bias)
            self.model.set_submodule(name, dense)
        model = self.unload()  # what else peft wraps (modules_to_save)
        if any(is_quantized_bitsandbytes(m) for m in model.modules()):
            model.dequantize(dtype=dtype)
        elif getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        return model


def _refuse_new_factors_into_a_merge(tuner, state_dict, prefix, *args) -> None:
    """``load_state_dict`` (``set_peft_model_state_dict``, a checkpoint) with new factor values for an adapter merged
    into the base weights: they would not reach the outputs, since ``W0`` holds the merged update (peft's LoRA loads
    them silently). Refused before anything loads; equal values (a checkpoint of this very state) pass."""
    for name, layer in tuner.model.named_modules():
        if not isinstance(layer, AdaptedLayer):
            continue
        for adapter in layer.merged_adapters:
            for attr, factor in zip(layer.adapter_layer_names, layer.factors(adapter)):
                value = state_dict.get(f"{prefix}model.{name}.{attr}.{adapter}.weight")
                if (value is None or isinstance(value, DTensor) or isinstance(factor, DTensor)
                        or torch.equal(value.to(factor.device, factor.dtype), factor)):
                    continue
                raise ValueError(
                    f"Loading new values of adapter {adapter!r} into {name}, where it is merged into the base "
                    "weights: they would not reach the outputs (W0 holds the merged update). Nothing was loaded. "
                    "Call model.unmerge_adapter() first, load, then merge again if you need to."
                )


def called_by_save_pretrained(depth: int = 10) -> bool:
    """Whether ``PeftModel.save_pretrained`` is among the callers: it writes the file as soon as
    ``get_peft_model_state_dict`` returns, with no hook of the tuner's in between."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is PeftModel.save_pretrained.__code__:
            return True
        frame = frame.f_back
    return False


def _see_model_input(module, args, kwargs, rows: RowAdapters):
    """The model's forward pre-hook in a mixed batch: one adapter name per batch row, checked, and the number of
    tokens recorded for the layers whose input is flattened to tokens (:mod:`.mixed_batch`)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    embeds = kwargs.get("inputs_embeds")
    shape = ids.shape if ids is not None else embeds.shape[:-1] if embeds is not None else None
    if shape is None or len(shape) == 0:
        rows.tokens = None
        return
    if shape[0] != len(rows):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(rows)} and {shape[0]} respectively.")
    rows.tokens = shape.numel()


def _pass_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _expand_all_linear(config, model: nn.Module):
    """peft's ``target_modules="all-linear"``, also on a model that already holds adapted layers (a second adapter):
    peft counts a wrapped layer only when its class name contains "Linear", its naming convention, and skips
    everything inside a wrapper, so without this a second "all-linear" adapter would match nothing."""
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    config = _maybe_include_all_linear_layers(config, model)
    if all_linear:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        config.target_modules |= {name for name, m in model.named_modules()
                                  if isinstance(m, AdaptedLayer) and m.get_base_layer() is not output}
    return config


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
        module_name, _, param_name = bare.removesuffix(".weight").rpartition(".")  # 0.1 saved no ".weight"
        if param_name in layer_cls.factor_dims:
            _check_factor_shape(path, modules, module_name, param_name, shape, layer_cls.factor_dims[param_name])
        elif bare in params and tuple(full_shape(params[bare])) != shape:
            raise ValueError(
                f"The adapter {path} does not fit this base model: it holds {bare} with shape {shape}, but the "
                f"model's {bare} has shape {tuple(full_shape(params[bare]))}. Load it onto the base model it was "
                "trained with."
            )


def _check_factor_shape(path, modules, module_name, param_name, shape, dims) -> None:
    module = modules.get(unwrapped_name(module_name))  # a target_parameters adapter nests: experts.base_layer.X
    if module is None:
        raise ValueError(
            f"The adapter {path} has weights for layer {module_name!r}, which this base model does not have. "
            "Load it onto the base model it was trained with."
        )
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if not is_adaptable(module):
        _check_parameter_factor_shape(path, module, module_name, param_name, shape, dims)
        return
    out_f, in_f = base_weight_of(module).shape  # (out, in), also for Conv1D and a quantized layer's packed weight
    sizes = {"out": out_f, "in": in_f}
    for axis, dim_name in enumerate(dims):
        if dim_name is not None and shape[axis] != sizes[dim_name]:
            raise ValueError(
                f"The adapter {path} does not fit this base model: layer {module_name!r} has weight shape "
                f"(out={out_f}, in={in_f}), but the adapter's {param_name} has shape {shape}, made for a layer with "
                f"{dim_name}={shape[axis]}. Load it onto the base model it was trained with."
            )


def _check_parameter_factor_shape(path, module, module_name, param_name, shape, dims) -> None:
    """A factor of a ``target_parameters`` adapter must fit one of the module's 2-D or 3-D parameters: the same
    number of experts, and ``in`` or ``out`` where the factor carries it."""
    candidates = {}
    for name, param in module.named_parameters(recurse=False):
        try:
            candidates[name] = ParameterWeight(module, name, stored_layout_is_transposed(module, name)).shape
        except (ValueError, TypeError):
            continue
    if not candidates:
        raise unsupported_layer_error(module, module_name)

    def fits(size) -> bool:
        sizes = {"out": size[-2], "in": size[-1]}
        return (len(shape) == len(size) and tuple(shape[:-2]) == tuple(size[:-2])
                and all(d is None or shape[len(shape) - 2 + axis] == sizes[d] for axis, d in enumerate(dims)))

    if not any(fits(size) for size in candidates.values()):
        found = {name: tuple(size) for name, size in candidates.items()}
        raise ValueError(
            f"The adapter {path} does not fit this base model: its {param_name} for {unwrapped_name(module_name)!r} "
            f"has shape {tuple(shape)}, which fits none of that module's parameters (as (experts, out, in): {found}). "
            "Load it onto the base model it was trained with."
        )


def _report_rounding(layers: list[tuple[str, AdaptedLayer]]) -> None:
    """Warn once per merge into a quantized base: the merged weights were quantized again, and by how much that
    moved them (peft's rule for bitsandbytes layers, whose error it leaves unsaid)."""
    errors = [(layer.rounding_error, name) for name, layer in layers if layer.rounding_error is not None]
    if errors:
        worst, where = max(errors)
        warnings.warn(
            f"Merged into a quantized base: the merged weights of {len(errors)} layer(s) were quantized again, "
            f"moving them by up to {worst:.2%} of a layer's largest weight ({where}); the merged model's outputs "
            "differ from the adapter's by that rounding. For an unrounded merge use model.merge_and_dequantize() "
            "(a dense model), or keep the adapter unmerged.", stacklevel=3,
        )


def _config_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model.config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
