"""Writing compression results: a compressed model folder (atomically, with its report and Fisher state), and a
FisherLoRA adapter folder exported as a vanilla LoRA one."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from ...compression.checkpoint import save_compressed
from ...compression.compress import CompressionReport
from ...fisher.state import FisherState
from ...io import atomic_directory, atomic_write_json, read_json
from .config import FISHER_FIELDS

__all__ = ["copy_as_lora_adapter", "export_lora_adapter", "save_compressed_model"]


def save_compressed_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    report: CompressionReport | None = None,
    fisher_state: FisherState | None = None,
) -> Path:
    """Deprecated: :func:`hf_lowrank.save_compressed` does the same job (atomic folder, report, Fisher state, card)."""
    warnings.warn("save_compressed_model is deprecated; use hf_lowrank.save_compressed(model, path, tokenizer=, "
                  "report=, fisher_state=).", DeprecationWarning, stacklevel=2)
    return save_compressed(model, output_dir, tokenizer=tokenizer, report=report, fisher_state=fisher_state)


def export_lora_adapter(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Deprecated: ``hf_lowrank.save_as_lora(dst, src)`` (peft's argument order)."""
    warnings.warn("export_lora_adapter(src, dst) is deprecated; use hf_lowrank.save_as_lora(path, model_or_folder) "
                  "(peft's argument order).", DeprecationWarning, stacklevel=2)
    return copy_as_lora_adapter(src, dst)


def copy_as_lora_adapter(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a saved FisherLoRA adapter folder as a vanilla LoRA adapter (loadable without hf-lowrank).

    The implementation behind :func:`hf_lowrank.save_as_lora` for a FisherLoRA model or adapter folder.

    ``adapter_config.json`` is rewritten with ``peft_type: "LORA"`` and without the FisherLoRA fields; the weights
    file is copied unchanged (the tensor names and shapes are LoRA's).

    Returns:
        The destination folder.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    config = read_json(src / "adapter_config.json", what="adapter config")
    if config.get("peft_type") not in ("FISHER_LORA", "LORA"):
        raise ValueError(f"'{src}' holds a {config.get('peft_type')} adapter, not a FisherLoRA one.")
    config = {k: v for k, v in config.items() if k not in FISHER_FIELDS}
    config["peft_type"] = "LORA"
    weights = [p for p in src.iterdir() if p.name.startswith("adapter_model.")]
    if not weights:
        raise ValueError(f"'{src}' has no adapter_model.* weights file; save the adapter with save_pretrained first.")
    with atomic_directory(dst) as tmp:
        for p in weights:
            shutil.copy2(p, Path(tmp) / p.name)
        atomic_write_json(Path(tmp) / "adapter_config.json", config)
    return dst
