"""Correct a 4-bit model with a data-aware low-rank adapter, then load it with stock transformers + peft.

1. ``hf_lowrank.quantization_correction(dense_folder, BitsAndBytesConfig(load_in_4bit=True, nf4), rank,
   calibration=batches, path=adapter)`` fits, per block Linear, the rank-``r`` correction of the NF4 error
   ``W - Q(W)`` that minimises the layer's output error weighted by the calibration data (input and output-gradient
   Grams), and writes it as a plain LoRA adapter.
2. The corrected model is then an ordinary QLoRA model: ``PeftModel.from_pretrained(AutoModelForCausalLM.
   from_pretrained(dense_folder, quantization_config=bnb), adapter)`` (no hf_lowrank needed); fine-tune it as any
   QLoRA model (``is_trainable=True``), the adapter being its initialisation.

Printed: perplexity of the dense model, of NF4 alone and of NF4 + the correction on held-out bundled prose (the
SmolLM2-135M shipped offline; bitsandbytes runs 4-bit on the CPU).

Run: ``python examples/quantization_correction.py [--rank 16] [--texts 16] [--out runs/qcorr]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--texts", type=int, default=16, help="held-out prose texts to evaluate on")
    parser.add_argument("--calibration-texts", type=int, default=32)
    parser.add_argument("--out", default="runs/qcorr")
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import hf_lowrank
    from hf_lowrank import calibration_batches
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2, smollm2_dir

    dense, tok = load_smollm2()
    folder = smollm2_dir()  # the dense checkpoint (float32 on disk): the 4-bit base is loaded from it
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    batches = calibration_batches(tok, wordnet.prose_texts("train", n=args.calibration_texts), max_length=128)
    report = hf_lowrank.quantization_correction(dense, bnb, args.rank, calibration=batches,
                                                path=Path(args.out) / "adapter")
    summary = report.summary()
    print(f"adapter: {report.output_dir} ({len(report.modules)} modules, rank {args.rank}); mean weighted error "
          f"{summary['mean_weighted_error_before']:.4f} -> {summary['mean_weighted_error_after']:.4f}")

    texts = wordnet.prose_texts("test", n=args.texts)
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map="cpu",
                                                     dtype=torch.float32)
    rows = {"dense": perplexity(dense, tok, texts, progress=False),
            "nf4": perplexity(quantized, tok, texts, progress=False)}
    corrected = PeftModel.from_pretrained(quantized, report.output_dir)  # stock peft
    rows[f"nf4 + correction r{args.rank}"] = perplexity(corrected, tok, texts, progress=False)
    for name, value in rows.items():
        print(f"{name:>28}: perplexity {value:.2f}")


if __name__ == "__main__":
    main()
