"""What the tests share: the tiny models they build (one place for their configs, so that every test works on the
same shapes), snapshots of a model's state, and hand-edits of safetensors headers.

Imported as ``from testing_common import ...``: pytest puts ``tests/`` on ``sys.path`` (the folder has no
``__init__.py``), and scripts run from ``tests/`` (``distributed_worker.py``, the subprocess of
``test_crash_safe.py``) find it next to themselves or through ``PYTHONPATH``. ``tiny_models.py`` re-exports the model
builders under their old module name.

transformers is imported inside the functions, not at module level: ``conftest.py`` sets ``HF_HUB_OFFLINE`` before
transformers is first imported, and importing this module must not get ahead of that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import (
        BertConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedModel,
        RobertaForSequenceClassification,
    )

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



def make_finetuned_copy(base: torch.nn.Module, seed: int = 1, scale: float = 0.02) -> torch.nn.Module:
    """A deep copy of ``base`` standing in for a full fine-tune of it: every matrix moved by ``scale`` times seeded
    Gaussian noise (what ERE encodes as a residual)."""
    import copy

    ft = copy.deepcopy(base)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in ft.parameters():
            if p.ndim == 2:
                p += scale * torch.randn(p.shape, generator=g)
    return ft

def make_tiny_bert_config(**overrides: Any) -> BertConfig:
    """A :class:`~transformers.BertConfig` with the :data:`TINY_BERT` shapes; ``overrides`` replace or add fields
    (e.g. ``num_labels=3``)."""
    from transformers import BertConfig

    return BertConfig(**{**TINY_BERT, **overrides})


TINY_ROBERTA = dict(TINY_SHAPES, max_position_embeddings=72, pad_token_id=1, num_labels=3)
"""The tiny RoBERTa classifier: its head is the two-layer ``RobertaClassificationHead`` (``classifier.dense`` +
``classifier.out_proj``), not a single Linear like BERT's. Positions start after ``pad_token_id``, hence 72."""


def make_tiny_roberta_classifier(seed: int = 0, **overrides: Any) -> RobertaForSequenceClassification:
    """A freshly initialised tiny :class:`~transformers.RobertaForSequenceClassification` (3 labels) in eval mode,
    weights from ``seed``; ``overrides`` replace or add :class:`~transformers.RobertaConfig` fields."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    return RobertaForSequenceClassification(RobertaConfig(**{**TINY_ROBERTA, **overrides})).float().eval()


TINY_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
"""The tiny GPT-2: its attention and MLP projections are ``transformers.pytorch_utils.Conv1D`` layers (weight stored
``(in, out)``), not ``nn.Linear``; tied embeddings."""


def make_tiny_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """One tiny model per architecture family of the PEFT contract matrix, in eval mode, weights from ``seed``.

    ``kind``: ``"llama"`` (GQA decoder), ``"qwen2"`` (biased q/k/v), ``"phi3"`` (fused ``qkv_proj`` and
    ``gate_up_proj``), ``"t5"`` (encoder-decoder, ``wi``/``wo``), ``"roberta_cls"`` (two-layer classifier head),
    ``"bert_cls"`` (single Linear classifier head), ``"gpt2"`` (GPT-2: :data:`TINY_GPT2`, ``Conv1D`` layers),
    ``"gpt2_cls"`` (the same GPT-2 with a bias-free ``score`` head read at the last non-pad token, three labels).
    """
    import transformers

    configs = {
        "llama": ("LlamaForCausalLM", "LlamaConfig", TINY_LLAMA),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", TINY_LLAMA),
        "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(TINY_LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "t5": (
            "T5ForConditionalGeneration",
            "T5Config",
            dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0),
        ),
        "roberta_cls": ("RobertaForSequenceClassification", "RobertaConfig", TINY_ROBERTA),
        "bert_cls": ("BertForSequenceClassification", "BertConfig", dict(TINY_BERT, num_labels=3)),
        "gpt2": ("GPT2LMHeadModel", "GPT2Config", TINY_GPT2),
        "gpt2_cls": ("GPT2ForSequenceClassification", "GPT2Config", dict(TINY_GPT2, num_labels=3, pad_token_id=0)),
    }
    if kind not in configs:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {sorted(configs)}.")
    model_cls, config_cls, fields = configs[kind]
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).float().eval()


TINY_MLP = ["gate_proj", "up_proj", "down_proj"]
"""The tiny Llama's MLP projections: the FisherLoRA tests' targets."""

TINY_FISHER_LORA = dict(
    r=4, lora_alpha=8, target_modules=TINY_MLP, init_lora_weights=False, compress_rank=8, fisher_weighting="two_sided"
)
"""The FisherLoRA adapter of the Fisher and trainer tests: random (not zero) B so that the adapter is not a no-op,
compression to rank 8, the diagonal two-sided Fisher weighting (the Kronecker one: ``test_data_aware.py``)."""


def make_tiny_fisher_lora(model: PreTrainedModel, **overrides: Any) -> PeftModel:
    """``get_peft_model(model, FisherLoRAConfig(**TINY_FISHER_LORA))``, ``overrides`` replacing or adding config
    fields; the random LoRA init is drawn after seeding the global torch RNG with 1."""
    from peft import get_peft_model

    from hf_lowrank import FisherLoRAConfig

    torch.manual_seed(1)
    return get_peft_model(model, FisherLoRAConfig(**{**TINY_FISHER_LORA, **overrides}))


def write_safetensors_header(path, header: dict) -> None:
    """Replace the JSON header of a safetensors file in place (tests of hand-edited checkpoints)."""
    import json
    from pathlib import Path

    path = Path(path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


class CallCounter:
    """Wraps a real function and counts its calls (the function still runs): put it in place with monkeypatch."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def snapshot_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor of ``model.state_dict()``, to compare with after an operation that failed."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """``model``'s state is exactly ``before`` (a :func:`snapshot_state`): the same keys, bit-identical values."""
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)


def read_safetensors_header(path) -> dict:
    """The JSON header of a safetensors file (tests that edit it with :func:`write_safetensors_header`)."""
    import json
    from pathlib import Path

    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def mlp_fisher_lora(model: PreTrainedModel, **overrides: Any) -> PeftModel:
    """FisherLoRA r=4 on the MLP Linears with random B, compression to rank 8 and the config's default Fisher
    weighting (:data:`TINY_FISHER_LORA` pins the two-sided one); the LoRA init is drawn after seeding with 1."""
    from peft import get_peft_model

    from hf_lowrank import FisherLoRAConfig

    torch.manual_seed(1)
    config = dict(r=4, lora_alpha=8, target_modules=TINY_MLP, init_lora_weights=False, compress_rank=8)
    return get_peft_model(model, FisherLoRAConfig(**{**config, **overrides}))


def collect_lora_fisher(peft_model: PeftModel, n: int = 2):
    """A :class:`~hf_lowrank.tuners.fisher_lora.FisherCollector` over ``n`` backward passes of random tokens
    (gradients cleared afterwards, the model left in eval mode)."""
    from hf_lowrank.tuners.fisher_lora import FisherCollector

    collector = FisherCollector("lora").attach(peft_model)
    peft_model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randint(0, 128, (2, 12), generator=g)
        peft_model(input_ids=x, labels=x).loss.backward()
    peft_model.zero_grad(set_to_none=True)
    collector.detach()
    peft_model.eval()
    return collector
