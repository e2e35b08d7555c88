"""The maths of Dual LoRA, as pure functions (arXiv 2512.03402, Sec. 3). Shapes follow PyTorch: ``W0`` is
``(out, in)``, a layer computes ``y = x W^T + b``::

    P = B @ A        (out, r1) @ (r1, in)     magnitude logits
    Q = D @ C        (out, r2) @ (r2, in)     direction logits
    dW = coef * m(P) * d(Q)                   coef = lam_t * lora_alpha / sqrt(r1 * r2)

with ``m = ReLU`` and ``d = Sign`` (Sign(0) = -1) by default. Every function here is used by the layer (forward and
merge) and by the tests, so there is one truth. :class:`DualRows` is the row rule of the shared memory-efficient
linear (:mod:`duallora.core.blocked`): its backward (docs/methods/dual_lora.md, "The gradients")::

    G  = g^T x
    Gm = coef * G * d(Q) * m'(P)          -> dB = Gm A^T,  dA = B^T Gm
    Gd = STE(coef * G * m(P))             -> dD = Gd C^T,  dC = D^T Gd
    gx = g (W0 + dW)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.base_weight import as_rows
from ..core.blocked import (DEFAULT_KERNEL, BlockedAdaptedWeight, BlockedAdapterLinear, KernelOptions, RowRule,
                             add_matmul_)
from ..core.fused import fused
from ..core.precision import factor_product

MAGNITUDE_ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
DIRECTION_ACTIVATIONS = ("sign", "tanh", "identity")
STE_VARIANTS = ("clip", "identity", "hardtanh")


def keep_nonfinite(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` where ``x`` is finite, NaN where it is not.

    Sign, ReLU, tanh and sigmoid map NaN or Inf to finite values (Sign(NaN) = -1, ReLU(-Inf) = 0, tanh(Inf) = 1), so a
    broken factor would train on in silence behind them. Passing the non-finite value on makes it show as a
    non-finite output, as it does in LoRA: a GradScaler then skips the step and NaN guards fire.
    """
    return torch.where(torch.isfinite(x), y, torch.nan)


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """Sign with values in {-1, +1}: +1 where ``x > 0``, else -1 (so Sign(0) = -1, unlike ``torch.sign``); NaN where
    ``x`` is NaN or Inf (:func:`keep_nonfinite`)."""
    return keep_nonfinite(torch.where(x > 0, 1.0, -1.0).to(x.dtype), x)


def magnitude(p: torch.Tensor, name: str) -> torch.Tensor:
    """The magnitude activation ``m(P)`` of Dual LoRA (paper: ReLU); NaN where ``P`` is not finite."""
    if name == "relu":
        return keep_nonfinite(torch.relu(p), p)
    if name == "tanh":
        return keep_nonfinite(torch.tanh(p), p)
    if name == "sigmoid":
        return keep_nonfinite(torch.sigmoid(p), p)
    if name == "identity":
        return p
    raise ValueError(f"unknown magnitude activation {name!r}; valid: {MAGNITUDE_ACTIVATIONS}")


def magnitude_derivative(p: torch.Tensor, name: str) -> torch.Tensor:
    """``m'(P)`` elementwise; ReLU uses its ordinary sub-gradient (0 at P = 0)."""
    if name == "relu":
        return (p > 0).to(p.dtype)
    if name == "tanh":
        return 1 - torch.tanh(p).square()
    if name == "sigmoid":
        s = torch.sigmoid(p)
        return s * (1 - s)
    if name == "identity":
        return torch.ones_like(p)
    raise ValueError(f"unknown magnitude activation {name!r}; valid: {MAGNITUDE_ACTIVATIONS}")


def direction(q: torch.Tensor, name: str) -> torch.Tensor:
    """The direction activation ``d(Q)`` of Dual LoRA (paper: Sign), without gradient bookkeeping; NaN where ``Q``
    is not finite."""
    if name == "sign":
        return sign_pm1(q)
    if name == "tanh":
        return keep_nonfinite(torch.tanh(q), q)
    if name == "identity":
        return q
    raise ValueError(f"unknown direction activation {name!r}; valid: {DIRECTION_ACTIVATIONS}")


def direction_backward(grad: torch.Tensor, q: torch.Tensor, name: str, ste: str) -> torch.Tensor:
    """Gradient w.r.t. ``Q`` given ``grad`` = dL/d d(Q).

    For Sign, a straight-through estimator (paper Sec. 3.2, ``dL/dx = Clip(dL/dx_b, -1, 1)``):
    ``clip`` passes the gradient clipped to [-1, 1], ``identity`` passes it unchanged, ``hardtanh`` passes
    it only where ``|Q| <= 1``. Other activations use their true derivative (``ste`` is ignored).
    """
    if name == "sign":
        if ste == "clip":
            return grad.clamp(-1.0, 1.0)
        if ste == "identity":
            return grad
        if ste == "hardtanh":
            return grad * (q.abs() <= 1).to(grad.dtype)
        raise ValueError(f"unknown straight-through estimator {ste!r}; valid: {STE_VARIANTS}")
    if name == "tanh":
        return grad * (1 - torch.tanh(q).square())
    if name == "identity":
        return grad
    raise ValueError(f"unknown direction activation {name!r}; valid: {DIRECTION_ACTIVATIONS}")


class _DirectionWithSTE(torch.autograd.Function):
    """``d(Q)`` whose backward is :func:`direction_backward` (the differentiable path for Sign)."""

    @staticmethod
    def forward(ctx, q, name, ste):
        ctx.save_for_backward(q)
        ctx.name, ctx.ste = name, ste
        return direction(q, name)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        return direction_backward(grad, q, ctx.name, ctx.ste), None, None


def differentiable_direction(q: torch.Tensor, name: str, ste: str) -> torch.Tensor:
    """``d(Q)`` usable under plain autograd: Sign gets the straight-through gradient."""
    if name == "sign":
        return _DirectionWithSTE.apply(q, name, ste)
    return direction(q, name)


def dual_delta_weight(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    coef: torch.Tensor | float,
    magnitude_activation: str = "relu",
    direction_activation: str = "sign",
    ste: str = "clip",
) -> torch.Tensor:
    """Dual LoRA update ``dW = coef * m(B @ A) * d(D @ C)`` (Hadamard product), shape ``(out, in)``.

    Differentiable under plain autograd (Sign through the chosen STE); this is the reference path.
    """
    w_m = magnitude(factor_product(B, A), magnitude_activation)
    w_d = differentiable_direction(factor_product(D, C), direction_activation, ste)
    return coef * (w_m * w_d)


def dual_weight_from_products(p: torch.Tensor, q: torch.Tensor, w0: torch.Tensor, coef: torch.Tensor,
                              magnitude_activation: str, direction_activation: str, with_base: bool) -> torch.Tensor:
    """``W0 + coef * m(P) * d(Q)`` (or without ``W0``) from the factor products, without autograd bookkeeping."""
    dw = coef * (magnitude(p, magnitude_activation) * direction(q, direction_activation))
    return w0 + dw if with_base else dw


def dual_product_grads(g: torch.Tensor, p: torch.Tensor, q: torch.Tensor, coef: torch.Tensor,
                       magnitude_activation: str, direction_activation: str, ste: str):
    """Gradients w.r.t. ``P`` and ``Q`` given ``G = dL/dW``: ``Gm = coef G d(Q) m'(P)``, ``Gd = STE(coef G m(P))``."""
    g = g * coef
    g_m = g * direction(q, direction_activation) * magnitude_derivative(p, magnitude_activation)
    g_d = direction_backward(g * magnitude(p, magnitude_activation), q, direction_activation, ste)
    return g_m, g_d


def dual_warmup_coef(step: torch.Tensor, warmup_steps: int, scale: float) -> torch.Tensor:
    """``lam_t * s`` with ``lam_t = min(1, t / warmup_steps)`` (paper Sec. 3.3); a tensor, so that
    ``torch.compile`` sees one graph for every step. ``warmup_steps = 0`` turns the warm-up off."""
    if warmup_steps <= 0:
        return torch.full((), scale, dtype=torch.float32, device=step.device)
    return (step.to(torch.float32) / warmup_steps).clamp(max=1.0) * scale


# one fused loop each over the out x in matrices (see duallora.core.fused)
_build_weight = fused(dual_weight_from_products)
_product_grads = fused(dual_product_grads)


@dataclass(frozen=True)
class DualRows(RowRule):
    """Dual LoRA's row rule: rows ``s`` need ``B[s]``, ``D[s]`` and ``W0[s]`` (``tensors`` = A, B, C, D, coef).
    Matrices or stacks of them (``(experts, out, r1)`` etc.: rows ``s`` of every expert)."""

    magnitude_activation: str = "relu"
    direction_activation: str = "sign"
    ste: str = "clip"
    with_base: bool = True

    @property
    def depends_on_w0(self) -> bool:
        return self.with_base

    def block(self, s, w0, tensors):
        A, B, C, D, coef = tensors
        return factor_product(B[..., s, :], A), factor_product(D[..., s, :], C), w0.rows(s, A.dtype), coef

    def rows(self, state):
        p, q, w0_rows, coef = state
        return _build_weight(p, q, w0_rows, coef, self.magnitude_activation, self.direction_activation, self.with_base)

    def gradient_buffers(self, tensors):
        A, B, C, D, _ = tensors
        return [torch.zeros_like(A), torch.empty_like(B), torch.zeros_like(C), torch.empty_like(D), None]

    def backward(self, s, g, state, tensors, grads):
        A, B, C, D, coef = tensors
        p, q, _, _ = state
        grad_A, grad_B, grad_C, grad_D, _ = grads
        g_m, g_d = _product_grads(g, p, q, coef, self.magnitude_activation, self.direction_activation, self.ste)
        grad_B[..., s, :], grad_D[..., s, :] = g_m @ A.mT, g_d @ C.mT
        add_matmul_(grad_A, B[..., s, :].mT, g_m)
        add_matmul_(grad_C, D[..., s, :].mT, g_d)
        return g  # y sees W0 with weight one: dL/dW0 = G


def dual_linear(x, w0, bias, A, B, C, D, coef, with_base: bool = True, magnitude_activation: str = "relu",
                direction_activation: str = "sign", ste: str = "clip", kernel: KernelOptions = DEFAULT_KERNEL):
    """``y = x (W0 + dW)^T + b`` (or ``x dW^T`` without the base), memory-efficient: autograd keeps ``x`` and the
    four factors only, and every ``out x in`` matrix (P, Q, W, G, Gm, Gd) is built one row block at a time. ``w0``
    is an ``(out, in)`` tensor or a :class:`~duallora.core.base_weight.WeightRows` (a quantized one included)."""
    rule, base = DualRows(magnitude_activation, direction_activation, ste, with_base), as_rows(w0)
    return BlockedAdapterLinear.apply(x, base.tensor, bias, rule, kernel, base, A, B, C, D, coef)


def dual_efficient_weight(w0, A, B, C, D, coef, magnitude_activation: str = "relu", direction_activation: str = "sign",
                          ste: str = "clip", kernel: KernelOptions = DEFAULT_KERNEL) -> torch.Tensor:
    """``W0 + dW`` as a tensor of ``w0``'s dtype and layout, for a matrix or a stack ``(experts, out, in)`` (factors
    ``(experts, r1, in)`` etc.), memory-efficient: autograd keeps the factors only (:class:`BlockedAdaptedWeight`).
    For a parameter that a module reads itself (MoE experts)."""
    rule = DualRows(magnitude_activation, direction_activation, ste)
    return BlockedAdaptedWeight.apply(w0, rule, kernel, as_rows(w0), A, B, C, D, coef)


def dual_weight_rows(s: slice, w0, A, B, C, D, coef, magnitude_activation: str, direction_activation: str,
                     with_base: bool = True) -> torch.Tensor:
    """Rows ``s`` of ``W0 + dW`` (or of ``dW``) in the factors' dtype: the rows one block of the memory-efficient
    forward and the eval cache build."""
    rule = DualRows(magnitude_activation, direction_activation, with_base=with_base)
    return rule.rows(rule.block(s, as_rows(w0), (A, B, C, D, coef)))


# Magnitudes with m(c x) = c m(x) for c > 0: a weight's size moves into B. Every direction activation is odd,
# d(-x) = -d(x), so a weight's sign always moves into D.
POSITIVELY_HOMOGENEOUS_MAGNITUDES = ("relu", "identity")


def dual_weighted_factors(A, B, C, D, weight: float):
    """The factors of ``weight * dW``, exactly: ``|w| m(B A) = m(|w| B A)`` for a positively homogeneous ``m``, and
    ``sign(w) d(D C) = d(sign(w) D C)`` for an odd ``d``; so ``B -> |w| B`` and ``D -> sign(w) D``."""
    return A, abs(weight) * B, C, (1.0 if weight > 0 else -1.0) * D
