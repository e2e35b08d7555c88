"""The adapted layer shared by both methods: a Linear or Conv1D whose weight becomes ``f(W0, factors)``.

A method subclass (``dual/layer.py``, ``d2/layer.py``) says which factors an adapter has, how they start, and which
functional builds the weight; this class holds the factors, reads the base weight in either orientation (Linear
stores ``(out, in)``, GPT-2's Conv1D ``(in, out)``) and runs the forward with dropout. The other concerns are
mixed in from a module each: mixed batches (:mod:`.mixed_batch`), the sharding checks (:mod:`.sharding`), the eval
cache (:mod:`.eval_cache`), merge and unmerge (:mod:`.merging`).

Several active adapters compose in order: ``W = f_k(... f_1(W0))``. Merge applies the same sequence, so merged
and unmerged outputs agree for any number of adapters.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .base_weight import BaseWeight, WeightRows, base_weight_of, bitsandbytes_kind
from .blocked import KernelOptions, autocast_dtype
from .eval_cache import EvalCache
from .factor import Factor, rename_0_1_keys, run_inside
from .merging import Merging
from .mixed_batch import MixedBatchForward
from .sharding import ShardingChecks

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D)
# packages whose Linear subclasses hold quantized weights: bitsandbytes' two are adapted, the others refused by name
QUANTIZATION_LIBRARIES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "torchao", "optimum.quanto")
SUPPORTED = ("torch.nn.Linear and transformers' Conv1D (GPT-2) with a floating-point weight, and bitsandbytes' "
             "Linear4bit and Linear8bitLt (4-bit and 8-bit bases)")


def is_quantized_bitsandbytes(module: nn.Module) -> bool:
    return bitsandbytes_kind(module) is not None


def is_adaptable(module: nn.Module) -> bool:
    """A Linear or Conv1D with a dense floating-point weight and the forward of its class (``x W^T + b``), or a
    bitsandbytes 4-bit / 8-bit Linear. Other quantized layers (GPTQ, AWQ, HQQ, torchao) subclass ``nn.Linear`` but
    hold packed weights no reader here knows; a subclass with a forward of its own (Llama-4's router: top-k and a
    sigmoid after the product) would lose it, since the adapted layer computes ``x f(W0)^T + b`` itself."""
    if not isinstance(module, SUPPORTED_LAYER_TYPES):
        return False
    if is_quantized_bitsandbytes(module):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.is_floating_point() and not own_forward(module)
            and not quantized_elsewhere(module))


def quantized_elsewhere(module: nn.Module) -> bool:
    """A layer of a quantization library other than bitsandbytes (its class, or its weight's)."""
    weight = getattr(module, "weight", None)
    return any(cls.__module__.startswith(QUANTIZATION_LIBRARIES) for cls in (type(module), type(weight)))


def own_forward(module: nn.Module) -> bool:
    """Whether a Linear or Conv1D subclass computes more than its class's product in its forward."""
    return not any(type(module).forward is cls.forward for cls in SUPPORTED_LAYER_TYPES)


def unsupported_layer_error(module: nn.Module, name: str = "") -> TypeError:
    where = f" ({name})" if name else ""
    kind = f"{type(module).__module__}.{type(module).__name__}"
    if (isinstance(module, SUPPORTED_LAYER_TYPES) and own_forward(module) and not quantized_elsewhere(module)
            and not is_quantized_bitsandbytes(module)):
        parameter = f"{name}.weight" if name else "<module>.weight"
        return TypeError(
            f"Target module{where} is a {kind}, whose forward does more than x W^T + b ({type(module).__name__}."
            "forward); an adapted layer computes the product itself and would drop the rest (peft's LoRA fails on "
            f"it too). Adapt its weight instead, which keeps its forward: target_parameters=[{parameter!r}], and "
            "leave the module out of target_modules (with 'all-linear': exclude_modules=[...] naming it)."
        )
    quantized = isinstance(module, SUPPORTED_LAYER_TYPES)  # a Linear subclass refused for its weight
    why = (" It holds a quantized weight of a kind Dual LoRA and D2-LoRA cannot read: quantize the base with "
           "bitsandbytes (BitsAndBytesConfig, 4-bit or 8-bit) or load it unquantized." if quantized else "")
    return TypeError(
        f"Target module{where} is a {kind}, which cannot be adapted.{why} "
        f"Supported: {SUPPORTED}. Choose other `target_modules`."
    )


class AdaptedLayer(MixedBatchForward, ShardingChecks, EvalCache, Merging, nn.Module, BaseTunerLayer):
    """Base class of the adapted layers. Subclasses set ``prefix``, ``adapter_layer_names`` (the trainable
    factor dicts), ``other_param_names`` and implement ``create_adapter``, ``adapted_weight`` and ``fused_linear``.
    """

    prefix: str = ""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **layer_kwargs) -> None:
        super().__init__()
        self.check_base_layer(base_layer, config)
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        *stack, self.out_features, self.in_features = self.base.shape
        self.stack_shape = tuple(stack)  # (experts,) for a stack of expert matrices: each gets its own factors
        self.memory_efficient: dict[str, bool] = {}
        self.kernel_options: dict[str, KernelOptions] = {}
        self.eval_cache: dict[str, bool] = {}
        setattr(self, self.prefix + "dropout", nn.ModuleDict())  # under the method's prefix, as PEFT expects
        self._eval_cache: Optional[tuple[tuple, torch.Tensor]] = None
        self._sharded = False  # seen sharded once (FSDP, ZeRO-3): sticky, the eval cache stays off
        self._merge_records: dict[str, Any] = {}  # what unmerge needs, per merged adapter
        self._unmerged_base = None  # a quantized W0 before the first merge (BaseWeight.snapshot)
        self.rounding_error: Optional[float] = None  # a quantized base's requantization error, from the last merge
        self._active_adapter = adapter_name
        self.register_load_state_dict_pre_hook(self._load_0_1_keys)  # adapters saved by duallora 0.1
        self.register_state_dict_post_hook(self._after_state_dict)
        self.update_layer(adapter_name, config, **layer_kwargs)

    def check_base_layer(self, base_layer: nn.Module, config) -> None:
        """Refuse, before anything is built, a base layer this class cannot adapt."""
        if not is_adaptable(base_layer):
            raise unsupported_layer_error(base_layer)

    # ----------------------------------------------------------------- method hooks
    def create_adapter(self, adapter_name: str, config, **layer_kwargs) -> None:
        raise NotImplementedError

    def adapted_weight(self, adapter_name: str, w_in: torch.Tensor, factors=None) -> torch.Tensor:
        """Differentiable ``f(W_in)`` for one adapter, ``(out, in)``, computed in the dtype of ``factors`` (default:
        the adapter's own, as :meth:`compute_factors` gives them)."""
        raise NotImplementedError

    def fused_linear(self, adapter_name, x, w0, bias, with_base: bool) -> torch.Tensor:
        """``x f(W0)^T + b`` (or ``x (f(W0) - W0)^T``) through the memory-efficient autograd Function."""
        raise NotImplementedError

    def efficient_weight(self, adapter_name: str, w0: WeightRows) -> torch.Tensor:
        """``f(W0)`` itself, for ``w0`` read as ``(..., out, in)`` (a matrix or a stack of expert matrices), in its
        tensor's dtype and layout, through the memory-efficient autograd Function that keeps only the factors."""
        raise NotImplementedError

    def weight_rows(self, adapter_name: str, w0: torch.Tensor, factors) -> tuple[list[slice], Any]:
        """The row blocks of ``f(W0)`` and the function that builds rows ``s`` from ``factors`` (as the memory-
        efficient forward does), for building the whole weight one block at a time."""
        raise NotImplementedError

    def merge_weight(self, adapter_name: str, w_in: torch.Tensor, factors) -> tuple[torch.Tensor, Any]:
        """``f(W_in)`` from float32 ``factors``, without gradient, and the method's constants that
        :meth:`unmerge_weight` needs besides the factors."""
        with torch.no_grad():
            return self.adapted_weight(adapter_name, w_in, factors), None

    def unmerge_weight(self, adapter_name: str, w_out: torch.Tensor, factors, constants: Any) -> torch.Tensor:
        """``W_in`` from ``W_out = f(W_in)``, with the float32 factors and constants of the merge."""
        raise NotImplementedError

    def values_changed(self) -> None:
        """Called when the eval cache's fingerprint finds a changed value: drop what a method caches by version."""

    def before_adapter_forward(self, active: list[str], x: torch.Tensor) -> None:
        """Called before a forward through the adapters (not when merged or disabled); a method's bookkeeping."""

    def factor_modules(self, adapter_name: str) -> tuple[nn.Module, ...]:
        """The modules holding one adapter's factors (:class:`~duallora.core.factor.Factor`, or FSDP1's wrappers of
        them), in the order of ``adapter_layer_names``."""
        return tuple(getattr(self, name)[adapter_name] for name in self.adapter_layer_names)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The trainable factors of one adapter, in the order of ``adapter_layer_names``."""
        return tuple(module.weight for module in self.factor_modules(adapter_name))

    def add_factors(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Hold a new adapter's factors, each in a :class:`~duallora.core.factor.Factor` of its own."""
        for name in self.adapter_layer_names:
            if not hasattr(self, name):
                setattr(self, name, nn.ModuleDict())
            getattr(self, name)[adapter_name] = Factor(tensors[name])

    @staticmethod
    def _after_state_dict(module, *args) -> None:
        module.base.after_state_dict()  # a 4-bit base's state mended after bitsandbytes' own saving (BaseWeight)

    @staticmethod
    def _load_0_1_keys(module, state_dict, prefix, *args) -> None:
        rename_0_1_keys(state_dict, prefix, module.adapter_layer_names)

    def compute_factors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The factors as every forward computes with them: in float32 at least, whatever they are stored in (bf16
        under FSDP ``MixedPrecision(param_dtype=bf16)``, DeepSpeed bf16 or ``autocast_adapter_dtype=False``). The cast
        is differentiable (the gradient returns in the storage dtype) and costs a copy of the small factors; products
        built in bf16 would flip Sign(D C) wherever |D C| is below bf16's resolution, a change of 2 |dW| there."""
        return tuple(f if f.dtype in (torch.float32, torch.float64) else f.float() for f in self.factors(adapter_name))

    def factor_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        """Every tensor that ``f`` reads for this adapter (the eval cache watches them)."""
        return list(self.factors(adapter_name))

    def float_factors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The factors in float32, without gradient: what merges, the eval cache and inspection compute with."""
        return tuple(f.detach().float() for f in self.factors(adapter_name))

    # ----------------------------------------------------------------- base weight
    @property
    def base(self) -> BaseWeight:
        """The reader of ``W0`` as ``(out, in)``, whatever the layer stores: Conv1D's ``(in, out)``, a bitsandbytes
        layer's packed bytes. Made afresh from ``base_layer`` (cheap), so a replaced base weight is never missed."""
        try:
            return base_weight_of(self.base_layer)
        except AttributeError as err:
            # an AttributeError escaping a property is renamed by nn.Module.__getattr__ to "no attribute 'base'"
            raise RuntimeError(f"Reading W0 of the base layer {type(self.base_layer).__name__} "
                               f"failed: {err!r}") from err

    def base_weight(self) -> torch.Tensor:
        """``W0`` as ``(out, in)``: a view of a dense weight (no copy), a quantized one dequantized (float32)."""
        return self.base.whole(torch.float32)

    @property
    def dropouts(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "dropout")

    # ----------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config, **layer_kwargs) -> None:
        """Add an adapter: its factors, dropout and options (called for the first and every later adapter)."""
        self.memory_efficient[adapter_name] = config.memory_efficient
        self.eval_cache[adapter_name] = config.eval_cache
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
    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        if adapter_names is not None:
            self._check_mixed_batch(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = self._present_active_adapters()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        self._check_base_is_whole()
        self.before_adapter_forward(active, x)
        modules = [module for name in active for module in self.factor_modules(name)]
        return run_inside(modules, lambda: self._adapted_forward(active, x, *args, **kwargs))


    def _adapted_forward(self, active: list[str], x: torch.Tensor, *args: Any, use_cache: bool = True,
                         **kwargs: Any) -> torch.Tensor:
        """The forward through the active adapters, run inside their factors' module forwards (:mod:`.factor`)."""
        bias = self.base_layer.bias
        if use_cache and self._eval_cache_applies(active):
            weight = self._cached_weight(active, autocast_dtype(x))
            return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        w0 = self.base
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
        with torch.autocast(x.device.type, enabled=False):  # the factors' precision, as the fused path's
            weight = w0.whole(self.compute_factors(active[0])[0].dtype)
            for name in active:
                weight = self.adapted_weight(name, weight)
        dtype = autocast_dtype(x)
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    def _base_description(self) -> str:
        return f"{type(self.get_base_layer()).__name__} ({self.in_features} -> {self.out_features} features)"

    def _adapter_linear(self, name, x, w0, bias, with_base: bool) -> torch.Tensor:
        if self.memory_efficient[name]:
            return self.fused_linear(name, x, w0, bias, with_base)
        # the weight in the factors' precision, as the fused path builds it: under bf16 autocast, B A and D C in bf16
        # would flip Sign(D C) wherever |D C| is below bf16's resolution, a change of 2 |dW| there, not a rounding
        with torch.autocast(x.device.type, enabled=False):
            # the plain path builds whole matrices (it is the reference; a quantized W0 is dequantized whole here)
            w0 = w0.whole(self.compute_factors(name)[0].dtype)
            weight = self.adapted_weight(name, w0)
            if not with_base:
                weight = weight - w0.to(weight.dtype)
        dtype = autocast_dtype(x)
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}.{super().__repr__()}"
