"""The README.md model cards of a residual folder and of a LoRA adapter exported from one.

Their front matter comes from the one Hub-metadata writer, :func:`hf_lowrank.model_card.card_metadata`: the base
is named as ``base_model`` only when it is a Hub id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...model_card import card_metadata

if TYPE_CHECKING:
    from .format import EREResidual


def _model_card(res: EREResidual) -> str:
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


def _adapter_card(res: EREResidual, cfg: Any) -> str:
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
