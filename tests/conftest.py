"""Shared fixtures: tiny models built from a config, and the offline SmolLM2 (session-scoped)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from testing_common import make_tiny_bert_config, make_tiny_llama_config  # noqa: E402

import hf_lowrank  # noqa: E402,F401  (registers the PEFT types and the checkpoint format)

# Small LAPACK calls oversubscribe badly on 2-core machines (a 90x60 SVD went from 5 ms to 0.5 s with 2 threads
# under load); tests use one thread unless told otherwise.
torch.set_num_threads(int(os.environ.get("HF_LOWRANK_TEST_THREADS", "1")))

# The hypothesis settings of the hostile-input suites (test_hostile_*.py, ``settings.get_profile("hostile")``):
# bounded and derandomized so that CI is deterministic and fast; no example database (nothing written to the tree).
# A deeper, randomized search: HF_LOWRANK_HOSTILE_EXAMPLES=500 python -m pytest tests/test_hostile_*.py
_HOSTILE_EXAMPLES = os.environ.get("HF_LOWRANK_HOSTILE_EXAMPLES")
settings.register_profile(
    "hostile",
    max_examples=int(_HOSTILE_EXAMPLES or 25),
    deadline=None,
    derandomize=_HOSTILE_EXAMPLES is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(autouse=True)
def seed_all():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_llama_config():
    """A fresh tiny Llama config per test (tests may edit it)."""
    return make_tiny_llama_config()


@pytest.fixture
def tiny_llama(tiny_llama_config):
    """The tiny Llama (seed 0, float32, eval) built on the test's ``tiny_llama_config`` object."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config).float().eval()


@pytest.fixture
def tiny_bert_classifier():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(make_tiny_bert_config(num_labels=3)).float().eval()


@pytest.fixture(scope="session")
def smollm2():
    from hf_lowrank.demo.models import load_smollm2

    model, tokenizer = load_smollm2()
    model.eval()
    return model, tokenizer
