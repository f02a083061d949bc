"""FisherLoRA on a CUDA GPU: what collecting the Fisher costs next to plain LoRA and next to full-gradient FWSVD.

Seed 001's point is memory: FWSVD needs the gradient of every dense weight (the Fisher of an ``(out, in)`` matrix),
FisherLoRA only the gradients of the LoRA factors it trains anyway. For each model shape the frozen base is built
fresh, wrapped with a LoRA adapter (r=k, alpha 16, all Linear layers of the blocks, dropout 0) and trained a few
steps (AdamW on the adapter), with

- ``lora``: no Fisher (the baseline);
- ``fisher_lora``: ``FisherCollector("lora")``: squared per micro-batch gradients of ``A`` and ``B`` (what
  ``LowRankTrainer`` attaches for a ``FisherLoRAConfig``);
- ``full_fwsvd``: ``FisherCollector("full")`` on the same adapter model: every frozen target weight gets a gradient
  that is squared into a float32 ``(out, in)`` accumulator and dropped (16-bit bases only: a 4-bit weight has no
  gradient, which is why FisherLoRA exists).

Figures from the CUDA caching allocator (see ``gpu_common.measure``): peak training memory above the frozen model and
median step time; ratios are against ``lora``. Shapes have random weights (no download; memory and time do not depend
on the values).

Usage: ``python benchmarks/fisher_lora_gpu.py [--shapes smollm2-135m llama2-7b] [--bits 16 4]``. Prints JSON.
"""

from __future__ import annotations

import json

# benchmarks/ is on sys.path when a script there runs
from gpu_common import bases_for, measure, parser_with_common_args, record, start

METHODS = ("lora", "fisher_lora", "full_fwsvd")


def _wrapper(method: str, k: int):
    def wrap(model):
        from peft import LoraConfig, get_peft_model

        from hf_lowrank import FisherLoRAConfig
        from hf_lowrank.tuners.fisher_lora import FisherCollector

        if method == "fisher_lora":
            config = FisherLoRAConfig(r=k, lora_alpha=16, target_modules="all-linear", compress_keep=0.9)
        else:
            config = LoraConfig(r=k, lora_alpha=16, target_modules="all-linear")
        if method == "lora":
            return get_peft_model(model, config), None
        return get_peft_model(model, config), FisherCollector("lora" if method == "fisher_lora" else "full").attach

    return wrap


def main(argv=None) -> None:
    parser = parser_with_common_args(__doc__, k=16, k_help="LoRA rank")
    args = parser.parse_args(argv)
    result = start("fisher_lora_gpu", args, "fisher_lora")
    for shape, bits, bases, ids in bases_for(args):
        methods = METHODS if bits == 16 else METHODS[:2]
        rows = {m: measure(bases, _wrapper(m, args.k), ids, args.steps) for m in methods}
        summary = {
            f"{fig}_{m}_vs_lora": round(rows[m][fig] / rows["lora"][fig], 3)
            for m in methods[1:] for fig in ("mem_mib", "step_ms")
        }
        record(result, f"{shape}/{bits}bit", rows, summary)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
