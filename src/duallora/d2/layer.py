"""D2-LoRA: a signed two-branch update with a per-unit norm projection (arXiv 2602.14728).

::

    dW    = (lora_alpha / r) * (A_pos @ B_pos - tau * A_neg @ B_neg)    (out,r)(r,in), two branches
    W*    = (W0 + dW) * n(W0) / n(W0 + dW)                              each unit back to its original norm
    W_hat = W* + dW                                                     Eq. 3: the update is added once more
    y     = x W_hat^T + b

Two rank-r branches hold 2x LoRA's parameters at r: compare it with LoRA at 2r.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..core.base_weight import as_rows
from ..core.blocked import weight_blocks
from ..core.combine import copy_into
from ..core.layer import AdaptedLayer
from .config import D2LoraConfig
from .maths import (d2_concatenated_branches, d2_delta_weight, d2_efficient_weight, d2_linear, d2_unit_scale,
                    d2_unmerge, d2_weight, d2_weight_rows, frozen_unit_norm)


NORM_CACHE_OFF = os.environ.get("DUALLORA_NORM_CACHE", "1") == "0"  # the benchmarks' d2-nocache variant


@torch.compiler.disable  # python-side bookkeeping (storage pointers, version counters): out of compiled graphs
def cache_key_of(w0):
    return w0.cache_key()


@dataclass(frozen=True)
class D2Options:
    """Per-adapter constants of one D2-LoRA layer."""

    scaling: float  # lora_alpha / r
    tau: float
    norm_axis: str
    detach_norm: bool


class D2LoraLayer(AdaptedLayer):
    """A Linear/Conv1D adapted with D2-LoRA.

    ``n(W0)`` of the layer's own ``W0`` is cached, keyed by which tensors hold ``W0``, where and how their values
    live and their version counters (:meth:`~duallora.core.base_weight.WeightRows.cache_key`: identity, storage,
    offset, shape, strides, dtype, device, ``_version``, the quantized layout) and ``norm_axis``, so a merge, an
    unmerge, a cast, ``load_state_dict`` (``assign=True`` too), an in-place edit or a re-quantized weight computes it
    again (in eval mode, where the eval cache fingerprints the values, so does a write through ``.data``); on a 4-bit
    base that saves a dequantization pass per forward. Sharded weights (refilled between uses) are not cached, nor
    are the intermediate weights a merge composes on. ``DUALLORA_NORM_CACHE=0`` turns the cache off.
    """

    prefix = "d2_lora_"
    adapter_layer_names = ("d2_lora_A_pos", "d2_lora_B_pos", "d2_lora_A_neg", "d2_lora_B_neg")
    other_param_names = ("d2_lora_dropout", "d2_options", "memory_efficient", "kernel_options", "eval_cache")
    factor_dims = {"d2_lora_A_pos": ("out", None), "d2_lora_B_pos": (None, "in"),
                   "d2_lora_A_neg": ("out", None), "d2_lora_B_neg": (None, "in")}

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: D2LoraConfig, **kwargs) -> None:
        self.d2_options: dict[str, D2Options] = {}
        self._norm_cache: dict[str, tuple[object, torch.Tensor]] = {}  # norm_axis -> (W0's cache key, n(W0))
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def create_adapter(self, adapter_name: str, config: D2LoraConfig, r: int, lora_alpha: float) -> None:
        self.d2_options[adapter_name] = D2Options(
            scaling=lora_alpha / r, tau=config.tau, norm_axis=config.norm_axis, detach_norm=config.detach_norm
        )
        # dW = 0 at init: the factors that meet x first (B) random and independent (equal branches would stay
        # collinear), the others (A) zero, as LoRA initialises its A and B.
        factors, stack = {}, self.stack_shape  # stack: () for a Linear; (experts,) for a stack of expert matrices
        for branch in ("pos", "neg"):
            b = torch.empty(*stack, r, self.in_features)
            for matrix in b.view(-1, r, self.in_features):  # each expert's own fan-in (a 3-D tensor's is r * in)
                nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
            factors[f"d2_lora_B_{branch}"] = b
            factors[f"d2_lora_A_{branch}"] = torch.zeros(*stack, self.out_features, r)
        self.add_factors(adapter_name, factors)

    def values_changed(self) -> None:
        self._norm_cache.clear()  # the eval cache's fingerprint sees writes through .data, which versions miss

    def _input_norm(self, adapter_name: str, w_in) -> torch.Tensor:
        """``n(W_in)`` in float32, read in row blocks of at most ``block_mib`` as float32; cached for the layer's own
        ``W0`` (see the class docstring)."""
        w_in = as_rows(w_in)  # W0 itself (dense or quantized) or the float32 weight a merge composes on
        axis = self.d2_options[adapter_name].norm_axis
        key = None if (NORM_CACHE_OFF or self._sharded) else cache_key_of(w_in)
        cached = self._norm_cache.get(axis)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        blocks = weight_blocks(w_in, torch.float32, self.kernel_options[adapter_name])
        norm = frozen_unit_norm(w_in, axis, blocks)
        if key is not None:
            self._norm_cache[axis] = (key, norm)
        return norm

    def adapted_weight(self, adapter_name: str, w_in: torch.Tensor, factors=None) -> torch.Tensor:
        opts = self.d2_options[adapter_name]
        factors = factors or self.compute_factors(adapter_name)
        return d2_weight(
            w_in.to(factors[0].dtype), *factors, opts.scaling, opts.tau,
            self._input_norm(adapter_name, w_in), opts.norm_axis, opts.detach_norm,
        )

    def fused_linear(self, adapter_name, x, w0, bias, with_base: bool) -> torch.Tensor:
        opts = self.d2_options[adapter_name]
        return d2_linear(x, w0, bias, *self.compute_factors(adapter_name), self._input_norm(adapter_name, w0),
                         opts.scaling, opts.tau, opts.norm_axis, opts.detach_norm, with_base,
                         self.kernel_options[adapter_name])

    def efficient_weight(self, adapter_name: str, w0) -> torch.Tensor:
        opts = self.d2_options[adapter_name]
        return d2_efficient_weight(w0.tensor, *self.compute_factors(adapter_name), self._input_norm(adapter_name, w0),
                                   opts.scaling, opts.tau, opts.norm_axis, opts.detach_norm,
                                   self.kernel_options[adapter_name])

    def weight_rows(self, adapter_name: str, w0: torch.Tensor, factors):
        opts = self.d2_options[adapter_name]
        norm = self._input_norm(adapter_name, w0)
        blocks = weight_blocks(w0, factors[0].dtype, self.kernel_options[adapter_name], whole=opts.norm_axis == "in")
        return blocks, lambda s: d2_weight_rows(s, w0, *factors, norm, opts.scaling, opts.tau, opts.norm_axis,
                                                opts.detach_norm)

    def merge_weight(self, adapter_name: str, w_in: torch.Tensor, factors):
        """``W_hat``, and the per-unit scale ``k = n(W0)/n(W')`` that unmerge inverts with."""
        opts = self.d2_options[adapter_name]
        dw = d2_delta_weight(*factors, opts.scaling, opts.tau)
        k = d2_unit_scale(w_in + dw, self._input_norm(adapter_name, w_in), opts.norm_axis)
        return self.adapted_weight(adapter_name, w_in, factors), k

    def unmerge_weight(self, adapter_name: str, w_out: torch.Tensor, factors, k) -> torch.Tensor:
        opts = self.d2_options[adapter_name]
        return d2_unmerge(w_out, d2_delta_weight(*factors, opts.scaling, opts.tau), k)

    def fill_weighted(self, adapter_name: str, adapters: list[str], weights: list[float]) -> None:
        """Make ``adapter_name`` (scale 1, tau 1) hold ``sum_i w_i dW_i`` of ``adapters`` (docs/combining.md)."""
        options = [self.d2_options[name] for name in adapters]
        pos_coefs = [w * o.scaling for w, o in zip(weights, options)]
        neg_coefs = [w * o.scaling * o.tau for w, o in zip(weights, options)]
        branches = d2_concatenated_branches([self.float_factors(name) for name in adapters], pos_coefs, neg_coefs)
        copy_into(self, adapter_name, dict(zip(self.adapter_layer_names, branches)))
