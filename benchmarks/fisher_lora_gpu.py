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

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from gpu_common import SHAPES, Bases, measure  # benchmarks/ is on sys.path when a script there runs

METHODS = ("lora", "fisher_lora", "full_fwsvd")


def _wrapper(method: str, k: int):
    def wrap(model):
        from peft import LoraConfig, get_peft_model

        from hf_lowrank import FisherLoRAConfig
        from hf_lowrank.peft_configs.fisher_lora import FisherCollector

        if method == "fisher_lora":
            config = FisherLoRAConfig(r=k, lora_alpha=16, target_modules="all-linear", compress_keep=0.9)
        else:
            config = LoraConfig(r=k, lora_alpha=16, target_modules="all-linear")
        if method == "lora":
            return get_peft_model(model, config), None
        return get_peft_model(model, config), FisherCollector("lora" if method == "fisher_lora" else "full").attach

    return wrap


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama2-7b"], choices=list(SHAPES))
    parser.add_argument("--bits", nargs="+", type=int, default=[16], choices=[16, 4])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--k", type=int, default=16, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/fisher_lora_gpu.py needs a CUDA GPU; on the CPU use benchmarks/fisher_lora.py.")
    dtype = getattr(torch, args.dtype)
    result: dict = {
        "benchmark": "fisher_lora_gpu", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "k": args.k, "dtype": args.dtype, "runs": {},
        "summary": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            ids = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch_size, args.seq_len), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(0))
            for bits in args.bits:
                bases = Bases(shape, bits, dtype, Path(tmp))
                methods = METHODS if bits == 16 else METHODS[:2]
                key = f"{shape}/{bits}bit"
                rows = {m: measure(bases, _wrapper(m, args.k), ids, args.steps) for m in methods}
                result["runs"][key] = rows
                result["summary"][key] = {
                    f"{fig}_{m}_vs_lora": round(rows[m][fig] / rows["lora"][fig], 3)
                    for m in methods[1:] for fig in ("mem_mib", "step_ms")
                }
                print(json.dumps({key: result["summary"][key]}), file=sys.stderr, flush=True)
                if bases.folder is not None:
                    shutil.rmtree(bases.folder, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
