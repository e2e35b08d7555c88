"""Dual LoRA's configuration: PEFT's usual fields plus the method's own (docs/methods/dual_lora.md), and its
documented defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from ..core.config import WeightAdapterConfig, check_choice, check_range
from ..core.registration import ensure_peft_type
from .maths import DIRECTION_ACTIVATIONS, MAGNITUDE_ACTIVATIONS, STE_VARIANTS

# Default init: std = DEFAULT_INIT_SCALE / sqrt(in_features) for all four factors. Measured on MiniLM + BBC News
# (examples/sweep_init_std.py, docs/init_std_sweep.json): uniform stds 0.01-0.02 (= 0.19-0.38 / sqrt(384)) learned as
# fast as LoRA, 0.05 slower, and a per-factor 1/sqrt(fan-in) (B, D at 1/sqrt(r)) not at all: once the warm-up ends,
# its random full-rank dW is larger than W0 itself. Scaling with 1/sqrt(in) carries the choice to other widths.
DEFAULT_INIT_SCALE = 0.25

# The warm-up of a long run: long enough that dW enters gently while the factors find a useful direction, short
# against runs of thousands of steps. A run of T < 1,000 steps ramps over its first tenth (auto_warmup_steps).
DEFAULT_WARMUP_STEPS = 100
AUTO_WARMUP_FRACTION = 0.1


def auto_warmup_steps(total_steps: int) -> int:
    """The warm-up length for a run of ``total_steps`` optimizer steps: ``min(100, ceil(total_steps / 10))``.

    Measured over run lengths by ``examples/sweep_warmup.py`` (docs/warmup_sweep.md): a fixed 100 leaves a 20-step run
    at ``lam_t = 0.2`` (its update a fifth of the trained one, the model close to the base), while a tenth of the run
    reaches full ``dW`` early and learns as the longer ramp does; from 1,000 steps on it is the fixed 100."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"`total_steps` must be an integer >= 1; got {total_steps!r}.")
    return min(DEFAULT_WARMUP_STEPS, math.ceil(AUTO_WARMUP_FRACTION * total_steps))


@dataclass
class DualLoraConfig(WeightAdapterConfig):
    """Configuration of a Dual LoRA adapter: PEFT's usual fields plus the method's own (docs/methods/dual_lora.md)."""

    r1: Optional[int] = field(
        default=None, metadata={"help": "Rank of the magnitude factors (A, B). None: r // 2, or r - r2 if r2 is set."}
    )
    r2: Optional[int] = field(
        default=None, metadata={"help": "Rank of the direction factors (C, D). None: r - r1."}
    )
    warmup_steps: Union[int, str] = field(
        default="auto",
        metadata={"help": "Optimizer steps over which lam_t ramps from 0 to 1 (dW = 0 at step 0); 0 turns it off. "
                          "'auto' (default): a tenth of the run, at most 100 (auto_warmup_steps), once the run's "
                          "length is given (fit_warmup_to_run, DualLoraWarmupCallback, the command line); 100 until "
                          "then."},
    )
    ste: str = field(
        default="clip",
        metadata={"help": f"Straight-through estimator for Sign: one of {list(STE_VARIANTS)}."},
    )
    magnitude_activation: str = field(
        default="relu", metadata={"help": f"Activation on B @ A: one of {list(MAGNITUDE_ACTIVATIONS)}."}
    )
    direction_activation: str = field(
        default="sign", metadata={"help": f"Activation on D @ C: one of {list(DIRECTION_ACTIVATIONS)}."}
    )
    init_std: Optional[Union[float, str]] = field(
        default=None,
        metadata={
            "help": "Std of the Gaussian init of all four factors. None (default): 0.25 / sqrt(in_features) of each "
            "layer, chosen by measurement (docs/methods/dual_lora.md); the warm-up holds dW at 0 while the factors "
            "start. "
            "'fan_in': each factor at 1/sqrt(its own fan-in) (1/sqrt(in) for A and C, 1/sqrt(r) for B and D)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("dual_lora")
        self.r1, self.r2 = split_rank(self.r, self.r1, self.r2)
        check_range("warmup_steps", self.warmup_steps, "an integer >= 0 or 'auto'", self.warmup_steps == "auto" or (
            isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool) and self.warmup_steps >= 0))
        check_choice("ste", self.ste, STE_VARIANTS)
        check_choice("magnitude_activation", self.magnitude_activation, MAGNITUDE_ACTIVATIONS)
        check_choice("direction_activation", self.direction_activation, DIRECTION_ACTIVATIONS)
        if self.init_std is not None and self.init_std != "fan_in":
            check_range("init_std", self.init_std, "a number > 0, 'fan_in' or None",
                        isinstance(self.init_std, (int, float)) and self.init_std > 0)

    @property
    def resolved_warmup_steps(self) -> int:
        """The warm-up length the layers use: ``warmup_steps``, or for ``"auto"`` before the run's length is known
        the long-run value, 100."""
        return DEFAULT_WARMUP_STEPS if self.warmup_steps == "auto" else self.warmup_steps

    def check_rank(self, field_name: str, rank) -> None:
        check_range(
            field_name, rank, "an integer >= 2 (Dual LoRA splits r into r1 >= 1 and r2 >= 1)",
            isinstance(rank, int) and rank >= 2,
        )

    def layer_ranks(self, r: int) -> tuple[int, int]:
        """``(r1, r2)`` for a layer of rank ``r`` (from ``rank_pattern``): the config's split ratio, kept."""
        if r == self.r:
            return self.r1, self.r2
        r1 = min(max(1, round(r * self.r1 / self.r)), r - 1)
        return r1, r - r1


def split_rank(r: int, r1: Optional[int], r2: Optional[int]) -> tuple[int, int]:
    """Resolve ``r1 + r2 = r`` (the parameter budget of LoRA at ``r``); ``r1 = r // 2`` by default."""
    if r1 is None and r2 is None:
        r1 = r // 2
    elif r1 is None:
        r1 = r - r2
    elif r2 is None:
        r2 = r - r1
    r2 = r - r1 if r2 is None else r2
    for name, value in (("r1", r1), ("r2", r2)):
        check_range(name, value, f"an integer in [1, r - 1] = [1, {r - 1}]", isinstance(value, int) and 1 <= value < r)
    if r1 + r2 != r:
        raise ValueError(f"`r1 + r2` must equal `r` = {r} (same parameters as LoRA at r); got r1={r1}, r2={r2}.")
    return r1, r2


def init_std(option: Optional[Union[float, str]], in_features: int, fan_in: int) -> float:
    """The Gaussian std of one factor: the configured number, 1/sqrt(fan-in), or the default 0.25/sqrt(in)."""
    if option is None:
        return DEFAULT_INIT_SCALE / math.sqrt(in_features)
    if option == "fan_in":
        return 1 / math.sqrt(fan_in)
    return float(option)
