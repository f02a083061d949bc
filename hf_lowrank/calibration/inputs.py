"""Calibration batches as a model's forward arguments: what a user passes, made usable or refused with the fix.

A calibration set is an iterable of dicts with ``input_ids`` (a tokenizer's output, a ``DataLoader`` over such
dicts, or :func:`calibration_batches` of a tokenizer and texts); one dict alone is one batch. :func:`_batch_inputs` moves a batch to the model's device as forward kwargs:
1-D ``input_ids`` become a batch of one, integer labels int64, tensors made under ``torch.inference_mode()``
ordinary tensors; an encoder-decoder keeps its ``labels`` (it builds its decoder inputs from them).
:func:`_language_model_labels` gives a causal language model its next-token labels. :func:`check_model_ready`
refuses a model whose weights are on the meta device, or a call inside ``torch.inference_mode()``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["as_batches", "calibration_batches", "check_model_ready", "is_causal_lm"]


def check_model_ready(model: nn.Module) -> None:
    """Refuse, with the fix, a model that calibration or compression cannot run: weights on the meta device (no
    values to factorize) or a call inside ``torch.inference_mode()`` (its tensors cannot be used by autograd, which
    the Gram hooks and the Kronecker backward pass need, and factors made there cannot be trained later)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "hf-lowrank was called inside torch.inference_mode(): tensors made there cannot take part in autograd "
            "(the calibration hooks and backward pass) and factors made there could never be trained. Call it "
            "outside the inference_mode block (torch.no_grad() is fine)."
        )
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(
            f"{type(model).__name__} has weights on the meta device (e.g. '{meta}'): it was built without its "
            "weights (init_empty_weights, torch.device('meta'), device_map='meta'), so there is nothing to "
            "compress. Load the weights first (from_pretrained on a real device, or to_empty() and "
            "load_state_dict())."
        )


def as_batches(calibration) -> Iterable:
    """``calibration`` as an iterable of batches: one batch (a dict, or a tokenizer's ``BatchEncoding``) is taken as
    a list of that one batch; a bare tensor or string is refused with what to pass instead."""
    if isinstance(calibration, Mapping):
        return [calibration]
    if isinstance(calibration, (torch.Tensor, str, bytes)):
        raise ValueError(
            f"calibration must be an iterable of batches (dicts with 'input_ids'), got a {type(calibration).__name__}"
            ". Pass e.g. [{'input_ids': ids}] or hf_lowrank.calibration_batches(tokenizer, texts)."
        )
    return calibration


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _batch_inputs(batch, device, model: nn.Module, *, labels: bool = False) -> dict:
    """A calibration batch as forward kwargs on ``device`` (no KV cache; ``labels`` kept only when asked, or when an
    encoder-decoder needs them to build its decoder inputs).

    1-D ``input_ids`` are one sequence: it and the batch's tensors of its shape become a batch of one (a 0-d label,
    that sequence's class). Integer labels become int64 (the dtype of the loss functions' targets). Tensors made under
    ``torch.inference_mode()`` are copied into ordinary tensors (autograd may save them for the backward pass).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "Each calibration batch must be a dict with 'input_ids' (and optionally 'attention_mask'), e.g. a "
            f"tokenizer's output or a DataLoader over such dicts; got {type(batch).__name__}."
        )
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.ndim == 0 or ids.is_floating_point():
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(
            f"A calibration batch's 'input_ids' must be an integer tensor of shape (batch, sequence) (or one "
            f"sequence), got {shape}. Tokenize with return_tensors='pt'."
        )
    if _is_encoder_decoder(model) and not any(k in batch for k in ("labels", "decoder_input_ids",
                                                                     "decoder_inputs_embeds")):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model: each calibration batch needs the decoder's side "
            "too, as 'labels' (the target token ids, from which it builds its decoder inputs) or "
            "'decoder_input_ids'."
        )
    keep_labels = labels or (_is_encoder_decoder(model) and "decoder_input_ids" not in batch)
    inputs = {}
    for key, value in batch.items():
        if key == "labels" and not keep_labels:
            continue
        if isinstance(value, torch.Tensor):
            if value.is_inference():
                value = value.clone()
            if ids.ndim == 1 and (value.shape == ids.shape or (key == "labels" and value.ndim == 0)):
                value = value.reshape(1, *value.shape) if value.ndim else value.reshape(1)
            if key == "labels" and not value.is_floating_point() and value.dtype != torch.long:
                value = value.long()
            value = value.to(device)
        inputs[key] = value
    if hasattr(getattr(model, "config", None), "use_cache"):
        inputs["use_cache"] = False
    return inputs


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (a class of transformers' ``AutoModelForCausalLM`` mapping, or
    named ``*ForCausalLM``): its loss on calibration text needs no labels but the text."""
    name = type(model).__name__
    return name in _causal_lm_class_names() or name.endswith("ForCausalLM")


@functools.cache
def _causal_lm_class_names() -> frozenset[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers without the auto mapping
        return frozenset()
    return frozenset(n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v))


def _language_model_labels(model: nn.Module, inputs: dict) -> None:
    """Give ``inputs`` next-token labels (padded positions ignored) when it has none, or say what is missing."""
    if "labels" in inputs:
        return
    if not is_causal_lm(model):
        raise ValueError(
            "calibration_weighting='kronecker' weighs by the gradients of the model's loss on the calibration data, "
            f"and {type(model).__name__} is not a causal language model whose labels are its input_ids: pass "
            "batches with 'labels' (e.g. class labels for a classifier), or use calibration_weighting='whitened'."
        )
    labels = inputs["input_ids"].long()  # a copy (int64 targets; int32 ids would fail in the loss)
    if labels.data_ptr() == inputs["input_ids"].data_ptr():
        labels = labels.clone()
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
        labels[mask == 0] = -100
    inputs["labels"] = labels


def _check_texts(texts: Sequence[str], name: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of strings, not one string; wrap it: [{name}]")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty; pass at least one string")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{name}[{bad[0]}] is {type(texts[bad[0]]).__name__}, not str; pass strings only")
    return texts


def _check_positive(value: int, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to a (batch, max_len) id tensor and its 0/1 attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def calibration_batches(
    tokenizer, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``texts`` into right-padded ``{"input_ids", "attention_mask"}`` batches for calibration.

    What ``compress_model(..., calibration=...)`` and ``hf-lowrank compress --calibration`` take; any iterable of
    such dicts (a ``DataLoader``) works as well.

    Args:
        tokenizer: the model's tokenizer.
        texts: calibration texts (ideally from the task's domain, disjoint from evaluation texts).
        max_length: tokens kept per text.
        batch_size: texts per batch.
    """
    texts = _check_texts(texts, "texts")
    _check_positive(max_length, "max_length", 2)
    _check_positive(batch_size, "batch_size")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts]
    seqs = [s for s in seqs if s]
    batches = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = _pad_right(seqs[start : start + batch_size], pad_id)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
