"""The private API of peft, transformers and bitsandbytes that hf-lowrank relies on, in one place.

Together with :mod:`hf_lowrank.tuners._registry` (the ``PeftType`` extension) this is the only module that
reaches into upstream names starting with ``_``. Each shim looks its symbol up when called and, if upstream moved or
removed it, raises :class:`UpstreamChangedError` naming the symbol, the installed version and the versions it was
checked against. ``tests/test_registry.py`` asserts that every symbol exists and behaves as relied on here, so an
upstream change fails there first.

Not shims: the members a ``BaseTunerLayer`` subclass sets up in its ``__init__`` (``_active_adapter``,
``_disable_adapters``, as peft's own tuners do) and the ``BaseTuner`` / ``HfQuantizer`` hooks a subclass overrides
(``_create_and_replace``, ``_replace_module``, ``_process_model_before_weight_loading``, ...); the tests pin those too.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from .errors import UpstreamChangedError

__all__ = [
    "CHECKED_VERSIONS",
    "BufferDict",
    "UpstreamChangedError",
    "add_keys_to_ignore_on_load_unexpected",
    "cast_input_dtype",
    "clear_peft_config_loaded",
    "get_in_out_features",
    "installed_minor",
    "model_from_config",
    "move_adapter_to_device_of_base_layer",
    "remove_parallel_forward",
    "tied_weights_keys",
    "unpack_bnb_cpu_weight",
]

# Minor versions (major for transformers) the shims below were checked against.
CHECKED_VERSIONS: dict[str, tuple[str, ...]] = {
    "peft": ("0.21",),
    "transformers": ("5",),
    "bitsandbytes": ("0.50",),
}


def installed_minor(package: str) -> str:
    """``"0.21"`` for peft 0.21.2 (``"5"`` for transformers 5.x: transformers is checked per major version)."""
    version = importlib.import_module(package).__version__
    parts = version.split(".")
    return parts[0] if package == "transformers" else ".".join(parts[:2])


def _gone(package: str, symbol: str) -> UpstreamChangedError:
    return UpstreamChangedError(
        f"{package} {importlib.import_module(package).__version__} no longer has {symbol}, which hf-lowrank relies "
        f"on (checked against {package} {', '.join(CHECKED_VERSIONS[package])}). Install a checked version."
    )


def _private(package: str, module: str, name: str) -> Any:
    """``module.name`` (a private upstream symbol), or a clear :class:`UpstreamChangedError`."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise _gone(package, f"{module}.{name}") from exc


# ---- peft ----------------------------------------------------------------------------------------------------------

try:  # a class SPSFT layers hold their row indices in, so it is resolved at import time
    from peft.tuners._buffer_dict import BufferDict
except ImportError as _exc:  # pragma: no cover - only on an unchecked peft
    raise _gone("peft", "peft.tuners._buffer_dict.BufferDict") from _exc


def get_in_out_features(module: nn.Module) -> tuple[int | None, int | None]:
    """``(in_features, out_features)`` of a Linear-like module as peft reads them (bitsandbytes layers included);
    ``(None, None)`` for a module peft does not know as Linear."""
    return _private("peft", "peft.tuners.tuners_utils", "_get_in_out_features")(module)


def cast_input_dtype(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """peft's cast of a tuner layer's input to the adapter weight's dtype (honours ``peft``'s autocast setting)."""
    if not hasattr(layer, "_cast_input_dtype"):
        raise _gone("peft", "BaseTunerLayer._cast_input_dtype")
    return layer._cast_input_dtype(x, dtype)


def move_adapter_to_device_of_base_layer(layer: nn.Module, adapter_name: str) -> None:
    """peft's placement of a new adapter's weights on the device (and float dtype) of the layer's base weight."""
    if not hasattr(layer, "_move_adapter_to_device_of_base_layer"):
        raise _gone("peft", "BaseTunerLayer._move_adapter_to_device_of_base_layer")
    layer._move_adapter_to_device_of_base_layer(adapter_name)


# ---- transformers --------------------------------------------------------------------------------------------------


def model_from_config(cls: type, config: Any, **kwargs: Any) -> nn.Module:
    """A ``PreTrainedModel`` subclass built from ``config`` with random weights (``cls._from_config``: what the Auto
    classes' public ``from_config`` calls, without their config-to-class look-up)."""
    build = getattr(cls, "_from_config", None)
    if build is None:
        raise _gone("transformers", f"{getattr(cls, '__name__', cls)}._from_config (PreTrainedModel._from_config)")
    return build(config, **kwargs)


def tied_weights_keys(model: nn.Module) -> set[str]:
    """Names of the parameters transformers ties to another one (``_tied_weights_keys``; a mapping or a list)."""
    return set(getattr(model, "_tied_weights_keys", None) or ())


def add_keys_to_ignore_on_load_unexpected(model: nn.Module, patterns: set[str]) -> None:
    """Let ``from_pretrained`` load checkpoints with extra keys matching ``patterns`` (regexes) without a warning."""
    current = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    model._keys_to_ignore_on_load_unexpected = set(current or ()) | set(patterns)


def clear_peft_config_loaded(model: nn.Module) -> None:
    """Mark a transformers model as carrying no peft adapter any more (transformers' ``_hf_peft_config_loaded``)."""
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False


def remove_parallel_forward(module: nn.Module) -> bool:
    """Undo the forward hook of transformers' tensor-parallel style on ``module``; ``False`` when it has none.

    ``TensorParallelLayer.install_forward`` (what ``apply_tensor_parallelism`` calls for a module the plan names)
    replaces the instance's ``forward`` with a wrapper and sets ``module._is_hooked``; deleting the instance attribute
    gives the class's ``forward`` back. A hook installed any other way is refused as an upstream change.
    """
    if not getattr(module, "_is_hooked", False):
        return False
    if "forward" not in module.__dict__:
        raise _gone("transformers", "TensorParallelLayer.install_forward replacing module.forward")
    del module.forward
    module._is_hooked = False
    return True


# ---- bitsandbytes --------------------------------------------------------------------------------------------------


def unpack_bnb_cpu_weight(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking of a ``Linear4bit`` weight, in place (no-op otherwise).

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode on an input that does not require grad rewrites the
    weight into a kernel-specific layout (``quant_state.packing_format_for_cpu``) that ``dequantize_4bit`` does not
    understand. bitsandbytes undoes it the same way before saving a state dict; its next eval forward repacks.
    """
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        inverse = _private("bitsandbytes", "bitsandbytes.functional", "_convert_weight_packed_for_cpu_inverse")
        weight.data, weight.quant_state = inverse(weight.data, state)
