"""Evaluation helpers: perplexity of a causal LM, accuracy of a sequence classifier.

Both work on any transformers model (and on peft-wrapped ones): they call ``model(input_ids=...,
attention_mask=...)`` and read ``.logits``. The model is put in eval mode for the call and its training mode is
restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration.inputs import (
    _check_positive,
    _check_texts,
    _pad_right,
    calibration_batches,  # noqa: F401  (still importable from here, its old room)
)

__all__ = ["ClassificationDataset", "accuracy", "perplexity", "token_nll"]


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def token_nll(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of ``texts`` under a causal LM, and the token count.

    Each text is tokenized on its own (with the tokenizer's special tokens, e.g. BOS) and truncated to
    ``max_length`` tokens; every token after the first is predicted from those before it. Batches are
    right-padded and padding is masked out, so the result does not depend on ``batch_size``.

    Args:
        model: a causal LM returning ``logits`` of shape (batch, seq, vocab).
        tokenizer: its tokenizer (called as ``tokenizer(text)["input_ids"]``).
        texts: the texts.
        max_length: tokens kept per text (>= 2).
        batch_size: texts per forward pass.
        progress: show a tqdm bar.

    Returns:
        ``(nll_sum, n_tokens)``.
    """
    texts = _check_texts(texts)
    _check_positive(max_length, "max_length", 2)
    _check_positive(batch_size, "batch_size")
    encoded = [list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"])[:max_length] for t in texts]
    n_tokens = sum(max(len(e) - 1, 0) for e in encoded)
    if n_tokens == 0:
        raise ValueError("no text has two or more tokens, so there is nothing to predict; pass longer texts")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    # Longest first: similar lengths share a batch (less padding), and memory peaks on the first batch.
    order = sorted((i for i, e in enumerate(encoded) if len(e) >= 2), key=lambda i: -len(encoded[i]))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        bar = tqdm(total=len(order), desc="perplexity", unit="text", disable=not progress)
        for start in range(0, len(order), batch_size):
            chunk = [encoded[i] for i in order[start : start + batch_size]]
            ids, mask = _pad_right(chunk, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            targets = ids[:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view_as(targets)
            total += (nll * mask[:, 1:]).sum(dtype=torch.float64).item()
            bar.update(len(chunk))
        bar.close()
    finally:
        model.train(was_training)
    return total, n_tokens


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Token-weighted perplexity of a causal LM on ``texts``: ``exp(sum of token NLL / number of tokens)``.

    See :func:`token_nll` for tokenization, truncation and padding. Works for peft-wrapped models.

    Args:
        model: a causal LM (``...ForCausalLM`` or a ``PeftModel`` around one).
        tokenizer: its tokenizer.
        texts: the texts (each needs at least two tokens to count).
        max_length: tokens kept per text.
        batch_size: texts per forward pass.
        progress: show a tqdm bar.

    Returns:
        The perplexity (>= 1).
    """
    nll, count = token_nll(model, tokenizer, texts, max_length=max_length, batch_size=batch_size, progress=progress)
    return math.exp(nll / count)


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = True,
) -> float:
    """Fraction of ``texts`` a sequence classifier labels correctly (argmax of ``logits``).

    Args:
        model: a sequence classifier returning ``logits`` of shape (batch, num_labels).
        tokenizer: its tokenizer; it must have a pad token.
        texts: the texts.
        labels: the true class index of each text.
        batch_size: texts per forward pass.
        max_length: tokens kept per text.
        progress: show a tqdm bar.

    Returns:
        Accuracy in [0, 1].
    """
    texts = _check_texts(texts)
    labels = [int(x) for x in labels]
    if len(labels) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels; pass one label per text")
    _check_positive(batch_size, "batch_size")
    _check_positive(max_length, "max_length")
    if tokenizer.pad_token is None:
        raise ValueError(
            "the tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        bar = tqdm(total=len(texts), desc="accuracy", unit="text", disable=not progress)
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits
            if logits.dim() != 2:
                raise ValueError(
                    f"expected classifier logits of shape (batch, num_labels), got {tuple(logits.shape)}; "
                    "pass a sequence-classification model"
                )
            gold = torch.as_tensor(labels[start : start + batch_size], device=logits.device)
            correct += int((logits.argmax(dim=-1) == gold).sum().item())
            bar.update(len(gold))
        bar.close()
    finally:
        model.train(was_training)
    return correct / len(texts)


class ClassificationDataset(torch.utils.data.Dataset):
    """Texts and integer labels, tokenized once, as a ``Trainer`` train/eval dataset (pad with a data collator).

    Args:
        tokenizer: the model's tokenizer.
        texts: one text per example.
        labels: one class index per text.
        max_length: tokens kept per text.
    """

    def __init__(self, tokenizer, texts: Sequence[str], labels: Sequence[int], *, max_length: int = 128) -> None:
        texts = _check_texts(texts, "texts")
        if len(labels) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(labels)} labels; pass one label per text.")
        _check_positive(max_length, "max_length", 2)
        self.enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}
