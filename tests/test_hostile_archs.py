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


@pytest.mark.filterwarnings("ignore::UserWarning")
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


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_int_rank_leaves_a_narrow_module_dense():
    """rank=8 for every target: Qwen2-MoE's 1 x 64 shared-expert gate cannot take rank 8 and no rank of it saves
    parameters, so it stays dense and is listed as skipped (was: 'Rank 8 ... out of range', the whole call refused)."""
    model = _qwen2_moe()
    report = hf_lowrank.compress_model(model, 8, progress=False)
    gates = [m for m in report.modules if m.name.endswith("shared_expert_gate")]
    assert len(gates) == 2 and all(m.skipped and m.rank is None for m in gates)
    assert all(r == 8 for r in report.ranks.values()) and len(report.ranks) == len(report.modules) - 2
    assert isinstance(model.get_submodule("model.layers.0.mlp.shared_expert_gate"), torch.nn.Linear)
    # a rank named for that module by a pattern key is still refused, with the module named
    with pytest.raises(ValueError, match="shared_expert_gate"):
        hf_lowrank.compress_model(_qwen2_moe(), rank_pattern={"shared_expert_gate": 8}, progress=False)


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
