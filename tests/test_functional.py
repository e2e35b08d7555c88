"""The maths against hand-computed golden values and against references written independently here."""

import math

import pytest
import torch

from duallora.core.blocked import KernelOptions, row_blocks
from duallora.d2.maths import d2_linear, d2_unit_scale, d2_unmerge, d2_weight, unit_norm
from duallora.dual.maths import dual_delta_weight, dual_linear, dual_warmup_coef, sign_pm1

torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- independent references
def reference_dual_linear(x, w0, bias, A, B, C, D, coef, mag, dirn, ste, with_base=True):
    """Dual LoRA written from the paper with autograd doing the work; the STE is built from hooks and detach."""
    p = B @ A
    q = D @ C
    w_m = {"relu": torch.nn.functional.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
           "identity": lambda t: t}[mag](p)
    if dirn == "sign":
        hard = torch.where(q > 0, torch.ones_like(q), -torch.ones_like(q))
        if ste == "hardtanh":
            soft = torch.nn.functional.hardtanh(q)  # derivative 1 on [-1, 1], 0 outside
        else:
            soft = q
        w_d = soft + (hard - soft).detach()
        if ste == "clip" and w_d.requires_grad:
            w_d.register_hook(lambda g: g.clamp(-1, 1))
    else:
        w_d = {"tanh": torch.tanh, "identity": lambda t: t}[dirn](q)
    dw = coef * w_m * w_d
    w = w0 + dw if with_base else dw
    return torch.einsum("bti,oi->bto", x, w) + (bias if bias is not None else 0)


def reference_d2_linear(x, w0, bias, Ap, Bp, An, Bn, scale, tau, axis, detach, with_base=True):
    dw = scale * (Ap @ Bp) - scale * tau * (An @ Bn)
    wp = w0 + dw
    dim = 1 if axis == "out" else 0
    n0 = (w0.detach() ** 2).sum(dim, keepdim=True).sqrt()
    n = (wp ** 2).sum(dim, keepdim=True).sqrt()
    if detach:
        n = n.detach()
    w_hat = wp / n * n0 + dw
    w = w_hat if with_base else w_hat - w0
    return torch.einsum("bti,oi->bto", x, w) + (bias if bias is not None else 0)


def _dual_inputs(dtype=torch.float64, out=6, inp=5, r1=2, r2=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = mk(2, 4, inp)
    w0, bias = mk(out, inp), mk(out)
    A, B, C, D = mk(r1, inp), mk(out, r1), mk(r2, inp), mk(out, r2)
    return x, w0, bias, A, B, C, D


# ----------------------------------------------------------------------------- golden values
def test_sign_of_zero_is_minus_one():
    assert sign_pm1(torch.tensor([-2.0, 0.0, 3.0])).tolist() == [-1.0, -1.0, 1.0]


def test_dual_delta_weight_golden_by_hand():
    A = torch.tensor([[1.0, -2.0]])
    B = torch.tensor([[1.0], [2.0]])
    C = torch.tensor([[1.0, 0.0]])
    D = torch.tensor([[-1.0], [0.0]])
    # ReLU(BA) = [[1, 0], [2, 0]]; Sign(DC) = Sign([[-1, 0], [0, 0]]) = all -1 (Sign(0) = -1); s = 2 / sqrt(1 * 1)
    dw = dual_delta_weight(A, B, C, D, coef=2.0)
    torch.testing.assert_close(dw, torch.tensor([[-2.0, 0.0], [-4.0, 0.0]]))


def test_d2_weight_golden_by_hand():
    w0 = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    Ap, Bp = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0, 5.0]])
    An, Bn = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0, 0.0]])
    # dW = [[0, 5], [-1, 0]]; W' = [[3, 9], [-1, 1]]; rows rescaled to norms 5 and 1, then + dW
    r90, r2 = math.sqrt(90), math.sqrt(2)
    expected = torch.tensor([[15 / r90, 45 / r90 + 5], [-1 / r2 - 1, 1 / r2]])
    w_hat = d2_weight(w0, Ap, Bp, An, Bn, scale=1.0, tau=0.5, w0_norm=unit_norm(w0, "out"))
    torch.testing.assert_close(w_hat, expected)


def test_d2_column_axis_keeps_column_norms_of_w_star():
    w0 = torch.randn(5, 4)
    dw_factors = torch.randn(5, 2), torch.randn(2, 4), torch.randn(5, 2), torch.randn(2, 4)
    w_hat = d2_weight(w0, *dw_factors, scale=1.0, tau=0.5, w0_norm=unit_norm(w0, "in"), norm_axis="in")
    dw = dw_factors[0] @ dw_factors[1] - 0.5 * dw_factors[2] @ dw_factors[3]
    torch.testing.assert_close(unit_norm(w_hat - dw, "in"), unit_norm(w0, "in"))


def test_d2_unmerge_inverts_merge():
    w0 = torch.randn(6, 5, dtype=torch.float64)
    f = [torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64),
         torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)]
    dw = f[0] @ f[1] - 0.5 * f[2] @ f[3]
    n0 = unit_norm(w0, "out")
    w_hat = d2_weight(w0, *f, scale=1.0, tau=0.5, w0_norm=n0)
    k = d2_unit_scale(w0 + dw, n0)
    torch.testing.assert_close(d2_unmerge(w_hat, dw, k), w0)


def test_warmup_coefficient_ramps_then_saturates():
    coefs = [float(dual_warmup_coef(torch.tensor(t), 4, 2.0)) for t in (0, 1, 4, 9)]
    assert coefs == [0.0, 0.5, 2.0, 2.0]
    assert float(dual_warmup_coef(torch.tensor(0), 0, 2.0)) == 2.0  # warmup_steps = 0: off


# ----------------------------------------------------------------------------- dual: hand-written backward
@pytest.mark.parametrize("ste", ["clip", "identity", "hardtanh"])
@pytest.mark.parametrize("mag,dirn", [("relu", "sign"), ("tanh", "sign"), ("sigmoid", "tanh"),
                                      ("identity", "identity"), ("relu", "tanh")])
@pytest.mark.parametrize("with_base", [True, False])
def test_dual_backward_equals_reference_autograd(ste, mag, dirn, with_base):
    x, w0, bias, A, B, C, D = _dual_inputs()
    coef = torch.tensor(0.7, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, C, D)]
    y = dual_linear(leaves[0], w0, bias, *leaves[1:], coef, with_base, mag, dirn, ste)
    grad_out = torch.randn_like(y) * 3  # large enough that the clip STE clips some entries
    got = torch.autograd.grad(y, leaves, grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (x, A, B, C, D)]
    y_ref = reference_dual_linear(ref_leaves[0], w0, bias, *ref_leaves[1:], coef, mag, dirn, ste, with_base)
    expected = torch.autograd.grad(y_ref, ref_leaves, grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, g, e in zip("xABCD", got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_dual_clip_ste_actually_clips():
    """With a large upstream gradient the three STEs must disagree (else the test above proves nothing)."""
    x, w0, bias, A, B, C, D = _dual_inputs()
    coef = torch.tensor(5.0, dtype=torch.float64)
    grads = {}
    for ste in ("clip", "identity", "hardtanh"):
        Cg = C.clone().requires_grad_()
        y = dual_linear(x, w0, bias, A, B, Cg, D, coef, True, "relu", "sign", ste)
        grads[ste] = torch.autograd.grad((y * 10).sum(), Cg)[0]
    assert not torch.allclose(grads["clip"], grads["identity"])
    assert not torch.allclose(grads["hardtanh"], grads["identity"])


def test_dual_gradcheck_magnitude_factors_and_input():
    x, w0, bias, A, B, C, D = _dual_inputs()
    coef = torch.tensor(0.9, dtype=torch.float64)
    fn = lambda x_, A_, B_: dual_linear(x_, w0, bias, A_, B_, C, D, coef, True,  # noqa: E731
                                                           "relu", "sign", "clip")
    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in (x, A, B)])


@pytest.mark.parametrize("mag,dirn", [("tanh", "tanh"), ("sigmoid", "identity"), ("relu", "tanh")])
def test_dual_gradcheck_all_factors_smooth_activations(mag, dirn):
    x, w0, bias, A, B, C, D = _dual_inputs()
    coef = torch.tensor(0.9, dtype=torch.float64)
    fn = lambda *t: dual_linear(t[0], w0, bias, *t[1:], coef, True, mag, dirn, "clip")  # noqa: E731
    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in (x, A, B, C, D)])


def test_dual_gradcheck_frozen_weight_and_bias_grads():
    x, w0, bias, A, B, C, D = _dual_inputs()
    coef = torch.tensor(0.9, dtype=torch.float64)
    fn = lambda w0_, b_: dual_linear(x, w0_, b_, A, B, C, D, coef, True,  # noqa: E731
                                                       "relu", "sign", "clip")
    assert torch.autograd.gradcheck(fn, [w0.clone().requires_grad_(), bias.clone().requires_grad_()])


# ----------------------------------------------------------------------------- d2: hand-written backward
def _d2_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(2, 3, 5), mk(6, 5), mk(6), mk(6, 2), mk(2, 5), mk(6, 2), mk(2, 5)


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("with_base", [True, False])
def test_d2_gradcheck_through_the_norm(axis, with_base):
    x, w0, bias, Ap, Bp, An, Bn = _d2_inputs()

    def fn(x_, w0_, Ap_, Bp_, An_, Bn_):
        n0 = unit_norm(w0_.detach(), axis)  # n(W0) is a constant of the layer
        return d2_linear(x_, w0_, bias, Ap_, Bp_, An_, Bn_, n0, 0.8, 0.5, axis, False, with_base)

    leaves = [t.clone().requires_grad_() for t in (x, w0, Ap, Bp, An, Bn)]
    # W0's true gradient would also flow through n(W0); the layer treats n(W0) as a constant, so check W0 by
    # comparison with the reference below and leave it out of the finite differences here
    assert torch.autograd.gradcheck(lambda *t: fn(t[0], w0, *t[1:]), [leaves[0]] + leaves[2:])


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_d2_backward_equals_reference_autograd(detach, axis):
    x, w0, bias, Ap, Bp, An, Bn = _d2_inputs(seed=3)
    n0 = unit_norm(w0, axis)
    leaves = [t.clone().requires_grad_() for t in (x, w0, bias, Ap, Bp, An, Bn)]
    y = d2_linear(leaves[0], leaves[1], leaves[2], *leaves[3:], n0, 0.8, 0.5, axis, detach, True)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad_out)
    ref = [t.clone().requires_grad_() for t in (x, w0, bias, Ap, Bp, An, Bn)]
    y_ref = reference_d2_linear(ref[0], ref[1], ref[2], *ref[3:], 0.8, 0.5, axis, detach)
    expected = torch.autograd.grad(y_ref, ref, grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, g, e in zip(["x", "w0", "bias", "A_pos", "B_pos", "A_neg", "B_neg"], got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_d2_detach_norm_changes_the_gradient():
    x, w0, bias, Ap, Bp, An, Bn = _d2_inputs(seed=5)
    n0 = unit_norm(w0, "out")
    grads = []
    for detach in (False, True):
        a = Ap.clone().requires_grad_()
        y = d2_linear(x, w0, bias, a, Bp, An, Bn, n0, 0.8, 0.5, "out", detach, True)
        grads.append(torch.autograd.grad(y.square().sum(), a)[0])
    assert not torch.allclose(*grads)


# ----------------------------------------------------------------------------- autocast
def test_dual_function_under_bf16_autocast_matches_float32_closely():
    x, w0, bias, A, B, C, D = (t.float() for t in _dual_inputs(dtype=torch.float32))
    coef = torch.tensor(0.5)
    y32 = dual_linear(x, w0, bias, A, B, C, D, coef, True, "relu", "sign", "clip")
    Ab = A.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = dual_linear(x, w0, bias, Ab, B, C, D, coef, True, "relu", "sign", "clip")
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=5e-2)
    y16.float().sum().backward()
    assert Ab.grad.dtype == torch.float32 and torch.isfinite(Ab.grad).all()


# ----------------------------------------------------------------------------- fused elementwise kernels
def test_fused_kernels_match_the_eager_maths():
    from duallora.dual.maths import _build_weight, _product_grads, dual_product_grads, dual_weight_from_products

    g = torch.Generator().manual_seed(7)
    p, q, w0, grad = (torch.randn(33, 17, generator=g) for _ in range(4))
    q[0, :3] = 0.0  # Sign(0) = -1 must survive fusion
    coef = torch.tensor(0.8)
    torch.testing.assert_close(_build_weight(p, q, w0, coef, "relu", "sign", True),
                               dual_weight_from_products(p, q, w0, coef, "relu", "sign", True))
    for fused_out, eager_out in zip(_product_grads(grad * 3, p, q, coef, "relu", "sign", "clip"),
                                    dual_product_grads(grad * 3, p, q, coef, "relu", "sign", "clip")):
        torch.testing.assert_close(fused_out, eager_out)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    """A machine without a working C++ compiler: Inductor fails, the maths runs eagerly, once said."""
    import torch._inductor.config as inductor_config

    import duallora.core.fused as fused_module

    monkeypatch.setattr(fused_module, "_disabled", False)
    cube = fused_module.fused(lambda t: t * t * t + 0.25)
    # fx_graph_cache off: compile for real, not from the cache of an earlier run
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        with pytest.warns(UserWarning, match="failed.*InvalidCxxCompiler.*eagerly"):
            assert torch.equal(cube(torch.tensor([2.0])), torch.tensor([8.25]))
    assert fused_module._disabled  # and from then on, eager without trying again


def test_out_of_memory_reaches_the_caller_and_fusion_stays_on(monkeypatch):
    """Only compiler failures fall back: an out-of-memory error (before: it turned fusion off for the process)
    is the caller's to handle, and the next call is compiled again."""
    import duallora.core.fused as fused_module

    calls = []

    def compile_that_runs_out_of_memory_once(fn, **kwargs):
        def run(*args):
            calls.append(args)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return fn(*args)
        return run

    monkeypatch.setattr(fused_module, "_disabled", False)
    monkeypatch.setattr(torch, "compile", compile_that_runs_out_of_memory_once)
    double = fused_module.fused(lambda t: 2 * t)
    with pytest.raises(torch.OutOfMemoryError):
        double(torch.ones(3))
    assert not fused_module._disabled
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0)) and len(calls) == 2


def test_bad_inputs_raise_their_own_error_and_fusion_stays_on(monkeypatch):
    """Shapes that do not broadcast fail in the compiler's tracing first; the error is the inputs', not the
    compiler's, so the eager error reaches the caller and fusion stays on."""
    import duallora.core.fused as fused_module

    monkeypatch.setattr(fused_module, "_disabled", False)
    add = fused_module.fused(lambda a, b: a + b)
    with pytest.raises(RuntimeError, match="size of tensor a"):
        add(torch.ones(3), torch.ones(4))
    assert not fused_module._disabled
    assert torch.equal(add(torch.ones(3), torch.ones(3)), torch.full((3,), 2.0))


def test_non_finite_logits_are_not_hidden_by_the_activations():
    """Sign(NaN) = -1, ReLU(-Inf) = 0 and tanh(Inf) = 1 would hide a broken factor behind finite outputs."""
    from duallora.dual.maths import direction, magnitude

    q = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 2.0, -3.0])
    assert torch.equal(sign_pm1(q)[3:], torch.tensor([-1.0, 1.0, -1.0]))
    for values in [sign_pm1(q), direction(q, "tanh"), direction(q, "identity")] + \
            [magnitude(q, name) for name in ("relu", "tanh", "sigmoid", "identity")]:
        assert not torch.isfinite(values[:3]).any() and torch.isfinite(values[3:]).all()


def test_fused_kernels_keep_non_finite_values():
    from duallora.dual.maths import _build_weight, _product_grads

    p, q, w0 = (torch.randn(9, 7, generator=torch.Generator().manual_seed(3)) for _ in range(3))
    q[2, 3], p[4, 1] = float("nan"), -float("inf")
    w = _build_weight(p, q, w0, torch.tensor(0.5), "relu", "sign", True)
    assert torch.isnan(w[2, 3]) and torch.isnan(w[4, 1]) and torch.isfinite(w).sum() == w.numel() - 2
    g_m, g_d = _product_grads(torch.ones_like(p), p, q, torch.tensor(0.5), "relu", "sign", "clip")
    assert torch.isnan(g_m[2, 3]) and torch.isnan(g_d[4, 1])


@pytest.mark.parametrize("axis", ["out", "in"])
def test_functions_are_right_for_a_transposed_base_weight(axis):
    """Conv1D hands the layers W0 as a transposed view; the compiled kernels must not see strides they get wrong."""
    g = torch.Generator().manual_seed(11)
    w0 = (torch.randn(48, 32, generator=g) * 0.1).t()  # (32, 48), not contiguous
    x = torch.randn(2, 5, 48, generator=g)
    Ap, Bp, An, Bn = (torch.randn(*s, generator=g) * 0.1 for s in ((32, 4), (4, 48), (32, 4), (4, 48)))
    n0 = unit_norm(w0, axis)
    y = d2_linear(x, w0, None, Ap, Bp, An, Bn, n0, 2.0, 0.5, axis, False, True)
    torch.testing.assert_close(y, reference_d2_linear(x, w0, None, Ap, Bp, An, Bn, 2.0, 0.5, axis, False))
    A, B, C, D = (torch.randn(*s, generator=g) * 0.3 for s in ((3, 48), (32, 3), (3, 48), (32, 3)))
    coef = torch.tensor(0.6)
    y = dual_linear(x, w0, None, A, B, C, D, coef, True, "relu", "sign", "clip")
    torch.testing.assert_close(y, reference_dual_linear(x, w0, None, A, B, C, D, coef, "relu", "sign", "clip"))


# ----------------------------------------------------------------------------- row blocks
def test_rows_per_block_follows_the_bound_and_the_layer_size():
    kernel = KernelOptions(block_mib=64)
    assert kernel.rows_per_block(4096, 11008, 4) == 1524  # 64 MiB / (11008 * 4 bytes): 3 blocks
    assert kernel.rows_per_block(11008, 4096, 4) == 4096  # 3 blocks the other way round
    assert kernel.rows_per_block(4096, 11008, 2) == 3048  # bf16 factors: twice the rows
    assert kernel.rows_per_block(576, 1536, 4) == 576  # a SmolLM2 layer fits whole: no blocking
    assert KernelOptions(block_mib=None).rows_per_block(4096, 11008, 4) == 4096
    assert KernelOptions(block_mib=1e-6).rows_per_block(4096, 11008, 4) == 1  # never zero rows
    assert row_blocks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


def _blocked_and_whole(function, leaves, args_before, args_after, rows, grad_seed=0):
    """Outputs and gradients of ``function`` with ``rows`` rows per block and with whole matrices."""
    results = []
    for kernel in (KernelOptions(block_mib=rows * leaves[1].shape[1] * 8 / 2**20), KernelOptions(block_mib=None)):
        ls = [t.clone().requires_grad_() for t in leaves]
        y = function(*ls[:3], *args_before(ls), *args_after, kernel=kernel)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype) * 3
        results.append((y, torch.autograd.grad(y, ls, grad_out, allow_unused=True)))
    return results


@pytest.mark.parametrize("rows", [1, 2, 4, 6])  # 4: an uneven last block; 6: one block (the whole matrix)
@pytest.mark.parametrize("with_base", [True, False])
def test_dual_row_blocks_give_the_whole_matrix_results(rows, with_base):
    x, w0, bias, A, B, C, D = _dual_inputs()
    coef = torch.tensor(0.7, dtype=torch.float64)
    (y, grads), (y_ref, grads_ref) = _blocked_and_whole(
        dual_linear, [x, w0, bias, A, B, C, D], lambda ls: ls[3:], (coef, with_base, "relu", "sign",
                                                                                "clip"), rows)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(["x", "w0", "bias", "A", "B", "C", "D"], grads, grads_ref):
        if e is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("rows", [1, 4, 6])
@pytest.mark.parametrize("detach", [False, True])
def test_d2_row_blocks_give_the_whole_matrix_results(rows, detach):
    x, w0, bias, Ap, Bp, An, Bn = _d2_inputs(seed=3)
    n0 = unit_norm(w0, "out")
    (y, grads), (y_ref, grads_ref) = _blocked_and_whole(
        d2_linear, [x, w0, bias, Ap, Bp, An, Bn], lambda ls: ls[3:], (n0, 0.8, 0.5, "out", detach, True),
        rows)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(["x", "w0", "bias", "A_pos", "B_pos", "A_neg", "B_neg"], grads, grads_ref):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")


def test_row_blocks_are_right_for_a_transposed_base_weight_and_a_column_norm():
    """Conv1D's transposed W0 sliced by rows, and D2's 'in' axis (whole columns: built at once whatever the bound)."""
    g = torch.Generator().manual_seed(12)
    w0 = (torch.randn(48, 32, generator=g, dtype=torch.float64) * 0.1).t()
    x = torch.randn(2, 5, 48, generator=g, dtype=torch.float64)
    A, B, C, D = (torch.randn(*s, generator=g, dtype=torch.float64) * 0.3
                  for s in ((3, 48), (32, 3), (3, 48), (32, 3)))
    coef = torch.tensor(0.6, dtype=torch.float64)
    small = KernelOptions(block_mib=5 * 48 * 8 / 2**20)  # 5 rows per block
    y = dual_linear(x, w0, None, A, B, C, D, coef, True, "relu", "sign", "clip", small)
    torch.testing.assert_close(y, reference_dual_linear(x, w0, None, A, B, C, D, coef, "relu", "sign", "clip"))
    Ap, Bp, An, Bn = (torch.randn(*s, generator=g, dtype=torch.float64) * 0.1
                      for s in ((32, 4), (4, 48), (32, 4), (4, 48)))
    for axis in ("out", "in"):
        y = d2_linear(x, w0, None, Ap, Bp, An, Bn, unit_norm(w0, axis), 2.0, 0.5, axis, False, True,
                                       small)
        torch.testing.assert_close(y, reference_d2_linear(x, w0, None, Ap, Bp, An, Bn, 2.0, 0.5, axis, False))
