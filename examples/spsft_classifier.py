"""SPSFT with class-aware importance: fine-tune a MiniLM classifier on the bundled WordNet category task.

1. all-MiniLM-L6-v2 with a new 6-way head (offline copy), wrapped by ``get_peft_model`` with
   ``SPSFTConfig(ratio=..., importance="qm_taylor", task_type="SEQ_CLS")``: every Linear of the encoder gets trainable
   rows ``W_f`` (zero init), the head is trained in full (peft's ``modules_to_save`` for sequence classification).
2. ``spsft_importance`` (``hf_lowrank.tuners.spsft``) re-selects the rows from calibration batches with the
   quantile-mean Taylor score of seed 004 eq. 7 (per class: ``|W[i] . grad L(class)|``; score: mean of the 0..100%
   quantiles over classes).
3. ``transformers.Trainer`` trains for ``--steps`` steps; test accuracy before and after is printed, the adapter is
   saved (only ``W_f``, row indices and the head) and reloaded with ``PeftModel.from_pretrained``.
   ``--compare-l2`` trains a second adapter whose rows were chosen by l2 norm, on the same data, for comparison.

Run: ``python examples/spsft_classifier.py [--steps 120] [--ratio 0.05] [--compare-l2] [--out runs/spsft_cls]``
(about a minute per training run on 2 CPU cores).
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


def train_one(importance: str, args, train_data, collator, test_texts, test_labels) -> dict:
    from peft import PeftModel, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    from hf_lowrank import SPSFTConfig
    from hf_lowrank.demo.evaluation import accuracy
    from hf_lowrank.demo.models import load_minilm
    from hf_lowrank.tuners.spsft import spsft_importance

    torch.manual_seed(args.seed)
    base, tok = load_minilm(num_labels=args.num_labels, label_names=args.label_names)
    config = SPSFTConfig(ratio=args.ratio, importance=importance, task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    before = accuracy(model, tok, test_texts, test_labels, progress=False)

    started = time.perf_counter()
    if importance != "l2":
        calib = DataLoader(train_data, batch_size=32, shuffle=True, collate_fn=collator)
        spsft_importance(model, calib, num_batches=args.calib_batches, progress=False)
    importance_s = time.perf_counter() - started

    run = Path(args.out) / importance
    targs = TrainingArguments(
        output_dir=str(run),
        max_steps=args.steps,
        learning_rate=args.lr,
        per_device_train_batch_size=32,
        warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="linear",
        save_strategy="no",
        logging_steps=max(1, args.steps // 4),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_data, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    model.eval()
    after = accuracy(model, tok, test_texts, test_labels, progress=False)

    model.save_pretrained(run / "adapter")
    fresh, _ = load_minilm(num_labels=args.num_labels, label_names=args.label_names)
    reloaded = PeftModel.from_pretrained(fresh, run / "adapter").eval()
    reloaded_acc = accuracy(reloaded, tok, test_texts, test_labels, progress=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "importance": importance,
        "trainable_params": trainable,
        "trainable_percent": round(100 * trainable / total, 3),
        "test_accuracy_before": round(before, 4),
        "test_accuracy_after": round(after, 4),
        "test_accuracy_reloaded": round(reloaded_acc, 4),
        "importance_s": round(importance_s, 1),
        "train_s": round(train_s, 1),
        "adapter_bytes": sum(p.stat().st_size for p in (run / "adapter").glob("*.safetensors")),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--ratio", type=float, default=0.05, help="fraction of each Linear's rows to fine-tune")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--calib-batches", type=int, default=8, help="batches of 32 for the qm_taylor scores")
    parser.add_argument("--compare-l2", action="store_true", help="also train an adapter with l2-selected rows")
    parser.add_argument("--out", default="runs/spsft_classifier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    import hf_lowrank.tuners.spsft  # noqa: F401  (registers the SPSFT PEFT type)
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.models import load_minilm

    train_texts, train_labels, names = wordnet.category_task("train")
    test_texts, test_labels, _ = wordnet.category_task("test")
    args.num_labels, args.label_names = len(names), names
    _, tok = load_minilm()
    train_data = Dataset.from_dict({"text": train_texts, "label": train_labels}).map(
        lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    )
    collator = DataCollatorWithPadding(tok)
    runs = [train_one("qm_taylor", args, train_data, collator, test_texts, test_labels)]
    if args.compare_l2:
        runs.append(train_one("l2", args, train_data, collator, test_texts, test_labels))
    result = {
        "example": "spsft_classifier",
        "model": "all-MiniLM-L6-v2 + 6-way head",
        "task": f"WordNet category ({len(names)} classes: {', '.join(names)})",
        "train_examples": len(train_texts),
        "test_examples": len(test_texts),
        "steps": args.steps,
        "ratio": args.ratio,
        "runs": runs,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
