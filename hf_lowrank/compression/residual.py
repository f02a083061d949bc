"""Deprecated location of the ERE residual API: it lives in :mod:`hf_lowrank.compression.ere`.

Kept for imports that still name this module; import from ``hf_lowrank`` or ``hf_lowrank.compression.ere``.
"""

from .ere import (
    FORMAT_VERSION,
    BaseMismatchError,
    EREResidual,
    ResidualEntry,
    ResidualError,
    ResidualFormatError,
    ResidualReport,
    base_fingerprint,
    decode_residual,
    encode_residual,
    export_residual_as_lora,
    is_residual_dir,
    load_residual,
    save_residual_on_save,
)

__all__ = [
    "BaseMismatchError",
    "EREResidual",
    "FORMAT_VERSION",
    "ResidualEntry",
    "ResidualError",
    "ResidualFormatError",
    "ResidualReport",
    "base_fingerprint",
    "decode_residual",
    "encode_residual",
    "export_residual_as_lora",
    "is_residual_dir",
    "load_residual",
    "save_residual_on_save",
]
