"""The adapted layers' computation paths: the eval cache, memory-efficient against plain autograd, dropout,
autocast, gradient checkpointing, torch.compile, golden values per layer kind, the memory they keep and build,
row blocks, the weight-gradient dtype, and the clip STE under float16."""

import copy
import math

import pytest
import torch
from conftest import METHODS, adapted, assert_float32_close, model_output, tiny_llama, trained_like
from peft import get_peft_model

from duallora import D2LoraConfig, DualLoraConfig, set_warmup_step
from duallora.core.layer import AdaptedLayer


# ----------------------------------------------------------------------------- eval cache
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_eval_cache_is_reused_and_never_stale(method, inputs):
    model = adapted("llama", method)
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        first = model_output(model, inputs)
        cached = layer._eval_cache[1]
        assert torch.equal(model_output(model, inputs), first)
        assert layer._eval_cache[1] is cached  # reused, not rebuilt
        # an in-place change of the factors (as load_state_dict does) must invalidate it
        state = {k: v * 1.5 for k, v in model.state_dict().items() if "_lora_" in k and v.is_floating_point()}
        model.load_state_dict(state, strict=False)
        changed = model_output(model, inputs)
    assert layer._eval_cache[1] is not cached
    model.train()
    with torch.no_grad():
        reference = model_output(model, inputs)  # no cache in training mode (the fused path: float rounding only)
    assert_float32_close(changed, reference)
    assert (changed - first).abs().max() > 1e-3  # a stale cache would have served `first` again
    assert layer._eval_cache is None


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("write", ["factor", "base weight"])
def test_eval_cache_sees_writes_through_data(method, write, inputs):
    """Version counters miss `.data` writes (EMA swaps, DeepSpeed's copy-back): the cache looks at the values."""
    model = adapted("llama", method)
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        first = model_output(model, inputs)
        target = layer.factors("default")[0] if write == "factor" else \
            layer.base_layer.weight
        target.data.mul_(1.5)
        changed = model_output(model, inputs)
        model.train()
        reference = model_output(model, inputs)  # no cache in training mode
    assert (changed - first).abs().max() > 1e-3
    assert_float32_close(changed, reference)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_eval_cache_sees_values_permuted_within_a_row_through_data(method, inputs):
    """A permutation within each row of W0 keeps every row sum: the fingerprint weighs columns, so it is seen."""
    model = adapted("llama", method)
    model.eval()
    with torch.no_grad():
        first = model_output(model, inputs)
        for layer in (m for m in model.modules() if isinstance(m, AdaptedLayer)):
            weight = layer.get_base_layer().weight
            weight.data.copy_(weight.data.roll(1, dims=1))  # through .data: no version counter moves
        changed = model_output(model, inputs)
        model.train()
        reference = model_output(model, inputs)
    assert (changed - first).abs().max() > 1e-3
    assert_float32_close(changed, reference)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_eval_cache_filled_under_inference_mode_serves_a_later_input_gradient(method, inputs):
    """A frozen adapter in eval mode: a cache built under torch.inference_mode() once failed every later forward that
    saves the weight for backward ("Inference tensors cannot be saved for backward"); LoRA's works."""
    model = adapted("llama", method)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = inputs
    with torch.inference_mode():
        filled = model(input_ids=ids).logits.clone()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.sum().backward()
    reference_embeds = embeds.detach().clone().requires_grad_()
    for layer in (m for m in model.modules() if isinstance(m, AdaptedLayer)):
        layer.clear_eval_cache()
        layer.eval_cache = {name: False for name in layer.eval_cache}  # the same forward without the cache
    model(inputs_embeds=reference_embeds).logits.sum().backward()
    assert_float32_close(embeds.grad, reference_embeds.grad)
    with torch.no_grad():
        assert_float32_close(model(input_ids=ids).logits, filled)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_eval_cache_can_be_switched_off(method, inputs):
    cached, uncached = adapted("llama", method), adapted("llama", method, eval_cache=False)
    uncached.load_state_dict(cached.state_dict())
    for model in (cached, uncached):
        model.eval()
    with torch.no_grad():
        assert_float32_close(model_output(uncached, inputs), model_output(cached, inputs))
    assert all(m._eval_cache is not None for m in cached.modules() if isinstance(m, AdaptedLayer))
    assert all(m._eval_cache is None for m in uncached.modules() if isinstance(m, AdaptedLayer))


def test_fingerprint_changes_with_any_single_value():
    from duallora.core.watch import fingerprint

    w = torch.randn(64, 48, dtype=torch.bfloat16)
    reference = fingerprint([w])
    one_ulp = w.clone()
    one_ulp[17, 5] = torch.nextafter(one_ulp[17, 5].float(), torch.tensor(float("inf"))).bfloat16()
    if one_ulp[17, 5] == w[17, 5]:  # nextafter in float32 may round back: step by a bf16 ulp instead
        one_ulp.view(torch.int16)[17, 5] += 1
    swapped = w.clone()
    swapped[[3, 40]] = w[[40, 3]]  # same values, other rows: a plain sum would not see it
    assert fingerprint([one_ulp]) != reference
    assert fingerprint([swapped]) != reference
    within_a_row = w.clone()
    within_a_row[9, [2, 30]] = w[9, [30, 2]]  # same values, other columns of one row: a row sum would not see it
    assert w[9, 2] != w[9, 30] and fingerprint([within_a_row]) != reference
    assert fingerprint([w.clone()]) == reference
    assert fingerprint([w.t()]) == fingerprint([w.t().contiguous()])  # Conv1D's transposed view reads the same


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_memory_efficient_and_plain_autograd_paths_agree(method, inputs):
    grads = []
    for efficient in (True, False):
        model = adapted("llama", method, memory_efficient=efficient)
        model.train()
        model(inputs, labels=inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert_float32_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_dropout_path_equals_base_plus_dropped_update(method):
    """Training with lora_dropout > 0: y = x W0^T + b + dropout(x) (f(W0) - W0)^T, the same mask as nn.Dropout's."""
    torch.manual_seed(0)
    model = trained_like(get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10)),
                                        METHODS[method](r=4, target_modules=["0"], lora_dropout=0.3)))
    model.train()
    layer = model.base_model.model[0]
    x = torch.randn(5, 12)
    torch.manual_seed(42)
    y = model(x)
    torch.manual_seed(42)
    dropped = torch.nn.functional.dropout(x, 0.3, training=True)
    w0, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    update = layer.get_delta_weight("default")
    assert_float32_close(y, x @ w0.t() + bias + dropped @ update.t())
    assert not torch.allclose(y, x @ (w0 + update).t() + bias, atol=1e-4)  # the mask did something
    model.eval()
    with torch.no_grad():  # in eval, dropout is off: one matmul with the adapted weight
        assert_float32_close(model(x), x @ (w0 + update).t() + bias)


# ----------------------------------------------------------------------------- autocast, checkpointing, compile
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_bf16_autocast_training_step(method, inputs):
    model = adapted("llama", method)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs, labels=inputs).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_gradient_checkpointing_gives_the_same_gradients(method, inputs):
    grads = []
    for checkpointing in (False, True):
        model = adapted("llama", method)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(inputs, labels=inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert_float32_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_torch_compile_matches_eager(method, inputs):
    model = adapted("llama", method)
    model.train()
    eager_loss = model(inputs, labels=inputs).loss
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model)
    loss = compiled(inputs, labels=inputs).loss
    loss.backward()
    assert_float32_close(loss, eager_loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_float32_close(p.grad, eager[name], msg=name)


def test_dual_init_std_default_and_options():
    def stds(**kw):
        model = get_peft_model(tiny_llama(), DualLoraConfig(r=8, target_modules=["up_proj"], **kw))
        layer = model.base_model.model.model.layers[0].mlp.up_proj  # in = 32, r1 = r2 = 4
        return {n: float(getattr(layer, n)["default"].weight.std()) for n in layer.adapter_layer_names}

    default = stds()
    assert all(abs(s - 0.25 / math.sqrt(32)) < 0.15 * 0.25 / math.sqrt(32) for s in default.values())
    fan_in = stds(init_std="fan_in")
    assert abs(fan_in["dual_lora_B"] - 0.5) < 0.1 and abs(fan_in["dual_lora_A"] - 32 ** -0.5) < 0.03
    assert all(abs(s - 0.07) < 0.01 for s in stds(init_std=0.07).values())


# ----------------------------------------------------------------------------- layer-level golden values
def _single_layer_model(kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    layer = Conv1D(6, 5) if kind == "conv1d" else torch.nn.Linear(5, 6)
    if kind == "conv1d":
        torch.nn.init.normal_(layer.weight, std=0.3)
        torch.nn.init.normal_(layer.bias, std=0.3)
    return torch.nn.Sequential(layer)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dual_layer_output_golden_against_independent_formula(kind):
    from test_functional import reference_dual_linear

    model = get_peft_model(_single_layer_model(kind),
                           DualLoraConfig(r=5, r1=2, lora_alpha=3, warmup_steps=4, target_modules=["0"]))
    set_warmup_step(model, 1)  # lam = 1/4
    layer = model.base_model.model[0]
    w0 = layer.base_layer.weight.detach()
    w0 = w0.t() if kind == "conv1d" else w0
    x = torch.randn(2, 3, 5)
    A, B, C, D = (p.detach() for p in layer.factors("default"))
    coef = 0.25 * 3 / math.sqrt(2 * 3)
    expected = reference_dual_linear(x, w0, layer.base_layer.bias.detach(), A, B, C, D, coef, "relu", "sign", "clip")
    with torch.no_grad():
        assert_float32_close(model(x), expected)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_d2_layer_output_golden_against_independent_formula(kind):
    from test_functional import reference_d2_linear

    model = trained_like(get_peft_model(_single_layer_model(kind),
                                        D2LoraConfig(r=3, lora_alpha=6, tau=0.7, target_modules=["0"])))
    layer = model.base_model.model[0]
    w0 = layer.base_layer.weight.detach()
    w0 = w0.t() if kind == "conv1d" else w0
    x = torch.randn(2, 3, 5)
    expected = reference_d2_linear(x, w0, layer.base_layer.bias.detach(),
                                   *(p.detach() for p in layer.factors("default")), 2.0, 0.7, "out", False)
    with torch.no_grad():
        assert_float32_close(model(x), expected)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_bfloat16_base_model_trains(method, inputs):
    model = adapted("llama", method)
    model.to(torch.bfloat16)
    model.train()
    model(inputs, labels=inputs).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_factors_stored_in_bf16_still_build_the_update_in_float32(method, memory_efficient, inputs):
    """FSDP's MixedPrecision(param_dtype=bf16), DeepSpeed bf16 and autocast_adapter_dtype=False hold the factors in
    bf16. The products B A and D C (A_pos B_pos, A_neg B_neg) are built in float32 all the same: the model computes
    exactly what float32 factors holding the same values compute (bf16 products flip Sign(D C) where |D C| is below
    bf16's resolution: 5 % of dW), and each gradient is the float32 one rounded once to bf16."""
    in_float32 = adapted("llama", method, memory_efficient=memory_efficient)
    with torch.no_grad():
        for name, p in in_float32.named_parameters():
            if "_lora_" in name:
                p.copy_(p.bfloat16().float())  # values that bf16 holds exactly
    in_bf16 = copy.deepcopy(in_float32)
    for name, p in in_bf16.named_parameters():
        if "_lora_" in name:
            p.data = p.data.bfloat16()
    outputs = []
    for model in (in_float32, in_bf16):
        model.train()
        output = model_output(model, inputs)
        output.square().mean().backward()
        outputs.append(output)
    assert torch.equal(outputs[1], outputs[0])
    grads = {name: p.grad for name, p in in_float32.named_parameters() if p.grad is not None}
    for name, p in in_bf16.named_parameters():
        if name in grads:
            assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad, grads[name].bfloat16()), name


# ----------------------------------------------------------------------------- memory, unload, new process
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_memory_efficient_path_saves_no_out_by_in_matrix(method):
    """What autograd keeps for backward: the fused path holds x and the factors, never an (out, in) matrix."""
    def saved_full_matrices(efficient):
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(48, 40)),
                               METHODS[method](r=4, target_modules=["0"], memory_efficient=efficient))
        params = {p.data_ptr() for p in model.parameters()}
        full = []

        def pack(t):
            if t.dim() == 2 and tuple(t.shape) in ((40, 48), (48, 40)) and t.data_ptr() not in params:
                full.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(3, 48)).sum().backward()
        return len(full)

    assert saved_full_matrices(True) == 0
    assert saved_full_matrices(False) >= 2


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operation creates (a new storage, not a view of an input)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, (t.untyped_storage().nbytes(), str(func)), key=lambda p: p[0])
        return out


@pytest.mark.parametrize("method", ["dual", "d2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_respect_the_block_bound(method, dtype, monkeypatch):
    """No out x in matrix beyond one row block exists at once (before: D2's forward copied a bf16 W0 to float32
    whole on every call). The bound is one block of float32 rows: the kernels' elementwise work runs in the factors'
    dtype or float32, whichever is wider (n(W0) is float32). Measured eagerly, every intermediate visible (fusion
    only removes some); a kernel compiled under the recording mode would also be reused after it."""
    import duallora.core.fused as fused_module

    monkeypatch.setattr(fused_module, "_disabled", True)
    out_features, in_features, rows = 256, 128, 32
    block_mib = rows * in_features * dtype.itemsize / 2**20  # 8 blocks of 32 rows
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(in_features, out_features)),
                           METHODS[method](r=4, target_modules=["0"], block_mib=block_mib)).to(dtype)
    trained_like(model)
    x = torch.randn(2, in_features, dtype=dtype, requires_grad=True)  # 2 tokens: y and grad_x are small
    with LargestAllocation() as recorder:
        model(x).float().sum().backward()
    nbytes, op = recorder.largest
    assert nbytes <= rows * in_features * 4, (nbytes, op)
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_bf16_weight_gradient_is_close_to_float32(method, inputs):
    grads = []
    for dtype in (None, "bfloat16"):
        model = adapted("llama", method, weight_grad_dtype=dtype)
        model.train()
        model(inputs, labels=inputs).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    relative = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert 0 < relative < 2e-2  # bf16 precision of G, not a different gradient


def test_unknown_weight_grad_dtype_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"`weight_grad_dtype` must be one of \['float32', 'bfloat16', 'float16'\]"):
        DualLoraConfig(weight_grad_dtype="int8")


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_row_blocks_through_peft_give_the_same_loss_and_gradients(method, inputs):
    """block_mib reaches the layers: a bound of 2 KiB splits every 64 x 32 / 32 x 64 layer into several blocks."""
    results = []
    for block_mib in (None, 2 / 1024):
        model = adapted("gpt2", method, block_mib=block_mib)  # GPT-2: Conv1D's transposed W0 sliced by rows
        model.train()
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters() if p.requires_grad]))
        layer = model.base_model.model.transformer.h[0].mlp.c_fc
        kernel = layer.kernel_options["default"]
        assert kernel.block_mib == block_mib
        if block_mib is not None:
            assert kernel.rows_per_block(layer.out_features, layer.in_features, 4) < layer.out_features
    assert_float32_close(results[1][0], results[0][0])
    for blocked, whole in zip(results[1][1], results[0][1]):
        assert_float32_close(blocked, whole)


@pytest.mark.parametrize("value", [0, -1.0, "64"])
def test_block_mib_out_of_range_names_the_field(value):
    with pytest.raises(ValueError, match=r"`block_mib` must be > 0 \(or None: no blocking\)"):
        DualLoraConfig(block_mib=value)


def test_clip_ste_under_float16_warns_once_that_it_sees_scaled_gradients(inputs, monkeypatch):
    """Under fp16 a GradScaler multiplies the loss: `clip` then clips scaled gradients, a threshold that moves with the
    scale. The layer cannot see the scale, so it says so, once; bf16 (no loss scaling) and the other STEs are quiet."""
    import warnings

    import duallora.dual.layer as dual_module

    monkeypatch.setattr(dual_module, "_clip_warned", False)
    runs = {}
    for ste, dtype in (("clip", torch.bfloat16), ("identity", torch.float16), ("clip", torch.float16)):
        model = adapted("llama", "dual", ste=ste)
        model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                with torch.autocast("cpu", dtype=dtype):
                    model(inputs, labels=inputs).loss.backward()
        runs[(ste, dtype)] = [str(w.message) for w in caught if "ste='clip'" in str(w.message)]
    assert runs[("clip", torch.bfloat16)] == [] and runs[("identity", torch.float16)] == []
    assert len(runs[("clip", torch.float16)]) == 1 and "loss scale" in runs[("clip", torch.float16)][0]
