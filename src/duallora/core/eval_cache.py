"""The eval cache: in eval mode, the adapted weight ``f_k(... f_1(W0))`` is built once and reused while nothing it
reads changes, instead of once per forward (a generate call runs the layer once per token)."""

from __future__ import annotations

import torch

from .base_weight import tensors_key
from .blocked import blocked_weight
from .watch import fingerprint


class EvalCache:
    """The eval cache of :class:`~duallora.core.layer.AdaptedLayer`."""

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
