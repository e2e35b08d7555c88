"""D2-LoRA's configuration: PEFT's usual fields plus the method's own (docs/methods/d2_lora.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import WeightAdapterConfig, check_choice, check_range
from ..core.registration import ensure_peft_type
from .maths import NORM_AXES


@dataclass
class D2LoraConfig(WeightAdapterConfig):
    """Configuration of a D2-LoRA adapter: PEFT's usual fields plus the method's own (docs/methods/d2_lora.md)."""

    tau: float = field(default=0.5, metadata={"help": "Fixed weight of the negative branch (>= 0; paper: 0.5)."})
    norm_axis: str = field(
        default="out",
        metadata={"help": "'out': the norm of each output unit's weights (as PEFT's DoRA); "
                          "'in': of each input column."},
    )
    detach_norm: bool = field(
        default=False, metadata={"help": "Stop the gradient through n(W0 + dW) (DoRA's choice: less memory)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("d2_lora")
        check_range("tau", self.tau, ">= 0", isinstance(self.tau, (int, float)) and self.tau >= 0)
        check_choice("norm_axis", self.norm_axis, NORM_AXES)
