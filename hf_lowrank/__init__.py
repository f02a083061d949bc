"""hf-lowrank: low-rank compression and memory-efficient fine-tuning inside transformers, peft and trl.

Importing the package registers its PEFT types (``FISHER_LORA``, ``WELORE_LRC``, ``SPSFT``) with peft and its
factorized-checkpoint format (``quant_method: hf_lowrank``) with transformers.

The top level holds the jobs users call (:data:`__all__`); everything else is imported from its submodule. A name
that left the top level still resolves here for one release, with a ``DeprecationWarning`` naming its submodule.
"""

import importlib as _importlib
import warnings as _warnings
from importlib import metadata as _metadata

from . import _moved
from .calibration import calibration_batches
from .compression import (
    CompressionConfig,
    CompressionReport,
    compress_model,
    decompress_model,
    load_compressed,
    save_compressed,
)
from .compression.correction import quantization_correction
from .compression.ere import decode_residual, encode_residual
from .errors import HfLowRankError
from .lora_export import save_as_lora
from .modules import LowRankLinear
from .trainer import CompressOnSaveCallback, FisherCollectorCallback, LowRankTrainer, LowRankTrainerMixin
from .tuners.fisher_lora import FisherLoRAConfig
from .tuners.spsft import SPSFTConfig
from .tuners.welore import WeLoreLRCConfig

_moved.install()

try:
    __version__ = _metadata.version("hf-lowrank")
except _metadata.PackageNotFoundError:  # pragma: no cover (a source tree on sys.path, not installed)
    __version__ = "0+unknown"

__all__ = [
    # compress a model, save it, load it back
    "CompressionConfig",
    "CompressionReport",
    "compress_model",
    "save_compressed",
    "load_compressed",
    "decompress_model",
    "quantization_correction",
    "calibration_batches",
    "LowRankLinear",
    # PEFT methods (peft configs)
    "FisherLoRAConfig",
    "WeLoreLRCConfig",
    "SPSFTConfig",
    # training
    "LowRankTrainer",
    "LowRankSFTTrainer",
    "LowRankTrainerMixin",
    "CompressOnSaveCallback",
    "FisherCollectorCallback",
    # fine-tunes stored as residuals, adapters exported as LoRA
    "encode_residual",
    "decode_residual",
    "save_as_lora",
    "HfLowRankError",
    "__version__",
]

#: names that left the top level -> the submodule that holds them (resolved with a DeprecationWarning, one release)
_MOVED = {
    "BaseMismatchError": "hf_lowrank.errors",
    "CompressedCheckpointError": "hf_lowrank.errors",
    "ResidualError": "hf_lowrank.errors",
    "CorrectionReport": "hf_lowrank.compression.correction",
    "fake_quantize": "hf_lowrank.compression.correction",
    "EREResidual": "hf_lowrank.compression.ere",
    "export_residual_as_lora": "hf_lowrank.compression.ere",
    "load_residual": "hf_lowrank.compression.ere",
    "save_residual_on_save": "hf_lowrank.compression.ere",
    "LowRankConfig": "hf_lowrank.compression",
    "find_target_linears": "hf_lowrank.targets",
    "gather_full_model": "hf_lowrank.distributed",
    "is_fsdp_model": "hf_lowrank.distributed",
    "write_model_card": "hf_lowrank.cards",
    "QuantizedLowRankLinear": "hf_lowrank.quantized_modules",
    "dequantize_factors": "hf_lowrank.quantized_modules",
    "FisherState": "hf_lowrank.fisher.state",
    "FisherLoraModel": "hf_lowrank.tuners.fisher_lora",
    "compress_peft_model": "hf_lowrank.tuners.fisher_lora",
    "SPSFTModel": "hf_lowrank.tuners.spsft",
    "export_spsft_as_lora": "hf_lowrank.tuners.spsft",
    "spsft_importance": "hf_lowrank.tuners.spsft",
    "WeLoreModel": "hf_lowrank.tuners.welore",
    "welore_ranks_for_model": "hf_lowrank.tuners.welore",
}


def __getattr__(name: str):
    # LowRankSFTTrainer subclasses trl.SFTTrainer: trl (an extra) is imported on first use only.
    if name == "LowRankSFTTrainer":
        from .trainer.mixins import LowRankSFTTrainer

        return LowRankSFTTrainer
    if name in _MOVED:
        module = _MOVED[name]
        _warnings.warn(
            f"hf_lowrank.{name} is no longer a top-level name and will be removed from there in the next release; "
            f"import it from its submodule: `from {module} import {name}`.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
