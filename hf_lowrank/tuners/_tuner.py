"""What the WeLore and SPSFT tuners share on top of peft's ``BaseTuner``."""

from __future__ import annotations

from contextlib import contextmanager

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["KeepUnloadedModules", "RefuseMixedBatches"]


class RefuseMixedBatches:
    """``BaseTuner`` mixin: ``model(..., adapter_names=[...])`` (peft's mixed adapter batches, a LoRA feature) is
    refused instead of ignored.

    ``PeftModel.forward`` / ``generate`` drop ``adapter_names`` before calling the base model and leave it to the
    tuner's ``_enable_peft_forward_hooks``; a tuner without one would run every row of the batch with the active
    adapter, silently.
    """

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"{type(self).__name__} does not support mixed adapter batches (adapter_names=...): its layers would "
                "run every row with the active adapter. Run one batch per adapter after model.set_adapter(name), or "
                "export the adapter as a LoRA one, which supports adapter_names."
            )
        yield


class KeepUnloadedModules:
    """``BaseTuner`` mixin: unloading puts the module a layer returns in its place, as it is.

    peft's ``_replace_module`` also copies ``child.weight`` (and ``bias``) onto a new module that has no
    ``base_layer``: wrong for a ``LowRankLinear`` (its weight is ``up @ down``), for a dense ``nn.Linear`` built from
    dequantized weights, and impossible for a ``modules_to_save`` head without a ``weight`` (RoBERTa's two-layer
    ``RobertaClassificationHead``). Injection (a new tuner layer) keeps peft's placement (bnb state, device).
    """

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, BaseTunerLayer):
            super()._replace_module(parent, child_name, new_module, child)
            return
        setattr(parent, child_name, new_module)
