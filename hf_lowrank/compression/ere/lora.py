"""Export of a residual as a vanilla PEFT LoRA adapter (``PeftModel.from_pretrained(base, out)`` loads it)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...cards import residual_adapter_card
from ...io import atomic_directory, atomic_write_bytes
from .fingerprint import verified_base_tensors
from .format import CARD_NAME, EREResidual, _as_residual, _dtype_of, _module_of

__all__ = ["export_residual_as_lora", "residual_to_lora"]

_HEAD_NAMES = ("classifier", "score")  # what peft's PeftModelForSequence/TokenClassification add to modules_to_save


def _task_type(arch: str | None) -> str | None:
    if not arch:
        return None
    if arch.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if arch.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if arch.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def export_residual_as_lora(path: str | os.PathLike | EREResidual, out: str | os.PathLike, **kwargs) -> Path:
    """Deprecated: ``hf_lowrank.save_as_lora(out, path, base_model=base_model)`` (peft's argument order)."""
    warnings.warn("export_residual_as_lora(path, out, base_model=) is deprecated; use hf_lowrank.save_as_lora(out, "
                  "residual, base_model=) (peft's argument order).", DeprecationWarning, stacklevel=2)
    return residual_to_lora(path, out, **kwargs)


@torch.no_grad()
def residual_to_lora(
    path: str | os.PathLike | EREResidual,
    out: str | os.PathLike,
    *,
    base_model: nn.Module | None = None,
    progress: bool = True,
) -> Path:
    """Write a residual as a standard PEFT LoRA adapter that plain ``PeftModel.from_pretrained(base, out)`` loads.

    The implementation behind :func:`hf_lowrank.save_as_lora` for a residual.

    Mapping: a low-rank ``nn.Linear`` weight becomes ``lora_A = sqrt|S| Vh``, ``lora_B = U sign(S) sqrt|S|`` with
    ``rank_pattern[m] = alpha_pattern[m] = r`` (scaling 1) from the decoded (dequantized, Stiefel-projected)
    factors; a GPT-2-style ``Conv1D`` weight (stored ``(in, out)``) the same with the factors' roles swapped and
    ``fan_in_fan_out=True``; a low-rank embedding becomes ``lora_embedding_A/B``; a tied ``lm_head`` gets its own LoRA with the same
    factors; a row-sparse embedding becomes ``trainable_token_indices`` (PEFT stores the new rows, so this needs
    ``base_model``); changed biases travel with ``bias="all"``; whole modules stored exactly (new heads, norms) go
    to ``modules_to_save``. Unchanged tensors are not written.

    Args:
        path: residual folder or :class:`EREResidual`.
        out: adapter folder to write (atomically).
        base_model: the base (verified by fingerprint); needed only for row-sparse embeddings and for modules that
            must go to ``modules_to_save`` with some tensors unchanged.
        progress: show a tqdm bar.

    Returns:
        The adapter folder. Load it with ``PeftModel.from_pretrained(<base in the fine-tuned architecture>, out)``.
    """
    from peft import LoraConfig
    from safetensors.torch import save as st_save

    res = _as_residual(path)
    spec = res.entries
    base_of: dict[str, torch.Tensor | None] = {}
    if base_model is not None:
        base_of = verified_base_tensors(res, base_model)
    aliases_of: dict[str, list[str]] = {}
    for name, e in spec.items():
        if e["kind"] == "alias":
            aliases_of.setdefault(e["of"], []).append(name)

    state: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    token_indices: dict[str, list[int]] = {}
    save_modules: set[str] = set()
    biases: dict[str, torch.Tensor] = {}
    pre = "base_model.model."
    conv1d_targets = False  # GPT-2-style Conv1D LoRA targets need fan_in_fan_out=True (peft unsets it per nn.Linear)

    def need_base(name: str, why: str) -> torch.Tensor:
        if base_model is None or base_of.get(name) is None:
            raise ValueError(
                f"exporting '{name}' as a PEFT adapter needs the base weights ({why}); pass "
                "save_as_lora(out, residual, base_model=<the base model>)."
            )
        return base_of[name]

    task_type = _task_type(res.manifest.get("architecture"))
    heads = _head_modules(spec, task_type)
    names = [n for n, e in spec.items() if e["kind"] in ("lowrank", "sparse", "exact")]
    head_changed = False
    for name in tqdm(names, desc="export LoRA", unit="tensor", disable=not progress):
        e = spec[name]
        mod, leaf = _module_of(name)
        if _under(mod, heads):
            head_changed = True  # the head is exported whole below
            continue
        mtype = e.get("module_type")
        dtype = _dtype_of(e["dtype"])
        if e["kind"] == "lowrank":
            if not e["rank"]:
                continue
            U, S, Vh = res.factors(name, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            root = S.abs().sqrt()
            up, down = U * (torch.sign(S) * root), root[:, None] * Vh  # (out, r), (r, in)
            r = int(e["rank"])
            holders = [(mod, mtype)] + [
                (spec[a]["module"], spec[a].get("module_type")) for a in aliases_of.get(name, [])
            ]
            if leaf == "weight" and all(t in ("Embedding", "Linear", "Conv1D") for _, t in holders):
                for m_name, m_type in holders:  # a tied lm_head gets the same change as the embedding
                    if m_type == "Embedding":  # peft: delta = (B @ A).T with A (r, num_embeddings), B (dim, r)
                        state[f"{pre}{m_name}.lora_embedding_A"] = up.T.contiguous().to(dtype)
                        state[f"{pre}{m_name}.lora_embedding_B"] = down.T.contiguous().to(dtype)
                    elif m_type == "Conv1D":  # weight (in, out); peft (fan_in_fan_out): delta = (B @ A).T
                        state[f"{pre}{m_name}.lora_A.weight"] = up.T.contiguous().to(dtype)
                        state[f"{pre}{m_name}.lora_B.weight"] = down.T.contiguous().to(dtype)
                        conv1d_targets = True
                    else:
                        state[f"{pre}{m_name}.lora_A.weight"] = down.contiguous().to(dtype)
                        state[f"{pre}{m_name}.lora_B.weight"] = up.contiguous().to(dtype)
                    targets.append(m_name)
                    rank_pattern[m_name] = r
            elif len(holders) == 1:
                b = need_base(name, f"a {mtype} weight is not a LoRA target, it goes to modules_to_save")
                full = (b.to(torch.float64) + res.delta(name, dtype=torch.float64).to(b.device)).to(dtype)
                _save_whole(state, save_modules, res, spec, mod, {leaf: full}, need_base)
            else:
                raise ValueError(
                    f"'{name}' is tied to {aliases_of[name]} and is not a Linear/Embedding weight; "
                    "it cannot be exported as a LoRA adapter. Use decode_residual instead."
                )
        elif e["kind"] == "sparse":
            if mtype != "Embedding" or leaf != "weight":
                raise ValueError(f"row-sparse tensor '{name}' is not an embedding weight; it cannot be exported.")
            b = need_base(name, "PEFT's trainable_token_indices stores the new embedding rows, not their change")
            rows = res.tensors[f"{name}:rows"].long()
            new_rows = b.to(torch.float64)[rows.to(b.device)].cpu() + res.delta(name, dtype=torch.float64)[rows]
            new_rows = new_rows.to(dtype)
            token_indices[mod] = [int(i) for i in rows.tolist()]
            state[f"{pre}{mod}.token_adapter.trainable_tokens_delta"] = new_rows.cpu().contiguous()
        else:  # exact
            value = res.tensors[f"{name}:exact"].to(dtype)
            if leaf == "bias" and value.ndim == 1:
                biases[name] = value
            else:
                _save_whole(state, save_modules, res, spec, mod, {leaf: value}, need_base)
    for name, value in biases.items():
        mod, leaf = _module_of(name)
        if mod in save_modules:
            state[f"{pre}{name}"] = value
        elif mod in targets:
            state[f"{pre}{mod}.base_layer.{leaf}"] = value
        else:
            state[f"{pre}{name}"] = value
    if not targets and not token_indices and not save_modules and not biases and not head_changed:
        raise ValueError("the residual holds no change to export (every tensor equals the base).")
    for head in heads:
        # peft wraps a SEQ_CLS / TOKEN_CLS head ("classifier", "score") whole in modules_to_save and then expects
        # every tensor of it in the adapter: a LoRA inside it (RoBERTa's classifier.dense / out_proj) cannot load.
        subs = {e["module"] for e in spec.values() if e["kind"] != "alias" and _under(e["module"], [head])}
        for sub in sorted(subs):
            _save_whole(state, set(), res, spec, sub, {}, need_base)
        save_modules.add(head)
    cfg = LoraConfig(
        r=max(rank_pattern.values(), default=8),
        lora_alpha=max(rank_pattern.values(), default=8),
        target_modules=sorted(set(targets)) if targets else [],
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(rank_pattern),
        lora_dropout=0.0,
        fan_in_fan_out=conv1d_targets,
        bias="all" if biases else "none",
        modules_to_save=sorted(save_modules) or None,
        trainable_token_indices=token_indices or None,
        task_type=task_type,
        base_model_name_or_path=res.manifest["base"].get("name_or_path"),
    )
    out = Path(out)
    with atomic_directory(out) as tmp:
        cfg.save_pretrained(str(tmp))
        atomic_write_bytes(Path(tmp) / "adapter_model.safetensors", st_save(state, metadata={"format": "pt"}))
        atomic_write_bytes(Path(tmp) / CARD_NAME, residual_adapter_card(res, cfg).encode())
    return out


def _head_modules(spec: Mapping[str, Any], task_type: str | None) -> list[str]:
    """The classifier heads that peft wraps whole for ``task_type`` (outermost module named like a head)."""
    if task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        return []
    heads: set[str] = set()
    for e in spec.values():
        parts = (e.get("module") or "").split(".")
        for i, part in enumerate(parts):
            if part in _HEAD_NAMES:
                heads.add(".".join(parts[: i + 1]))
                break
    return sorted(heads)


def _under(mod: str, heads: Sequence[str]) -> bool:
    return any(mod == h or mod.startswith(h + ".") for h in heads)


def _save_whole(state, save_modules, res, spec, mod, given, need_base) -> None:
    """Put module ``mod`` in ``modules_to_save`` with all its direct tensors (stored, decoded or from the base)."""
    pre = "base_model.model."
    save_modules.add(mod)
    for name, e in spec.items():
        if e.get("kind") == "alias" or e.get("module") != mod:
            continue
        leaf = _module_of(name)[1]
        if leaf in given:
            value = given[leaf]
        elif e["kind"] == "exact":
            value = res.tensors[f"{name}:exact"]
        elif e["kind"] == "base":
            value = need_base(name, f"module '{mod}' goes to modules_to_save whole").to(_dtype_of(e["dtype"]))
        else:
            b = need_base(name, f"module '{mod}' goes to modules_to_save whole")
            value = (b.to(torch.float64) + res.delta(name, dtype=torch.float64).to(b.device)).to(_dtype_of(e["dtype"]))
        state[f"{pre}{name}"] = value.detach().cpu().contiguous()
