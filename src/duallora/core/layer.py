"""The adapted layer shared by both methods: a Linear or Conv1D whose weight becomes ``f(W0, factors)``.

A method subclass (``dual/layer.py``, ``d2/layer.py``) says which factors an adapter has, how they start, and which
functional builds the weight; everything else lives here once: orientation of the base weight (Linear stores
``(out, in)``, GPT-2's Conv1D ``(in, out)``), forward, dropout, merge and unmerge (safe or not), the eval cache.

Merges compute in float32 and cast once, whatever the model's dtype. Each merge keeps a copy of the factors it
used (and the method's own constants), so unmerge subtracts exactly what merge added, whatever happened between.

Several active adapters compose in order: ``W = f_k(... f_1(W0))``. Merge applies the same sequence, so merged
and unmerged outputs agree for any number of adapters.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from transformers.pytorch_utils import Conv1D

from .base_weight import BaseWeight, WeightRows, base_weight_of, bitsandbytes_kind, tensors_key
from .blocked import KernelOptions, autocast_dtype, blocked_weight
from .factor import Factor, rename_0_1_keys, run_inside
from .watch import fingerprint, is_sharded, is_zero3_partition

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D)
# packages whose Linear subclasses hold quantized weights: bitsandbytes' two are adapted, the others refused by name
QUANTIZATION_LIBRARIES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "torchao", "optimum.quanto")
SUPPORTED = ("torch.nn.Linear and transformers' Conv1D (GPT-2) with a floating-point weight, and bitsandbytes' "
             "Linear4bit and Linear8bitLt (4-bit and 8-bit bases)")


def is_quantized_bitsandbytes(module: nn.Module) -> bool:
    return bitsandbytes_kind(module) is not None


def is_adaptable(module: nn.Module) -> bool:
    """A Linear or Conv1D with a dense floating-point weight, or a bitsandbytes 4-bit / 8-bit Linear. Other
    quantized layers (GPTQ, AWQ, HQQ, torchao) subclass ``nn.Linear`` but hold packed weights no reader here knows."""
    if not isinstance(module, SUPPORTED_LAYER_TYPES):
        return False
    if is_quantized_bitsandbytes(module):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.is_floating_point()
            and not any(cls.__module__.startswith(QUANTIZATION_LIBRARIES) for cls in (type(module), type(weight))))


def unsupported_layer_error(module: nn.Module, name: str = "") -> TypeError:
    where = f" ({name})" if name else ""
    quantized = isinstance(module, SUPPORTED_LAYER_TYPES)  # a Linear subclass refused for its weight
    why = (" It holds a quantized weight of a kind Dual LoRA and D2-LoRA cannot read: quantize the base with "
           "bitsandbytes (BitsAndBytesConfig, 4-bit or 8-bit) or load it unquantized." if quantized else "")
    return TypeError(
        f"Target module{where} is a {type(module).__module__}.{type(module).__name__}, which cannot be adapted.{why} "
        f"Supported: {SUPPORTED}. Choose other `target_modules`."
    )


# peft's name for "no adapter" in a mixed batch's adapter_names
BASE_ROWS = "__base__"


def zero3_merge_error(action: str, partitioned: list[str]) -> RuntimeError:
    """The error for a merge or unmerge under DeepSpeed ZeRO-3 outside a gather (peft's LoRA changes nothing there,
    silently: it computes on the empty placeholders)."""
    return RuntimeError(
        f"{action} under DeepSpeed ZeRO-3 needs the whole weights, but {len(partitioned)} parameter(s) are partitions "
        f"now (e.g. {partitioned[:3]}): here their data is an empty placeholder, so the merge would write nothing and "
        "the model would then run its base weights alone. Nothing was changed. Gather them on every process first:\n"
        "    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):\n"
        f"        model.{action}()"
    )


class AdaptedLayer(nn.Module, BaseTunerLayer):
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

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        """peft's checks of ``adapter_names`` at a layer, with its messages."""
        if len(x) != len(adapter_names):
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
                             ) -> torch.Tensor:
        """Each row of the batch through its own adapter (peft's ``adapter_names``). The rows are grouped, so the
        cost is one pass per distinct adapter, each building its weight in row blocks as a training forward does (no
        cached copy per adapter: k adapters would hold k dense copies of every layer). Rows named ``"__base__"``, or
        an adapter this layer does not hold, go through the base layer."""
        present = getattr(self, self.adapter_layer_names[0])
        groups: dict[str, list[int]] = {BASE_ROWS: []}  # the base rows first: on a CPU with AVX512-BF16 the first
        # eval-mode call of a 4-bit base layer repacks its weight (its absmax rounded to bf16), so every adapter row
        # then reads the weight the base rows were computed with
        for row, name in enumerate(adapter_names):
            groups.setdefault(name if name in present else BASE_ROWS, []).append(row)
        outputs = []
        for name, rows in groups.items():
            if not rows:
                continue
            index = torch.tensor(rows, device=x.device)
            part = x[index]
            if name == BASE_ROWS:
                outputs.append((index, self.base_layer(part, *args, **kwargs)))
                continue
            self._check_base_is_whole()
            self.before_adapter_forward([name], part)
            outputs.append((index, run_inside(self.factor_modules(name),
                                              lambda: self._adapted_forward([name], part, use_cache=False))))
        dtype = functools.reduce(torch.promote_types, [y.dtype for _, y in outputs])
        result = outputs[0][1].new_empty((x.shape[0], *outputs[0][1].shape[1:]), dtype=dtype)
        for index, y in outputs:
            result[index] = y.to(dtype)
        return result

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

    def _check_base_is_whole(self) -> None:
        """The adapter reads ``W0`` itself, outside the base layer's forward: refuse, before any work, the wrappings
        under which ``W0`` is not whole there (they would crash deep inside, or compute on a placeholder)."""
        weight = self.base.parameter
        if isinstance(weight, DTensor):
            raise RuntimeError(
                f"W0 of an adapted {self._base_description()} is still a sharded DTensor ({weight.placements}) "
                "when the adapter reads it. "
                "Either its nn.Linear is an FSDP2 unit of its own (fully_shard applied to the Linear, or a size-based "
                "wrap policy): Dual LoRA and D2-LoRA read W0 in their own forward, not through the Linear's, so FSDP "
                "never unshards it; apply fully_shard to the decoder layers and the model only (as peft's "
                "fsdp_auto_wrap_policy does). Or the weight is tensor-parallel, which these methods do not support: "
                "use FSDP2 or DeepSpeed ZeRO instead."
            )
        if is_zero3_partition(weight):
            raise RuntimeError(
                f"W0 of an adapted {self._base_description()} is a DeepSpeed ZeRO-3 partition that was not "
                "gathered when the adapter read "
                "it. DeepSpeed gathers a parameter on access in an eager forward, but not while torch.compile traces "
                "(or outside the engine's forward). Under ZeRO-3, run the model without torch.compile, or use "
                "ZeRO-2 or FSDP2 with it."
            )

    def _base_description(self) -> str:
        return f"{type(self.get_base_layer()).__name__} ({self.in_features} -> {self.out_features} features)"

    def partitioned_parameters(self) -> list[str]:
        """This layer's parameters that are ZeRO-3 partitions now, by name (nothing can be merged into or from
        them)."""
        return [name for name, p in self.named_parameters() if is_zero3_partition(p)]

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

    # ----------------------------------------------------------------- eval cache
    def _eval_cache_applies(self, active: list[str]) -> bool:
        """Reuse the adapted weight in eval mode, unless a gradient w.r.t. the factors is being asked for, the
        config turned the cache off, or the weights are sharded or quantized (a whole dense copy would undo the
        sharding or the quantization)."""
        if self.training or not all(self.eval_cache[name] for name in active) or self._weights_sharded(active):
            return False
        if self.base.quantized:
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(t.requires_grad for name in active for t in self.factor_tensors(name))

    def _weights_sharded(self, active: list[str]) -> bool:
        self._sharded = (self._sharded or any(is_sharded(t) for t in self._watched(active))
                         or any(isinstance(m, FullyShardedDataParallel) for name in active
                                for m in self.factor_modules(name)))  # FSDP1 units of their own
        return self._sharded

    def _watched(self, active: list[str]) -> list[torch.Tensor]:
        return self.base.watched() + [t for name in active for t in self.factor_tensors(name)]

    @torch.compiler.disable  # python-side bookkeeping: keep it out of a compiled graph
    def _cached_weight(self, active: list[str], dtype: torch.dtype) -> torch.Tensor:
        # The key holds which tensors f reads (the base weight, the factors, the warm-up clock) with their version
        # counters (a tensor swapped in, load_state_dict(assign=True) onto a freed address, any in-place write), and
        # a fingerprint of their values as a second guard (a write through `.data`, which version counters miss).
        # Checking costs one read of W0 and one host sync per call; building costs several out x in passes.
        watched = self._watched(active)
        key = (tuple(active), dtype, self.base.device, tensors_key(watched, ()), tuple(fingerprint(watched)))
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = None  # free the old weight before building the new one
            self.values_changed()  # the fingerprint saw a change, a write through .data included
            self._eval_cache = (key, self._adapted_weight_no_grad(active, dtype))
        return self._eval_cache[1]

    def _adapted_weight_no_grad(self, active: list[str], dtype: torch.dtype) -> torch.Tensor:
        """``f_k(... f_1(W0))`` from float32 factors, cast to ``dtype``. One adapter is built one row block at a
        time (the ``block_mib`` bound); several compose on whole float32 matrices (each reads its predecessor). Built
        outside inference mode even when called in it: an inference tensor kept in the cache would fail a later
        forward that saves it for backward (an input gradient through a frozen adapter)."""
        with torch.no_grad(), torch.inference_mode(False):
            if len(active) == 1:
                blocks, rows = self.weight_rows(active[0], self.base, self.float_factors(active[0]))
                return blocked_weight(lambda s: rows(s).to(dtype), blocks, self.in_features, self.base.device, dtype)
            weight = self.base.full()
            for name in active:
                weight = self.adapted_weight(name, weight, self.float_factors(name))
            return weight.to(dtype)

    def clear_eval_cache(self) -> None:
        self._eval_cache = None

    def train(self, mode: bool = True):
        self._eval_cache = None  # a mode switch starts afresh; training never holds the cache's memory
        self._weights_sharded(list(getattr(self, self.adapter_layer_names[0]).keys()))  # FSDP shards outside forward
        return super().train(mode)

    # ----------------------------------------------------------------- merge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write ``f(W0)`` into the base weight, computed in float32 and then cast (a quantized base: quantized
        again, with the rounding it costs in ``rounding_error``; unmerge restores the quantized weight exactly).

        With ``safe_merge`` nothing is written unless every factor and the merged weight are finite.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        factors = getattr(self, self.adapter_layer_names[0])
        adapter_names = [name for name in adapter_names if name in factors]
        if not adapter_names:
            return
        if self.partitioned_parameters():
            raise zero3_merge_error("merge_adapter", self.partitioned_parameters())
        weight, records = self._merged_weight(adapter_names)
        if safe_merge:
            problems = self.merge_problems(adapter_names, weight)
            if problems:
                raise ValueError(
                    f"safe_merge: merging adapter(s) {adapter_names} would write NaN/Inf into this layer ("
                    f"{'; '.join(problems)}); the base weights were left untouched. The adapter is broken: check its "
                    "training (learning rate, loss scaling)."
                )
        if not self.merged_adapters:
            self._unmerged_base = self.base.snapshot()  # a quantized W0 as it was: unmerge puts it back bit for bit
        self.rounding_error = self.base.write(weight)  # None for a dense base; the requantization's for a quantized
        self._merge_records.update(records)
        self.merged_adapters.extend(adapter_names)
        self._eval_cache = None

    def _merged_weight(self, adapter_names: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The merged weight in the base weight's dtype (float32 for a quantized base, which quantizes it itself),
        and per adapter the record its unmerge needs: a copy of the factors the merge used and the method's
        constants (the warm-up factor, D2's unit scales)."""
        records = {}
        with torch.no_grad():
            weight = self.base.full()
            for name in adapter_names:
                copies = tuple(f.detach().clone() for f in self.factors(name))
                weight, constants = self.merge_weight(name, weight, tuple(c.float() for c in copies))
                records[name] = (copies, constants)
        return weight if self.base.quantized else weight.to(self.base.dtype), records

    def merge_problems(self, adapter_names: Optional[list[str]] = None, merged: Optional[torch.Tensor] = None
                       ) -> list[str]:
        """Why merging would write NaN/Inf into this layer: each non-finite factor by name, or a merged weight that is
        not finite in the base weight's dtype (an overflow). Empty when a merge is safe. Nothing is written."""
        names = [n for n in (adapter_names or self.active_adapters) if n not in self.merged_adapters]
        names = [n for n in names if n in getattr(self, self.adapter_layer_names[0])]
        problems = [f"{attr}[{name!r}] holds NaN/Inf" for name in names
                    for attr, factor in zip(self.adapter_layer_names, self.factors(name))
                    if not torch.isfinite(factor).all()]
        if names and not problems:
            merged = self._merged_weight(names)[0] if merged is None else merged
            if not torch.isfinite(merged).all():
                problems.append(f"the merged weight overflows {self.base.dtype}")
        return problems

    def unmerge(self) -> None:
        """Put ``W0`` back: a quantized one exactly as it was before the first merge; a dense one by inverting each
        merge with the factors and constants it used (within float32 rounding, whatever trained in between)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self.partitioned_parameters():
            raise zero3_merge_error("unmerge_adapter", self.partitioned_parameters())
        if self._unmerged_base is not None:
            self.base.restore(self._unmerged_base)
            self._unmerged_base, self.rounding_error = None, None
            self.merged_adapters.clear()
            self._merge_records.clear()
        else:
            with torch.no_grad():
                weight = self.base.full()
                while self.merged_adapters:
                    name = self.merged_adapters.pop()
                    copies, constants = self._merge_records.pop(name)
                    weight = self.unmerge_weight(name, weight, tuple(c.float() for c in copies), constants)
            self.base.write(weight)
        self._eval_cache = None

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``dW = f(W0) - W0`` for one adapter, ``(out, in)`` whatever the base layer, in float32 without gradient."""
        with torch.no_grad():
            w0 = self.base.full()
            return self.adapted_weight(adapter_name, w0, self.float_factors(adapter_name)) - w0

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """:meth:`delta_weight` in the base weight's layout, as peft's layers give it: ``(out, in)``, or ``(in, out)``
        for GPT-2's ``Conv1D`` (peft's LoRA conversion relies on it)."""
        delta = self.delta_weight(adapter_name)
        return delta.t() if isinstance(self.get_base_layer(), Conv1D) else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Both methods are additive (``W0 + dW``, ``dW`` from :meth:`get_delta_weight`), so peft's
        ``convert_to_lora`` applies (``duallora.convert_to_lora`` adds the error it makes)."""
        return True

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}.{super().__repr__()}"
