"""The methods the benchmarks measure: each is a method of ``duallora train``, its peft config built by the same
:func:`duallora.app.run_config.adapter_config` (all linear layers, alpha = 2r), or a variant of one (LoRA at twice
the rank, Dual LoRA with a bf16 weight gradient or through plain autograd)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Variant:
    method: str  # the run's method: its adapter, and its optimizer (LoRA+'s groups for loraplus)
    rank_factor: int = 1  # times the benchmark's rank
    run_options: dict = field(default_factory=dict)  # RunConfig fields (a flag of duallora train each)
    config_options: dict = field(default_factory=dict)  # peft-config fields that no flag of duallora train sets


VARIANTS = {
    "full": Variant("full"),
    "lora": Variant("lora"),
    "lora-2r": Variant("lora", rank_factor=2),
    "loraplus": Variant("loraplus"),
    "dora": Variant("dora"),
    "hira": Variant("hira"),
    "dual": Variant("dual"),
    "dual-eager": Variant("dual"),  # run with DUALLORA_COMPILE=0 (train_step.py's ENVIRONMENT)
    "dual-bf16-grad": Variant("dual", run_options={"weight_grad_dtype": "bfloat16"}),
    "dual-autograd": Variant("dual", config_options={"memory_efficient": False}),
    "d2": Variant("d2"),
    "d2-nocache": Variant("d2"),  # run with DUALLORA_NORM_CACHE=0 (train_step.py's ENVIRONMENT)
}


def peft_config(name: str, r: int, task_type: str):
    """The peft config of benchmark method ``name`` at rank ``r`` for ``task_type`` ("CAUSAL_LM" or "SEQ_CLS");
    None for full fine-tuning."""
    from duallora.app.run_config import RunConfig, adapter_config

    variant = VARIANTS[name]
    run = RunConfig(method=variant.method, r=variant.rank_factor * r, target_modules="all-linear",
                    **variant.run_options)
    config = adapter_config(run, "classification" if task_type == "SEQ_CLS" else "generation")
    return replace(config, **variant.config_options) if variant.config_options else config
