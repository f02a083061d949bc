"""Hostile inputs on architectures beyond Llama: tiny GPT-2 (Conv1D), Bloom (fused QKV with biases) and Qwen2-MoE
(a 1 x 64 shared-expert gate) built from configs, each compressed the documented way and checked for a silent
wrong result."""

from __future__ import annotations

import pytest
import torch

import hf_lowrank
from hf_lowrank import LowRankLinear


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)).eval()


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64, max_position_embeddings=64)
    return Qwen2MoeForCausalLM(config).eval()


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (2, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 15).reshape(1, 12)).logits


def test_keep_one_keeps_every_module_exact_with_uniform_ranks():
    """keep=1.0 keeps every parameter: the global allocation keeps every module dense, so the uniform one must too,
    not swap in rank-48 pairs of a 64 x 256 Conv1D (lossy at 94% of its parameters; the logits moved by 0.16)."""
    model = _gpt2()
    ref = _logits(model)
    report = hf_lowrank.compress_model(model, 1.0, progress=False)
    assert report.info["allocation"] == "uniform"
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert report.ranks == {} and report.kept_fraction == 1.0
    assert all(m.skipped for m in report.modules)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="factorized no module.*keep fraction"):
        hf_lowrank.compress_model(_gpt2(), 1.0, progress=False)


def test_one_int_rank_too_large_for_a_narrow_module_names_the_fix():
    """rank=8 for every target of Qwen2-MoE: its 1 x 64 shared-expert gate cannot take it. The refusal names the
    module and how to go on (target_modules=, rank_pattern= for that module, or a keep fraction), and the model is
    left untouched."""
    model = _qwen2_moe()
    ref = _logits(model)
    with pytest.raises(ValueError, match="shared_expert_gate") as err:
        hf_lowrank.compress_model(model, 8, progress=False)
    assert "target_modules=" in str(err.value) and "rank_pattern={'shared_expert_gate': 1}" in str(err.value)
    assert "keep fraction" in str(err.value)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


def test_compressing_a_compressed_mixture_of_experts_again_is_not_silent():
    """Qwen2-MoE compressed once keeps its 1-row router gates dense, so the 'already compressed' refusal (no dense
    Linear left) does not fire on a second call: it factorized nothing and said nothing. Now a warning names the
    earlier compression and the fix, and the model is unchanged."""
    model = _qwen2_moe()
    with pytest.warns(UserWarning):
        hf_lowrank.compress_model(model, 0.8, progress=False)
    ref = _logits(model)
    with pytest.warns(UserWarning, match=r"factorized no module.*already holds 14 LowRankLinear.*decompress_model"):
        report = hf_lowrank.compress_model(model, 0.8, progress=False)
    assert report.ranks == {}
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_frozen_model_stays_frozen_after_compression():
    """A frozen Bloom (fused QKV with biases) in train mode: its factor layers take the frozen state of the layers
    they replace (they were trainable, so a later Trainer would silently train them), and the mode is kept."""
    model = _bloom().train()
    model.requires_grad_(False)
    hf_lowrank.compress_model(model, 0.8, calibration=_batches(), progress=False)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(m.training for m in layers)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    # a trainable model's factors stay trainable
    model = _bloom()
    hf_lowrank.compress_model(model, 0.8, progress=False)
    assert all(p.requires_grad for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters())


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def test_uniform_keep_the_ranks_cannot_reach_is_said():
    """Uniform keep 0.8 on 64-wide attention (ranks in multiples of 8) keeps 0.75: said with the figure and the fix,
    not only in report.kept_fraction; rank_multiple=1 reaches the budget and says nothing."""
    model = _mixtral()
    with pytest.warns(UserWarning, match=r"keep=0.8 asked, 0\.7\d+ of the target parameters kept.*rank_multiple=1"):
        report = hf_lowrank.compress_model(model, 0.8, allocation="uniform", progress=False)
    assert abs(report.kept_fraction - 0.8) > 0.02
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = hf_lowrank.compress_model(_mixtral(), 0.8, allocation="uniform", rank_multiple=1, progress=False)
    assert abs(report.kept_fraction - 0.8) <= 0.02
    assert not [w for w in caught if "asked" in str(w.message)]
