"""WeLoreLRC end to end on SmolLM2-135M: compress at 30% rank reduction, fine-tune only the low-rank components.

Steps (all offline, plain transformers / peft APIs):

1. perplexity of the dense model on held-out bundled prose;
2. uniform rank reduction at the same ERR (every target Linear cut by the same fraction of its rank) for comparison;
3. ``get_peft_model(model, WeLoreLRCConfig(reduction=0.3))``: non-uniform ranks from the normalised spectra, LRCs
   replaced by trainable factor pairs, N-LRCs kept exact and frozen;
4. a short fine-tune with ``transformers.Trainer`` on the bundled training prose (only LRC factors train);
5. ``save_pretrained`` of the adapter, ``merge_and_unload()`` to a plain model with ``LowRankLinear`` layers, saved
   and reloaded with ``AutoModelForCausalLM.from_pretrained`` (same perplexity), and a PNG of the kept-rank map.

Run: ``python examples/welore_compress_finetune.py [--reduction 0.3] [--steps 40] [--out welore_out] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduction", type=float, default=0.3, help="target effective rank reduction (ERR)")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--eval-texts", type=int, default=32)
    parser.add_argument("--out", default="welore_out", help="folder for the adapter, the compressed model, the PNG")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: first 4 blocks, 4 steps, 8 texts")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_texts, args.batch = min(args.steps, 4), min(args.eval_texts, 8), min(args.batch, 4)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import hf_lowrank  # noqa: F401  (registers the factorized-checkpoint format)
    from hf_lowrank import WeLoreLRCConfig
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.demo.plotting import plot_ranks
    from hf_lowrank.demo.wordnet import prose_texts
    from hf_lowrank.ops.svd import split_factors, truncated_svd
    from hf_lowrank.targets import find_target_linears

    out = Path(args.out)
    base, tok = load_smollm2()
    if args.quick:
        base.model.layers = base.model.layers[:4]
        base.config.num_hidden_layers = 4
    texts = prose_texts("test", args.eval_texts)

    def ppl(model) -> float:
        return perplexity(model, tok, texts, max_length=256, progress=False)

    results = {"dense": ppl(base)}
    print(f"dense perplexity: {results['dense']:.2f}")

    # Uniform baseline: the same fraction of every target's rank removed (exact truncated SVD, stored dense here).
    uniform = copy.deepcopy(base)
    with torch.no_grad():
        for name, linear in find_target_linears(uniform).items():
            rank = max(1, round((1 - args.reduction) * min(linear.weight.shape)))
            down, up = split_factors(*truncated_svd(linear.weight, rank, name=name))
            linear.weight.copy_(up @ down)
    results["uniform"] = ppl(uniform)
    del uniform
    print(f"uniform {args.reduction:.0%} rank reduction: {results['uniform']:.4g}")

    # WeLore: spectra (cached), global threshold bisected to the ACHIEVED reduction, LRCs -> trainable factors.
    config = WeLoreLRCConfig(reduction=args.reduction, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config)
    model.print_trainable_parameters()
    alloc = model.welore_allocation
    results["welore"] = ppl(model)
    print(f"WeLore {alloc.achieved_reduction:.1%} (achieved) before fine-tuning: {results['welore']:.4g}")
    plot_ranks(alloc.ranks, alloc.shapes, out / "ranks.png", lrc=alloc.lrc, title="SmolLM2-135M, WeLore")

    # Short fine-tune of the LRC factors with the plain transformers Trainer.
    ids = tok("\n\n".join(prose_texts("train", 1500 if not args.quick else 60)), return_tensors="pt")["input_ids"][0]
    n = len(ids) // args.seq
    chunks = ids[: n * args.seq].view(n, args.seq).tolist()
    train = Dataset.from_dict({"input_ids": chunks, "labels": chunks})
    targs = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), lr_scheduler_type="constant_with_warmup",
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
    )
    Trainer(model=model, args=targs, train_dataset=train).train()
    results["welore_finetuned"] = ppl(model)
    print(f"WeLore after {args.steps} LRC fine-tuning steps: {results['welore_finetuned']:.4g}")

    # Save the adapter (rank map + LRC factors), then the compressed model as a factorized checkpoint.
    model.save_pretrained(out / "adapter")
    compressed = model.merge_and_unload()
    compressed.save_pretrained(out / "compressed")
    tok.save_pretrained(out / "compressed")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "compressed")
    results["reloaded"] = ppl(reloaded)
    size = sum(p.numel() for p in reloaded.parameters()) / sum(p.numel() for p in base.parameters())

    print()
    print(f"{'model':<34}{'perplexity':>12}")
    for label, key in (
        ("dense", "dense"),
        (f"uniform {args.reduction:.0%}", "uniform"),
        (f"WeLore {alloc.achieved_reduction:.0%}", "welore"),
        (f"WeLore {alloc.achieved_reduction:.0%} + LRC fine-tune", "welore_finetuned"),
        ("compressed checkpoint, reloaded", "reloaded"),
    ):
        print(f"{label:<34}{results[key]:>12.4g}")
    print(f"\ncompressed model: {size:.1%} of the dense parameters, {len(alloc.lrc)} low-rank components; saved to "
          f"{out / 'compressed'} (adapter in {out / 'adapter'}, rank map in {out / 'ranks.png'})")


if __name__ == "__main__":
    main()
