"""Dual LoRA on a parameter that a module reads itself (``target_parameters``: MoE experts, a router's weight)."""

from ..core.param_wrapper import AdaptedParameter
from .layer import DualLoraLayer


class ParamWrapper(AdaptedParameter, DualLoraLayer):
    """Dual LoRA on one parameter; for a stack of expert matrices, each expert has its own A, B, C, D and update
    ``dW_e = lam_t s ReLU(B_e A_e) Sign(D_e C_e)``. Named as peft's LoRA wrapper: peft's ``target_parameters``
    injection finds an existing wrapper (another adapter, another parameter of the module) by this class name."""
