"""Every error hf-lowrank raises, on one root: ``except HfLowRankError`` catches any of them.

Each class also keeps the builtin base it has always had (``ValueError`` for bad input or a bad file,
``RuntimeError`` for a failure of the run or the environment), so ``except ValueError`` keeps working. A leaf
module: it imports nothing from the package, so every layer (``ops`` included) can raise these.
"""

from __future__ import annotations

__all__ = [
    "BaseMismatchError",
    "CliError",
    "CompressedCheckpointError",
    "DenseWeightDroppedError",
    "FisherStateError",
    "HfLowRankError",
    "OfflineModelError",
    "QuantizedMergeError",
    "ResidualError",
    "ResidualFormatError",
    "SVDError",
    "SaveConflictError",
    "UpstreamChangedError",
    "WhitenedFactorsNeedCalibrationError",
]


class HfLowRankError(Exception):
    """Root of every error hf-lowrank raises."""


# ---- the run or the environment (RuntimeError)


class UpstreamChangedError(HfLowRankError, RuntimeError):
    """A private upstream symbol hf-lowrank relies on is gone or changed."""


class SVDError(HfLowRankError, RuntimeError):
    """Raised when no SVD path produces finite factors for a matrix."""


class SaveConflictError(HfLowRankError, RuntimeError):
    """Another writer saves to the same folder at the same time, or the destination cannot take a folder."""


class OfflineModelError(HfLowRankError, RuntimeError):
    """An offline model package is missing or its files are not where they should be."""


# ---- bad input or a bad file (ValueError)


class CompressedCheckpointError(HfLowRankError, ValueError):
    """A factorized checkpoint is missing, truncated, inconsistent or from an incompatible format."""


class FisherStateError(HfLowRankError, ValueError):
    """A Fisher state file is missing, corrupt, or does not belong to the model it is applied to."""


class ResidualError(HfLowRankError, ValueError):
    """Base class of the ERE residual errors."""


class ResidualFormatError(ResidualError):
    """The residual folder is missing files, truncated, edited, or of an unknown format version."""


class BaseMismatchError(ResidualError):
    """The base model given for decoding is not the one the residual was encoded from."""


class DenseWeightDroppedError(HfLowRankError, ValueError):
    """The operation needs the dense weight of a layer that WeLore replaced with ``keep_dense=False``."""


class WhitenedFactorsNeedCalibrationError(HfLowRankError, ValueError):
    """A data-aware (whitened) WeLore adapter has neither loaded weights nor the calibration to compute its factors."""


class QuantizedMergeError(HfLowRankError, ValueError):
    """Raised when asked to merge SPSFT rows into a quantized (e.g. bitsandbytes 4-bit) weight in place."""


# ---- the command line


class CliError(HfLowRankError):
    """A problem the command reports as one line on stderr with exit status 2 (as argparse does for bad usage)."""
