"""The maths of D2-LoRA, as pure functions (arXiv 2602.14728, Eq. 1-3). Shapes follow PyTorch: ``W0`` is
``(out, in)``, a layer computes ``y = x W^T + b``::

    dW    = scale * (A_pos @ B_pos - tau * A_neg @ B_neg)      scale = lora_alpha / r
    W'    = W0 + dW
    W*    = W' * n(W0) / n(W')                                  n = L2 norm per output unit (or per input column)
    W_hat = W* + dW

Every function here is used by the layer (forward and merge) and by the tests, so there is one truth.
:class:`D2Rows` is the row rule of the shared memory-efficient linear (:mod:`duallora.core.blocked`); its backward
takes the gradient through the norm projection with :func:`d2_product_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.base_weight import as_rows
from ..core.blocked import (DEFAULT_KERNEL, BlockedAdaptedWeight, BlockedAdapterLinear, KernelOptions, RowRule,
                             add_matmul_)
from ..core.fused import fused
from ..core.precision import factor_product

NORM_AXES = ("out", "in")

# Guards 0/0 when a unit of W' has zero norm (a pruned row): that unit's W* is then 0 instead of NaN.
_NORM_EPS = 1e-12


def unit_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """``n(W)``: L2 norm of each output unit (``axis="out"``: over ``in``, shape ``(out, 1)``, as PEFT's
    DoRA) or of each input column (``axis="in"``: over ``out``, shape ``(1, in)``); per matrix of a stack
    ``(experts, out, in)``."""
    if axis == "out":
        return torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    if axis == "in":
        return torch.linalg.vector_norm(w, dim=-2, keepdim=True)
    raise ValueError(f"unknown norm axis {axis!r}; valid: {NORM_AXES}")


def frozen_unit_norm(w0, axis: str, blocks: list[slice]) -> torch.Tensor:
    """``n(W0)`` in float32, without gradient, reading ``W0`` (a tensor or a dense or quantized
    :class:`~duallora.core.base_weight.WeightRows`) one row block at a time: it is never copied to float32 or
    dequantized whole, so the ``block_mib`` bound holds here too. ``axis="in"`` sums each block's squares."""
    w0 = as_rows(w0)
    with torch.no_grad():
        if axis == "out":
            return torch.cat([unit_norm(w0.rows(s, torch.float32), "out") for s in blocks], dim=-2)
        if axis == "in":
            squares = sum(w0.rows(s, torch.float32).square().sum(-2, keepdim=True) for s in blocks)
            return squares.sqrt()
    raise ValueError(f"unknown norm axis {axis!r}; valid: {NORM_AXES}")


def d2_delta_from_products(pos: torch.Tensor, neg: torch.Tensor, scale: float, tau: float) -> torch.Tensor:
    """D2-LoRA signed two-branch update ``dW = scale * (pos - tau * neg)`` from ``pos = A_pos B_pos``,
    ``neg = A_neg B_neg`` (paper Eq. 1)."""
    return scale * (pos - tau * neg)


def d2_delta_weight(
    A_pos: torch.Tensor, B_pos: torch.Tensor, A_neg: torch.Tensor, B_neg: torch.Tensor, scale: float, tau: float
) -> torch.Tensor:
    """D2-LoRA signed two-branch update ``dW = scale * (A_pos B_pos - tau * A_neg B_neg)`` (paper Eq. 1)."""
    return d2_delta_from_products(factor_product(A_pos, B_pos), factor_product(A_neg, B_neg), scale, tau)


def d2_unit_scale(
    w_prime: torch.Tensor, w0_norm: torch.Tensor, norm_axis: str = "out", detach_norm: bool = False
) -> torch.Tensor:
    """``k = n(W0) / n(W')``, the per-unit factor that takes each unit of ``W'`` back to its original norm."""
    norm = unit_norm(w_prime, norm_axis)
    if detach_norm:
        norm = norm.detach()  # DoRA's choice (DoRA paper Sec. 4.3): no gradient through the norm, less memory
    return w0_norm / norm.clamp_min(_NORM_EPS)


def d2_weight(
    w0: torch.Tensor,
    A_pos: torch.Tensor,
    B_pos: torch.Tensor,
    A_neg: torch.Tensor,
    B_neg: torch.Tensor,
    scale: float,
    tau: float,
    w0_norm: torch.Tensor,
    norm_axis: str = "out",
    detach_norm: bool = False,
) -> torch.Tensor:
    """``W_hat = (W0 + dW) * n(W0) / n(W0 + dW) + dW`` (paper Eq. 2-3). Differentiable (the reference path)."""
    return d2_weight_from_products(factor_product(A_pos, B_pos), factor_product(A_neg, B_neg), w0, w0_norm, scale,
                                   tau, norm_axis, detach_norm)


def d2_weight_from_products(pos: torch.Tensor, neg: torch.Tensor, w0: torch.Tensor, w0_norm: torch.Tensor,
                            scale: float, tau: float, norm_axis: str = "out", detach_norm: bool = False,
                            with_base: bool = True) -> torch.Tensor:
    """``W_hat`` (or ``W_hat - W0``) from the two branch products."""
    dw = d2_delta_from_products(pos, neg, scale, tau)
    w_prime = w0 + dw
    w_hat = w_prime * d2_unit_scale(w_prime, w0_norm, norm_axis, detach_norm) + dw
    return w_hat if with_base else w_hat - w0


def d2_product_grads(g: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, w0: torch.Tensor, w0_norm: torch.Tensor,
                     scale: float, tau: float, norm_axis: str, detach_norm: bool):
    """``(dL/d dW, dL/dW')`` given ``G = dL/dW_hat``, with ``k = n(W0)/n(W')``::

        dL/dW' = k * (G - <G, W'>_unit / n(W')^2 * W')      (k * G with detach_norm)
        dL/ddW = G + dL/dW'
    """
    w_prime = w0 + d2_delta_from_products(pos, neg, scale, tau)
    k = d2_unit_scale(w_prime, w0_norm, norm_axis)
    if detach_norm:
        g_prime = g * k
    else:
        dim = -1 if norm_axis == "out" else -2
        radial = (g * w_prime).sum(dim=dim, keepdim=True) / unit_norm(w_prime, norm_axis).square().clamp_min(_NORM_EPS)
        g_prime = (g - radial * w_prime) * k
    return g + g_prime, g_prime


def d2_unmerge(
    w_hat: torch.Tensor, dw: torch.Tensor, unit_scale: torch.Tensor
) -> torch.Tensor:
    """Invert ``W_hat = (W0 + dW) * k + dW`` for ``W0``, with ``k = n(W0)/n(W')`` cached at merge time.

    ``k = 0`` only where ``n(W0) = 0``: that unit of ``W0`` was all zeros, and is restored as zeros (not 0/0)."""
    return torch.where(unit_scale > 0, (w_hat - dw) / unit_scale - dw, 0.0)


_build_d2_weight = fused(d2_weight_from_products)
_d2_product_grads = fused(d2_product_grads)


@dataclass(frozen=True)
class D2Rows(RowRule):
    """D2-LoRA's row rule (``tensors`` = A_pos, B_pos, A_neg, B_neg, n(W0)). With ``norm_axis="out"`` each output
    row is projected on its own; ``"in"`` normalises whole columns, so the matrix is one block. Matrices or stacks of
    them (rows ``s`` of every expert)."""

    scale: float
    tau: float
    norm_axis: str = "out"
    detach_norm: bool = False
    with_base: bool = True

    @property
    def whole(self) -> bool:
        return self.norm_axis == "in"

    def block(self, s, w0, tensors):
        A_pos, B_pos, A_neg, B_neg, w0_norm = tensors
        norm = w0_norm[..., s, :] if self.norm_axis == "out" else w0_norm
        return (factor_product(A_pos[..., s, :], B_pos), factor_product(A_neg[..., s, :], B_neg),
                w0.rows(s, A_pos.dtype), norm)

    def rows(self, state):
        pos, neg, w0_rows, norm = state
        return _build_d2_weight(pos, neg, w0_rows, norm, self.scale, self.tau, self.norm_axis, self.detach_norm,
                                self.with_base)

    def gradient_buffers(self, tensors):
        A_pos, B_pos, A_neg, B_neg, _ = tensors
        return [torch.empty_like(A_pos), torch.zeros_like(B_pos), torch.empty_like(A_neg), torch.zeros_like(B_neg),
                None]

    def backward(self, s, g, state, tensors, grads):
        A_pos, B_pos, A_neg, B_neg, _ = tensors
        pos, neg, w0_rows, norm = state
        grad_A_pos, grad_B_pos, grad_A_neg, grad_B_neg, _ = grads
        g_dw, g_prime = _d2_product_grads(g, pos, neg, w0_rows, norm, self.scale, self.tau, self.norm_axis,
                                          self.detach_norm)
        w0_rows_grad = g_prime if self.with_base else g_prime - g  # y sees W0 through W' (and minus W0 itself)
        g_dw = g_dw.to(A_pos.dtype)  # n(W0) is float32 even for bf16 factors: back to the factors' dtype
        grad_A_pos[..., s, :] = self.scale * (g_dw @ B_pos.mT)
        grad_A_neg[..., s, :] = (-self.scale * self.tau) * (g_dw @ B_neg.mT)
        add_matmul_(grad_B_pos, A_pos[..., s, :].mT, g_dw, alpha=self.scale)
        add_matmul_(grad_B_neg, A_neg[..., s, :].mT, g_dw, alpha=-self.scale * self.tau)
        return w0_rows_grad


def d2_linear(x, w0, bias, A_pos, B_pos, A_neg, B_neg, w0_norm, scale: float, tau: float, norm_axis: str = "out",
              detach_norm: bool = False, with_base: bool = True, kernel: KernelOptions = DEFAULT_KERNEL):
    """``y = x W_hat^T + b`` (or ``x (W_hat - W0)^T`` without the base), memory-efficient: autograd keeps ``x`` and
    the factors only, the ``out x in`` matrices are rebuilt in row blocks inside backward."""
    rule, base = D2Rows(scale, tau, norm_axis, detach_norm, with_base), as_rows(w0)
    return BlockedAdapterLinear.apply(x, base.tensor, bias, rule, kernel, base, A_pos, B_pos, A_neg, B_neg, w0_norm)


def d2_efficient_weight(w0, A_pos, B_pos, A_neg, B_neg, w0_norm, scale: float, tau: float, norm_axis: str = "out",
                        detach_norm: bool = False, kernel: KernelOptions = DEFAULT_KERNEL) -> torch.Tensor:
    """``W_hat`` as a tensor of ``w0``'s dtype and layout, for a matrix or a stack ``(experts, out, in)``, memory-
    efficient: autograd keeps the factors and ``n(W0)`` only (:class:`BlockedAdaptedWeight`)."""
    rule = D2Rows(scale, tau, norm_axis, detach_norm)
    return BlockedAdaptedWeight.apply(w0, rule, kernel, as_rows(w0), A_pos, B_pos, A_neg, B_neg, w0_norm)


def d2_weight_rows(s: slice, w0, A_pos, B_pos, A_neg, B_neg, w0_norm, scale: float, tau: float, norm_axis: str,
                   detach_norm: bool, with_base: bool = True) -> torch.Tensor:
    """Rows ``s`` of ``W_hat`` (or of ``W_hat - W0``) in the factors' dtype."""
    rule = D2Rows(scale, tau, norm_axis, detach_norm, with_base)
    return rule.rows(rule.block(s, as_rows(w0), (A_pos, B_pos, A_neg, B_neg, w0_norm)))


def d2_concatenated_branches(branch_sets, pos_coefs, neg_coefs):
    """One D2 adapter (scale 1, tau 1) whose update is the weighted sum of several: ``sum_i w_i dW_i``, exactly.

    ``dW_i = s_i (A+_i B+_i - tau_i A-_i B-_i)``; stacking the branches along the rank,
    ``[c_1 A+_1, c_2 A+_2, ...] [B+_1; B+_2; ...] = sum_i c_i A+_i B+_i``, so with ``c_i = w_i s_i`` for the positive
    branches (``pos_coefs``) and ``w_i s_i tau_i`` for the negative ones (``neg_coefs``) the sum is one update of rank
    ``sum_i r_i``. ``branch_sets``: ``(A_pos, B_pos, A_neg, B_neg)`` per adapter, A ``(out, r_i)``, B ``(r_i, in)``.
    """
    def stacked(index, coefs):
        return (torch.cat([c * factors[index] for factors, c in zip(branch_sets, coefs)], dim=-1),
                torch.cat([factors[index + 1] for factors in branch_sets], dim=-2))

    return (*stacked(0, pos_coefs), *stacked(2, neg_coefs))
