"""Tiny compressed checkpoints and greedy generation with transformers and with vLLM, for the vLLM plugin tests.

Run as a script (``python tests_vllm/parity.py llama /tmp/out``) it builds, compresses and saves one tiny model, then
prints both engines' tokens: the tests call the same functions.
"""

from __future__ import annotations

import json
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


def transformers_greedy(folder, token_prompts, new_tokens: int = NEW_TOKENS):
    """Greedy continuation of each prompt by the checkpoint reloaded in transformers (float32, no end-of-sequence
    stop): ``(tokens, logprobs)``, the log-probability of each chosen token under the raw logits."""
    from hf_lowrank import load_compressed

    model = load_compressed(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens, logprobs = [], []
    with torch.no_grad():
        for ids in token_prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            new = gen.sequences[0, len(ids):]
            tokens.append(new.tolist())
            logprobs.append([torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(gen.logits, new)])
    return tokens, logprobs


def vllm_engine(folder, **kwargs):
    from vllm import LLM

    options = dict(dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0)
    if not (Path(folder) / "tokenizer_config.json").exists():
        options["skip_tokenizer_init"] = True
    options.update(kwargs)
    return LLM(model=str(folder), **options)


def vllm_greedy(llm, token_prompts, new_tokens: int = NEW_TOKENS):
    """Greedy continuation by vLLM: ``(tokens, logprobs)`` as :func:`transformers_greedy` returns them."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, toks)] for o, toks in zip(outputs, tokens)]
    return tokens, logprobs


def smollm2_folder(folder, *, default: bool = False, texts: int = 16, max_length: int = 128) -> Path:
    """The offline SmolLM2-135M compressed to 0.8 of its block Linears' parameters with global rank allocation (dense
    and factorized shards mixed inside vLLM's fused layers), saved with its tokenizer.

    ``default=True`` is ``compress_model``'s default (``calibration=batches``: Kronecker weighting, global
    allocation); its per-module Gram decompositions take about ten minutes on two CPU cores, too long for CI, so the
    tests use plain SVD with ``allocation="global"`` and the default is run by hand
    (``python tests_vllm/parity.py smollm2-default DIR``).
    """
    from hf_lowrank import calibration_batches, compress_model, save_compressed
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.models import load_smollm2

    model, tok = load_smollm2()
    if default:
        batches = calibration_batches(tok, wordnet.prose_texts("train", n=texts), max_length=max_length)
        report = compress_model(model, 0.8, calibration=batches, progress=False)
    else:
        report = compress_model(model, 0.8, allocation="global", target_modules=SMOLLM2_CI_TARGETS, progress=False)
    save_compressed(model, folder, tokenizer=tok, report=report)
    return Path(folder)


SMOLLM2_CI_TARGETS = r"model\.layers\.[0-5]\.(self_attn|mlp)\.\w+_proj"

SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
                   "Water boils at"]


def check(arch: str, folder: str, tp: int = 1) -> dict:
    """Build ``arch``'s compressed checkpoint in ``folder`` and compare the two engines; a JSON-able report."""
    import time

    t0 = time.perf_counter()
    if arch in ("smollm2", "smollm2-default"):
        from transformers import AutoTokenizer

        smollm2_folder(folder, default=arch == "smollm2-default")
        tok = AutoTokenizer.from_pretrained(folder)
        ps = [tok(p).input_ids for p in SMOLLM2_PROMPTS]
    else:
        compressed_folder(arch, folder)
        ps = prompts(SHAPES["vocab_size"])
    config = json.loads((Path(folder) / "config.json").read_text())
    ranks = config["quantization_config"]["ranks"]
    t1 = time.perf_counter()
    ref, ref_lp = transformers_greedy(folder, ps)
    t2 = time.perf_counter()
    got, got_lp = vllm_greedy(vllm_engine(folder, tensor_parallel_size=tp), ps)
    t3 = time.perf_counter()
    gap = max(abs(a - b) for ra, rb in zip(ref_lp, got_lp) for a, b in zip(ra, rb)) if ref == got else None
    return {"arch": arch, "tp": tp, "prompts": len(ps), "new_tokens": NEW_TOKENS, "factorized_modules": len(ranks),
            "equal": ref == got, "max_logprob_diff": gap,
            "seconds": {"compress_and_save": round(t1 - t0, 1), "transformers": round(t2 - t1, 1),
                        "vllm": round(t3 - t2, 1)}, "transformers": ref, "vllm": got}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("arch")
    parser.add_argument("folder")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args()
    result = check(args.arch, args.folder, args.tp)
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    for r, g in zip(result["transformers"], result["vllm"]):
        print("OK  " if r == g else "DIFF", r[:10], g[:10])
    print({k: v for k, v in result.items() if k not in ("transformers", "vllm")})
    sys.exit(0 if result["equal"] else 1)
