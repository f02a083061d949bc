"""SPSFT with trl's SFTTrainer: teach SmolLM2-135M-Instruct the bundled WordNet definition style.

1. ``SFTTrainer(model=SmolLM2, peft_config=SPSFTConfig(r=16, target_modules="all-linear"))``: trl calls
   ``get_peft_model`` itself; every Linear of the blocks gets ``r`` trainable rows ``W_f`` (zero init, rows chosen by
   l2 norm). With ``--importance taylor`` the rows are re-chosen from gradients of the SFT loss on a few training
   batches by ``SPSFTImportanceCallback`` before the first optimizer step.
2. Perplexity on held-out definitions before and after ``--steps`` steps.
3. The adapter is saved (only ``W_f`` and row indices), reloaded with ``PeftModel.from_pretrained``, and exported
   as a vanilla PEFT LoRA adapter (one-hot ``B``, ``A = W_f``) that plain peft loads with the same outputs.

Run: ``python examples/spsft_sft.py [--steps 12] [--r 16] [--importance l2|taylor] [--out runs/spsft_sft]``
(about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--r", type=int, default=16, help="rows fine-tuned per Linear")
    parser.add_argument("--importance", choices=["l2", "taylor"], default="l2")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--out", default="runs/spsft_sft")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    from hf_lowrank import SPSFTConfig, save_as_lora
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.tuners.spsft import SPSFTImportanceCallback

    model, tok = load_smollm2()
    train = Dataset.from_list(wordnet.sft_examples("train", n=args.train_examples))
    test_texts = [e["prompt"] + e["completion"] for e in wordnet.sft_examples("test", n=args.eval_examples)]
    ppl_before = perplexity(model, tok, test_texts, max_length=128, progress=False)

    out = Path(args.out)
    sft_args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=1,
        lr_scheduler_type="linear",
        max_length=128,
        gradient_checkpointing=False,  # CPU: activations of this small model fit; recomputation costs time
        bf16=False,
        save_strategy="no",
        logging_steps=max(1, args.steps // 4),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    callbacks = [SPSFTImportanceCallback(num_batches=4, progress=False)] if args.importance == "taylor" else []
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=train,
        processing_class=tok,
        peft_config=SPSFTConfig(r=args.r, target_modules="all-linear", importance=args.importance),
        callbacks=callbacks,
    )
    peft_model = trainer.model
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    peft_model.eval()
    ppl_after = perplexity(peft_model, tok, test_texts, max_length=128, progress=False)

    peft_model.save_pretrained(out / "adapter")
    save_as_lora(out / "lora", peft_model)
    ids = tok(test_texts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = peft_model(**ids).logits
        base, _ = load_smollm2()
        reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
        reload_diff = (reloaded(**ids).logits - logits).abs().max().item()
        base, _ = load_smollm2()
        lora = PeftModel.from_pretrained(base, out / "lora").eval()
        lora_diff = (lora(**ids).logits - logits).abs().max().item()

    result = {
        "example": "spsft_sft",
        "model": "SmolLM2-135M-Instruct",
        "importance": args.importance,
        "r": args.r,
        "trainable_params": trainable,
        "trainable_percent": round(100 * trainable / total, 3),
        "steps": args.steps,
        "train_s": round(train_s, 1),
        "heldout_perplexity_before": round(ppl_before, 3),
        "heldout_perplexity_after": round(ppl_after, 3),
        "adapter_bytes": sum(p.stat().st_size for p in (out / "adapter").glob("*.safetensors")),
        "reloaded_max_abs_logit_diff": reload_diff,
        "lora_export_peft_type": type(lora.base_model).__name__,
        "lora_export_max_abs_logit_diff": lora_diff,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
