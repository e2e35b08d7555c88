"""duallora: Dual LoRA and D2-LoRA as native PEFT methods.

Installing it registers both methods with peft whenever peft is imported (``duallora_autoload``), and so does
``import duallora``; then ``get_peft_model``, ``PeftModel.from_pretrained``,
``merge_and_unload`` and the rest of peft work with :class:`DualLoraConfig` and :class:`D2LoraConfig`.

Layout: ``dual/`` and ``d2/`` hold each method (config, layer, maths, tuner), ``core/`` what both share, ``app/`` the
command line and the evidence (the ``cli`` extra; nothing here imports it).
"""

from duallora_autoload import quiet_missing_kernels_message

quiet_missing_kernels_message()  # before peft imports bitsandbytes (see duallora_autoload)

from .core.registration import check_peft_version, check_transformers_peft_pair, register  # noqa: E402

check_peft_version()
check_transformers_peft_pair()

from .core.hotswap import hotswap_adapter  # noqa: E402
from .core.lora_export import convert_to_lora, save_as_lora  # noqa: E402
from .d2.config import D2LoraConfig  # noqa: E402
from .d2.layer import D2LoraLayer  # noqa: E402
from .d2.model import D2LoraModel  # noqa: E402
from .dual.config import DualLoraConfig, auto_warmup_steps  # noqa: E402
from .dual.layer import DualLoraLayer  # noqa: E402
from .dual.model import DualLoraModel  # noqa: E402
from .dual.warmup import fit_warmup_to_run, set_warmup_length, set_warmup_step, warmup_steps_taken  # noqa: E402

register("dual_lora", DualLoraConfig, DualLoraModel)
register("d2_lora", D2LoraConfig, D2LoraModel)

__version__ = "0.2.0"


def __getattr__(name: str):
    """``DualLoraWarmupCallback`` on first use: it subclasses transformers' ``TrainerCallback``, and importing that
    while transformers is still initialising (peft, and so this package, can be imported from inside it) would be a
    circular import."""
    if name == "DualLoraWarmupCallback":
        from .dual.callback import DualLoraWarmupCallback

        return DualLoraWarmupCallback
    raise AttributeError(f"module 'duallora' has no attribute {name!r}")


__all__ = [
    "D2LoraConfig",
    "D2LoraLayer",
    "D2LoraModel",
    "DualLoraConfig",
    "DualLoraLayer",
    "DualLoraModel",
    "DualLoraWarmupCallback",
    "auto_warmup_steps",
    "convert_to_lora",
    "fit_warmup_to_run",
    "hotswap_adapter",
    "save_as_lora",
    "set_warmup_length",
    "set_warmup_step",
    "warmup_steps_taken",
]
