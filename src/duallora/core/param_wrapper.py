"""Adapters on parameters that a module reads itself (peft's ``target_parameters``): MoE experts held as one 3-D
parameter per projection (``mlp.experts.gate_up_proj``, one matrix per expert), a router's 2-D ``weight``.

Such a module has no ``nn.Linear`` whose forward could be replaced, so the adapter does what peft's LoRA
``ParamWrapper`` does: for the length of the module's forward, the module's attribute reads the adapted weight
``f(W0)`` instead of ``W0``, and the module computes with it as it would with its own, whatever kernel it uses (an
eager loop over experts, ``grouped_mm``, ``batched_mm``). Each expert matrix gets its own factors (a leading experts
dimension on every factor) and its own update; every piece of maths is the one a Linear layer uses, on a stack.

The adapted weight is built by the memory-efficient Function (:class:`~duallora.core.blocked.BlockedAdaptedWeight`):
autograd keeps the factors, never ``m(BA)``, ``d(DC)`` or the norms of the whole stack. Several parameters of one
module nest, one wrapper around the other, as in peft (its injection finds the wrappers by this class name).

Layouts: ``(experts, out, in)`` (Mixtral, Qwen3-MoE, OLMoE) or ``(experts, in, out)`` (gpt-oss), told apart as peft
does, by the module's ``is_transposed`` (set by transformers' ``use_experts_implementation``); a 3-D parameter of a
module without it is refused, since ``in == out`` cannot be ruled out from the shape. A 2-D parameter is read as
``(out, in)``, as ``F.linear`` reads it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .base_weight import ParameterWeight
from .factor import run_inside
from .layer import AdaptedLayer
from .mixed_batch import BASE_ROWS, grouped_rows, scattered, units_of_rows

LAYOUT_ATTRIBUTE = "is_transposed"  # transformers' flag on expert modules: True for (experts, in, out)


def stored_layout_is_transposed(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is stored ``(experts, in, out)``; raise, naming the fix, where it cannot be read."""
    param = module._parameters.get(name)
    where = f"{type(module).__name__}.{name}"
    if not isinstance(param, torch.Tensor):
        raise ValueError(f"{where} is not a parameter of the module (target_parameters names nn.Parameters).")
    if not param.is_floating_point():
        raise TypeError(f"{where} holds {param.dtype} values, which cannot be adapted: only floating-point "
                        "parameters can (a quantized expert stack cannot; bitsandbytes leaves experts in 16 bits).")
    ndim = len(getattr(param, "ds_shape", param.shape))
    if ndim == 2:
        return False  # as F.linear reads it: (out, in)
    if ndim != 3:
        raise ValueError(
            f"{where} has {ndim} dimension(s); target_parameters adapts matrices (2-D, read as (out, in)) and stacks "
            "of expert matrices (3-D). A 1-D parameter is a bias or a norm: train it with bias='all' or "
            "modules_to_save instead."
        )
    transposed = getattr(module, LAYOUT_ATTRIBUTE, None)
    if not isinstance(transposed, bool):
        raise ValueError(
            f"Cannot tell the layout of {where} (shape {tuple(param.shape)}): (experts, out, in) or "
            "(experts, in, out). "
            f"transformers marks its expert modules with `{LAYOUT_ATTRIBUTE}` (use_experts_implementation); "
            f"{type(module).__name__} has none. Set it on each such module before get_peft_model: "
            f"module.{LAYOUT_ATTRIBUTE} = False if the module computes x @ W[e].T (as F.linear), True if x @ W[e]."
        )
    return transposed


@contextlib.contextmanager
def shadowed(module: nn.Module, name: str, tensor: torch.Tensor):
    """``module.<name>`` reads ``tensor`` within the block; the parameter itself stays registered and untouched.

    An instance attribute is found before ``nn.Module.__getattr__`` looks in ``_parameters``, so the module's own
    forward computes with ``tensor``, while ``named_parameters``, ``state_dict``, optimizers and FSDP still see the
    stored parameter (peft's way, a parametrization, re-registers the parameter on every call and evaluates the
    adapted weight once more to check it)."""
    module.__dict__[name] = tensor
    try:
        yield
    finally:
        del module.__dict__[name]


class AdaptedParameter(AdaptedLayer):
    """An adapter on one parameter of ``base_layer`` (a module, or another :class:`AdaptedParameter` wrapping it).
    A method's wrapper is ``class ParamWrapper(AdaptedParameter, <method>Layer)``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, parameter_name: str, **kwargs) -> None:
        self.parameter_name = parameter_name  # plain attributes may be set before nn.Module.__init__
        holder = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        self.transposed = stored_layout_is_transposed(holder, parameter_name)
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def check_base_layer(self, base_layer: nn.Module, config) -> None:
        if config.lora_dropout > 0:
            raise ValueError(
                f"lora_dropout={config.lora_dropout} cannot apply to target_parameters ({self.parameter_name}): the "
                "module multiplies its input by the parameter itself, so the adapter's share cannot see dropped "
                "inputs alone (peft's LoRA refuses it too). Set lora_dropout=0, or adapt these parameters with a "
                "second adapter that has no dropout."
            )

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        """Nothing here: :meth:`_mixed_batch_forward` checks the whole nest and the input's layout."""

    @property
    def base(self) -> ParameterWeight:
        return ParameterWeight(self.get_base_layer(), self.parameter_name, self.transposed)

    def _get_base_layer_device_and_dtype(self, base_layer):
        """peft moves new factors to the base layer's weight's device; here the parameter's (a module of experts
        has no ``weight``)."""
        param = self.base.parameter
        return param.device, param.dtype

    def wrapper_nest(self) -> list[AdaptedParameter]:
        """This wrapper and the ones it wraps (other parameters of the same module), outermost first."""
        nest, module = [], self
        while isinstance(module, AdaptedParameter):
            nest.append(module)
            module = module.base_layer
        return nest

    # ----------------------------------------------------------------- forward
    def _adapted_forward(self, active: list[str], x: torch.Tensor, *args: Any, use_cache: bool = True,
                         **kwargs: Any):
        weight = self.adapted_parameter(active, use_cache)
        with shadowed(self.get_base_layer(), self.parameter_name, weight):
            return self.base_layer(x, *args, **kwargs)

    def adapted_parameter(self, active: list[str], use_cache: bool = True) -> torch.Tensor:
        """``f_k(... f_1(W0))`` in the stored dtype and layout: what the module computes with."""
        if use_cache and self._eval_cache_applies(active):
            return self._cached_weight(active, self.base.dtype)
        return self._build_parameter(active)

    def _build_parameter(self, active: list[str]) -> torch.Tensor:
        base = self.base
        if len(active) == 1 and self.memory_efficient[active[0]]:
            return base.to_stored(self.efficient_weight(active[0], base))
        # several adapters (or memory_efficient=False): whole float32 stacks under plain autograd, the reference
        with torch.autocast(base.device.type, enabled=False):
            weight = base.tensor
            for name in active:
                weight = self.adapted_weight(name, weight)
        return base.to_stored(weight.to(base.dtype))

    def _adapted_weight_no_grad(self, active: list[str], dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            return self._build_parameter(active)

    # ----------------------------------------------------------------- mixed batches
    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any):
        """Each row of the batch through its own adapter: the module runs once per distinct adapter, on that
        adapter's units only, with every parameter of the nest adapted by it.

        A MoE block hands its experts and router the tokens of the whole batch flattened, row-major (or, Llama-4's
        experts, once per expert: :mod:`.mixed_batch` tells the layouts apart). Every tensor argument with as many
        rows as the input is split the same way, and every output tensor is put back in place."""
        nest = self.wrapper_nest()
        merged = [w.parameter_name for w in nest if w.merged]
        if merged:
            raise ValueError(f"Cannot pass `adapter_names` when there are merged adapters ({merged}), please call "
                             "`unmerge_adapter` first.")
        units, rows = x.shape[0], len(adapter_names)
        experts = self.stack_shape[0] if self.stack_shape else 1
        layout = self._input_layout(units, adapter_names, experts)
        module, outputs = self.get_base_layer(), []

        def held(name: str) -> bool:
            return any(name in getattr(w, w.adapter_layer_names[0]) for w in nest)

        for name, group in grouped_rows(adapter_names, held).items():
            index = units_of_rows(group, layout, units, rows, experts, x.device)
            part_args = [_rows_of(a, index, units) for a in args]
            part_kwargs = {k: _rows_of(v, index, units) for k, v in kwargs.items()}
            adapters = [] if name == BASE_ROWS else [w for w in nest if name in getattr(w, w.adapter_layer_names[0])]
            factor_modules = [m for w in adapters for m in w.factor_modules(name)]
            outputs.append((index, run_inside(factor_modules, functools.partial(
                _run_adapted, module, adapters, name, x[index], part_args, part_kwargs))))
        return scattered(outputs, units)

    # ----------------------------------------------------------------- merge, unload
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``dW`` in the stored layout (``(experts, in, out)`` for gpt-oss), as peft's ``ParamWrapper`` gives it."""
        return self.base.to_stored(self.delta_weight(adapter_name))

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """The bare module, with every wrapper of the nest merged first if ``merge`` (peft unloads the outermost
        wrapper only)."""
        if merge:
            for wrapper in self.wrapper_nest():
                wrapper.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    def _base_description(self) -> str:
        stack = f"{self.stack_shape[0]} experts, " if self.stack_shape else ""
        return (f"parameter {self.parameter_name!r} of {type(self.get_base_layer()).__name__} ({stack}"
                f"{self.in_features} -> {self.out_features} features)")

    def __repr__(self) -> str:
        rep = super().__repr__()
        head, _, rest = rep.partition("(")
        return f"{head}(\n  parameter_name={self.parameter_name!r},{rest}"


def _run_adapted(module: nn.Module, adapters: list[AdaptedParameter], name: str, x, args, kwargs):
    """``module(x, ...)`` with the parameters of ``adapters`` adapted by adapter ``name``."""
    with contextlib.ExitStack() as stack:
        for wrapper in adapters:
            wrapper._check_base_is_whole()
            wrapper.before_adapter_forward([name], x)
            stack.enter_context(shadowed(module, wrapper.parameter_name,
                                         wrapper.adapted_parameter([name], use_cache=False)))
        return module(x, *args, **kwargs)


def _rows_of(value, index: torch.Tensor, units: int):
    return value[index] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == units else value
