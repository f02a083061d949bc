"""The one model-card writer: ``README.md`` with Hub front matter for a factorized checkpoint, an ERE residual
folder and a LoRA adapter exported from one, all on :func:`card_metadata` (the base is named as ``base_model``
only when it is a Hub id)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._deprecation import renamed_keywords
from .io import atomic_write_bytes

if TYPE_CHECKING:
    from .compression.ere.format import EREResidual

__all__ = [
    "card_metadata",
    "final_name",
    "hub_model_id",
    "residual_adapter_card",
    "residual_card",
    "write_model_card",
    "write_model_card_for",
]

CARD_NAME = "README.md"


def _base_license(base_model: str | None) -> str | None:
    """The licence of the base: its card's front matter ``license:`` line (a local folder's card, or the card of a
    Hub id in the local Hub cache), else its config's field."""
    if not base_model:
        return None
    if not Path(base_model).is_dir():
        repo = hub_model_id(base_model)
        if repo is None:
            return None
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(repo, CARD_NAME)
        except Exception:  # noqa: BLE001 - a cache look-up never fails a save
            return None
        return _card_license(Path(cached)) if isinstance(cached, str) else None
    card = Path(base_model) / CARD_NAME
    if card.is_file() and (found := _card_license(card)):
        return found
    config = Path(base_model) / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("license")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, str) and value:
            return value
    return None


def _card_license(card: Path) -> str | None:
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "license" and value.strip():
                    return value.strip().strip("'\"")
    return None


#: The Hub's pipeline tag of a transformers task-model class, by the suffix of its name.
_PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
)

_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-[^.]+$")


def final_name(folder: str | os.PathLike) -> str:
    """The name a saved folder will have: ``folder``'s, or for the temporary sibling that
    :func:`hf_lowrank.io.atomic_directory` writes into (``.NAME.tmp-XXXX``), the ``NAME`` it becomes."""
    name = Path(folder).name
    match = _TMP_NAME.match(name)
    return match["name"] if match else name


def hub_model_id(name: str | os.PathLike | None) -> str | None:
    """``name`` when it reads as a Hub model id (``name`` or ``org/name``) and is not a local path, else ``None``.

    A local folder (absolute, relative, or one that exists here) is no Hub id: the Hub rejects a path as
    ``base_model``, and a relative ``org/name`` folder would link the card to a stranger's repo.
    """
    if name is None:
        return None
    text = str(name)
    if not text or text.startswith((".", "/", "~")) or "\\" in text or os.path.isabs(text) or text.count("/") > 1:
        return None
    if os.path.exists(text):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def card_metadata(*, base_model: str | None = None, relation: str | None = None, **fields: Any) -> str:
    """The YAML front matter (between ``---`` lines) of a card, built with ``huggingface_hub.ModelCardData``.

    ``base_model`` is kept only when it is a Hub id (:func:`hub_model_id`), and ``relation`` (the Hub's
    ``base_model_relation``: ``adapter``, ``merge``, ``quantized`` or ``finetune``) only with a base model. Fields
    that are ``None`` are left out.
    """
    from huggingface_hub import ModelCardData

    base = hub_model_id(base_model)
    if base is not None:
        fields["base_model"] = base
        if relation is not None:
            fields["base_model_relation"] = relation
    data = ModelCardData(**{k: v for k, v in fields.items() if v is not None})
    return f"---\n{data.to_yaml()}\n---\n"


def _pipeline_tag(arch: str | None) -> str | None:
    if not arch:
        return None
    return next((tag for suffix, tag in _PIPELINE_TAGS if arch.endswith(suffix)), None)


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


@renamed_keywords(folder="path")
def write_model_card(
    path: str | os.PathLike,
    *,
    base_model: str | None,
    method: str | None,
    settings: Mapping[str, Any],
    ranks: Mapping[str, int],
    params_before: int,
    params_after: int,
    quality: Mapping[str, Any] | None = None,
    license: str | None = None,
    name: str | None = None,
) -> Path:
    """Write ``path/README.md``: what the checkpoint is, how it was made and how to load it, with Hub metadata.

    The front matter is valid Hub metadata (built with ``huggingface_hub.ModelCardData``): ``library_name:
    transformers``, the ``pipeline_tag`` of the architecture, tags ``hf-lowrank``, ``low-rank`` and the method, the
    licence when known, and ``base_model`` with ``base_model_relation: quantized`` only when the base is a Hub id
    (a local path is named in the text only).

    Args:
        path: the folder of the saved compressed checkpoint (must exist).
        base_model: the base model's Hub id or local folder (``None`` when unknown).
        method: compression method (``"svd"``, ``"kronecker"``, ``"welore"``, ...). The method recorded in the
            folder's ``config.json`` (``quantization_config.method``) wins when there is one, so that the card and
            the checkpoint agree.
        settings: the method's settings as given (e.g. ``{"reduction": 0.3}``), listed verbatim.
        ranks: ``{module: rank}`` of the factorized layers.
        params_before: parameter count of the base model.
        params_after: parameter count of the compressed model.
        quality: measured quality, e.g. ``{"perplexity (wikitext)": 17.2}``; omitted when ``None``.
        license: licence identifier; default the base's (its card's front matter or config), else none is claimed.
        name: the checkpoint's name in the title and the load snippet (default: the folder's name; for the
            temporary folder of an atomic save, the name of the folder it becomes).

    Returns:
        The path of the card.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"write_model_card: '{folder}' is not a folder; save the checkpoint there first.")
    if params_before <= 0 or params_after <= 0:
        raise ValueError(f"params_before and params_after must be positive, got {params_before} and {params_after}.")
    license = license or _base_license(base_model)
    name = name or final_name(folder)
    arch = None
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        archs = config.get("architectures") or []
        arch = archs[0] if archs else None
        recorded = (config.get("quantization_config") or {}).get("method")
        if isinstance(recorded, str) and recorded:
            method = recorded
    method = method or "svd"
    hub_base = hub_model_id(base_model)
    front = card_metadata(
        base_model=hub_base, relation="quantized", library_name="transformers", pipeline_tag=_pipeline_tag(arch),
        license=license, tags=list(dict.fromkeys(["hf-lowrank", "low-rank", method])),
    )
    if hub_base:
        base_line, of_base = f"[`{hub_base}`](https://huggingface.co/{hub_base})", f" of {hub_base}"
    elif base_model:
        base_line, of_base = f"a local checkpoint (`{Path(str(base_model)).name}`), not on the Hub", ""
    else:
        base_line, of_base = "unknown", ""
    kept = params_after / params_before
    setting_lines = "\n".join(f"- `{k}`: {v!r}" for k, v in settings.items()) or "- (defaults)"
    loader = "AutoModelForCausalLM" if arch is None or arch.endswith("ForCausalLM") else arch
    body = f"""
# {name}: {method} low-rank compression{of_base}

A factorized checkpoint made with [hf-lowrank](https://pypi.org/project/hf-lowrank/): selected Linear layers are
stored as two low-rank factors (`down` (r, in), `up` (out, r)), everything else as in the base model.

- Base model: {base_line}
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

model = {loader}.from_pretrained("{name}")  # this folder, or its Hub repo id
```
"""
    if quality:
        body += "\n## Measured quality\n\n" + "\n".join(f"- {k}: {v}" for k, v in quality.items()) + "\n"
    body += "\n## Licence\n\n" + (
        f"`{license}`, inherited from the base model." if license else "Not known: see the base model's licence.\n"
    )
    card = folder / CARD_NAME
    atomic_write_bytes(card, (front + body.rstrip() + "\n").encode("utf-8"))
    return card


def _downloaded_from_hub(name: str | None) -> str | None:
    """``name`` when it is a Hub id whose config is in the local Hub cache: the model was loaded from the Hub, not
    from a local folder that happens to read like an id (the folder may be gone or elsewhere at save time)."""
    repo = hub_model_id(name)
    if repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo, "config.json")
    except Exception:  # noqa: BLE001 - a cache look-up never fails a save
        return None
    return repo if isinstance(cached, str) else None


@renamed_keywords(folder="path")
def write_model_card_for(
    model: Any,
    path: str | os.PathLike,
    report: Any = None,
    *,
    name: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
) -> Path | None:
    """The card of a compressed transformers ``model`` saved in the folder ``path`` (``None`` for a model not compressed).

    One writer for ``save_compressed``, ``LowRankTrainer.save_model`` and the CLI: method, ranks and settings come
    from the model's hf-lowrank ``quantization_config`` and, when given, the :class:`CompressionReport`. The base
    model is ``base_model`` when given, else the model's ``name_or_path`` when it is a Hub id that the local Hub
    cache holds (the model was downloaded from the Hub). ``name``: see :func:`write_model_card`.
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
    source = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return write_model_card(
        path, base_model=base_model or _downloaded_from_hub(source) or source,
        method=getattr(qconfig, "method", None) or (report.method if report is not None else "svd"),
        settings=settings, ranks=ranks, params_before=after + removed, params_after=after, license=license,
        name=name,
    )


def residual_card(res: EREResidual) -> str:
    m = res.manifest
    base = m["base"].get("name_or_path") or "<the base checkpoint>"
    arch = m.get("architecture") or "AutoModelForCausalLM"
    rep = res.report
    size = ""
    if rep is not None:
        size = (
            f"- stored: {rep.stored_bytes / 2**20:.2f} MiB, {100 * rep.fraction:.2f}% of the fine-tuned checkpoint "
            f"({rep.finetuned_bytes / 2**20:.1f} MiB)\n"
        )
    ranks = list(res.ranks.values())
    rank_line = f"- low-rank tensors: {len(ranks)}, ranks {min(ranks)}..{max(ranks)}\n" if ranks else ""
    front = card_metadata(base_model=m["base"].get("name_or_path"), relation="finetune", library_name="hf-lowrank",
                          tags=["ere", "residual", "hf-lowrank"])
    return f"""{front}
# ERE residual of a fine-tuned `{arch}`

This folder stores a fully fine-tuned model as a compressed **residual** over its base model (ERE, efficient
residual encoding): per weight, `W_ft - W_base` as a low-rank factorization with {m["bits"]}-bit factors
(or a row-sparse embedding change, or exact small tensors). It is not a standalone checkpoint: it needs the exact
base it was encoded from.

- base: `{base}` (`{m["base"].get("architecture")}`, {m["base"].get("dtype")}), fingerprint `{m["base"]["fingerprint"]["sha256"][:16]}`
- bits: {m["bits"]}, group size {m["group_size"]}, prior rank {m["prior_rank"]}, alpha {m["alpha"]}
{size}{rank_line}
## Load it

```python
import hf_lowrank
model = hf_lowrank.load_residual("{base}", "path/to/this/folder")   # the fine-tuned {arch}
```

or, with a base already in memory, `hf_lowrank.decode_residual(base_model, "path/to/this/folder")`.

From the command line:

```bash
hf-lowrank residual decode {base} path/to/this/folder --out finetuned/      # a plain transformers checkpoint
hf-lowrank residual export-lora path/to/this/folder --out adapter/ --base {base}   # a vanilla PEFT LoRA adapter
```

Decoding against any other base (or the same base in another dtype) is refused: the manifest holds a fingerprint
of the base weights. `residual_manifest.json` also records the sha256 of `residual.safetensors`.
"""


def residual_adapter_card(res: EREResidual, cfg: Any) -> str:
    base = res.manifest["base"].get("name_or_path") or "<the base checkpoint>"
    arch = res.manifest.get("architecture") or "AutoModelForCausalLM"
    front = card_metadata(base_model=res.manifest["base"].get("name_or_path"), relation="adapter",
                          library_name="peft", tags=["lora", "ere", "hf-lowrank"])
    return f"""{front}
# LoRA adapter exported from an ERE residual

A standard PEFT LoRA adapter (per-module `rank_pattern`, `alpha_pattern` equal to the rank, so scaling 1) that
reproduces the fine-tuned `{arch}` on its base `{base}`
(base fingerprint `{res.manifest["base"]["fingerprint"]["sha256"][:16]}`).

```python
from peft import PeftModel
from transformers import {arch}
base = {arch}.from_pretrained("{base}")   # the fine-tuned architecture (e.g. num_labels=...)
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```

Low-rank targets: {len(cfg.target_modules or [])}; modules_to_save: {sorted(cfg.modules_to_save or [])};
bias: {cfg.bias}; trainable tokens: {sorted((cfg.trainable_token_indices or {}).keys())}.
"""
