"""Dual LoRA's warm-up clock counts updates of the factors, once per update, whatever performs them: torch
optimizers, optimizers over copies of the factors (what DeepSpeed ZeRO and FSDP1's flat parameters do), and
hand-written updates; never micro-batches, eval forwards, checkpoint recomputations or steps that did not train it."""

import json
import warnings

import pytest
import torch
from conftest import model_output, tiny_bert, tiny_llama
from peft import PeftModel, get_peft_model

from duallora import (DualLoraConfig, auto_warmup_steps, fit_warmup_to_run, set_warmup_length, set_warmup_step,
                      warmup_steps_taken)
from duallora.dual.warmup import FrozenWarmupWarning, UnknownRunLengthWarning, WarmingUpWarning, frozen_clock_passes


def dual(model=None, warmup_steps=2, **kw):
    config = DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=warmup_steps, **kw)
    return get_peft_model(model if model is not None else tiny_llama(), config)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class TorchOptimizer:
    """The ordinary case: an optimizer that holds the adapter's own parameters."""

    def __init__(self, params):
        self.optimizer = torch.optim.AdamW(params, lr=1e-2)

    def update(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


class OptimizerOverCopies:
    """What DeepSpeed ZeRO does: the optimizer steps fp32 copies of the parameters, then copies them back."""

    def __init__(self, params):
        self.params = params
        self.copies = [p.detach().clone().requires_grad_() for p in params]
        self.optimizer = torch.optim.AdamW(self.copies, lr=1e-2)

    def update(self):
        for copy, p in zip(self.copies, self.params):
            copy.grad, p.grad = p.grad.clone(), None
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for copy, p in zip(self.copies, self.params):
                p.copy_(copy)


class HandWrittenSGD:
    """No optimizer object at all: the update is written in the training loop."""

    def __init__(self, params):
        self.params = params

    def update(self):
        with torch.no_grad():
            for p in self.params:
                p -= 1e-1 * p.grad
                p.grad = None


UPDATERS = [TorchOptimizer, OptimizerOverCopies, HandWrittenSGD]


def train(model, updater, inputs, updates, micro_batches=1):
    model.train()
    for _ in range(updates):
        for _ in range(micro_batches):
            model(inputs, labels=inputs).loss.backward()
        updater.update()


@pytest.mark.parametrize("updater_cls", UPDATERS)
def test_every_kind_of_update_advances_the_clock_and_the_adapter_learns(updater_cls, inputs):
    """The reported fault: over copies, 6 steps with warmup_steps=2 left the model equal to the base (t stayed 0)."""
    base = tiny_llama()
    with torch.no_grad():
        base_out = model_output(base, inputs)
    model = dual(base)
    params = trainable(model)
    before = [p.detach().clone() for p in params]
    train(model, updater_cls(params), inputs, updates=6)
    assert warmup_steps_taken(model) == 6
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # every factor moved
    model.eval()
    with torch.no_grad():
        assert (model_output(model, inputs) - base_out).abs().max() > 1e-3


@pytest.mark.parametrize("updater_cls", UPDATERS)
def test_gradient_accumulation_counts_one_update_per_cycle(updater_cls, inputs):
    model = dual(warmup_steps=10)
    train(model, updater_cls(trainable(model)), inputs, updates=3, micro_batches=4)
    assert warmup_steps_taken(model) == 3


@pytest.mark.parametrize("updater_cls", UPDATERS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_eval_forwards_and_checkpoint_recomputations_do_not_count(updater_cls, reentrant, inputs):
    model = dual(warmup_steps=10)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    updater = updater_cls(trainable(model))
    for step in range(1, 4):
        train(model, updater, inputs, updates=1, micro_batches=2)
        model.eval()
        for _ in range(3):
            with torch.no_grad():
                model(inputs)
            model(inputs)  # eval mode with grad enabled: still no update
        assert warmup_steps_taken(model) == step


def test_a_step_that_gave_the_adapter_no_gradient_does_not_count(inputs):
    """A classification head trains beside a merged (or frozen) adapter: the adapter was not updated."""
    model = dual(tiny_bert(), warmup_steps=10, modules_to_save=["classifier"])
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    labels = torch.tensor([0, 1])
    model.train()
    model(inputs, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.merge_adapter()
    for _ in range(3):
        model(inputs, labels=labels).loss.backward()
        optimizer.step()  # only the head has gradients
        optimizer.zero_grad()
    assert warmup_steps_taken(model) == 1
    model.unmerge_adapter()
    for p in trainable(model):
        if p.dim() == 2 and p.shape[0] != 3:  # freeze the adapter, keep the head (3 labels) training
            p.requires_grad_(False)
    model(inputs, labels=labels).loss.backward()
    optimizer.step()
    assert warmup_steps_taken(model) == 1


def test_two_optimizers_after_one_backward_count_once(inputs):
    model = dual(warmup_steps=10)
    groups = {g: [p for n, p in model.named_parameters() if f"dual_lora_{g}." in n] for g in "ABCD"}
    magnitude = torch.optim.SGD(groups["A"] + groups["B"], lr=1e-2)
    direction = torch.optim.SGD(groups["C"] + groups["D"], lr=1e-2)
    model.train()
    for _ in range(2):
        model(inputs, labels=inputs).loss.backward()
        magnitude.step()
        direction.step()
        model.zero_grad()
    assert warmup_steps_taken(model) == 2


def test_a_step_skipped_by_the_grad_scaler_does_not_count(inputs):
    model = dual(warmup_steps=10)
    params = trainable(model)
    optimizer = torch.optim.SGD(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    model.train()
    scaler.scale(model(inputs, labels=inputs).loss).backward()
    params[0].grad[0, 0] = float("inf")  # an overflow in the scaled gradients
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert warmup_steps_taken(model) == 0
    scaler.scale(model(inputs, labels=inputs).loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert warmup_steps_taken(model) == 1


def test_a_hand_written_update_is_counted_before_the_adapter_is_saved(tmp_path, inputs):
    model = dual(warmup_steps=10)
    train(model, HandWrittenSGD(trainable(model)), inputs, updates=3)  # no forward after the last update
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert warmup_steps_taken(loaded) == 3
    train(loaded, HandWrittenSGD(trainable(loaded)), inputs, updates=1)
    assert warmup_steps_taken(loaded) == 4


def test_a_clock_that_never_moves_warns_once(inputs):
    """Updates written through `.data` are invisible: the adapter trains with lam_t = 0, and the user is told."""
    model = dual(warmup_steps=2)
    params = trainable(model)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(frozen_clock_passes(2) + 5):
            model(inputs, labels=inputs).loss.backward()
            for p in params:
                p.data.add_(p.grad, alpha=-0.1)
                p.grad = None
    frozen = [w for w in caught if issubclass(w.category, FrozenWarmupWarning)]
    assert len(frozen) == 1
    message = str(frozen[0].message)
    assert "'default'" in message and "lam_t = 0" in message and "set_warmup_step" in message
    assert warmup_steps_taken(model) == 0  # the warning does not pretend to fix it
    set_warmup_step(model, 1)  # the documented way out: set the clock by hand
    assert warmup_steps_taken(model) == 1


def test_a_working_clock_never_warns(inputs):
    model = dual(warmup_steps=2)
    updater = TorchOptimizer(trainable(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenWarmupWarning)
        train(model, updater, inputs, updates=frozen_clock_passes(2) // 2 + 1, micro_batches=2)
    assert warmup_steps_taken(model) == frozen_clock_passes(2) // 2 + 1


def warming_up_warnings(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, WarmingUpWarning)]


def test_saving_merging_or_evaluating_before_the_warm_up_ends_warns_with_lam_t(tmp_path, inputs):
    """A 3-step run with warmup_steps=10 leaves dW at 0.3 of its trained size: each of save, merge and evaluate says
    so once per adapter; a finished warm-up, and an evaluation before any training, say nothing."""
    model = dual(warmup_steps=10)
    optimizer = torch.optim.SGD(trainable(model), lr=1e-2)
    assert warming_up_warnings(lambda: model.eval()) == []  # t = 0, not trained yet: the base model, as expected
    for _ in range(3):
        model.train()
        model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lam = "at warm-up step 3 of 10: its update dW is scaled by lam_t = min(1, t / warmup_steps) = 0.30"
    for action, verb in ((lambda: model.eval(), "evaluated"), (lambda: model.save_pretrained(tmp_path), "saved"),
                         (lambda: model.merge_adapter(), "merged")):
        assert warming_up_warnings(action) == [f"Dual LoRA adapter 'default' {verb} {lam}. Train at least "
                                               "warmup_steps=10 optimizer steps, or give the adapter a smaller "
                                               "warmup_steps for a short run."]
    model.unmerge_adapter()
    set_warmup_step(model, 10)
    assert warming_up_warnings(lambda: (model.eval(), model.save_pretrained(tmp_path),
                                        model.merge_and_unload())) == []
    fresh = dual(warmup_steps=10)
    assert "at warm-up step 0 of 10" in warming_up_warnings(lambda: fresh.save_pretrained(tmp_path / "f"))[0]


# ---------------------------------------------------------------- warmup_steps="auto": fitted to the run's length
@pytest.mark.parametrize("total, expected", [(1, 1), (9, 1), (20, 2), (100, 10), (400, 40), (991, 100),
                                             (1000, 100), (50_000, 100)])
def test_the_auto_warm_up_is_a_tenth_of_the_run_at_most_100(total, expected):
    assert auto_warmup_steps(total) == expected


@pytest.mark.parametrize("bad", [0, -5, 2.5, "20"])
def test_a_run_length_that_is_not_a_positive_integer_is_refused(bad):
    with pytest.raises(ValueError, match=r"`total_steps` must be an integer >= 1"):
        auto_warmup_steps(bad)


@pytest.mark.parametrize("bad", ["fast", -1, 1.5, True])
def test_a_warm_up_that_is_neither_a_count_nor_auto_is_refused(bad):
    with pytest.raises(ValueError, match=r"`warmup_steps` must be an integer >= 0 or 'auto'"):
        DualLoraConfig(warmup_steps=bad)


def lam(model) -> float:
    """lam_t of the adapter in its first Dual LoRA layer (warmup_coef is lam_t * s)."""
    layer = next(m for m in model.modules() if hasattr(m, "warmup_clocks"))
    return (layer.warmup_coef("default") / layer.dual_options["default"].scaling).item()


def unknown_length_warnings(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, UnknownRunLengthWarning)]


def test_auto_is_100_until_fitted_and_says_so_once_when_training_starts(inputs):
    model = get_peft_model(tiny_llama(), DualLoraConfig(r=4, target_modules="all-linear"))
    assert model.peft_config["default"].warmup_steps == "auto"
    optimizer = torch.optim.SGD(trainable(model), lr=1e-2)

    def two_steps():
        for _ in range(2):
            model.train()
            model(input_ids=inputs, labels=inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    messages = unknown_length_warnings(two_steps)
    assert len(messages) == 1  # one for the adapter, not one per layer or per step
    assert ("'default' has warmup_steps='auto' but was not given the run's length, so dW ramps in over 100 "
            "optimizer steps" in messages[0] and "duallora.fit_warmup_to_run(model, total_steps)" in messages[0]
            and "DualLoraWarmupCallback" in messages[0])
    assert lam(model) == pytest.approx(2 / 100, rel=1e-6)


def test_a_fitted_warm_up_drives_lam_t_is_saved_and_reloads_with_the_same_outputs(tmp_path, inputs):
    model = get_peft_model(tiny_llama(), DualLoraConfig(r=4, target_modules="all-linear"))
    assert fit_warmup_to_run(model, 40) == {"default": 4}
    assert model.peft_config["default"].warmup_steps == 4
    with torch.no_grad():
        for p in trainable(model):
            p.add_(0.05 * torch.randn_like(p))  # factors away from their init, so that dW's size shows in the output
    set_warmup_step(model, 1)
    assert lam(model) == pytest.approx(1 / 4, rel=1e-6)
    assert unknown_length_warnings(lambda: model.train()(input_ids=inputs, labels=inputs).loss.backward()) == []
    model.eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["warmup_steps"] == 4
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert lam(reloaded) == pytest.approx(1 / 4, rel=1e-6)  # with "auto" saved it would reload at 1 / 100
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, model(inputs).logits)


def test_an_explicit_warm_up_is_kept_and_never_warned_about(inputs):
    model = dual(warmup_steps=7)
    assert fit_warmup_to_run(model, 20) == {}
    assert model.peft_config["default"].warmup_steps == 7
    set_warmup_step(model, 1)
    assert lam(model) == pytest.approx(1 / 7, rel=1e-6)
    assert unknown_length_warnings(lambda: model.train()(input_ids=inputs, labels=inputs).loss.backward()) == []


def test_set_warmup_length_changes_layers_and_config_and_refuses_a_bad_value():
    model = dual(warmup_steps=7)
    set_warmup_length(model, 0)  # 0: no warm-up, lam_t = 1 from the first step
    assert lam(model) == 1.0 and model.peft_config["default"].warmup_steps == 0
    with pytest.raises(ValueError, match=r"`warmup_steps` must be an integer >= 0; got -2"):
        set_warmup_length(model, -2)
    with pytest.raises(ValueError, match=r"No Dual LoRA adapter named 'other'"):
        set_warmup_length(model, 3, "other")
