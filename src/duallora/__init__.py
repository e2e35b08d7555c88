"""duallora: Dual LoRA and D2-LoRA as native PEFT methods.

``import duallora`` registers both methods with peft; then ``get_peft_model``, ``PeftModel.from_pretrained``,
``merge_and_unload`` and the rest of peft work with :class:`DualLoraConfig` and :class:`D2LoraConfig`.
"""

from ._peft import check_peft_version, register

check_peft_version()

from .d2 import D2LoraConfig, D2LoraLayer  # noqa: E402
from .dual import DualLoraConfig, DualLoraLayer  # noqa: E402
from .tuner import D2LoraModel, DualLoraModel  # noqa: E402
from .warmup import set_warmup_step, warmup_steps_taken  # noqa: E402

register("dual_lora", DualLoraConfig, DualLoraModel)
register("d2_lora", D2LoraConfig, D2LoraModel)

__version__ = "0.1.0"

__all__ = [
    "D2LoraConfig",
    "D2LoraLayer",
    "D2LoraModel",
    "DualLoraConfig",
    "DualLoraLayer",
    "DualLoraModel",
    "set_warmup_step",
    "warmup_steps_taken",
]
