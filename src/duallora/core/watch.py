"""What the adapted layers watch about the tensors they read: whether their values changed, whether they are sharded.

A tensor's version counter misses writes through ``.data`` and through other views of its storage (DeepSpeed
copies its fp32 master weights back through flat buffers), so a change is told by the values themselves.
"""

from __future__ import annotations

import torch

# Bound on the int64 copy a reduction may make of one block (the fingerprint reads W0 in blocks, as the kernels do).
_FINGERPRINT_BLOCK_ELEMENTS = 2**22

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(tensors: list[torch.Tensor]) -> list[int]:
    """Two integers per tensor that change whenever any of its values changes (one host sync for all tensors).

    The bits of each element are read as an integer (exact: a change of one element by one ulp shows), weighted by
    the element's column (values swapped within a row do not cancel), summed per row, and the rows weighted by their
    position (two changes in different rows do not cancel); int64 arithmetic wraps, which keeps it exact and
    deterministic.
    """
    parts = []
    for t in tensors:
        bits = t.detach().reshape(1, -1) if t.dim() < 2 else t.detach().flatten(0, -2)
        bits = bits.view(_INT_VIEW[bits.element_size()])
        per_block = max(1, _FINGERPRINT_BLOCK_ELEMENTS // max(1, bits.shape[1]))
        column = torch.arange(1, bits.shape[1] + 1, device=bits.device, dtype=torch.int64)
        row_sums = torch.cat([(bits[i:i + per_block] * column).sum(dim=1)
                              for i in range(0, bits.shape[0], per_block)])
        position = torch.arange(1, row_sums.numel() + 1, device=row_sums.device, dtype=torch.int64)
        parts.append(torch.stack([row_sums.sum(), (row_sums * position).sum()]))
    return torch.cat(parts).tolist()


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is one process's shard of a larger tensor: a DTensor (FSDP2, tensor parallel), a DeepSpeed
    ZeRO-3 partition, or a parameter that FSDP1 flattened."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) or hasattr(t, "ds_id") or bool(getattr(t, "_fsdp_flattened", False))


def full_shape(t: torch.Tensor) -> torch.Size:
    """The shape ``t`` has as a whole: a DeepSpeed ZeRO-3 parameter's ``ds_shape`` (outside a gather its data is an
    empty placeholder of shape ``(0,)``: a model built under ``zero.Init`` is so from the start), else its own."""
    return torch.Size(getattr(t, "ds_shape", t.shape))


def is_zero3_partition(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter that is not gathered now (its values are elsewhere)."""
    return hasattr(t, "ds_shape") and tuple(t.shape) != tuple(t.ds_shape)
