"""D2-LoRA on a parameter that a module reads itself (``target_parameters``: MoE experts, a router's weight)."""

from ..core.param_wrapper import AdaptedParameter
from .layer import D2LoraLayer


class ParamWrapper(AdaptedParameter, D2LoraLayer):
    """D2-LoRA on one parameter; for a stack of expert matrices, each expert has its own two branches and its own norm
    projection ``n(W0_e)``. Named as peft's LoRA wrapper: peft's ``target_parameters`` injection finds an existing
    wrapper (another adapter, another parameter of the module) by this class name."""
