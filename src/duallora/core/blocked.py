"""The memory-efficient linear both methods share: ``y = x f(W0)^T + b`` whose autograd keeps only ``x`` and the
small factors, with every ``out x in`` matrix built for a block of output rows at a time (docs/methods/shared.md,
"Row blocks").

Both methods' ``f`` is row-local (D2-LoRA's with ``norm_axis="out"``): row ``i`` of ``f(W0)`` and of its gradients
depends only on row ``i`` of ``W0``, of the factors that carry the output dimension, and of the output gradient. So
forward and backward loop over row blocks, each block's transients exist for that block only, and the factor
gradients are summed over the blocks. :class:`BlockedAdapterLinear` is that loop, written once; a method says what
to do with one block through a :class:`RowRule` (``dual/maths.py``, ``d2/maths.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .base_weight import WeightRows


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype when autocast is on, else ``x``'s own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@dataclass(frozen=True)
class KernelOptions:
    """How the memory-efficient Functions compute (never what): the dtype of the weight-gradient matmul and the
    bound on each ``out x in`` transient, which sets how many rows of ``dW`` are built at once."""

    weight_grad_dtype: Optional[torch.dtype] = None  # None: the compute dtype
    block_mib: Optional[float] = 16.0  # None: whole matrices at once

    def rows_per_block(self, out_features: int, in_features: int, element_size: int) -> int:
        """The most rows whose ``rows x in`` matrix fits in ``block_mib`` (at least one, at most all)."""
        if self.block_mib is None:
            return out_features
        return max(1, min(out_features, int(self.block_mib * 2**20) // (in_features * element_size)))


DEFAULT_KERNEL = KernelOptions()


def row_blocks(rows: int, per_block: int) -> list[slice]:
    """Consecutive row slices of at most ``per_block`` rows covering ``rows``."""
    return [slice(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


def weight_blocks(w0: WeightRows, factor_dtype: torch.dtype, kernel: KernelOptions,
                  whole: bool = False) -> list[slice]:
    """The row blocks in which ``W0``'s ``out x in`` matrices are built (``whole``: one block), each a multiple of
    the rows ``W0`` can be read in (a quantized weight's blocks must not be split). A stack of matrices
    ``(experts, out, in)`` is cut along ``out`` for all its matrices at once, the bound covering the whole block."""
    *stack, out_features, in_features = w0.shape
    per_block = out_features if whole else kernel.rows_per_block(out_features, in_features * math.prod(stack),
                                                                 factor_dtype.itemsize)
    multiple = w0.row_multiple
    return row_blocks(out_features, min(out_features, max(multiple, per_block // multiple * multiple)))


def blocked_weight(rows, blocks: list[slice], in_features: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """The whole ``out x in`` matrix, filled block by block from ``rows(s)`` and cast to ``dtype`` as each block is
    made: beside the result only one block exists at a time."""
    weight = torch.empty(blocks[-1].stop, in_features, dtype=dtype, device=device)
    for s in blocks:
        weight[s] = rows(s)
    return weight


def add_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``out += alpha * a @ b`` in place, for matrices or stacks of them (a factor gradient summed over blocks)."""
    if out.dim() == 2:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.baddbmm_(a, b, alpha=alpha)


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """Tokens as rows: ``(..., features)`` -> ``(tokens, features)``."""
    return t.reshape(-1, t.shape[-1])


def _blocked_linear(x2: torch.Tensor, weight_rows, bias: Optional[torch.Tensor], blocks: list[slice]) -> torch.Tensor:
    """``x W^T + b`` where ``weight_rows(s)`` builds the rows ``s`` of ``W``: only one block of ``W`` exists at
    once."""
    if len(blocks) == 1:  # the common case: no output buffer to fill
        return F.linear(x2, weight_rows(blocks[0]), bias)
    y = x2.new_empty(x2.shape[0], blocks[-1].stop)
    for s in blocks:
        y[:, s] = F.linear(x2, weight_rows(s), None if bias is None else bias[s])
    return y


class _BlockedBackward:
    """The parts of a blocked backward that do not depend on the method: per row block ``s``, the slice of the
    weight gradient ``G[s] = g[:, s]^T x`` (in ``kernel.weight_grad_dtype`` if set, returned in the factors' dtype:
    float32 under bf16 autocast, as the elementwise work after it needs the range) and the input gradient
    ``gx = sum_s g[:, s] W[s]``, accumulated in place."""

    def __init__(self, x: torch.Tensor, grad_out: torch.Tensor, factor_dtype: torch.dtype, kernel: KernelOptions,
                 input_grad: bool):
        self.x, self.g = _matrix(x), _matrix(grad_out)
        matmul_dtype = kernel.weight_grad_dtype or grad_out.dtype
        self.x_mm, self.g_mm = self.x.to(matmul_dtype), self.g.to(matmul_dtype)
        self.factor_dtype = factor_dtype
        self.grad_x = torch.empty_like(self.x, dtype=grad_out.dtype) if input_grad else None
        self._beta = 0.0  # the first block overwrites grad_x (no zero fill in the hot path), later ones add to it

    def weight_grad(self, s: slice) -> torch.Tensor:
        return (self.g_mm[:, s].t() @ self.x_mm).to(self.factor_dtype)

    def add_input_grad(self, s: slice, weight_rows: torch.Tensor) -> None:
        self.grad_x.addmm_(self.g[:, s], weight_rows.to(self.grad_x.dtype), beta=self._beta)
        self._beta = 1.0

    def input_grad(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.grad_x is None else self.grad_x.reshape(x.shape).to(x.dtype)


class RowRule:
    """What a method does with one row block ``s`` (``tensors`` are the factors, then the method's constant tensors:
    Dual LoRA's ``lam_t s``, D2-LoRA's ``n(W0)``). Its options (activations, scales, ``with_base``) live on it."""

    whole: bool = False  # True: the rows are not independent (D2-LoRA's column norms), build one block
    depends_on_w0: bool = True  # False: f(W0) - W0 does not read W0 (Dual LoRA's update alone), no gradient for it

    def block(self, s: slice, w0: WeightRows, tensors: tuple) -> Any:
        """What the block's rows and gradients are built from (``W0``'s rows, the factor products), made once per
        block."""
        raise NotImplementedError

    def rows(self, state: Any) -> torch.Tensor:
        """Rows ``s`` of ``f(W0)`` (or of ``f(W0) - W0``), in the factors' dtype."""
        raise NotImplementedError

    def backward(self, s: slice, g: torch.Tensor, state: Any, tensors: tuple, grads: list) -> Optional[torch.Tensor]:
        """Add block ``s``'s share of each factor gradient to ``grads`` (one per tensor; None for constants), given
        ``g = dL/df(W0)[s]``; return the rows of ``dL/dW0`` (used only when ``W0`` wants a gradient)."""
        raise NotImplementedError

    def gradient_buffers(self, tensors: tuple) -> list:
        """One buffer per tensor that the blocks fill (rows) or add into (whole factors); None for constants."""
        raise NotImplementedError


class BlockedAdapterLinear(torch.autograd.Function):
    """``y = x f(W0)^T + b`` with ``f`` given by a :class:`RowRule`, saving ``x`` and ``tensors`` only (``W0`` is
    read again, one row block at a time, from ``base``: dense or quantized).

    Forward: one matmul per block with rows of ``f(W0)`` built on the fly. Backward, per block: rebuild the block's
    products, add ``g[:, s] f(W0)[s]`` to the input gradient, form ``G[s] = g[:, s]^T x`` and let the rule turn it
    into factor gradients. At most one block's ``out x in`` transients are alive at once; ``kernel.block_mib``
    bounds each. ``w0`` is ``base``'s tensor when it is dense (so that autograd can ask for its gradient), else None.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, rule: RowRule, kernel: KernelOptions, base: WeightRows, *tensors):
        compute_dtype = autocast_dtype(x)
        blocks = weight_blocks(base, tensors[0].dtype, kernel, whole=rule.whole)
        with torch.autocast(x.device.type, enabled=False):
            y = _blocked_linear(_matrix(x).to(compute_dtype),
                                lambda s: rule.rows(rule.block(s, base, tensors)).to(compute_dtype),
                                None if bias is None else bias.to(compute_dtype), blocks)
        ctx.save_for_backward(x, *tensors)
        ctx.rule, ctx.kernel, ctx.base, ctx.blocks, ctx.has_bias, ctx.compute_dtype = \
            rule, kernel, base, blocks, bias is not None, compute_dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x, *tensors = ctx.saved_tensors
        rule, base = ctx.rule, ctx.base
        grad_out = grad_out.to(ctx.compute_dtype)
        grad_w0 = (torch.empty(base.shape, dtype=base.tensor.dtype, device=x.device)
                   if ctx.needs_input_grad[1] and rule.depends_on_w0 else None)
        grads = rule.gradient_buffers(tuple(tensors))
        with torch.autocast(x.device.type, enabled=False):
            work = _BlockedBackward(x, grad_out, tensors[0].dtype, ctx.kernel, ctx.needs_input_grad[0])
            for s in ctx.blocks:
                state = rule.block(s, base, tensors)  # rebuilt once per block, shared by the input and factor grads
                if work.grad_x is not None:
                    work.add_input_grad(s, rule.rows(state))
                w0_rows = rule.backward(s, work.weight_grad(s), state, tensors, grads)
                if grad_w0 is not None:
                    grad_w0[s] = w0_rows
                del state, w0_rows  # at most one block's matrices alive at once
        grad_b = _matrix(grad_out).sum(0) if (ctx.has_bias and ctx.needs_input_grad[2]) else None
        return (work.input_grad(x), grad_w0, grad_b, None, None, None, *grads)


class BlockedAdaptedWeight(torch.autograd.Function):
    """``f(W0)`` itself, for a matrix or a stack ``(experts, out, in)``, saving only ``tensors`` (the factors and the
    method's constants): the adapted weight of a parameter that a module reads itself (MoE experts held as 3-D
    parameters), where no ``x`` comes in to fuse with.

    Forward: the result is filled one row block (of every matrix of the stack) at a time, in ``w0``'s dtype and
    memory layout. Backward, given ``G = dL/df(W0)``: per block, rebuild the block's products and let the rule turn
    ``G[..., s, :]`` into factor gradients. The transients are one block's; the only whole-stack tensors are the
    result (which the module's own matmuls keep, as they keep a LoRA-adapted weight) and ``G`` (autograd's).
    """

    @staticmethod
    def forward(ctx, w0, rule: RowRule, kernel: KernelOptions, base: WeightRows, *tensors):
        factor_dtype = tensors[0].dtype
        blocks = weight_blocks(base, factor_dtype, kernel, whole=rule.whole)
        result = torch.empty_like(w0)  # w0's strides: a transposed view gives a transposed result
        with torch.no_grad(), torch.autocast(w0.device.type, enabled=False):
            for s in blocks:
                result[..., s, :] = rule.rows(rule.block(s, base, tensors))
        ctx.save_for_backward(*tensors)
        ctx.rule, ctx.kernel, ctx.base, ctx.blocks, ctx.factor_dtype = rule, kernel, base, blocks, factor_dtype
        return result

    @staticmethod
    def backward(ctx, grad_weight):
        tensors = ctx.saved_tensors
        rule, base = ctx.rule, ctx.base
        grad_w0 = torch.empty_like(grad_weight) if ctx.needs_input_grad[0] and rule.depends_on_w0 else None
        grads = rule.gradient_buffers(tuple(tensors))
        with torch.autocast(grad_weight.device.type, enabled=False):
            for s in ctx.blocks:
                state = rule.block(s, base, tensors)
                g = grad_weight[..., s, :].to(ctx.factor_dtype).contiguous()  # the fused kernels take dense inputs
                w0_rows = rule.backward(s, g, state, tensors, grads)
                if grad_w0 is not None:
                    grad_w0[..., s, :] = w0_rows
                del state, g, w0_rows  # at most one block's matrices alive at once
        return (grad_w0, None, None, None, *grads)
