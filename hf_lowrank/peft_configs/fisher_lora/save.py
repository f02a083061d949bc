"""Writing compression results: a compressed model folder (atomically, with its report and Fisher state), and a
FisherLoRA adapter folder exported as a vanilla LoRA one."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ...compression.compress import CompressionReport
from ...fisher_state import FISHER_STATE_NAME, FisherState
from ...io import atomic_directory, atomic_write_json, read_json
from .config import FISHER_FIELDS

__all__ = ["export_lora_adapter", "save_compressed_model"]


def save_compressed_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    report: CompressionReport | None = None,
    fisher_state: FisherState | None = None,
) -> Path:
    """Write a compressed model, its tokenizer, ``compression_report.json`` and the Fisher state, atomically.

    The folder is built beside ``output_dir`` and swapped in only when everything is written (see
    :func:`hf_lowrank.io.atomic_directory`). A folder that holds a PEFT adapter at its top level is refused: the
    adapter files would be carried over and ``from_pretrained`` would load the adapter instead of the model.

    Returns:
        The output folder.
    """
    output_dir = Path(output_dir)
    if (output_dir / "adapter_config.json").exists():
        raise ValueError(
            f"'{output_dir}' already holds a PEFT adapter (adapter_config.json); saving a compressed model there would "
            "mix the two. Save to another folder, or remove the adapter files first."
        )
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            data = report.to_dict()
            if report.info:  # a FisherLoRA report: the Fisher facts go under "fisher"
                data["fisher"] = data.pop("info")
            atomic_write_json(Path(tmp) / "compression_report.json", data)
        if fisher_state is not None:
            fisher_state.save(Path(tmp) / FISHER_STATE_NAME)
        from ...model_card import write_model_card_for

        write_model_card_for(model, tmp, report, name=output_dir.name)
    return output_dir


def export_lora_adapter(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a saved FisherLoRA adapter folder as a vanilla LoRA adapter (loadable without hf-lowrank).

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
