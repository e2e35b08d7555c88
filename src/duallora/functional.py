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

import torch
import torch.nn.functional as F

from .fused import fused

MAGNITUDE_ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
DIRECTION_ACTIVATIONS = ("sign", "tanh", "identity")
STE_VARIANTS = ("clip", "identity", "hardtanh")
NORM_AXES = ("out", "in")

# Guards 0/0 when a unit of W' has zero norm (a pruned row): that unit's W* is then 0 instead of NaN.
_NORM_EPS = 1e-12


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """Sign with values in {-1, +1}: +1 where ``x > 0``, else -1 (so Sign(0) = -1, unlike ``torch.sign``)."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype)


def magnitude(p: torch.Tensor, name: str) -> torch.Tensor:
    """The magnitude activation ``m(P)`` of Dual LoRA (paper: ReLU)."""
    if name == "relu":
        return torch.relu(p)
    if name == "tanh":
        return torch.tanh(p)
    if name == "sigmoid":
        return torch.sigmoid(p)
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
    """The direction activation ``d(Q)`` of Dual LoRA (paper: Sign), without gradient bookkeeping."""
    if name == "sign":
        return sign_pm1(q)
    if name == "tanh":
        return torch.tanh(q)
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
    """Invert ``W_hat = (W0 + dW) * k + dW`` for ``W0``, with ``k = n(W0)/n(W')`` cached at merge time."""
    return (w_hat - dw) / unit_scale - dw


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


def _weight_grad(x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype,
                 matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``G = g^T x`` summed over all tokens, returned in the factors' dtype (float32 under bf16 autocast: the
    elementwise work after it needs the range). ``matmul_dtype`` (e.g. bfloat16) runs this one matmul, the
    largest extra cost over LoRA, in lower precision even in a float32 run."""
    matmul_dtype = matmul_dtype or grad_out.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(matmul_dtype)
    g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(matmul_dtype)
    return (g2.t() @ x2).to(dtype)


def _input_and_bias_grads(ctx, grad_out, weight, x, bias_needed):
    grad_x = (grad_out @ weight.to(grad_out.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if bias_needed else None
    return grad_x, grad_b


class DualLoraLinearFunction(torch.autograd.Function):
    """``y = x (W0 + dW)^T + b`` (or ``x dW^T`` when ``with_base`` is False) for Dual LoRA.

    Saves ``x`` and the four factors only. Backward (METHODS.md)::

        G  = g^T x
        Gm = coef * G * d(Q) * m'(P)          -> dB = Gm A^T,  dA = B^T Gm
        Gd = STE(coef * G * m(P))             -> dD = Gd C^T,  dC = D^T Gd
        gx = g (W0 + dW)

    The elementwise parts (building W; Gm and Gd from G) run as fused loops (:mod:`duallora.fused`).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, A, B, C, D, coef, with_base, magnitude_activation, direction_activation, ste,
                weight_grad_dtype=None):
        compute_dtype = autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            weight = _build_weight(B @ A, D @ C, _dense(w0, A.dtype), coef, magnitude_activation,
                                   direction_activation, with_base)
            weight = weight.to(compute_dtype)
            y = F.linear(x.to(compute_dtype), weight, None if bias is None else bias.to(compute_dtype))
        ctx.save_for_backward(x, w0, A, B, C, D, coef)
        ctx.options = (with_base, magnitude_activation, direction_activation, ste, bias is not None, weight_grad_dtype)
        ctx.compute_dtype = compute_dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, w0, A, B, C, D, coef = ctx.saved_tensors
        with_base, mag_name, dir_name, ste, has_bias, weight_grad_dtype = ctx.options
        grad_out = grad_out.to(ctx.compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            p, q = B @ A, D @ C  # rebuilt once, shared by the input and the factor gradients
            grad_x, grad_b = None, None
            if ctx.needs_input_grad[0] or (has_bias and ctx.needs_input_grad[2]):
                weight = _build_weight(p, q, _dense(w0, A.dtype), coef, mag_name, dir_name, with_base)
                grad_x, grad_b = _input_and_bias_grads(ctx, grad_out, weight, x, has_bias and ctx.needs_input_grad[2])
                del weight  # at most P, Q, G and the two branch gradients alive at once
            g = _weight_grad(x, grad_out, A.dtype, weight_grad_dtype)
            grad_w0 = g.to(w0.dtype, copy=True) if (ctx.needs_input_grad[1] and with_base) else None
            g_m, g_d = _product_grads(g, p, q, coef, mag_name, dir_name, ste)
            del g, p, q
            grad_B, grad_A = g_m @ A.t(), B.t() @ g_m
            grad_D, grad_C = g_d @ C.t(), D.t() @ g_d
        return grad_x, grad_w0, grad_b, grad_A, grad_B, grad_C, grad_D, None, None, None, None, None, None


# one fused loop each over the out x in matrices (see duallora.fused)
_build_weight = fused(dual_weight_from_products)
_product_grads = fused(dual_product_grads)


class D2LoraLinearFunction(torch.autograd.Function):
    """``y = x W_hat^T + b`` (or ``x (W_hat - W0)^T`` when ``with_base`` is False) for D2-LoRA.

    Saves ``x`` and the factors only; backward rebuilds the branch products and takes the gradient through the
    norm projection with :func:`d2_product_grads`. The elementwise parts run as fused loops (:mod:`duallora.fused`).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, A_pos, B_pos, A_neg, B_neg, w0_norm, scale, tau, norm_axis, detach_norm, with_base,
                weight_grad_dtype=None):
        compute_dtype = autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            weight = _build_d2_weight(A_pos @ B_pos, A_neg @ B_neg, _dense(w0, A_pos.dtype), w0_norm, scale, tau,
                                      norm_axis, detach_norm, with_base)
            y = F.linear(x.to(compute_dtype), weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype))
        ctx.save_for_backward(x, w0, A_pos, B_pos, A_neg, B_neg, w0_norm)
        ctx.options = (scale, tau, norm_axis, detach_norm, with_base, bias is not None, weight_grad_dtype)
        ctx.compute_dtype = compute_dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, w0, A_pos, B_pos, A_neg, B_neg, w0_norm = ctx.saved_tensors
        scale, tau, norm_axis, detach_norm, with_base, has_bias, weight_grad_dtype = ctx.options
        grad_out = grad_out.to(ctx.compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            pos, neg, w0f = A_pos @ B_pos, A_neg @ B_neg, _dense(w0, A_pos.dtype)
            grad_x, grad_b = None, None
            if ctx.needs_input_grad[0] or (has_bias and ctx.needs_input_grad[2]):
                weight = _build_d2_weight(pos, neg, w0f, w0_norm, scale, tau, norm_axis, detach_norm, with_base)
                grad_x, grad_b = _input_and_bias_grads(ctx, grad_out, weight, x, has_bias and ctx.needs_input_grad[2])
                del weight
            g = _weight_grad(x, grad_out, A_pos.dtype, weight_grad_dtype)
            g_dw, g_prime = _d2_product_grads(g, pos, neg, w0f, w0_norm, scale, tau, norm_axis, detach_norm)
            del pos, neg
            grad_w0 = None
            if ctx.needs_input_grad[1]:  # y sees W0 through W' (and, without the base term, minus W0 itself)
                grad_w0 = (g_prime if with_base else g_prime - g).to(w0.dtype, copy=True)
            del g, g_prime
            g_dw = g_dw.to(A_pos.dtype)  # n(W0) is float32 even for bf16 factors: back to the factors' dtype
            grad_A_pos = scale * (g_dw @ B_pos.t())
            grad_B_pos = scale * (A_pos.t() @ g_dw)
            grad_A_neg = (-scale * tau) * (g_dw @ B_neg.t())
            grad_B_neg = (-scale * tau) * (A_neg.t() @ g_dw)
        return (grad_x, grad_w0, grad_b, grad_A_pos, grad_B_pos, grad_A_neg, grad_B_neg) + (None,) * 7


_build_d2_weight = fused(d2_weight_from_products)
_d2_product_grads = fused(d2_product_grads)
