"""One exporter to a vanilla PEFT LoRA adapter: :func:`save_as_lora`, with peft's own name and argument order.

peft's ``save_as_lora(path, model, rank, ...)`` approximates a non-LoRA adapter by a truncated SVD of its weight
change. What hf-lowrank exports is exact, so there is no ``rank``: an SPSFT adapter IS a LoRA (one-hot ``B``, ``A``
the selected rows; Li and Bhaskara, 2025, arXiv:2502.11439), a FisherLoRA adapter's layers ARE LoRA layers, and an
ERE residual's change is stored as factors already (Ryu et al., 2023, arXiv:2305.18425). Every output folder loads with stock ``peft.PeftModel.from_pretrained(base, path)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .compression.ere.format import MANIFEST_NAME, EREResidual
from .compression.ere.lora import residual_to_lora
from .tuners.fisher_lora.save import copy_as_lora_adapter
from .tuners.spsft.model import write_spsft_as_lora

__all__ = ["save_as_lora"]


def save_as_lora(
    path: str | os.PathLike,
    model_or_residual: nn.Module | EREResidual | str | os.PathLike,
    adapter_name: str = "default",
    *,
    base_model: nn.Module | None = None,
    progressbar: bool = False,
) -> Path:
    """Write ``model_or_residual`` to the folder ``path`` as a vanilla PEFT LoRA adapter (atomically).

    Args:
        path: the adapter folder to write.
        model_or_residual: one of
            - a ``PeftModel`` with an SPSFT, FisherLoRA or LoRA adapter (``adapter_name`` picks it);
            - a saved FisherLoRA (or LoRA) adapter folder (``adapter_config.json``);
            - an ERE residual (:class:`~hf_lowrank.compression.ere.EREResidual`) or its folder.
        adapter_name: the adapter of a ``PeftModel`` to export.
        base_model: for a residual only: the base it was encoded from (verified by fingerprint); needed for
            row-sparse embeddings and modules that go to ``modules_to_save`` whole.
        progressbar: show a progress bar (residuals), as peft's ``save_as_lora``.

    Returns:
        ``path`` as a ``Path``. Load it with ``PeftModel.from_pretrained(<the base>, path)``.

    Raises:
        ValueError: a WeLore adapter (it replaces a weight by its factors, so the change is not low rank: use
            ``merge_and_unload()`` and :func:`hf_lowrank.save_compressed`), ``base_model`` given with a model, or a
            folder that is neither a residual nor an adapter.
        TypeError: any other object.
    """
    src = model_or_residual
    if isinstance(src, EREResidual) or (isinstance(src, (str, os.PathLike)) and (Path(src) / MANIFEST_NAME).is_file()):
        return residual_to_lora(src, path, base_model=base_model, progress=progressbar)
    if base_model is not None:
        raise ValueError(
            "save_as_lora(path, model, base_model=...): base_model is for an ERE residual only; a PEFT model carries "
            "its base. Drop base_model=."
        )
    if isinstance(src, (str, os.PathLike)):
        if (Path(src) / "adapter_config.json").is_file():
            return copy_as_lora_adapter(src, path)
        raise ValueError(
            f"'{src}' is neither an ERE residual folder (no {MANIFEST_NAME}) nor a saved adapter folder (no "
            "adapter_config.json). Pass the folder that encode_residual or PeftModel.save_pretrained wrote, or the "
            "model itself."
        )
    peft_type = _peft_type(src, adapter_name)
    if peft_type == "SPSFT":
        return write_spsft_as_lora(path, src, adapter_name)
    if peft_type in ("FISHER_LORA", "LORA"):
        # peft writes its own folder (its key mapping, tied weights, modules_to_save); the config is then rewritten
        with tempfile.TemporaryDirectory(prefix=".save_as_lora-", dir=Path(path).absolute().parent) as tmp:
            src.save_pretrained(tmp, selected_adapters=[adapter_name])
            folder = Path(tmp) if adapter_name == "default" else Path(tmp) / adapter_name
            return copy_as_lora_adapter(folder, path)
    if peft_type == "WELORE_LRC":
        raise ValueError(
            "a WeLore adapter replaces each weight by its low-rank factors, so its change to the base is not low "
            "rank and has no LoRA form. Use model.merge_and_unload() and hf_lowrank.save_compressed(model, path)."
        )
    raise ValueError(
        f"save_as_lora exports SPSFT, FisherLoRA and LoRA adapters and ERE residuals; adapter {adapter_name!r} is "
        f"{peft_type}. For other PEFT methods use peft.save_as_lora(path, model, rank) (an SVD approximation)."
    )


def _peft_type(model: Any, adapter_name: str) -> str:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError(
            f"save_as_lora takes a PeftModel, an ERE residual or a folder; got {type(model).__name__}. Wrap the model "
            "with peft.get_peft_model first, or pass the residual."
        )
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter {adapter_name!r}; its adapters are {sorted(configs)}.")
    peft_type = configs[adapter_name].peft_type
    return str(getattr(peft_type, "value", peft_type))
