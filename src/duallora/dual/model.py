"""The Dual LoRA tuner: PEFT's model class of the method (use through ``get_peft_model(model, DualLoraConfig())``)."""

from ..core.tuner import AdaptedWeightTuner
from .layer import DualLoraLayer


class DualLoraModel(AdaptedWeightTuner):
    """Dual LoRA tuner (use through ``peft.get_peft_model(model, DualLoraConfig(...))``)."""

    prefix = "dual_lora_"
    tuner_layer_cls = DualLoraLayer
