"""FisherLoRA on SmolLM2-135M-Instruct: SFT with LowRankSFTTrainer, compressed on save, reloaded, evaluated.

The LoRA adapters on the MLP (gate/up/down_proj) train on the bundled WordNet definition prompts; their gradients
give the Fisher information, and ``trainer.save_model`` writes the merged model compressed by Fisher-weighted SVD
(a factorized checkpoint). ``AutoModelForCausalLM.from_pretrained`` reloads it (hf_lowrank must be imported).

    python examples/fisher_lora_sft.py            # ~ a few minutes on 2 CPU cores
    python examples/fisher_lora_sft.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import SFTConfig  # noqa: E402

import hf_lowrank  # noqa: E402,F401  (registers FisherLoRA and the factorized-checkpoint format)
from hf_lowrank import CompressionConfig, FisherLoRAConfig, LowRankSFTTrainer  # noqa: E402
from hf_lowrank.demo import evaluation, models, wordnet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fisher_lora_sft", help="output folder")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--keep", type=float, default=0.9, help="fraction of each MLP matrix's parameters kept")
    parser.add_argument("--weighting", choices=("two_sided", "row"), default="two_sided")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps = 3
    torch.manual_seed(0)
    out = Path(args.out)

    model, tokenizer = models.load_smollm2()
    train = Dataset.from_list(wordnet.sft_examples("train", n=8 * args.steps))
    eval_texts = wordnet.definition_texts("test", n=16 if args.quick else 64)

    def ppl(m) -> float:
        return evaluation.perplexity(m, tokenizer, eval_texts, max_length=96, batch_size=8, progress=False)

    base_ppl = ppl(model)
    config = FisherLoRAConfig(
        r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM",
        compression=CompressionConfig(keep=args.keep), fisher_weighting=args.weighting,
    )
    from hf_lowrank.precision import training_dtype_kwargs

    precision, why = training_dtype_kwargs()
    print(f"training dtype: {why}")
    trainer = LowRankSFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out / "run"), max_steps=args.steps, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=1e-3, max_length=96, logging_steps=10, save_strategy="no",
            report_to=[], use_cpu=not torch.cuda.is_available(), seed=0, **precision,
            gradient_checkpointing=False,  # trl's default is on; this model's activations fit, recomputing costs time
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=config,
    )
    trainer.train()
    tuned_ppl = ppl(trainer.model)
    trainer.save_model(str(out / "compressed"))  # merge, Fisher-weighted SVD, factorized checkpoint

    reloaded = AutoModelForCausalLM.from_pretrained(out / "compressed")
    compressed_ppl = ppl(reloaded)
    report = trainer.compression_report
    summary = {
        "perplexity_base": round(base_ppl, 3),
        "perplexity_fine_tuned": round(tuned_ppl, 3),
        "perplexity_compressed": round(compressed_ppl, 3),
        "mlp_parameters_kept": round(report.kept_fraction, 4),
        "fisher": report.info,
        "saved_to": str(out / "compressed"),
    }
    print(report.summary())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
