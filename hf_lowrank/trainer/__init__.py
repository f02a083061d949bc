"""Trainer integration: Fisher-collecting and compress-on-save callbacks, and Trainer subclasses using them."""

from .callbacks import CompressOnSaveCallback, FisherCollectorCallback
from .mixins import LowRankTrainer, LowRankTrainerMixin

__all__ = [
    "CompressOnSaveCallback",
    "FisherCollectorCallback",
    "LowRankSFTTrainer",
    "LowRankTrainer",
    "LowRankTrainerMixin",
]


def __getattr__(name: str):
    # LowRankSFTTrainer subclasses trl.SFTTrainer; trl is imported on first use only.
    if name == "LowRankSFTTrainer":
        from . import mixins

        return mixins.LowRankSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
