"""hf-lowrank: low-rank compression and memory-efficient fine-tuning inside transformers, peft and trl.

Importing the package registers its PEFT types with peft and its factorized-checkpoint format with transformers.
"""

from .compression import (
    CompressedCheckpointError,
    CompressionReport,
    LowRankConfig,
    compress_model,
    decompress_model,
    find_target_linears,
    load_compressed,
)
from .modules import LowRankLinear

__version__ = "0.1.0"

__all__ = [
    "CompressedCheckpointError",
    "CompressionReport",
    "LowRankConfig",
    "LowRankLinear",
    "__version__",
    "compress_model",
    "decompress_model",
    "find_target_linears",
    "load_compressed",
]
