"""WeLoreLRC (seed 001): data-free non-uniform rank reduction, then fine-tuning of only the low-rank components.

Importing this package registers ``PeftType.WELORE_LRC`` with peft, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``merge_and_unload`` work with :class:`WeLoreLRCConfig`.
"""

from .._registry import register_method
from .allocation import WeLoreLRCAllocation, welore_allocation, welore_ranks_for_model
from .config import WeLoreLRCConfig
from .layer import DenseWeightDroppedError, WeLoreLayer, WeLoreLinear
from .model import WeLoreModel
from .spectra import SpectraCache, compute_spectra, default_spectra_cache, weight_fingerprint

register_method(name="welore_lrc", config_cls=WeLoreLRCConfig, model_cls=WeLoreModel, prefix="welore_")

__all__ = [
    "DenseWeightDroppedError",
    "SpectraCache",
    "WeLoreLRCAllocation",
    "WeLoreLRCConfig",
    "WeLoreLayer",
    "WeLoreLinear",
    "WeLoreModel",
    "compute_spectra",
    "default_spectra_cache",
    "weight_fingerprint",
    "welore_allocation",
    "welore_ranks_for_model",
]
