"""ERE on save: fully fine-tune a model with the transformers Trainer and store it as a small residual over its base.

1. MiniLM classifier (default): all-MiniLM-L6-v2 with a new 6-way head, fully fine-tuned on the bundled WordNet
   category task with ``Trainer``; ``CompressOnSaveCallback(method="ere")`` writes the final model as an ERE
   residual (a few percent of the checkpoint); ``load_residual`` (``hf_lowrank.compression.ere``) rebuilds it on the base and both are
   evaluated on the test split.
2. ``--smollm2``: SmolLM2-135M-Instruct fully fine-tuned with trl's ``SFTTrainer`` on the bundled definition SFT
   pairs, saved as a residual the same way, reloaded, and compared by perplexity on held-out definitions.

Run: ``python examples/ere_full_finetune.py [--steps 150] [--rank 32] [--bits 4] [--smollm2] [--out runs/ere]``.
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


def _training_args(out: Path, steps: int, lr: float, batch: int, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=batch,
        warmup_steps=max(1, steps // 10),
        lr_scheduler_type="linear",
        weight_decay=0.0,
        save_strategy="no",
        logging_steps=max(1, steps // 5),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )


def _dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def minilm(args) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    import hf_lowrank  # noqa: F401
    from hf_lowrank import CompressOnSaveCallback
    from hf_lowrank.compression.ere import load_residual
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import accuracy
    from hf_lowrank.demo.models import load_minilm, minilm_dir

    train_texts, train_labels, names = wordnet.category_task("train")
    test_texts, test_labels, _ = wordnet.category_task("test")
    model, tok = load_minilm(num_labels=len(names), label_names=names)
    base, _ = load_minilm()  # the bare pre-trained encoder: the reference of the residual
    data = Dataset.from_dict({"text": train_texts, "label": train_labels}).map(
        lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    )
    run = Path(args.out) / "minilm"
    ere = CompressOnSaveCallback(method="ere", base_model=base, rank=args.rank, bits=args.bits, output_subdir="ere")
    trainer = Trainer(
        model=model,
        args=_training_args(run, args.steps, 1e-4, 16),
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tok),
        processing_class=tok,
        callbacks=[ere],
    )
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    residual_dir = run / "ere"
    finetuned = trainer.model.eval()
    acc_ft = accuracy(finetuned, tok, test_texts, test_labels, progress=False)
    finetuned.save_pretrained(run / "full")  # only to measure the full checkpoint's size
    started = time.perf_counter()
    decoded = load_residual(minilm_dir(), residual_dir, progress=False)
    load_s = time.perf_counter() - started
    acc_dec = accuracy(decoded, tok, test_texts, test_labels, progress=False)
    acc_base = accuracy(load_minilm(num_labels=len(names))[0], tok, test_texts, test_labels, progress=False)
    full = _dir_bytes(run / "full", "*.safetensors")
    stored = _dir_bytes(residual_dir, "residual.safetensors")
    manifest = json.loads((residual_dir / "residual_manifest.json").read_text())
    return {
        "model": "all-MiniLM-L6-v2 + 6-way head",
        "steps": args.steps,
        "train_seconds": round(train_s, 1),
        "accuracy_untrained_head": round(acc_base, 4),
        "accuracy_finetuned": round(acc_ft, 4),
        "accuracy_from_residual": round(acc_dec, 4),
        "relative_drop": round((acc_ft - acc_dec) / acc_ft, 4),
        "checkpoint_bytes": full,
        "residual_bytes": stored,
        "fraction": round(stored / full, 4),
        "prior_rank": manifest["prior_rank"],
        "bits": manifest["bits"],
        "load_seconds": round(load_s, 2),
        "residual_dir": str(residual_dir),
    }


def smollm2(args) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import hf_lowrank  # noqa: F401
    from hf_lowrank import CompressOnSaveCallback
    from hf_lowrank.compression.ere import load_residual
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2, smollm2_dir

    model, tok = load_smollm2()
    base, _ = load_smollm2()
    train = Dataset.from_list(wordnet.sft_examples("train", n=8 * args.sft_steps))
    held_out = wordnet.definition_texts("test", n=48)
    run = Path(args.out) / "smollm2"
    ere = CompressOnSaveCallback(method="ere", base_model=base, rank=args.rank, bits=args.bits, output_subdir="ere")
    from hf_lowrank.precision import training_dtype_kwargs

    precision, why = training_dtype_kwargs()
    print(f"training dtype: {why}")
    cfg = SFTConfig(
        output_dir=str(run),
        max_steps=args.sft_steps,
        learning_rate=2e-5,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_length=128,
        save_strategy="no",
        logging_steps=max(1, args.sft_steps // 5),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,  # trl's default is on; this model's activations fit, recomputing costs time
        **precision,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok, callbacks=[ere])
    ppl_base = perplexity(base, tok, held_out, progress=False)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    finetuned = trainer.model.eval()
    ppl_ft = perplexity(finetuned, tok, held_out, progress=False)
    decoded = load_residual(smollm2_dir(), run / "ere", progress=False)
    ppl_dec = perplexity(decoded, tok, held_out, progress=False)
    unique = {t.data_ptr(): t for t in finetuned.state_dict().values()}  # tied lm_head counted once
    full = sum(t.numel() * t.element_size() for t in unique.values())
    stored = _dir_bytes(run / "ere", "residual.safetensors")
    return {
        "model": "SmolLM2-135M-Instruct",
        "steps": args.sft_steps,
        "train_seconds": round(train_s, 1),
        "perplexity_base": round(ppl_base, 3),
        "perplexity_finetuned": round(ppl_ft, 3),
        "perplexity_from_residual": round(ppl_dec, 3),
        "checkpoint_bytes_fp32": full,
        "residual_bytes": stored,
        "fraction": round(stored / full, 4),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="MiniLM fine-tuning steps")
    p.add_argument("--rank", type=int, default=32, help="ERE prior rank")
    p.add_argument("--bits", type=int, default=4, help="ERE bits for U and V")
    p.add_argument("--smollm2", action="store_true", help="also run the SmolLM2 SFT example (slower)")
    p.add_argument("--sft-steps", type=int, default=20, help="SmolLM2 SFT steps")
    p.add_argument("--out", default="runs/ere", help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results = {"minilm": minilm(args)}
    if args.smollm2:
        results["smollm2"] = smollm2(args)
    for r in results.values():
        print(f"\n== {r['model']}")
        for k, v in r.items():
            if k != "model":
                print(f"  {k:>26}: {v}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
