"""Dual LoRA's warm-up clock: ``lam_t = min(1, t / warmup_steps)``, with ``t`` the updates of the factors so far.

``t`` lives in each layer's ``dual_lora_step`` buffer, so it is saved with the adapter and a resumed run goes on
where it stopped. It advances by itself, whatever updates the factors, once per update:

- a training forward through the adapter (grad enabled, factors trainable) marks the adapter as *pending*;
- a pending adapter counts one update when any ``torch.optim`` optimizer completes a step that holds its factors,
  or holds no adapter factor of any model at all: an optimizer over copies (DeepSpeed ZeRO's fp32 partitions,
  FSDP1's flat parameters, clones copied back by hand). Several optimizers stepping after one backward count once;
- a pending adapter whose factors were changed in place (``p -= lr * p.grad``: version counters move) counts one
  update at its next forward, ``state_dict()`` or :func:`warmup_steps_taken`.

So gradient accumulation counts once per cycle (the factors do not change between micro-batches), a step that a
``GradScaler`` skipped counts nothing (it never calls ``optimizer.step``), and neither does a step while the adapter
is merged or frozen (no forward went through it), an eval-mode forward, or a gradient-checkpoint recomputation (the
factors did not change since the forward it recomputes). An update written through ``.data`` by hand is not seen: a
clock that is still at 0 long after ``warmup_steps`` training passes warns once, since ``dW`` then stays 0.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_tracked_layers: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def frozen_clock_passes(warmup_steps: int) -> int:
    """Training passes after which a clock still at 0 is reported: well past the ramp, and more than any
    gradient-accumulation cycle (with checkpointing, two passes per micro-batch) keeps a working clock at 0."""
    return max(100, 4 * warmup_steps)


class WarmupClock:
    """Host-side bookkeeping of one adapter's clock in one layer. The count itself is the layer's
    ``dual_lora_step`` buffer (looked up on each use: ``.to()`` replaces buffers)."""

    def __init__(self, layer: nn.Module, adapter_name: str, warmup_steps: int, auto: bool = False) -> None:
        self.layer, self.adapter_name, self.warmup_steps = layer, adapter_name, warmup_steps
        self.auto = auto  # warmup_steps="auto" not yet fitted to a run's length (fit_warmup_to_run)
        self.auto_warned = False  # UnknownRunLengthWarning given (once per adapter, not per layer)
        self.pending = False  # a training forward ran through the adapter since the last counted update
        self.versions: tuple[int, ...] = ()  # the factors' version counters at that forward
        self.passes = 0  # training passes while the clock has not been seen to move
        self.watching = warmup_steps > 0  # whether the frozen-clock check is still due

    @property
    def step(self) -> torch.Tensor:
        return self.layer.dual_lora_step[self.adapter_name]

    def _versions(self) -> tuple[int, ...]:
        return tuple(f._version for f in self.layer.factors(self.adapter_name))

    def training_pass(self) -> None:
        """A training forward through the adapter: count an in-place update since the last one, then mark pending."""
        if torch.compiler.is_compiling():
            self.pending = True  # a constant store is replayed by the compiled graph; version reads are not
            return
        self.sync()
        if self.auto and not self.auto_warned:
            _warn_unknown_run_length(self.adapter_name, self.warmup_steps)
        self.pending, self.versions = True, self._versions()
        if self.watching:
            self.passes += 1
            if self.passes >= frozen_clock_passes(self.warmup_steps):
                self.watching = False
                if int(self.step) == 0:  # one host sync, once
                    _warn_frozen(self.adapter_name, self.passes, self.warmup_steps)

    def sync(self) -> None:
        """Count an update made in place on the factors (a hand-written optimizer step) since the pending forward."""
        if self.pending and self._versions() != self.versions:
            self.count()

    def after_optimizer_step(self, held: "set[int] | None") -> None:
        """A ``torch.optim`` step completed; ``held`` are the ids it holds, None if it holds no adapter factor."""
        if self.pending and (held is None or id(self.layer.factors(self.adapter_name)[0]) in held):
            self.count()

    @torch.no_grad()
    def count(self) -> None:
        self.step.add_(1)
        self.pending, self.watching = False, False

    def restart(self) -> None:
        """The clock was set by hand: forget what was pending and watch it again."""
        self.pending, self.passes, self.watching = False, 0, self.warmup_steps > 0


def track(layer: nn.Module) -> None:
    """Let optimizer steps advance this layer's warm-up clocks (layers call this themselves)."""
    _tracked_layers.add(layer)


def _clocks(layers) -> list[WarmupClock]:
    return [clock for layer in layers for clock in getattr(layer, "warmup_clocks", {}).values()]


def _clocks_named(adapter_name: str) -> list[WarmupClock]:
    return [clock for clock in _clocks(list(_tracked_layers)) if clock.adapter_name == adapter_name]


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _tracked_layers:
        return  # no Dual LoRA layer alive: a plain fine-tuning run pays one set check
    layers = list(_tracked_layers)
    pending = [clock for clock in _clocks(layers) if clock.pending]
    if not pending:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    factors = {id(f) for layer in layers for name in layer.warmup_clocks for f in layer.factors(name)}
    holds_adapters = not held.isdisjoint(factors)
    for clock in pending:
        clock.after_optimizer_step(held if holds_adapters else None)


_hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


class FrozenWarmupWarning(UserWarning):
    """A Dual LoRA adapter trains with ``lam_t = 0``: its update stays 0 and its factors get no gradient."""


def _warn_once(adapter_name: str, message: str, category: type, mark: tuple[str, bool], stacklevel: int) -> None:
    """One warning for the adapter, not one per layer: every clock of ``adapter_name`` gets ``mark`` (an attribute
    and its value: ``watching`` off, ``auto_warned`` on), which its own check reads before warning again."""
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    for clock in _clocks_named(adapter_name):
        setattr(clock, *mark)


def _warn_frozen(adapter_name: str, passes: int, warmup_steps: int) -> None:
    _warn_once(
        adapter_name,
        f"Dual LoRA adapter {adapter_name!r}: the warm-up clock is still at 0 after {passes} training passes "
        f"(warmup_steps={warmup_steps}), so lam_t = 0, dW = 0 and the adapter's factors get zero gradients: it is not "
        "learning. The clock counts a torch.optim optimizer step, or an in-place update of the factors "
        "(p -= lr * p.grad), after a training forward; an update written through `.data` is not seen. Step with a "
        "torch.optim optimizer, or call duallora.set_warmup_step(model, t) after each update.",
        FrozenWarmupWarning, ("watching", False), stacklevel=2,
    )


class UnknownRunLengthWarning(UserWarning):
    """A Dual LoRA adapter with ``warmup_steps="auto"`` trains without having been told the run's length."""


def _warn_unknown_run_length(adapter_name: str, warmup_steps: int) -> None:
    _warn_once(
        adapter_name,
        f"Dual LoRA adapter {adapter_name!r} has warmup_steps='auto' but was not given the run's length, so dW ramps "
        f"in over {warmup_steps} optimizer steps, the value for runs of 1,000 steps or more: a shorter run ends with "
        "lam_t < 1, its update a fraction of the trained one. Give the length before training: "
        "duallora.fit_warmup_to_run(model, total_steps), or callbacks=[duallora.DualLoraWarmupCallback()] for a "
        "transformers or TRL Trainer (the duallora command line does it), or set warmup_steps to a number.",
        UnknownRunLengthWarning, ("auto_warned", True), stacklevel=4,
    )


def fit_warmup_to_run(model: nn.Module, total_steps: int) -> dict[str, int]:
    """Give every Dual LoRA adapter of ``model`` with ``warmup_steps="auto"`` the warm-up of a run of
    ``total_steps`` optimizer steps, :func:`~duallora.auto_warmup_steps` (a tenth of the run, at most 100); an
    explicit ``warmup_steps`` is kept. Call it before training (the command line and
    :class:`~duallora.DualLoraWarmupCallback` do). Returns ``{adapter name: warm-up steps}`` of those fitted."""
    from .config import auto_warmup_steps

    steps = auto_warmup_steps(total_steps)
    auto = {clock.adapter_name for clock in _clocks(model.modules()) if clock.auto}
    for name in sorted(auto):
        set_warmup_length(model, steps, name)
    return dict.fromkeys(sorted(auto), steps)


def set_warmup_length(model: nn.Module, warmup_steps: int, adapter_name: str = "default") -> None:
    """Set the warm-up length of ``adapter_name`` in every layer and in its config, so that a saved adapter
    reloads with the ``lam_t`` it trained with (``lam_t = min(1, t / warmup_steps)``; 0 turns the warm-up off)."""
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an integer >= 0; got {warmup_steps!r}.")
    for layer in _layers_with(model, adapter_name):
        layer.dual_options[adapter_name] = dataclasses.replace(layer.dual_options[adapter_name],
                                                               warmup_steps=warmup_steps)
        clock = layer.warmup_clocks[adapter_name]
        clock.warmup_steps, clock.auto = warmup_steps, False
        clock.restart()
    for module in model.modules():  # the PeftModel and its tuner share one dict of configs
        config = getattr(module, "peft_config", {}).get(adapter_name)
        if config is not None and hasattr(config, "warmup_steps"):
            config.warmup_steps = warmup_steps


class WarmingUpWarning(UserWarning):
    """A Dual LoRA adapter is saved, merged or evaluated before its warm-up ends: its update is ``lam_t < 1`` of
    what training is heading for (0 at ``t = 0``)."""


def warn_if_warming_up(model: nn.Module, action: str, adapter_names=None, started_only: bool = False) -> None:
    """One warning per adapter of ``model`` whose clock has not reached ``warmup_steps`` as it is ``action``
    (saved, merged, evaluated), giving ``lam_t``: a short run with the default warm-up would otherwise save or merge
    an adapter whose update is a fraction of the trained one, or 0, silently. ``started_only``: not at ``t = 0`` (an
    evaluation before training, of the base model, is expected)."""
    clocks = {}
    for layer in model.modules():
        for name, clock in getattr(layer, "warmup_clocks", {}).items():
            if name not in clocks and (adapter_names is None or name in adapter_names):
                clocks[name] = clock
    for name, clock in clocks.items():
        clock.sync()
        t, total = int(clock.step), clock.warmup_steps  # one host sync per adapter, outside any forward
        if total <= 0 or t >= total or (started_only and t == 0):
            continue
        base = ", so dW = 0 and the model is the base model" if t == 0 else ""
        warnings.warn(
            f"Dual LoRA adapter {name!r} {action} at warm-up step {t} of {total}: its update dW is scaled by "
            f"lam_t = min(1, t / warmup_steps) = {t / total:.2f}{base}. Train at least warmup_steps={total} "
            "optimizer steps, or give the adapter a smaller warmup_steps for a short run.",
            WarmingUpWarning, stacklevel=3,
        )


def sync_before_state_dict(layer: nn.Module, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook: a hand-written update since the last forward is counted before the clock is saved."""
    for clock in layer.warmup_clocks.values():
        clock.sync()


def _layers_with(model: nn.Module, adapter_name: str) -> list[nn.Module]:
    layers = [m for m in model.modules() if adapter_name in getattr(m, "warmup_clocks", {})]
    if not layers:
        raise ValueError(f"No Dual LoRA adapter named {adapter_name!r} in this model.")
    return layers


def warmup_steps_taken(model: nn.Module, adapter_name: str = "default") -> int:
    """The warm-up clock ``t`` of ``adapter_name`` (the same in every layer)."""
    layer = _layers_with(model, adapter_name)[0]
    layer.warmup_clocks[adapter_name].sync()
    return int(layer.dual_lora_step[adapter_name])


@torch.no_grad()
def set_warmup_step(model: nn.Module, step: int, adapter_name: str = "default") -> None:
    """Set the warm-up clock ``t`` of ``adapter_name`` in every layer (e.g. to restart the ramp)."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be an integer >= 0; got {step!r}.")
    for layer in _layers_with(model, adapter_name):
        layer.dual_lora_step[adapter_name].fill_(step)
        layer.warmup_clocks[adapter_name].restart()
