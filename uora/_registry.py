"""Registration of UORA with stock PEFT.

PEFT's `PeftType` is a closed `str` Enum and `register_peft_method` only accepts names that are
already members, so a method living outside PEFT has to add its member first. We add it the way
`enum` itself builds members (same attributes, same lookup tables), and only once: importing or
reloading `uora` any number of times reuses the existing member, so configs created before a reload
still compare equal and pickles/JSON (which store the string "UORA") keep resolving.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

UORA_NAME = "uora"
UORA_PREFIX = "uora_lambda_"


def extend_peft_type(name: str, value: str | None = None) -> PeftType:
    """Return the `PeftType` member `name`, adding it to the enum if it does not exist yet.

    Idempotent: a second call (or a module reload) returns the very same member object.
    """
    value = name if value is None else value
    existing = PeftType._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in PeftType._member_map_:
        raise ValueError(f"PeftType already has a member {name!r} with value {PeftType[name].value!r}")
    member = str.__new__(PeftType, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # class attribute first (EnumType.__setattr__ refuses to rebind members, type.__setattr__ does not)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(name)
    hashable = getattr(PeftType, "_hashable_values_", None)  # Python >= 3.13 keeps this list too
    if isinstance(hashable, list):
        hashable.append(value)
    return member


UORA_PEFT_TYPE = extend_peft_type("UORA")


def register(config_cls: type, model_cls: type) -> None:
    """Register UORA's config and tuner classes with PEFT (idempotent, reload-safe).

    On a first import this is `peft.utils.register_peft_method`. If UORA is already registered (the
    module was reloaded), the mapping entries are pointed at the new classes, because configs and
    models built after the reload are instances of those.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    if UORA_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[UORA_PEFT_TYPE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[UORA_PEFT_TYPE] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[UORA_PEFT_TYPE] = UORA_PREFIX
        return
    register_peft_method(name=UORA_NAME, config_cls=config_cls, model_cls=model_cls, prefix=UORA_PREFIX)
