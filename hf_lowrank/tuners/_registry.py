"""Registration of hf-lowrank's PEFT methods with peft.

This module and :mod:`hf_lowrank._compat` (the other private peft / transformers / bitsandbytes symbols, behind
checked-version shims) are the only ones that touch upstream private API. peft's ``register_peft_method`` only
accepts names that are already members of the closed ``PeftType`` enum, so we add a member first. The member's value equals its name
(e.g. ``"FISHER_LORA"``) because ``adapter_config.json`` stores the value and peft's mappings hash the string.

Everything here is idempotent: importing ``hf_lowrank`` twice, or reloading it, registers nothing twice.
"""

from __future__ import annotations

import peft
from peft.utils import PeftType

__all__ = ["SUPPORTED_PEFT_VERSIONS", "ensure_peft_type", "peft_all_linear_names", "register_method"]

# The enum surgery below was checked against these peft minor versions; another version gets a clear error from
# `ensure_peft_type` if the enum internals changed, and tests/test_registry.py fails loudly.
SUPPORTED_PEFT_VERSIONS = ("0.21",)


def ensure_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum when it is not a member yet.

    Args:
        name: upper-case member name, which is also its value (e.g. ``"WELORE_LRC"``).
    """
    if name in PeftType.__members__:
        return PeftType[name]
    required = ("_member_map_", "_value2member_map_", "_member_names_")
    if not all(hasattr(PeftType, attr) for attr in required):
        raise RuntimeError(
            f"peft {peft.__version__}: the PeftType enum no longer has the internals hf-lowrank extends "
            f"({', '.join(required)}). hf-lowrank supports peft {', '.join(SUPPORTED_PEFT_VERSIONS)}; "
            "install a supported version (pip install 'peft>=0.21,<0.22')."
        )
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_method(*, name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Register a PEFT method (config + tuner) with peft, once.

    Args:
        name: lower-case method name, e.g. ``"fisher_lora"``; the ``PeftType`` member is ``name.upper()``.
        config_cls: the ``PeftConfig`` subclass.
        model_cls: the ``BaseTuner`` subclass.
        prefix: the parameter-name prefix of the adapter's weights (e.g. ``"lora_"``), as peft uses it to
            select adapter state in ``get_peft_model_state_dict``.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type(name.upper())
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        if PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is not config_cls:
            # A module reload created new classes: point peft at the fresh ones.
            from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

            PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
            PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def peft_all_linear_names(model, task_type=None) -> set[str]:
    """peft's own expansion of ``target_modules="all-linear"`` on ``model`` (a private peft helper, hence here).

    Every ``nn.Linear`` / ``Conv1D`` (and adapter "Linear" layers) except, on a ``PreTrainedModel``, its output
    embeddings (the LM head), or with ``task_type="SEQ_CLS"`` its classification head; never the inner layers of
    an adapter.
    """
    from types import SimpleNamespace

    try:
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    except ImportError as exc:  # pragma: no cover - only on an unsupported peft
        raise ImportError(
            f"peft {peft.__version__} no longer has _maybe_include_all_linear_layers, which hf-lowrank uses for "
            f"'all-linear' (checked against peft {', '.join(SUPPORTED_PEFT_VERSIONS)}). Install peft 0.21."
        ) from exc
    config = SimpleNamespace(target_modules="all-linear", task_type=task_type)
    return set(_maybe_include_all_linear_layers(config, model).target_modules)
