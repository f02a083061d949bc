"""``hf-lowrank compress --method fwsvd --fisher FILE``: FWSVD of a saved model with a saved Fisher state.

The Fisher state is the ``fisher_state.safetensors`` that ``FisherCollectorCallback`` writes into every checkpoint
(and ``LowRankTrainer.save_model`` next to the compressed model). Its module names are those of the base
transformers model, so it applies to the base model (VRAM-limited pipeline: compress the original weights), to the
model with the adapter merged (``merge_and_unload`` then ``save_pretrained``), or to a full fine-tune
(``source="full"`` Fisher).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from torch import nn

from .compression.compress import CompressionReport
from .peft_configs.fisher_lora.config import DEFAULT_EPS, DEFAULT_EXPONENT, DEFAULT_WEIGHTING

__all__ = ["DEFAULT_WEIGHTING", "compress_with_fisher_file"]  # DEFAULT_WEIGHTING: FisherLoRAConfig's, re-exported


def compress_with_fisher_file(
    model: nn.Module,
    fisher_file: str | os.PathLike,
    ranks: int | float | Mapping[str, int],
    *,
    weighting: str | None = None,
    target_modules: Sequence[str] | str | None = None,
    method: str = "auto",
    exponent: float = DEFAULT_EXPONENT,
    eps: float = DEFAULT_EPS,
    progress: bool = True,
) -> CompressionReport:
    """Compress ``model`` in place by Fisher-weighted SVD with the Fisher state in ``fisher_file``.

    Args:
        model: a transformers model (no adapter), e.g. loaded by the CLI.
        fisher_file: a ``fisher_state.safetensors`` file, or a folder holding one (a checkpoint or a compressed
            model folder).
        ranks: ``int`` rank, ``float`` fraction of parameters kept, or ``{name: rank}``.
        weighting: ``"two_sided"`` or ``"row"`` (paper eq. 4/6); default :data:`DEFAULT_WEIGHTING`.
        target_modules: modules to compress (names or suffixes); default every module in the Fisher state.
        method: SVD algorithm, ``"auto"``, ``"exact"`` or ``"randomized"``.
        exponent, eps: Fisher weighting ``(F / mean(F) + eps) ** exponent``.
        progress: show a progress bar.

    Returns:
        The :class:`~hf_lowrank.CompressionReport`.

    Raises:
        FisherStateError: the file is missing, corrupt, or not a Fisher state.
        ValueError: the Fisher names modules the model lacks, or has other shapes (collected on another model).
    """
    from .peft_configs.fisher_lora.compress import compress_with_fisher
    from .peft_configs.fisher_lora.fisher import FisherState

    state = FisherState.load(fisher_file)
    return compress_with_fisher(
        model, state, ranks, weighting=weighting or DEFAULT_WEIGHTING, target_modules=target_modules,
        exponent=exponent, eps=eps, method=method, progress=progress,
    )
