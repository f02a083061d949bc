"""WeLoreLRC: non-uniform rank reduction, then fine-tuning of only the low-rank components.

WeLore: Jaiswal, Yin, Zhang, Liu, Zhao, Tian and Wang, 2024, "From GaLore to WeLore: How Low-Rank Weights Non-uniformly
Emerge from Low-Rank Gradients", arXiv:2407.11239.

Data-free by default (the threshold runs on the weights' spectra, as in the paper); data-aware with calibration
batches (``WeLoreLRCConfig(...).with_calibration(batches)``, ``welore_ranks_for_model(..., calibration=batches)``):
the threshold then runs on the whitened spectra, those of ``W L_in`` with ``L_in`` the Cholesky factor of each
module's calibration input Gram, and the factors are the whitened SVD.

Importing this package registers ``PeftType.WELORE_LRC`` with peft, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``merge_and_unload`` work with :class:`WeLoreLRCConfig`.
"""

from .._registry import register_method
from .allocation import WeLoreLRCAllocation, calibration_whitening, welore_allocation, welore_ranks_for_model
from .config import WeLoreLRCConfig
from .layer import DenseWeightDroppedError, WeLoreLayer, WeLoreLinear, WhitenedFactorsNeedCalibrationError
from .model import WeLoreLRCModel, WeLoreModel
from .spectra import SpectraCache, compute_spectra, default_spectra_cache, weight_fingerprint, whitening_factors

register_method(name="welore_lrc", config_cls=WeLoreLRCConfig, model_cls=WeLoreLRCModel, prefix="welore_")

__all__ = [
    "DenseWeightDroppedError",
    "SpectraCache",
    "WeLoreLRCAllocation",
    "WeLoreLRCConfig",
    "WeLoreLayer",
    "WeLoreLinear",
    "WeLoreLRCModel",
    "WeLoreModel",
    "WhitenedFactorsNeedCalibrationError",
    "calibration_whitening",
    "compute_spectra",
    "default_spectra_cache",
    "weight_fingerprint",
    "welore_allocation",
    "welore_ranks_for_model",
    "whitening_factors",
]
