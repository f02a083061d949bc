"""SPSFT vs LoRA on a CUDA GPU: peak training memory above the frozen model and step time, side by side.

The GPU counterpart of ``benchmarks/spsft.py`` (which measures on the CPU with a tensor-storage meter): here the
figures come from the CUDA caching allocator (``torch.cuda.max_memory_allocated``), as in the seed's Table 6/7.
For each model shape, target set and method the base model is built fresh, then

- ``model``: bytes allocated by the frozen model;
- ``infer``: peak of one no-grad forward pass above ``model`` (the seed subtracts "inference with the pre-trained
  model");
- ``mem``: peak of training steps above ``model`` (adapter weights, gradients, AdamW state, activations saved for
  backward, logits): the seed's "mem" is total minus model;
- ``step_ms``: median of the timed steps (forward, backward, AdamW step), CUDA-synchronised.

Methods at matched trainable parameters: SPSFT r=2k rows vs LoRA r=k (alpha 16) with dropout 0.1 (the seed's LoRA)
and dropout 0 (peft's default). Shapes are built from configs with random weights (memory and time do not depend on
the values; no download): SmolLM2-135M, TinyLlama-1.1B and Llama-2-7B (the seed's model). ``--bits 4`` puts the
frozen base in bitsandbytes NF4 (QLoRA-style; the shape is saved to a temporary folder and reloaded quantized).

Usage: ``python benchmarks/spsft_gpu.py [--shapes smollm2-135m llama2-7b] [--bits 16 4]``. Prints one JSON object.
"""

from __future__ import annotations

import json

# benchmarks/ is on sys.path when a script there runs
from gpu_common import bases_for, measure, parser_with_common_args, record, start

TARGETS = {"all_linear": "all-linear", "mlp_only": ["gate_proj", "up_proj", "down_proj"]}
METHODS = ("spsft", "lora_dropout0.1", "lora_dropout0")


def _wrapper(method: str, targets, k: int):
    def wrap(model):
        from peft import LoraConfig, get_peft_model

        from hf_lowrank import SPSFTConfig

        if method == "spsft":
            config = SPSFTConfig(r=2 * k, target_modules=targets)
        else:
            config = LoraConfig(r=k, lora_alpha=16, lora_dropout=0.1 if method == "lora_dropout0.1" else 0.0,
                                target_modules=targets)
        return get_peft_model(model, config), None

    return wrap


def main(argv=None) -> None:
    parser = parser_with_common_args(__doc__, k=8, k_help="LoRA rank k; SPSFT uses r=2k rows")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    args = parser.parse_args(argv)
    result = start("spsft_gpu", args, "spsft")
    for shape, bits, bases, ids in bases_for(args):
        for name in args.targets:
            rows = {m: measure(bases, _wrapper(m, TARGETS[name], args.k), ids, args.steps) for m in METHODS}
            summary = {
                f"{fig}_vs_{m}": round(rows["spsft"][fig] / rows[m][fig], 3)
                for m in METHODS[1:] for fig in ("mem_mib", "step_ms")
            }
            record(result, f"{shape}/{bits}bit/{name}", rows, summary)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
