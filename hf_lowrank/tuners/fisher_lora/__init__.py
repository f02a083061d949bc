"""FisherLoRA: FWSVD compression with Fisher information collected from LoRA / QLoRA adapters.

Moskovskiy, Pletenev, Zagoruyko and Panchenko, 2025, "Memory Efficient LM Compression using Fisher Information from
Low-Rank Representations" (NLDB 2025), on FWSVD (Hsu, Hua, Chang, Lou, Shen and Jin, 2022, "Language model
compression with weighted low-rank factorization", arXiv:2207.00112).

Importing this package registers ``PeftType.FISHER_LORA`` with peft, so ``get_peft_model(model,
FisherLoRAConfig(...))``, ``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle it.
"""

from ...fisher.collector import FisherCollector
from ...fisher.state import FISHER_STATE_NAME, FisherState, FisherStateError, fisher_state_filename
from ...fisher.walk import lora_linear_modules
from .._registry import register_method
from .compress import compress_peft_model, plan_ranks, resolve_fisher
from .config import FISHER_SOURCES, FISHER_WEIGHTINGS, FisherLoRAConfig
from .model import FisherLoRAModel, FisherLoraModel
from .save import export_lora_adapter, save_compressed_model
from .unload import shared_weight_copy

PEFT_TYPE = register_method(name="fisher_lora", config_cls=FisherLoRAConfig, model_cls=FisherLoRAModel, prefix="lora_")

__all__ = [
    "FISHER_SOURCES",
    "FISHER_STATE_NAME",
    "FISHER_WEIGHTINGS",
    "PEFT_TYPE",
    "FisherCollector",
    "FisherLoRAConfig",
    "FisherLoRAModel",
    "FisherLoraModel",
    "FisherState",
    "FisherStateError",
    "compress_peft_model",
    "export_lora_adapter",
    "fisher_state_filename",
    "lora_linear_modules",
    "plan_ranks",
    "resolve_fisher",
    "save_compressed_model",
    "shared_weight_copy",
]
