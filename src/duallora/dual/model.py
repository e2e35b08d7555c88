"""The Dual LoRA tuner: PEFT's model class of the method (use through ``get_peft_model(model, DualLoraConfig())``)."""

import dataclasses

from ..core.combine import refuse
from ..core.tuner import AdaptedWeightTuner
from .layer import DualLoraLayer
from .param_wrapper import ParamWrapper
from .maths import POSITIVELY_HOMOGENEOUS_MAGNITUDES


class DualLoraModel(AdaptedWeightTuner):
    """Dual LoRA tuner (use through ``peft.get_peft_model(model, DualLoraConfig(...))``)."""

    prefix = "dual_lora_"
    tuner_layer_cls = DualLoraLayer
    param_wrapper_cls = ParamWrapper
    method_title = "Dual LoRA"

    def combined_config(self, configs, weights, combination_type):
        """One adapter times a weight (``dual_weighted_factors``); its config, and its warm-up clock (copied).

        ``m(B1 A1) d(D1 C1) + m(B2 A2) d(D2 C2)`` is not ``m(B A) d(D C)`` of any stacked or averaged factors (ReLU of
        a sum is not the sum of ReLUs, and the product mixes the two), so two or more adapters are refused.
        """
        if len(configs) > 1:
            refuse(self.method_title, f"{len(configs)} adapters cannot be combined exactly (m(BA) * d(DC) is not "
                                      "linear in its factors); only one adapter times a weight can")
        if combination_type == "svd":
            refuse(self.method_title, "combination_type='svd' would refit dW with LoRA factors; use 'cat' or "
                                      "'linear' (the same, exact, for one adapter)")
        config = configs[0]
        if abs(weights[0]) != 1 and config.magnitude_activation not in POSITIVELY_HOMOGENEOUS_MAGNITUDES:
            refuse(self.method_title, f"magnitude_activation={config.magnitude_activation!r} cannot carry a weight "
                                      f"exactly; only {list(POSITIVELY_HOMOGENEOUS_MAGNITUDES)} can")
        return dataclasses.replace(config, inference_mode=True)
