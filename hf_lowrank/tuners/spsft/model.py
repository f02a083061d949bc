"""SPSFT tuner (``BaseTuner``) and the export of an SPSFT adapter as a vanilla PEFT LoRA adapter."""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import get_quantization_kwargs
from torch import nn

from ..._compat import get_in_out_features
from ...io import atomic_directory, atomic_save_safetensors
from ...modules import is_conv1d
from ...targets import PEFT_PREFIX, all_linear_names, in_block, is_linear, module_matches, strip_peft_prefix
from .._tuner import KeepUnloadedModules, RefuseMixedBatches
from .config import SPSFTConfig
from .layer import Linear, SPSFTLayer

__all__ = ["SPSFTModel", "export_spsft_as_lora", "spsft_to_lora", "write_spsft_as_lora"]

_PEFT_WRAPPER_SEGMENT = re.compile(r"\.(?:original_module|modules_to_save\.[^.]+)(?=\.|$)")


class SPSFTModel(RefuseMixedBatches, KeepUnloadedModules, BaseTuner):
    """Injects SPSFT layers into a model (called by ``peft.get_peft_model`` with an :class:`SPSFTConfig`).

    Example::

        import hf_lowrank
        from peft import get_peft_model
        model = get_peft_model(base, hf_lowrank.SPSFTConfig(r=16, target_modules="all-linear"))
    """

    prefix: str = "spsft_"
    tuner_layer_cls = SPSFTLayer
    # No per-architecture defaults: target_modules=None means "all-linear" (see _prepare_adapter_config).
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: SPSFTConfig, model_config: dict) -> SPSFTConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        target = peft_config.target_modules
        if isinstance(target, (list, tuple, set, frozenset)):
            _check_names_exist(self.model, target)
        if isinstance(target, str) and target.lower() == "all-linear" and peft_config.layers_to_transform is not None:
            # peft matches fully spelled-out names before it looks at layers_to_transform, so expand 'all-linear'
            # into the leaf names of the Linear layers that live inside a numbered block instead.
            peft_config.target_modules = _block_linear_leaf_names(self.model, peft_config.task_type)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: SPSFTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        _, out_features = get_in_out_features(base)
        if out_features is None:
            raise TypeError(
                f"SPSFT supports torch.nn.Linear and GPT-2-style Conv1D layers, but '{current_key}' is a "
                f"{type(base).__name__}; remove it from target_modules."
            )
        r = peft_config.rows_for(out_features)
        if isinstance(target, Linear):
            target.update_layer(adapter_name, r, peft_config, module_name=current_key)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"'{current_key}' already holds a {type(target).__name__} adapter; SPSFT cannot wrap it.")
        if not is_linear(base):
            raise TypeError(
                f"SPSFT supports torch.nn.Linear layers (optionally bitsandbytes-quantized) and GPT-2-style Conv1D "
                f"layers, but '{current_key}' is a {type(base).__name__}; remove it from target_modules."
            )
        kwargs = get_quantization_kwargs(self.model)
        new_module = Linear(target, adapter_name, peft_config, r=r, module_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ merging
    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Merge ``W[idx] += W_f`` into every base weight and return the plain model.

        peft's ``BaseTuner.merge_and_unload`` does the walk (:meth:`SPSFTLayer.unload_and_optionally_merge_module`
        for each SPSFT layer; ``modules_to_save`` heads become their trained copies); this only adds ``dequantize``.

        Args:
            progressbar: show a progress bar.
            safe_merge: check the merged rows for inf/NaN before writing them.
            adapter_names: adapters to merge (default: the active ones).
            dequantize: for quantized (bitsandbytes) base layers, replace them with new dense ``nn.Linear`` layers
                holding ``dequantize(W) + M @ W_f``. Without it a quantized base raises
                :class:`~hf_lowrank.tuners.spsft.layer.QuantizedMergeError` (before anything is unloaded),
                because re-quantizing would round the fine-tuned rows away.
        """
        if not dequantize:
            for module in self.model.modules():
                if isinstance(module, Linear):
                    module._refuse_quantized_merge()
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)


def _check_names_exist(model: nn.Module, names) -> None:
    """Every listed target must name some module (peft's rule, :func:`hf_lowrank.targets.module_matches`).

    peft adapts whatever the list matches and ignores the rest, so a typo (``"v_porj"``) would silently leave that
    layer untrained; SPSFT refuses it instead. Names are read as in the base model: a module that peft already
    wrapped (``x.original_module.dense`` / ``x.modules_to_save.<adapter>.dense`` of a ``modules_to_save`` head, as
    when a second adapter is loaded) still answers to ``x.dense``, the name the resolved config of the first adapter
    saved for it. The names themselves are read the same way: peft's ``'all-linear'`` on a model whose head is
    already wrapped lists the wrapper's inner Linears (``x.original_module``, ``x.modules_to_save.<adapter>``, which
    it does not adapt) and saves them in the second adapter's config.
    """
    modules = [_PEFT_WRAPPER_SEGMENT.sub("", n) for n, _ in model.named_modules() if n]
    for entry in names:
        key = _PEFT_WRAPPER_SEGMENT.sub("", entry) if isinstance(entry, str) else entry
        if not any(module_matches(n, [key]) for n in modules):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
            raise ValueError(
                f"SPSFTConfig.target_modules names {entry!r}, but no module of the model is called so or ends with "
                f"'.{entry}'. Linear layer names here: {', '.join(leaves[:20])}. Fix the name, or use "
                "target_modules='all-linear'."
            )


def _block_linear_leaf_names(model: nn.Module, task_type=None) -> set[str]:
    """Leaf names (e.g. ``q_proj``) of peft's 'all-linear' layers inside repeated blocks (:func:`in_block`)."""
    names = {n.rsplit(".", 1)[-1] for n in all_linear_names(model, task_type) if in_block(n)}
    if not names:
        raise ValueError(
            "layers_to_transform with target_modules='all-linear' found no Linear layer inside a numbered block "
            "(a module path with a numeric index, e.g. model.layers.3.mlp.up_proj); pass target_modules as a list "
            "of names."
        )
    return names


# ---------------------------------------------------------------------- LoRA export
def spsft_to_lora(peft_model: nn.Module, adapter_name: str = "default") -> tuple[Any, dict[str, torch.Tensor]]:
    """The SPSFT adapter as an exactly equivalent LoRA: ``A = W_f (r, in)``, ``B`` one-hot ``(out, r)`` with
    ``B[idx[j], j] = 1``, ``lora_alpha = r`` (scaling 1), no dropout.

    On GPT-2-style ``Conv1D`` layers the LoRA config has ``fan_in_fan_out=True`` (peft's setting for a weight stored
    ``(in, out)``; ``lora_A`` / ``lora_B`` are the same, only peft's merge transposes the product).

    Args:
        peft_model: a ``PeftModel`` wrapping an SPSFT adapter.
        adapter_name: the SPSFT adapter to convert.

    Returns:
        ``(LoraConfig, state_dict)`` in the checkpoint format that ``PeftModel.from_pretrained`` reads (keys
        ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, plus any ``modules_to_save`` entries).
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, SPSFTConfig):
        raise ValueError(
            f"adapter '{adapter_name}' is not an SPSFT adapter (got {type(config).__name__}); pass the PeftModel "
            "returned by get_peft_model(model, SPSFTConfig(...)) and its adapter name."
        )
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, Linear) and adapter_name in m.spsft_weight}
    if not layers:
        raise ValueError(f"no SPSFT layer holds adapter '{adapter_name}'.")
    if any(m.merged for m in layers.values()):
        raise ValueError("unmerge the SPSFT adapter (model.unmerge_adapter()) before exporting it as LoRA.")
    ckpt = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d = False
    for name, module in layers.items():
        conv1d = conv1d or is_conv1d(module.get_base_layer())
        key = PEFT_PREFIX + strip_peft_prefix(name)
        w_key, i_key = f"{key}.spsft_weight", f"{key}.spsft_indices"
        if w_key not in ckpt or i_key not in ckpt:
            raise RuntimeError(f"the SPSFT checkpoint lacks {w_key} / {i_key}; cannot export.")
        w_f = ckpt.pop(w_key).detach().to("cpu").contiguous()
        idx = ckpt.pop(i_key).to("cpu", torch.int64)
        r = w_f.shape[0]
        one_hot = torch.zeros(module.out_features, r, dtype=w_f.dtype)
        one_hot[idx, torch.arange(r)] = 1.0
        state[f"{key}.lora_A.weight"] = w_f
        state[f"{key}.lora_B.weight"] = one_hot
        ranks[strip_peft_prefix(key)] = r
    leftovers = [k for k in ckpt if ".spsft_" in k]
    if leftovers:
        raise RuntimeError(f"unexpected SPSFT entries left after the conversion: {leftovers[:3]}")
    state.update({k: v.detach().to("cpu").contiguous() for k, v in ckpt.items()})  # modules_to_save etc.

    default_r = Counter(ranks.values()).most_common(1)[0][0]
    # Full module paths as targets (peft matches a name that equals or ends with a target); rank patterns are regexes
    # matched against the end of the module path, so the dots are escaped.
    pattern = {re.escape(name): r for name, r in ranks.items() if r != default_r}
    lora_config = LoraConfig(
        r=default_r,
        lora_alpha=default_r,
        lora_dropout=0.0,
        fan_in_fan_out=conv1d,
        bias="none",
        target_modules=sorted(ranks),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    return lora_config, state


def export_spsft_as_lora(peft_model: nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Deprecated: ``hf_lowrank.save_as_lora(out_dir, peft_model, adapter_name)`` (peft's argument order)."""
    warnings.warn("export_spsft_as_lora(model, out_dir, adapter_name) is deprecated; use hf_lowrank.save_as_lora("
                  "path, model, adapter_name) (peft's argument order).", DeprecationWarning, stacklevel=2)
    return write_spsft_as_lora(out_dir, peft_model, adapter_name)


def write_spsft_as_lora(path: str | os.PathLike, peft_model: nn.Module, adapter_name: str = "default") -> Path:
    """Write the SPSFT adapter as a vanilla PEFT LoRA adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, path)`` loads with identical outputs,
    without hf_lowrank. The implementation behind :func:`hf_lowrank.save_as_lora` for an SPSFT model.

    The folder is written atomically (:func:`hf_lowrank.io.atomic_directory`): files of an earlier save that are not
    part of an adapter (a tokenizer) are kept, an earlier adapter is replaced whole.

    Returns:
        ``path`` as a ``Path``.
    """
    lora_config, state = spsft_to_lora(peft_model, adapter_name)
    out = Path(path)
    with atomic_directory(out) as tmp:
        lora_config.save_pretrained(str(tmp))
        atomic_save_safetensors(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return out
