"""The D2-LoRA tuner: PEFT's model class of the method (use through ``get_peft_model(model, D2LoraConfig())``)."""

from ..core.tuner import AdaptedWeightTuner
from .layer import D2LoraLayer


class D2LoraModel(AdaptedWeightTuner):
    """D2-LoRA tuner (use through ``peft.get_peft_model(model, D2LoraConfig(...))``)."""

    prefix = "d2_lora_"
    tuner_layer_cls = D2LoraLayer
