"""The maths of Dual LoRA and D2-LoRA, as pure functions.

Shapes follow PyTorch: a frozen weight ``W0`` is ``(out, in)`` and a layer computes ``y = x W^T + b``.

Dual LoRA (arXiv 2512.03402, Sec. 3)::

    P = B @ A        (out, r1) @ (r1, in)     magnitude logits
    Q = D @ C        (out, r2) @ (r2, in)     direction logits
    dW = coef * m(P) * d(Q)                   coef = lam_t * lora_alpha / sqrt(r1 * r2)

with ``m = ReLU`` and ``d = Sign`` (Sign(0) = -1) by default.

D2-LoRA (arXiv 2602.14728, Eq. 1-3)::

    dW    = scale * (A_pos @ B_pos - tau * A_neg @ B_neg)      scale = lora_alpha / r
    W'    = W0 + dW
    W*    = W' * n(W0) / n(W')                                  n = L2 norm per output unit (or per input column)
    W_hat = W* + dW

Every function here is used by the layers (forward and merge) and by the tests, so there is one truth.
The two ``autograd.Function`` classes compute ``y = x W^T + b`` while saving only ``x`` and the small
factors: the ``out x in`` matrices are rebuilt inside ``backward`` (METHODS.md, "Cost").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .fused import fused

MAGNITUDE_ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
DIRECTION_ACTIVATIONS = ("sign", "tanh", "identity")
STE_VARIANTS = ("clip", "identity", "hardtanh")
NORM_AXES = ("out", "in")

# Guards 0/0 when a unit of W' has zero norm (a pruned row): that unit's W* is then 0 instead of NaN.
_NORM_EPS = 1e-12


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
    w_m = magnitude(B @ A, magnitude_activation)
    w_d = differentiable_direction(D @ C, direction_activation, ste)
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


def unit_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """``n(W)``: L2 norm of each output unit (``axis="out"``: over ``in``, shape ``(out, 1)``, as PEFT's
    DoRA) or of each input column (``axis="in"``: over ``out``, shape ``(1, in)``)."""
    if axis == "out":
        return torch.linalg.vector_norm(w, dim=1, keepdim=True)
    if axis == "in":
        return torch.linalg.vector_norm(w, dim=0, keepdim=True)
    raise ValueError(f"unknown norm axis {axis!r}; valid: {NORM_AXES}")


def frozen_unit_norm(w0: torch.Tensor, axis: str, blocks: list[slice]) -> torch.Tensor:
    """``n(W0)`` in float32, without gradient, reading ``W0`` one row block at a time: a bf16 ``W0`` is never copied
    to float32 whole, so the ``block_mib`` bound holds here too. ``axis="in"`` sums each block's squares."""
    with torch.no_grad():
        if axis == "out":
            return torch.cat([unit_norm(w0[s].float(), "out") for s in blocks])
        if axis == "in":
            squares = sum(w0[s].float().square().sum(0, keepdim=True) for s in blocks)
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
    return d2_delta_from_products(A_pos @ B_pos, A_neg @ B_neg, scale, tau)


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
    return d2_weight_from_products(A_pos @ B_pos, A_neg @ B_neg, w0, w0_norm, scale, tau, norm_axis, detach_norm)


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
        dim = 1 if norm_axis == "out" else 0
        radial = (g * w_prime).sum(dim=dim, keepdim=True) / unit_norm(w_prime, norm_axis).square().clamp_min(_NORM_EPS)
        g_prime = (g - radial * w_prime) * k
    return g + g_prime, g_prime


def d2_unmerge(
    w_hat: torch.Tensor, dw: torch.Tensor, unit_scale: torch.Tensor
) -> torch.Tensor:
    """Invert ``W_hat = (W0 + dW) * k + dW`` for ``W0``, with ``k = n(W0)/n(W')`` cached at merge time.

    ``k = 0`` only where ``n(W0) = 0``: that unit of ``W0`` was all zeros, and is restored as zeros (not 0/0)."""
    return torch.where(unit_scale > 0, (w_hat - dw) / unit_scale - dw, 0.0)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype when autocast is on, else ``x``'s own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _dense(w0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W0`` in the factors' dtype and row-major. Conv1D's ``(out, in)`` view is transposed; the fused kernels are
    given dense inputs only (a transposed input to the compiled D2 reduction gave wrong results in torch 2.13)."""
    return w0.to(dtype).contiguous()


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


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """Tokens as rows: ``(..., features)`` -> ``(tokens, features)``."""
    return t.reshape(-1, t.shape[-1])


def _blocked_linear(x2: torch.Tensor, weight_rows, bias: Optional[torch.Tensor], blocks: list[slice]) -> torch.Tensor:
    """``x W^T + b`` where ``weight_rows(s)`` builds the rows ``s`` of ``W``: only one block of ``W`` exists at once."""
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


def _bias_grad(grad_out: torch.Tensor) -> torch.Tensor:
    return _matrix(grad_out).sum(0)


def weight_blocks(w0: torch.Tensor, factor_dtype: torch.dtype, kernel: KernelOptions,
                  whole: bool = False) -> list[slice]:
    """The row blocks in which ``W0``'s ``out x in`` matrices are built (``whole``: one block)."""
    out_features, in_features = w0.shape
    per_block = out_features if whole else kernel.rows_per_block(out_features, in_features, factor_dtype.itemsize)
    return row_blocks(out_features, per_block)


class DualLoraLinearFunction(torch.autograd.Function):
    """``y = x (W0 + dW)^T + b`` (or ``x dW^T`` when ``with_base`` is False) for Dual LoRA.

    Saves ``x`` and the four factors only. Backward (METHODS.md)::

        G  = g^T x
        Gm = coef * G * d(Q) * m'(P)          -> dB = Gm A^T,  dA = B^T Gm
        Gd = STE(coef * G * m(P))             -> dD = Gd C^T,  dC = D^T Gd
        gx = g (W0 + dW)

    Every ``out x in`` matrix (P, Q, W, G, Gm, Gd) is built for a block of output rows at a time: row ``i`` of each
    depends on row ``i`` of B, D, W0 and g only, so the blocks are independent and their factor gradients add up.
    ``kernel.block_mib`` bounds one block matrix. The elementwise parts run as fused loops (:mod:`duallora.fused`).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, A, B, C, D, coef, with_base, magnitude_activation, direction_activation, ste,
                kernel=DEFAULT_KERNEL):
        compute_dtype = autocast_dtype(x)

        def weight_rows(s):
            return dual_weight_rows(s, w0, A, B, C, D, coef, magnitude_activation, direction_activation,
                                    with_base).to(compute_dtype)

        with torch.autocast(x.device.type, enabled=False):
            y = _blocked_linear(_matrix(x).to(compute_dtype), weight_rows,
                                None if bias is None else bias.to(compute_dtype), weight_blocks(w0, A.dtype, kernel))
        ctx.save_for_backward(x, w0, A, B, C, D, coef)
        ctx.options = (with_base, magnitude_activation, direction_activation, ste, bias is not None, kernel)
        ctx.compute_dtype = compute_dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x, w0, A, B, C, D, coef = ctx.saved_tensors
        with_base, mag_name, dir_name, ste, has_bias, kernel = ctx.options
        grad_out = grad_out.to(ctx.compute_dtype)
        grad_w0 = torch.empty_like(w0) if (ctx.needs_input_grad[1] and with_base) else None
        grad_A, grad_C = torch.zeros_like(A), torch.zeros_like(C)
        grad_B, grad_D = torch.empty_like(B), torch.empty_like(D)
        with torch.autocast(x.device.type, enabled=False):
            work = _BlockedBackward(x, grad_out, A.dtype, kernel, ctx.needs_input_grad[0])
            for s in weight_blocks(w0, A.dtype, kernel):
                p, q = B[s] @ A, D[s] @ C  # rebuilt once per block, shared by the input and the factor gradients
                if work.grad_x is not None:
                    work.add_input_grad(s, _build_weight(p, q, _dense(w0[s], A.dtype), coef, mag_name, dir_name,
                                                         with_base))
                g = work.weight_grad(s)
                if grad_w0 is not None:
                    grad_w0[s] = g
                g_m, g_d = _product_grads(g, p, q, coef, mag_name, dir_name, ste)
                del g, p, q  # at most P, Q, G and the two branch gradients of one block alive at once
                grad_B[s], grad_D[s] = g_m @ A.t(), g_d @ C.t()
                grad_A.addmm_(B[s].t(), g_m)
                grad_C.addmm_(D[s].t(), g_d)
        grad_b = _bias_grad(grad_out) if (has_bias and ctx.needs_input_grad[2]) else None
        return (work.input_grad(x), grad_w0, grad_b, grad_A, grad_B, grad_C, grad_D) + (None,) * 6


# one fused loop each over the out x in matrices (see duallora.fused)
_build_weight = fused(dual_weight_from_products)
_product_grads = fused(dual_product_grads)


def dual_weight_rows(s: slice, w0, A, B, C, D, coef, magnitude_activation: str, direction_activation: str,
                     with_base: bool = True) -> torch.Tensor:
    """Rows ``s`` of ``W0 + dW`` (or of ``dW``) in the factors' dtype: the rows one block of the memory-efficient
    forward, the eval cache and :func:`blocked_weight` build (row ``i`` needs row ``i`` of ``B``, ``D``, ``W0`` only)."""
    return _build_weight(B[s] @ A, D[s] @ C, _dense(w0[s], A.dtype), coef, magnitude_activation, direction_activation,
                         with_base)


class D2LoraLinearFunction(torch.autograd.Function):
    """``y = x W_hat^T + b`` (or ``x (W_hat - W0)^T`` when ``with_base`` is False) for D2-LoRA.

    Saves ``x`` and the factors only; backward rebuilds the branch products and takes the gradient through the
    norm projection with :func:`d2_product_grads`. With ``norm_axis="out"`` each output row is projected on its
    own, so the ``out x in`` matrices are built in row blocks as for Dual LoRA; ``norm_axis="in"`` normalises whole
    columns and builds them at once. The elementwise parts run as fused loops (:mod:`duallora.fused`).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, A_pos, B_pos, A_neg, B_neg, w0_norm, scale, tau, norm_axis, detach_norm, with_base,
                kernel=DEFAULT_KERNEL):
        compute_dtype = autocast_dtype(x)
        blocks = weight_blocks(w0, A_pos.dtype, kernel, whole=norm_axis == "in")

        def weight_rows(s):
            return d2_weight_rows(s, w0, A_pos, B_pos, A_neg, B_neg, w0_norm, scale, tau, norm_axis, detach_norm,
                                  with_base).to(compute_dtype)

        with torch.autocast(x.device.type, enabled=False):
            y = _blocked_linear(_matrix(x).to(compute_dtype), weight_rows,
                                None if bias is None else bias.to(compute_dtype), blocks)
        ctx.save_for_backward(x, w0, A_pos, B_pos, A_neg, B_neg, w0_norm)
        ctx.options = (scale, tau, norm_axis, detach_norm, with_base, bias is not None, kernel)
        ctx.compute_dtype = compute_dtype
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x, w0, A_pos, B_pos, A_neg, B_neg, w0_norm = ctx.saved_tensors
        scale, tau, norm_axis, detach_norm, with_base, has_bias, kernel = ctx.options
        grad_out = grad_out.to(ctx.compute_dtype)
        grad_w0 = torch.empty_like(w0) if ctx.needs_input_grad[1] else None
        grad_A_pos, grad_A_neg = torch.empty_like(A_pos), torch.empty_like(A_neg)
        grad_B_pos, grad_B_neg = torch.zeros_like(B_pos), torch.zeros_like(B_neg)
        with torch.autocast(x.device.type, enabled=False):
            work = _BlockedBackward(x, grad_out, A_pos.dtype, kernel, ctx.needs_input_grad[0])
            for s in weight_blocks(w0, A_pos.dtype, kernel, whole=norm_axis == "in"):
                pos, neg, w0f = A_pos[s] @ B_pos, A_neg[s] @ B_neg, _dense(w0[s], A_pos.dtype)
                norm = w0_norm[s] if norm_axis == "out" else w0_norm
                if work.grad_x is not None:
                    work.add_input_grad(s, _build_d2_weight(pos, neg, w0f, norm, scale, tau, norm_axis, detach_norm,
                                                            with_base))
                g = work.weight_grad(s)
                g_dw, g_prime = _d2_product_grads(g, pos, neg, w0f, norm, scale, tau, norm_axis, detach_norm)
                del pos, neg
                if grad_w0 is not None:  # y sees W0 through W' (and, without the base term, minus W0 itself)
                    grad_w0[s] = g_prime if with_base else g_prime - g
                del g, g_prime
                g_dw = g_dw.to(A_pos.dtype)  # n(W0) is float32 even for bf16 factors: back to the factors' dtype
                grad_A_pos[s] = scale * (g_dw @ B_pos.t())
                grad_A_neg[s] = (-scale * tau) * (g_dw @ B_neg.t())
                grad_B_pos.addmm_(A_pos[s].t(), g_dw, alpha=scale)
                grad_B_neg.addmm_(A_neg[s].t(), g_dw, alpha=-scale * tau)
        grad_b = _bias_grad(grad_out) if (has_bias and ctx.needs_input_grad[2]) else None
        return (work.input_grad(x), grad_w0, grad_b, grad_A_pos, grad_B_pos, grad_A_neg, grad_B_neg) + (None,) * 7


_build_d2_weight = fused(d2_weight_from_products)
_d2_product_grads = fused(d2_product_grads)


def d2_weight_rows(s: slice, w0, A_pos, B_pos, A_neg, B_neg, w0_norm, scale: float, tau: float, norm_axis: str,
                   detach_norm: bool, with_base: bool = True) -> torch.Tensor:
    """Rows ``s`` of ``W_hat`` (or of ``W_hat - W0``) in the factors' dtype. With ``norm_axis="out"`` a row's
    projection needs only its own row; with ``"in"`` the caller passes the whole matrix as one block."""
    norm = w0_norm[s] if norm_axis == "out" else w0_norm
    return _build_d2_weight(A_pos[s] @ B_pos, A_neg[s] @ B_neg, _dense(w0[s], A_pos.dtype), norm, scale, tau,
                            norm_axis, detach_norm, with_base)


def blocked_weight(rows, blocks: list[slice], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole ``out x in`` matrix, filled block by block from ``rows(s)`` and cast to ``dtype`` as each block is
    made: beside the result only one block exists at a time."""
    weight = torch.empty(blocks[-1].stop, like.shape[1], dtype=dtype, device=like.device)
    for s in blocks:
        weight[s] = rows(s)
    return weight
