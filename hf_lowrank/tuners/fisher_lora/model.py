"""The FisherLoRA tuner: peft's LoRA tuner, unchanged, registered under the ``FISHER_LORA`` type.

The layers are peft ``lora.Linear`` / ``lora.Linear4bit`` / ... modules, so merging, unloading, quantized bases and
adapter weights behave exactly as with ``LoraConfig``. What FisherLoRA adds lives outside the tuner: Fisher
collection (``FisherCollector``) and compression (``compress_peft_model``).
"""

from __future__ import annotations

from peft.tuners.lora import LoraModel

__all__ = ["FisherLoRAModel", "FisherLoraModel"]


class FisherLoRAModel(LoraModel):
    """``LoraModel`` for :class:`FisherLoRAConfig` adapters (parameter prefix ``lora_``, as vanilla LoRA)."""

    prefix: str = "lora_"


FisherLoraModel = FisherLoRAModel
"""Deprecated name of :class:`FisherLoRAModel` (named like its config); removed in the next release."""
