"""hf-lowrank: low-rank compression and memory-efficient fine-tuning inside transformers, peft and trl.

Importing the package registers its PEFT types (``FISHER_LORA``, ``WELORE_LRC``, ``SPSFT``) with peft and its
factorized-checkpoint format (``quant_method: hf_lowrank``) with transformers.
"""

from importlib import metadata as _metadata

from . import _moved
from .calibration import calibration_batches
from .cards import write_model_card
from .compression import (
    CompressedCheckpointError,
    CompressionConfig,
    CompressionReport,
    LowRankConfig,
    compress_model,
    decompress_model,
    find_target_linears,
    load_compressed,
    save_compressed,
)
from .compression.correction import CorrectionReport, fake_quantize, quantization_correction
from .compression.ere import (
    BaseMismatchError,
    EREResidual,
    ResidualError,
    decode_residual,
    encode_residual,
    export_residual_as_lora,
    load_residual,
    save_residual_on_save,
)
from .distributed import gather_full_model, is_fsdp_model
from .modules import LowRankLinear
from .quantized_modules import QuantizedLowRankLinear, dequantize_factors
from .trainer import CompressOnSaveCallback, FisherCollectorCallback, LowRankTrainer, LowRankTrainerMixin
from .tuners.fisher_lora import (
    FisherLoRAConfig,
    FisherLoraModel,
    FisherState,
    compress_peft_model,
)
from .tuners.spsft import SPSFTConfig, SPSFTModel, export_spsft_as_lora, spsft_importance
from .tuners.welore import WeLoreLRCConfig, WeLoreModel, welore_ranks_for_model

_moved.install()

try:
    __version__ = _metadata.version("hf-lowrank")
except _metadata.PackageNotFoundError:  # pragma: no cover (a source tree on sys.path, not installed)
    __version__ = "0+unknown"

__all__ = [
    "BaseMismatchError",
    "CompressOnSaveCallback",
    "CompressedCheckpointError",
    "CompressionConfig",
    "CompressionReport",
    "CorrectionReport",
    "EREResidual",
    "FisherCollectorCallback",
    "FisherLoRAConfig",
    "FisherLoraModel",
    "FisherState",
    "LowRankConfig",
    "LowRankLinear",
    "QuantizedLowRankLinear",
    "LowRankSFTTrainer",
    "LowRankTrainer",
    "LowRankTrainerMixin",
    "ResidualError",
    "SPSFTConfig",
    "SPSFTModel",
    "WeLoreLRCConfig",
    "WeLoreModel",
    "__version__",
    "calibration_batches",
    "compress_model",
    "compress_peft_model",
    "decode_residual",
    "decompress_model",
    "encode_residual",
    "export_residual_as_lora",
    "export_spsft_as_lora",
    "dequantize_factors",
    "fake_quantize",
    "find_target_linears",
    "gather_full_model",
    "is_fsdp_model",
    "load_compressed",
    "load_residual",
    "quantization_correction",
    "save_compressed",
    "save_residual_on_save",
    "spsft_importance",
    "welore_ranks_for_model",
    "write_model_card",
]


def __getattr__(name: str):
    # LowRankSFTTrainer subclasses trl.SFTTrainer: trl (an extra) is imported on first use only.
    if name == "LowRankSFTTrainer":
        from .trainer.mixins import LowRankSFTTrainer

        return LowRankSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
