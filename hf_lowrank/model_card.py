"""A model card (``README.md`` with Hub front matter) for every compressed checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_model_card"]

CARD_NAME = "README.md"


def _base_license(base_model: str | None) -> str | None:
    """The licence of a local base folder: its card's front matter ``license:`` line, else its config's field."""
    if not base_model or not Path(base_model).is_dir():
        return None
    card = Path(base_model) / CARD_NAME
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "license" and value.strip():
                    return value.strip().strip("'\"")
    config = Path(base_model) / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("license")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, str) and value:
            return value
    return None


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def _ranks_summary(ranks: Mapping[str, int]) -> str:
    if not ranks:
        return "No layer was factorized."
    values = sorted(ranks.values())
    lines = [
        f"{len(values)} factorized Linear layers; rank min {values[0]}, median {values[len(values) // 2]}, "
        f"max {values[-1]}.",
        "",
        "| module | rank |",
        "|---|---|",
    ]
    shown = sorted(ranks.items())
    lines += [f"| `{name}` | {rank} |" for name, rank in shown[:40]]
    if len(shown) > 40:
        lines.append(f"| ... {len(shown) - 40} more (see `config.json`, `quantization_config.ranks`) | |")
    return "\n".join(lines)


def write_model_card(
    folder: str | os.PathLike,
    *,
    base_model: str | None,
    method: str,
    settings: Mapping[str, Any],
    ranks: Mapping[str, int],
    params_before: int,
    params_after: int,
    quality: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> Path:
    """Write ``folder/README.md``: what the checkpoint is, how it was made and how to load it.

    Args:
        folder: the saved compressed checkpoint (must exist).
        base_model: the base model's Hub id or local folder (``None`` when unknown).
        method: compression method (``"svd"``, ``"fwsvd"``, ``"welore"``, ...).
        settings: the method's settings as given (e.g. ``{"reduction": 0.3}``), listed verbatim.
        ranks: ``{module: rank}`` of the factorized layers.
        params_before: parameter count of the base model.
        params_after: parameter count of the compressed model.
        quality: measured quality, e.g. ``{"perplexity (wikitext)": 17.2}``; omitted when ``None``.
        license: licence identifier; default the base's (its card's front matter or config), else none is claimed.

    Returns:
        The path of the card.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"write_model_card: '{folder}' is not a folder; save the checkpoint there first.")
    if params_before <= 0 or params_after <= 0:
        raise ValueError(f"params_before and params_after must be positive, got {params_before} and {params_after}.")
    license = license or _base_license(base_model)
    arch = None
    config_path = folder / "config.json"
    if config_path.is_file():
        archs = json.loads(config_path.read_text()).get("architectures") or []
        arch = archs[0] if archs else None
    front = ["---", "library_name: transformers", "tags:", "- hf-lowrank", "- low-rank", f"- {method}"]
    if base_model:
        front.append(f"base_model: {_yaml_str(str(base_model))}")
    if license:
        front.append(f"license: {_yaml_str(license)}")
    front.append("---")
    kept = params_after / params_before
    setting_lines = "\n".join(f"- `{k}`: {v!r}" for k, v in settings.items()) or "- (defaults)"
    loader = "AutoModelForCausalLM" if arch is None or arch.endswith("ForCausalLM") else arch
    body = f"""
# {folder.name}: {method} low-rank compression{f" of {base_model}" if base_model else ""}

A factorized checkpoint made with [hf-lowrank](https://pypi.org/project/hf-lowrank/): selected Linear layers are
stored as two low-rank factors (`down` (r, in), `up` (out, r)), everything else as in the base model.

- Base model: {f"`{base_model}`" if base_model else "unknown"}
- Architecture: {f"`{arch}`" if arch else "unknown"}
- Method: `{method}`

## Settings

{setting_lines}

## Ranks

{_ranks_summary(ranks)}

## Size

Parameters: {params_before:,} before, {params_after:,} after ({kept:.1%} kept, {1 - kept:.1%} removed).

## How to load

`hf_lowrank` must be imported first: it registers the checkpoint format with transformers. Stock transformers
without it refuses this folder (size mismatch) rather than loading random weights.

```python
import hf_lowrank  # noqa: F401  (registers the factorized checkpoint format)
from transformers import {loader}

model = {loader}.from_pretrained("{folder.name}")
```
"""
    if quality:
        body += "\n## Measured quality\n\n" + "\n".join(f"- {k}: {v}" for k, v in quality.items()) + "\n"
    body += "\n## Licence\n\n" + (
        f"`{license}`, inherited from the base model." if license else "Not known: see the base model's licence.\n"
    )
    card = folder / CARD_NAME
    tmp = folder / f".{CARD_NAME}.tmp"
    tmp.write_text("\n".join(front) + "\n" + body.rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, card)
    return card


def write_model_card_for(model: Any, folder: str | os.PathLike, report: Any = None) -> Path | None:
    """The card of a compressed transformers ``model`` saved in ``folder`` (``None`` for a model not compressed).

    One writer for ``save_compressed``, ``LowRankTrainer.save_model`` and the CLI: method, ranks and settings come
    from the model's hf-lowrank ``quantization_config`` and, when given, the :class:`CompressionReport`.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(quantizer, "quantization_config", None)
    ranks = getattr(qconfig, "ranks", None)
    if not isinstance(ranks, Mapping) or not ranks:
        return None
    after = sum(p.numel() for p in model.parameters())
    removed = (report.params_before - report.params_after) if report is not None else 0
    settings = dict(getattr(qconfig, "extra", None) or {})
    if report is not None and getattr(report, "info", None):
        settings.update({k: v for k, v in report.info.items() if isinstance(v, (str, int, float, bool)) or v is None})
    config = getattr(model, "config", None)
    return write_model_card(
        folder, base_model=getattr(config, "name_or_path", None) or None,
        method=getattr(qconfig, "method", None) or (report.method if report is not None else "svd"),
        settings=settings, ranks=ranks, params_before=after + removed, params_after=after,
    )
