"""FisherLoRA on a sequence classifier: all-MiniLM-L6-v2 + a head on the bundled WordNet category task.

The seed's RoBERTa/GLUE setting in small: LoRA on the feed-forward layers (``intermediate.dense``,
``output.dense``), the classification head trained in full (peft's ``modules_to_save``), Fisher from the LoRA
gradients, and ``trainer.save_model`` writes the merged model compressed by Fisher-weighted SVD.
``AutoModelForSequenceClassification.from_pretrained`` reloads it; the head comes back with it.

    python examples/fisher_lora_classifier.py           # ~ a minute or two on 2 CPU cores
    python examples/fisher_lora_classifier.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, TrainingArguments  # noqa: E402

import hf_lowrank  # noqa: E402,F401  (registers FisherLoRA and the factorized-checkpoint format)
from hf_lowrank import CompressionConfig, FisherLoRAConfig, LowRankTrainer  # noqa: E402
from hf_lowrank.demo import evaluation, models, wordnet  # noqa: E402

FFN = r".*\.layer\.\d+\.(intermediate|output)\.dense"  # not attention.output.dense



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fisher_lora_classifier")
    parser.add_argument("--keep", type=float, default=0.7, help="fraction of each FFN matrix's parameters kept")
    parser.add_argument("--weighting", choices=("two_sided", "row"), default="two_sided")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)

    texts, labels, names = wordnet.category_task("train", n=192 if args.quick else 1536)
    test_texts, test_labels, _ = wordnet.category_task("test", n=120 if args.quick else None)  # None: all 378
    model, tokenizer = models.load_minilm(num_labels=len(names), label_names=names)
    config = FisherLoRAConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=FFN, compression=CompressionConfig(keep=args.keep),
        fisher_weighting=args.weighting,
    )
    peft_model = get_peft_model(model, config)
    trainer = LowRankTrainer(
        model=peft_model,
        args=TrainingArguments(
            output_dir=str(out / "run"), num_train_epochs=0.25 if args.quick else args.epochs,
            per_device_train_batch_size=16, learning_rate=2e-3, logging_steps=20, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), seed=0,
        ),
        train_dataset=evaluation.ClassificationDataset(tokenizer, texts, labels, max_length=64),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()

    def acc(m) -> float:
        return evaluation.accuracy(m, tokenizer, test_texts, test_labels, batch_size=64, max_length=64,
                                   progress=False)

    tuned = acc(trainer.model)
    trainer.save_model(str(out / "compressed"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "compressed")
    report = trainer.compression_report
    print(report.summary())
    print(json.dumps({
        "accuracy_fine_tuned": round(tuned, 4),
        "accuracy_compressed": round(acc(reloaded), 4),
        "ffn_parameters_kept": round(report.kept_fraction, 4),
        "labels": reloaded.config.id2label,
        "saved_to": str(out / "compressed"),
    }, indent=1))


if __name__ == "__main__":
    main()
