"""Making duallora's methods first-class PEFT methods: the PeftType members, the version guards, registration."""

from __future__ import annotations

import warnings

import peft
import transformers
from packaging.version import Version
from peft.utils import PeftType, register_peft_method

MIN_PEFT_VERSION = "0.21.0"


def check_peft_version() -> None:
    """Fail early and clearly on a peft whose tuner internals duallora was not written against."""
    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        raise ImportError(
            f"duallora needs peft >= {MIN_PEFT_VERSION}, found peft {peft.__version__}. "
            f"Upgrade it: pip install 'peft>={MIN_PEFT_VERSION}'."
        )


# From transformers 5.24 on, its own adapter API (on the base model: model.add_adapter(...), not PeftModel's) refuses
# every peft before 0.22 with "The version of PEFT you are using is not compatible, please use a version >= 0.22.0".
TRANSFORMERS_REFUSING_OLD_PEFT = "5.24.0"
PEFT_ACCEPTED_BY_IT = "0.22.0"
REFUSED_TRANSFORMERS_METHODS = ("add_adapter", "set_adapter", "enable_adapters", "disable_adapters",
                                "active_adapters", "get_adapter_state_dict", "delete_adapter")


def check_transformers_peft_pair(transformers_version: str = transformers.__version__,
                                 peft_version: str = peft.__version__) -> None:
    """Warn loudly when this transformers refuses this peft in its adapter API (duallora's own ranges exclude the
    pair; a user can still install it by hand). ``PeftModel`` and ``load_adapter`` keep working then."""
    if (Version(transformers_version) >= Version(TRANSFORMERS_REFUSING_OLD_PEFT)
            and Version(peft_version) < Version(PEFT_ACCEPTED_BY_IT)):
        methods = ", ".join(f"model.{name}()" for name in REFUSED_TRANSFORMERS_METHODS)
        warnings.warn(
            f"transformers {transformers_version} refuses peft {peft_version} in its own adapter API: {methods} on "
            f"a transformers model raise 'please use a version >= {PEFT_ACCEPTED_BY_IT}' (for every PEFT method, "
            f"LoRA included). get_peft_model, PeftModel (its add_adapter, set_adapter, ...) and load_adapter still "
            f"work. Fix: pip install 'transformers<{TRANSFORMERS_REFUSING_OLD_PEFT}' (the tested set is in "
            f"duallora's constraints.txt), or peft >= {PEFT_ACCEPTED_BY_IT} once it is released.",
            UserWarning,
            stacklevel=3,
        )


def ensure_peft_type(method_name: str) -> PeftType:
    """Return ``PeftType[METHOD_NAME]``, adding the member first if this peft does not know it (idempotent).

    peft's ``register_peft_method`` requires the enum member to exist, and ``PeftType`` is a closed ``Enum``,
    so the member is added the way ``Enum`` itself stores members.
    """
    member_name = method_name.upper()
    if member_name in PeftType.__members__:
        return PeftType[member_name]
    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    PeftType._member_names_.append(member_name)
    type.__setattr__(PeftType, member_name, member)
    return member


def register(method_name: str, config_cls, model_cls) -> None:
    """Register one method with peft (idempotent: importing duallora twice is harmless)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = ensure_peft_type(method_name)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return
    register_peft_method(name=method_name, config_cls=config_cls, model_cls=model_cls)
