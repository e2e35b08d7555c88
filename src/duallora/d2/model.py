"""The D2-LoRA tuner: PEFT's model class of the method (use through ``get_peft_model(model, D2LoraConfig())``)."""

import dataclasses

from ..core.combine import refuse
from ..core.tuner import AdaptedWeightTuner
from .layer import D2LoraLayer
from .param_wrapper import ParamWrapper


class D2LoraModel(AdaptedWeightTuner):
    """D2-LoRA tuner (use through ``peft.get_peft_model(model, D2LoraConfig(...))``)."""

    prefix = "d2_lora_"
    tuner_layer_cls = D2LoraLayer
    param_wrapper_cls = ParamWrapper
    method_title = "D2-LoRA"

    def combined_config(self, configs, weights, combination_type):
        """Branches concatenated (``d2_concatenated_branches``): rank ``sum r_i``, scale 1 (alpha = r), tau 1.

        "cat" for any number of adapters; "linear" only for one (for several, LoRA's "linear" averages factors,
        whose product is not the weighted sum). The projection reads ``norm_axis`` and ``detach_norm``: equal in all.
        """
        if combination_type not in ("cat", "linear") or (combination_type == "linear" and len(configs) > 1):
            refuse(self.method_title, f"combination_type={combination_type!r} is not exact for D2-LoRA; 'cat' is, "
                                      "for any number of adapters (its update is linear in the branch products)")
        for field in ("norm_axis", "detach_norm"):
            if len({getattr(config, field) for config in configs}) > 1:
                refuse(self.method_title, f"the adapters differ in {field}; only adapters with the same {field} "
                                          "combine exactly")
        rank = sum(config.r for config in configs)
        return dataclasses.replace(configs[0], r=rank, lora_alpha=rank, tau=1.0, inference_mode=True)
