"""Tiny compressed checkpoints and greedy generation with transformers and with vLLM, for the vLLM plugin tests.

Run as a script (``python tests_vllm/parity.py llama /tmp/out``) it builds, compresses and saves one tiny model, then
prints both engines' tokens: the tests call the same functions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# vLLM's CPU backend: a small KV cache, no thread pinning (the machine is shared), the engine in this process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEW_TOKENS = 32
# vLLM's CPU attention supports head sizes 32, 64, 80, ...: width 128 over 4 heads.
SHAPES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Per-module ranks: different in every module, and some modules (whole or one shard of a fused vLLM layer) dense.
SPLIT_RANKS = {
    "model.layers.0.self_attn.q_proj": 24, "model.layers.0.self_attn.k_proj": 16,
    "model.layers.0.self_attn.o_proj": 40, "model.layers.0.mlp.gate_proj": 32, "model.layers.0.mlp.down_proj": 48,
    "model.layers.1.self_attn.k_proj": 8, "model.layers.1.self_attn.v_proj": 20, "model.layers.1.mlp.gate_proj": 56,
    "model.layers.1.mlp.up_proj": 12, "model.layers.1.mlp.down_proj": 28,
}
# Phi-3 stores qkv_proj and gate_up_proj fused: one rank per fused module.
FUSED_RANKS = {
    "model.layers.0.self_attn.qkv_proj": 36, "model.layers.0.mlp.gate_up_proj": 44,
    "model.layers.1.self_attn.o_proj": 20, "model.layers.1.mlp.down_proj": 52,
}


def tiny_model(arch: str, seed: int = 0):
    """A freshly initialised tiny causal LM of ``arch`` (``llama``, ``mistral``, ``qwen2``, ``phi3``), float32."""
    import transformers

    kwargs = dict(SHAPES, initializer_range=0.1)
    if arch == "llama":  # SmolLM2-shaped: tied embeddings
        config = transformers.LlamaConfig(**kwargs, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(**kwargs, sliding_window=None, tie_word_embeddings=False)
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":  # q/k/v biases
        config = transformers.Qwen2Config(**kwargs, tie_word_embeddings=False, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "phi3":  # fused qkv_proj / gate_up_proj in the checkpoint
        config = transformers.Phi3Config(**kwargs, sliding_window=None, tie_word_embeddings=False)
        cls = transformers.Phi3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    if arch == "qwen2":  # biases are zero-initialised: give them values so that a dropped bias shows
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.1)
    return model


def compressed_folder(arch: str, folder: str | os.PathLike) -> Path:
    """Compress :func:`tiny_model` with per-module ranks (some modules dense) and save it to ``folder``."""
    from hf_lowrank import compress_model, save_compressed

    model = tiny_model(arch)
    ranks = FUSED_RANKS if arch == "phi3" else SPLIT_RANKS
    report = compress_model(model, dict(ranks), progress=False)
    factorized = {n for n, m in model.named_modules() if type(m).__name__ == "LowRankLinear"}
    assert factorized == set(ranks), (sorted(factorized), report)
    return save_compressed(model, folder)


def prompts(vocab: int, lengths=(5, 11, 17, 3), seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def transformers_greedy(folder, token_prompts, new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy continuation of each prompt by the checkpoint reloaded in transformers (float32, eos ignored)."""
    from hf_lowrank import load_compressed

    model = load_compressed(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for ids in token_prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


def vllm_engine(folder, **kwargs):
    from vllm import LLM

    options = dict(dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=128,
                   max_num_seqs=4, seed=0)
    options.update(kwargs)
    return LLM(model=str(folder), **options)


def vllm_greedy(llm, token_prompts, new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


if __name__ == "__main__":
    arch, folder = sys.argv[1], sys.argv[2]
    compressed_folder(arch, folder)
    ps = prompts(SHAPES["vocab_size"])
    ref = transformers_greedy(folder, ps)
    got = vllm_greedy(vllm_engine(folder), ps)
    for r, g in zip(ref, got):
        print("OK  " if r == g else "DIFF", r[:12], g[:12])
    sys.exit(0 if ref == got else 1)
