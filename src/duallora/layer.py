"""The adapted layer shared by both methods: a Linear or Conv1D whose weight becomes ``f(W0, factors)``.

A method subclass (``dual.py``, ``d2.py``) says which factors an adapter has, how they start, and which
functional builds the weight; everything else lives here once: orientation of the base weight (Linear stores
``(out, in)``, GPT-2's Conv1D ``(in, out)``), forward, dropout, merge and unmerge (safe or not), the eval cache.

Several active adapters compose in order: ``W = f_k(... f_1(W0))``. Merge applies the same sequence, so merged
and unmerged outputs agree for any number of adapters.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .functional import KernelOptions, autocast_dtype

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D)


def unsupported_layer_error(module: nn.Module, name: str = "") -> TypeError:
    where = f" ({name})" if name else ""
    return TypeError(
        f"Target module{where} is a {type(module).__module__}.{type(module).__name__}, which cannot be adapted. "
        "Supported layer types: torch.nn.Linear and transformers' Conv1D (GPT-2). Choose other `target_modules`."
    )


class AdaptedLayer(nn.Module, BaseTunerLayer):
    """Base class of the adapted layers. Subclasses set ``prefix``, ``adapter_layer_names`` (the trainable
    factor dicts), ``other_param_names`` and implement ``create_adapter``, ``adapted_weight`` and ``fused_linear``.
    """

    prefix: str = ""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **layer_kwargs) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_LAYER_TYPES):
            raise unsupported_layer_error(base_layer)
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Conv1D stores (in, out); every formula here works on the (out, in) view of the weight.
        self.transposed = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = self.base_weight().shape
        self.memory_efficient: dict[str, bool] = {}
        self.kernel_options: dict[str, KernelOptions] = {}
        setattr(self, self.prefix + "dropout", nn.ModuleDict())  # under the method's prefix, as PEFT expects
        self._eval_cache: Optional[tuple[tuple, torch.Tensor]] = None
        self._merge_state: dict[str, Any] = {}  # what unmerge needs, per merged adapter
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **layer_kwargs)

    # ----------------------------------------------------------------- method hooks
    def create_adapter(self, adapter_name: str, config, **layer_kwargs) -> None:
        raise NotImplementedError

    def adapted_weight(self, adapter_name: str, w_in: torch.Tensor) -> torch.Tensor:
        """Differentiable ``f(W_in)`` for one adapter, ``(out, in)``."""
        raise NotImplementedError

    def fused_linear(self, adapter_name, x, w0, bias, with_base: bool) -> torch.Tensor:
        """``x f(W0)^T + b`` (or ``x (f(W0) - W0)^T``) through the memory-efficient autograd Function."""
        raise NotImplementedError

    def merge_weight(self, adapter_name: str, w_in: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``f(W_in)`` without gradient, and what :meth:`unmerge_weight` needs to invert it."""
        with torch.no_grad():
            return self.adapted_weight(adapter_name, w_in), None

    def unmerge_weight(self, adapter_name: str, w_out: torch.Tensor, state: Any) -> torch.Tensor:
        raise NotImplementedError

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The trainable factors of one adapter, in the order of ``adapter_layer_names``."""
        return tuple(getattr(self, name)[adapter_name] for name in self.adapter_layer_names)

    def factor_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        """Every tensor that ``f`` reads for this adapter (the eval cache watches them)."""
        return list(self.factors(adapter_name))

    # ----------------------------------------------------------------- base weight
    def base_weight(self) -> torch.Tensor:
        """``W0`` as ``(out, in)`` (a view for Conv1D, no copy)."""
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def _write_base_weight(self, w: torch.Tensor) -> None:
        # copy_ in place: the Parameter keeps its storage, so tied weights and optimizer references stay valid
        self.base_layer.weight.data.copy_(w.t() if self.transposed else w)

    @property
    def dropouts(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "dropout")

    # ----------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config, **layer_kwargs) -> None:
        """Add an adapter: its factors, dropout and options (called for the first and every later adapter)."""
        self.memory_efficient[adapter_name] = config.memory_efficient
        self.kernel_options[adapter_name] = KernelOptions(getattr(torch, config.weight_grad_dtype or "", None),
                                                          config.block_mib)
        self.dropouts[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.create_adapter(adapter_name, config, **layer_kwargs)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _present_active_adapters(self) -> list[str]:
        factors = getattr(self, self.adapter_layer_names[0])
        return [name for name in self.active_adapters if name in factors]

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._present_active_adapters()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        bias = self.base_layer.bias
        if self._eval_cache_applies(active):
            weight = self._cached_weight(active, autocast_dtype(x))
            return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        w0 = self.base_weight()
        dropout_on = self.training and any(not isinstance(self.dropouts[name], nn.Identity) for name in active)
        if len(active) == 1:
            name = active[0]
            if not dropout_on:
                return self._adapter_linear(name, x, w0, bias, with_base=True)
            # y = x W0^T + b + dropout(x) (f(W0) - W0)^T: the adapter path sees dropped inputs (two matmuls)
            return self.base_layer(x, *args, **kwargs) + self._adapter_linear(
                name, self.dropouts[name](x), w0, None, with_base=False
            )
        if dropout_on:
            raise ValueError(
                f"Training several active adapters {active} at once with lora_dropout > 0 is not supported: "
                "set lora_dropout=0 or activate a single adapter."
            )
        weight = w0
        for name in active:
            weight = self.adapted_weight(name, weight)
        dtype = autocast_dtype(x)
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    def _adapter_linear(self, name, x, w0, bias, with_base: bool) -> torch.Tensor:
        if self.memory_efficient[name]:
            return self.fused_linear(name, x, w0, bias, with_base)
        weight = self.adapted_weight(name, w0)
        if not with_base:
            weight = weight - w0.to(weight.dtype)
        dtype = autocast_dtype(x)
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    # ----------------------------------------------------------------- eval cache
    def _eval_cache_applies(self, active: list[str]) -> bool:
        """Reuse the adapted weight in eval mode, unless a gradient w.r.t. the factors is being asked for."""
        if self.training:
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(t.requires_grad for name in active for t in self.factor_tensors(name))

    @torch.compiler.disable  # python-side bookkeeping: keep it out of a compiled graph
    def _cached_weight(self, active: list[str], dtype: torch.dtype) -> torch.Tensor:
        # The key sees every tensor f reads: an optimizer step or load_state_dict bumps `_version`, a
        # replaced tensor changes `data_ptr`; so a stale weight is never served.
        watched = [self.base_layer.weight] + [t for name in active for t in self.factor_tensors(name)]
        key = (tuple(active), dtype) + tuple((t.data_ptr(), t._version, t.device) for t in watched)
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = None  # free the old weight before building the new one
            with torch.no_grad():
                weight = self.base_weight().float()
                for name in active:
                    weight = self.adapted_weight(name, weight)
            self._eval_cache = (key, weight.to(dtype))
        return self._eval_cache[1]

    def clear_eval_cache(self) -> None:
        self._eval_cache = None

    def train(self, mode: bool = True):
        if mode:
            self._eval_cache = None  # the cache only serves eval; don't hold the memory during training
        return super().train(mode)

    # ----------------------------------------------------------------- merge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write ``f(W0)`` into the base weight, computed in float32 and then cast.

        With ``safe_merge`` nothing is written unless every merged weight is finite.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        factors = getattr(self, self.adapter_layer_names[0])
        adapter_names = [name for name in adapter_names if name in factors]
        if not adapter_names:
            return
        weight, states = self._merged_weight(adapter_names)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(
                f"Merging adapter(s) {adapter_names} gives NaN/Inf weights in this layer; the base weights were left "
                "untouched. The adapter is broken: check its training (learning rate, loss scaling)."
            )
        self._write_base_weight(weight)
        self._merge_state.update(states)
        self.merged_adapters.extend(adapter_names)
        self._eval_cache = None

    def _merged_weight(self, adapter_names: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        states = {}
        with torch.no_grad():
            weight = self.base_weight().float()
            for name in adapter_names:
                weight, states[name] = self.merge_weight(name, weight)
        return weight, states

    def merged_weight_is_finite(self, adapter_names: Optional[list[str]] = None) -> bool:
        """Dry run of a merge: would the merged weight be finite? (Nothing is written.)"""
        names = [n for n in (adapter_names or self.active_adapters) if n not in self.merged_adapters]
        names = [n for n in names if n in getattr(self, self.adapter_layer_names[0])]
        return not names or bool(torch.isfinite(self._merged_weight(names)[0]).all())

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        with torch.no_grad():
            weight = self.base_weight().float()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight = self.unmerge_weight(name, weight, self._merge_state.pop(name, None))
        self._write_base_weight(weight)
        self._eval_cache = None

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``f(W0) - W0`` for one adapter, as ``(out, in)``, without gradient (for inspection)."""
        with torch.no_grad():
            w0 = self.base_weight().float()
            return self.adapted_weight(adapter_name, w0) - w0

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}.{super().__repr__()}"
