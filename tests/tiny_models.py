"""The tiny models the tests build: one place for their configs, so that every test works on the same shapes.

Imported as ``from tiny_models import ...``: pytest puts ``tests/`` on ``sys.path`` (the folder has no
``__init__.py``), and scripts run from ``tests/`` (``distributed_worker.py``, the subprocess of
``test_crash_safe.py``) find it next to themselves or through ``PYTHONPATH``.

transformers is imported inside the functions, not at module level: ``conftest.py`` sets ``HF_HUB_OFFLINE`` before
transformers is first imported, and importing this module must not get ahead of that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import BertConfig, LlamaConfig, LlamaForCausalLM

TINY_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
"""Two layers of width 64 (4 heads, MLP 128) over a 128-token vocabulary: every Linear kind of the real model, small
enough for a CPU test. Shared by the decoder and the encoder below."""

TINY_LLAMA = dict(TINY_SHAPES, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
"""The tiny decoder: grouped-query attention (2 KV heads for 4 heads), untied embeddings."""

TINY_BERT = dict(TINY_SHAPES, max_position_embeddings=64)
"""The tiny encoder (MiniLM-style classifiers and bare encoders)."""


def make_tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A :class:`~transformers.LlamaConfig` with the :data:`TINY_LLAMA` shapes; ``overrides`` replace or add fields
    (e.g. ``tie_word_embeddings=True``). Named ``make_*`` so as not to clash with the ``tiny_llama_config`` fixture."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> LlamaForCausalLM:
    """A freshly initialised tiny :class:`~transformers.LlamaForCausalLM` in eval mode: the weights depend only on
    ``seed`` (the global torch RNG is seeded with it just before construction), ``overrides`` go to
    :func:`make_tiny_llama_config`."""
    from transformers import LlamaForCausalLM

    config = make_tiny_llama_config(**overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def make_tiny_bert_config(**overrides: Any) -> BertConfig:
    """A :class:`~transformers.BertConfig` with the :data:`TINY_BERT` shapes; ``overrides`` replace or add fields
    (e.g. ``num_labels=3``)."""
    from transformers import BertConfig

    return BertConfig(**{**TINY_BERT, **overrides})
