"""What an adapted layer refuses under sharding (FSDP, DeepSpeed ZeRO-3, tensor parallelism): the adapter reads
``W0`` itself, outside the base layer's forward, so ``W0`` must be whole there, and a merge must see whole weights.
"""

from __future__ import annotations

from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from .watch import is_sharded, is_zero3_partition


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


class ShardingChecks:
    """The sharding checks of :class:`~duallora.core.layer.AdaptedLayer`."""

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


    def partitioned_parameters(self) -> list[str]:
        """This layer's parameters that are ZeRO-3 partitions now, by name (nothing can be merged into or from
        them)."""
        return [name for name, p in self.named_parameters() if is_zero3_partition(p)]


    def _weights_sharded(self, active: list[str]) -> bool:
        self._sharded = (self._sharded or any(is_sharded(t) for t in self._watched(active))
                         or any(isinstance(m, FullyShardedDataParallel) for name in active
                                for m in self.factor_modules(name)))  # FSDP1 units of their own
        return self._sharded

