"""Fisher information, in one room: the state and its file (:mod:`.state`), the weighting sides every compression
entry point takes from it (:mod:`.sides`), and the diagonal / Kronecker collector that fills it during LoRA
training (:mod:`.collector`, imported from there: it walks LoRA models, so this package does not load it eagerly).
"""

from .sides import degenerate_fisher, fisher_sides
from .state import (
    DEFAULT_EPS,
    DEFAULT_EXPONENT,
    DEFAULT_LORA_WEIGHTING,
    DEFAULT_WEIGHTING,
    FISHER_STATE_NAME,
    SOURCES,
    FisherState,
    FisherStateError,
    fisher_state_filename,
    resolve_fisher,
)

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_EXPONENT",
    "DEFAULT_LORA_WEIGHTING",
    "DEFAULT_WEIGHTING",
    "FISHER_STATE_NAME",
    "SOURCES",
    "FisherState",
    "FisherStateError",
    "degenerate_fisher",
    "fisher_sides",
    "fisher_state_filename",
    "resolve_fisher",
]
