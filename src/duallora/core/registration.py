"""Making duallora's methods first-class PEFT methods: the PeftType members, the version guard, registration."""

from __future__ import annotations

import peft
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
