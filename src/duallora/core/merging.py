"""Merge and unmerge of an adapted layer: ``f(W0)`` written into the base weight, computed in float32 and cast once
(a quantized base quantized again); each merge keeps a copy of the factors it used and the method's constants, so
unmerge subtracts exactly what merge added, whatever happened between. Several adapters compose in order,
``W = f_k(... f_1(W0))``, as the unmerged forward computes them."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from .sharding import zero3_merge_error


class Merging:
    """Merge, unmerge and the update ``dW`` of :class:`~duallora.core.layer.AdaptedLayer`."""

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

