"""Shared fixtures: tiny models built from a config, and the offline SmolLM2 (session-scoped)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hf_lowrank  # noqa: E402,F401  (registers the PEFT types and the checkpoint format)

# Small LAPACK calls oversubscribe badly on 2-core machines (a 90x60 SVD went from 5 ms to 0.5 s with 2 threads
# under load); tests use one thread unless told otherwise.
torch.set_num_threads(int(os.environ.get("HF_LOWRANK_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def seed_all():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


@pytest.fixture
def tiny_llama(tiny_llama_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config).float().eval()


@pytest.fixture
def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).float().eval()


@pytest.fixture(scope="session")
def smollm2():
    from hf_lowrank.offline import load_smollm2

    model, tokenizer = load_smollm2()
    model.eval()
    return model, tokenizer
