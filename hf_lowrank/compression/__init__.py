"""Compression of whole models: factorize Linear layers, save and reload factorized checkpoints."""

from .checkpoint import CompressedCheckpointError, LowRankConfig, decompress_model, load_compressed, save_compressed
from .compress import CompressionReport, ModuleReport, compress_model, find_target_linears
from .config import CompressionConfig

__all__ = [
    "CompressedCheckpointError",
    "CompressionConfig",
    "CompressionReport",
    "LowRankConfig",
    "ModuleReport",
    "compress_model",
    "decompress_model",
    "find_target_linears",
    "load_compressed",
    "save_compressed",
]
