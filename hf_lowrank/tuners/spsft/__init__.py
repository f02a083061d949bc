"""SPSFT: structured-pruning-based sparse fine-tuning as a PEFT method.

Li and Bhaskara, 2025, "An Efficient Sparse Fine-Tuning with Low Quantization Error via Neural Network Pruning",
arXiv:2502.11439.

Importing this package registers ``PeftType.SPSFT`` with peft, so ``get_peft_model(model, SPSFTConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as for any built-in method.
"""

from hf_lowrank.tuners._registry import register_method

from .config import IMPORTANCE_METHODS, SPSFTConfig
from .importance import SPSFTImportanceCallback, spsft_importance
from .layer import Linear, QuantizedMergeError, SelectedRowsAdd, SPSFTLayer, selected_rows_add
from .model import SPSFTModel, export_spsft_as_lora, spsft_to_lora

__all__ = [
    "IMPORTANCE_METHODS",
    "Linear",
    "QuantizedMergeError",
    "SPSFTConfig",
    "SPSFTImportanceCallback",
    "SPSFTLayer",
    "SPSFTModel",
    "SelectedRowsAdd",
    "export_spsft_as_lora",
    "selected_rows_add",
    "spsft_importance",
    "spsft_to_lora",
]

register_method(name="spsft", config_cls=SPSFTConfig, model_cls=SPSFTModel, prefix="spsft_")
