"""Decoding: the fine-tuned model rebuilt from its base and a residual (verified against the base fingerprint)."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..._compat import model_from_config
from ..._deprecation import renamed_keywords
from .fingerprint import verified_base_tensors
from .format import EREResidual, ResidualError, _architecture_class, _as_residual, _compute_dtype, _dtype_of

__all__ = ["decode_residual", "load_residual"]

logger = logging.getLogger(__name__)


def _build_model(res: EREResidual, base_model: nn.Module) -> nn.Module:
    arch = res.manifest.get("architecture")
    cls = _architecture_class(res.manifest)
    if cls is None or res.config is None:
        raise ResidualError(
            f"The residual's architecture {arch!r} differs from the base model's {type(base_model).__name__!r} and "
            "cannot be rebuilt from a stored config. Pass a base model of the fine-tuned architecture "
            f"({arch}.from_pretrained(<base checkpoint>, ...))."
        )
    config = copy.deepcopy(res.config)
    dtype = _dtype_of(res.manifest["dtype"]) if res.manifest.get("dtype") else torch.float32
    model = model_from_config(cls, config, dtype=dtype)
    device = next((p.device for p in base_model.parameters()), torch.device("cpu"))
    return model.to(device)


def _copy_config(model: nn.Module, res: EREResidual) -> None:
    config, target = res.config, getattr(model, "config", None)
    if config is None or target is None:
        return
    for key in ("id2label", "label2id", "problem_type", "architectures"):
        if hasattr(config, key):
            setattr(target, key, copy.deepcopy(getattr(config, key)))


@renamed_keywords(in_place="inplace")
@torch.no_grad()
def decode_residual(
    base_model: nn.Module,
    path: str | os.PathLike | EREResidual,
    *,
    inplace: bool = False,
    stiefel: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Rebuild the fine-tuned model from its base and an ERE residual.

    Args:
        base_model: the base the residual was encoded against (verified by fingerprint). Either the fine-tuned
            architecture (then a deep copy of it is decoded, or the model itself with ``inplace=True``) or another
            architecture sharing the backbone (then the fine-tuned architecture is rebuilt from the stored
            ``config.json`` and filled from the base and the residual).
        path: the residual folder, or an :class:`EREResidual` in memory.
        inplace: decode into ``base_model`` itself (saves a copy; the base is modified). Only possible when it has
            the fine-tuned architecture and shapes.
        stiefel: project dequantized factors onto the Stiefel manifold (the ERE decoder; False only for ablations).
        progress: show a tqdm bar.

    Returns:
        The fine-tuned model, in eval mode.

    Raises:
        BaseMismatchError: the base differs from the encoding base. ResidualFormatError: a damaged residual.
    """
    res = _as_residual(path)
    spec = res.entries
    base_sd = base_model.state_dict()
    base_of = verified_base_tensors(res, base_model, base_sd)
    same = type(base_model).__name__ == res.manifest.get("architecture") and all(
        name in base_sd and list(base_sd[name].shape) == e["shape"] for name, e in spec.items() if e["kind"] != "alias"
    )
    if same:
        model = base_model if inplace else copy.deepcopy(base_model)
        fresh = False
    else:
        if inplace:
            logger.info("the base has another architecture than the residual: decoding into a new model")
        model = _build_model(res, base_model)
        fresh = True
    _copy_config(model, res)
    target = model.state_dict(keep_vars=True)
    done: dict[str, torch.Tensor] = {}
    names = [n for n, e in spec.items() if e["kind"] != "alias" and (fresh or e["kind"] != "base")]
    for name in tqdm(names, desc="ERE decode", unit="tensor", disable=not progress):
        e = spec[name]
        if name not in target:
            raise ResidualError(
                f"the model to decode into has no tensor '{name}'. Pass a base of class {res.manifest.get('architecture')}."
            )
        dest = target[name]
        dtype = _dtype_of(e["dtype"])
        if e["kind"] == "exact":
            value = res.tensors[f"{name}:exact"]
        elif e["kind"] == "base":
            value = base_of[name]
        else:
            b = base_of[name]
            cd = _compute_dtype(dtype, b.dtype)
            value = b.to(cd) + res.delta(name, stiefel=stiefel, dtype=cd).to(b.device)
        value = value.to(device=dest.device, dtype=dtype)
        if dest.dtype != dtype:
            dest.data = value.clone()
        else:
            dest.data.copy_(value)
        done[name] = dest
    for name, e in spec.items():
        if e["kind"] == "alias" and name in target and e["of"] in done:
            src, dest = done[e["of"]], target[name]
            if dest.data_ptr() != src.data_ptr():
                dest.data.copy_(src.data.to(dest.dtype))
    model.eval()
    return model


def load_residual(
    base_name_or_path: str | os.PathLike | nn.Module | None,
    path: str | os.PathLike,
    model_class: Any = None,
    *,
    progress: bool = True,
    **kwargs,
) -> nn.Module:
    """Load the base checkpoint and decode an ERE residual into it in place: the fine-tuned transformers model.

    Args:
        base_name_or_path: folder or Hub id of the base (the command line resolves ``"smollm2"`` / ``"minilm"``,
            the embedded offline models, before calling), a base model already in memory (then
            :func:`decode_residual` on a copy), or None for the base
            path recorded in the manifest.
        path: the residual folder.
        model_class: a transformers class or auto class; default the fine-tuned architecture recorded in the
            manifest (e.g. ``BertForSequenceClassification``).
        progress: show tqdm bars.
        **kwargs: passed to ``from_pretrained`` (``device_map``, ...). ``dtype`` defaults to the base dtype the
            residual was encoded against (the fingerprint includes it).

    Returns:
        The fine-tuned model, in eval mode.
    """
    res = _as_residual(path)
    if isinstance(base_name_or_path, nn.Module):
        return decode_residual(base_name_or_path, res, progress=progress)
    if base_name_or_path is None:
        base_name_or_path = res.manifest["base"].get("name_or_path")
        if not base_name_or_path:
            raise ValueError(
                "No base given and the residual's manifest records none: pass load_residual(<base folder>, path)."
            )
    import transformers

    if model_class is None:
        model_class = _architecture_class(res.manifest) or transformers.AutoModelForCausalLM
    if "dtype" not in kwargs and res.manifest["base"].get("dtype"):
        kwargs["dtype"] = _dtype_of(res.manifest["base"]["dtype"])
    if res.config is not None:
        kwargs.setdefault("config", res.config)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized" heads are expected: the residual holds them
    try:
        model = model_class.from_pretrained(str(base_name_or_path), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    return decode_residual(model, res, inplace=True, progress=progress)
