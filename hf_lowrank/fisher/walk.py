"""Walking a (PEFT-wrapped) model: the transformers model under its wrappers, its LoRA-adapted Linears, and the
fingerprint that ties a Fisher state to the model it was collected on."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..distributed import unwrap_wrappers
from ..modules import dense_weight, is_conv1d
from ..targets import find_target_linears

__all__ = ["lora_linear_modules", "model_fingerprint", "unwrap_model", "unwrap_wrappers"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / ``torch.compile`` wrappers and a ``PeftModel`` (its LoRA layers stay)."""
    model = unwrap_wrappers(model)
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model.get_base_model()
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    return model


_SAMPLE_SIZE = 16


def model_fingerprint(model: nn.Module, modules: Mapping[str, nn.Module], adapter_name: str | None) -> dict:
    """What a LoRA Fisher state belongs to: the adapter rank, the model type and name, and a sample of the weights.

    The sample is ``_SAMPLE_SIZE`` evenly spaced values of the (frozen) base weight of the first and the last adapted
    module; a module whose adapter is merged into its weight is left out of it. Compared with a tolerance, so that the
    same model loaded in another dtype matches.
    """
    config = getattr(unwrap_model(model), "config", None)
    first = next(iter(modules.values()), None)
    rank = getattr(first, "r", {}).get(adapter_name) if first is not None and adapter_name else None
    sample: dict[str, list[float]] = {}
    names = list(modules)
    for name in dict.fromkeys(names[:1] + names[-1:]):
        module = modules[name]
        if getattr(module, "merged", False):
            continue
        try:
            W = dense_weight(module.get_base_layer()).detach()
        except Exception:  # noqa: BLE001 (an exotic base layer: no sample, the other checks remain)
            continue
        if W.is_meta or W.numel() == 0:
            continue
        flat = W.reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, _SAMPLE_SIZE).round().long().to(flat.device)
        sample[name] = [float(v) for v in flat[idx].float().cpu()]
    return {
        "adapter_rank": int(rank) if rank is not None else None,
        "model_type": getattr(config, "model_type", None) or None,
        "name_or_path": str(getattr(config, "name_or_path", "") or "") or None,
        "sample": sample,
    }



def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def lora_linear_modules(model: nn.Module, adapter_name: str | None = None) -> tuple[dict[str, nn.Module], str | None]:
    """LoRA-adapted Linear layers of ``model`` (names as in the base transformers model) and the adapter name.

    Args:
        model: a ``PeftModel`` or a model with peft LoRA layers injected.
        adapter_name: the adapter; default the first active adapter found.

    Returns:
        ``({name: lora_layer}, adapter_name)``; only layers whose base layer is an ``nn.Linear`` (bitsandbytes
        4/8-bit Linears included) or a GPT-2-style ``Conv1D`` and that carry the adapter.
    """
    from peft.tuners.lora import LoraLayer

    base = unwrap_model(model)
    found: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name is None:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if not active:
                continue
            adapter_name = active[0]
        if adapter_name in module.lora_A and _linear_like(module.get_base_layer()):
            found[name] = module
    return found, adapter_name


def _full_targets(model: nn.Module, target_modules) -> dict[str, nn.Module]:
    """``{name: Linear}`` whose dense weight gets full-gradient Fisher (base layers of LoRA layers first)."""
    base = unwrap_model(model)
    lora, _ = lora_linear_modules(base)
    if lora and target_modules is None:
        return {name: m.get_base_layer() for name, m in lora.items()}
    found = find_target_linears(base, target_modules)
    return {name.removesuffix(".base_layer"): m for name, m in found.items()}
