"""Calibration: the batches a user passes and the activation Gram statistics collected from them.

- :mod:`.inputs`: :func:`calibration_batches` (texts to ``input_ids`` batches) and the checks that make a batch
  usable as forward arguments (or refuse it with the fix).
- :mod:`.grams`: the Gram hooks, :func:`calibration_grams` / :class:`CalibrationGrams` and their all-reduce.
"""

from .grams import GRAM_IN, GRAM_OUT, CalibrationGrams, GramHooks, calibration_grams, gram_memory_bytes, reduce_grams
from .inputs import as_batches, calibration_batches, check_model_ready, is_causal_lm

__all__ = [
    "CalibrationGrams",
    "GRAM_IN",
    "GRAM_OUT",
    "GramHooks",
    "as_batches",
    "calibration_batches",
    "calibration_grams",
    "check_model_ready",
    "gram_memory_bytes",
    "is_causal_lm",
    "reduce_grams",
]
