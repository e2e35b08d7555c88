"""The Dual LoRA tuner: PEFT's model class of the method (use through ``get_peft_model(model, DualLoraConfig())``)."""

import dataclasses

from ..core.combine import refuse
from ..core.tuner import AdaptedWeightTuner, called_by_save_pretrained
from .layer import DualLoraLayer
from .param_wrapper import ParamWrapper
from .maths import POSITIVELY_HOMOGENEOUS_MAGNITUDES
from .warmup import warn_if_warming_up


class DualLoraModel(AdaptedWeightTuner):
    """Dual LoRA tuner (use through ``peft.get_peft_model(model, DualLoraConfig(...))``)."""

    prefix = "dual_lora_"
    tuner_layer_cls = DualLoraLayer
    param_wrapper_cls = ParamWrapper
    method_title = "Dual LoRA"

    # ------------------------------------------------------------------ before the warm-up ends: say so
    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        warn_if_warming_up(self.model, "merged", adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            warn_if_warming_up(self.model, "merged", adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    def train(self, mode: bool = True):
        if not mode:  # model.eval(): what Trainer.evaluate and every evaluation loop call first
            warn_if_warming_up(self.model, "evaluated", started_only=True)
        return super().train(mode)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        if called_by_save_pretrained():
            warn_if_warming_up(model, "saved", [adapter_name])
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

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
