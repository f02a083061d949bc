"""The main job (``make demo``): compress the embedded SmolLM2-135M and compare rank choices side by side.

For each method the model is compressed to the same target fraction of its transformer-block Linear parameters,
saved with ``save_pretrained``, reloaded with ``AutoModelForCausalLM.from_pretrained`` (the hf-lowrank plugin
rebuilds the factorized layers), and evaluated on held-out bundled WordNet prose. Printed: one table, and a JSON
line with the same figures; written: ``<out>/results.json`` and ``<out>/summary.png`` (perplexity and size per
method). The checkpoints are removed at the end unless ``HF_LOWRANK_DEMO_CLEAN=0``.

Methods:
- ``dense``: the uncompressed model.
- ``svd``: uniform plain SVD, the same fraction of parameters kept in every module.
- ``welore``: WeLore's data-free non-uniform ranks (global threshold on normalised spectra), with the reduction
  bisected so the parameter count matches the target; then a short fine-tune of only its low-rank components.
- ``calibration``: calibration only, no training (``compress_model(model, keep, calibration=batches)`` with its
  defaults): forward and backward passes over other bundled prose, the weights frozen, give each block Linear's
  input Gram and the Gram of the loss gradient at its output (the Kronecker-factored Fisher); each weight is
  factorized by the weighted SVD, ranks allocated globally (``--calibration-weighting whitened`` gives SVD-LLM's
  input whitening alone, with uniform ranks).
- ``fisher_lora``: FisherLoRA: a short LoRA SFT on the bundled definitions collects the Kronecker-factored Fisher
  (Grams of each adapted layer's input and output gradient); on save the merged model is compressed by the weighted
  SVD with global rank allocation. ``fisher_lora_2s``: the same adapter compressed with the diagonal two-sided
  Fisher (the seed's weighting), uniform ranks.

Run: ``python examples/demo.py [--keep 0.9] [--texts 48] [--steps 40] [--out runs/demo]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: Tokens per training sequence of the methods that train (WeLore's fine-tune, the FisherLoRA SFT): the SFT step
#: is compute-bound on a 2-core CPU, and 12 steps of 8 such sequences (with 16 evaluation texts) keep a fresh-clone
#: ``make demo`` near 8 minutes on an AVX2-only one (fp32 training), inside its 10-minute budget with a margin.
TRAIN_MAX_LENGTH = 96


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _block_linear_params(model) -> int:
    """Parameters of the transformer-block Linear layers, whether dense or factorized."""
    from torch import nn

    from hf_lowrank import LowRankLinear

    total = 0
    for name, module in model.named_modules():
        in_block = any(part.isdigit() for part in name.split("."))
        if isinstance(module, LowRankLinear):
            total += module.down.weight.numel() + module.up.weight.numel()
        elif in_block and isinstance(module, nn.Linear) and not name.endswith((".down", ".up")):
            total += module.weight.numel()
    return total


def _save_reload_eval(name, model, tok, out: Path, texts, args, rows, extra=None):
    from transformers import AutoModelForCausalLM

    from hf_lowrank import save_compressed
    from hf_lowrank.demo.evaluation import perplexity

    folder = save_compressed(model, out / name, tokenizer=tok)
    start = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    ppl = perplexity(reloaded, tok, texts, max_length=args.max_length, batch_size=8, progress=True)
    row = {
        "method": name,
        "linear_params": _block_linear_params(reloaded),
        "total_params": sum(p.numel() for p in reloaded.parameters()),
        "file_mb": round(_dir_bytes(folder) / 2**20, 1),
        "perplexity": round(ppl, 2),
        "load_s": round(load_s, 2),
    }
    row.update(extra or {})
    rows.append(row)
    print(f"  {name}: perplexity {ppl:.2f}, {row['file_mb']} MB, reloaded in {load_s:.2f}s")
    return reloaded


def _print_table(rows, dense_linear):
    print()
    header = f"{'method':<14}{'block Linear params':>20}{'kept':>8}{'total params':>15}{'file MB':>9}{'ppl':>14}{'load s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        kept = r["linear_params"] / dense_linear
        print(f"{r['method']:<14}{r['linear_params']:>20,}{kept:>8.1%}{r['total_params']:>15,}{r['file_mb']:>9}"
              f"{r['perplexity']:>14,.2f}{r['load_s']:>8.2f}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.9, help="fraction of block Linear parameters kept")
    parser.add_argument("--texts", type=int, default=16, help="held-out prose paragraphs for perplexity")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="fine-tuning steps for the methods that train")
    parser.add_argument("--methods", default="svd,welore,calibration,fisher_lora")
    parser.add_argument("--calib-texts", type=int, default=24, help="bundled prose paragraphs for calibration")
    parser.add_argument("--calibration-weighting", default="auto", choices=["auto", "whitened", "kronecker"],
                        help="weighting of the calibration row (default: compress_model's, kronecker for a causal LM)")
    parser.add_argument("--allocation", default="auto", choices=["auto", "uniform", "global"],
                        help="rank allocation of the calibration row (default: compress_model's, global with kronecker)")
    parser.add_argument("--fisher-allocation", default="global", choices=["uniform", "global"],
                        help="rank allocation of the Kronecker FisherLoRA row")
    parser.add_argument("--loss-normalization", default="none", choices=["none", "relative"])
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()
    torch.manual_seed(0)

    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.models import load_smollm2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("Loading the embedded SmolLM2-135M-Instruct (converted from GGUF once, then cached) ...")
    start = time.perf_counter()
    dense, tok = load_smollm2()
    print(f"  loaded in {time.perf_counter() - start:.1f}s")
    texts = wordnet.prose_texts("test", n=args.texts)
    dense_linear = _block_linear_params(dense)
    rows: list[dict] = []
    print("[dense] evaluating ...")
    _save_reload_eval("dense", dense, tok, out, texts, args, rows)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        print(f"[{method}] compressing to {args.keep:.0%} of block Linear parameters ...")
        runner = METHODS[method]
        model, extra = runner(copy.deepcopy(dense), tok, args)
        _save_reload_eval(method, model, tok, out, texts, args, rows, extra)
        del model
        while _EXTRA_ROWS:
            name, extra_model, extra_info = _EXTRA_ROWS.pop(0)
            _save_reload_eval(name, extra_model, tok, out, texts, args, rows, extra_info)
            del extra_model

    _print_table(rows, dense_linear)
    from hf_lowrank.demo.plotting import plot_compression_summary
    from hf_lowrank.io import atomic_write_json

    summary = {"keep": args.keep, "texts": len(texts), "rows": rows}
    print(json.dumps(summary))
    atomic_write_json(out / "results.json", summary)
    png = plot_compression_summary(
        rows, out / "summary.png", title=f"SmolLM2-135M, {args.keep:.0%} of block Linear parameters kept"
    )
    if os.environ.get("HF_LOWRANK_DEMO_CLEAN", "1") == "1":  # the checkpoints are large; keep the figures
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
    print(f"Summary plot: {png}  (results: {out / 'results.json'})")


def _mean_error(report) -> float:
    errs = [m.rel_error for m in report.modules if m.rel_error is not None]
    return round(sum(errs) / max(1, len(errs)), 4)


def run_svd(model, tok, args):
    """Uniform plain SVD: every block Linear keeps the same fraction of its parameters."""
    from hf_lowrank import compress_model

    report = compress_model(model, args.keep)
    return model, {"mean_rel_error": _mean_error(report)}


def _lm_trainer_inputs(tok, texts, max_length):
    from transformers import DataCollatorForLanguageModeling

    rows = [{"input_ids": tok(t, truncation=True, max_length=max_length).input_ids} for t in texts]
    return rows, DataCollatorForLanguageModeling(tok, mlm=False)


def _training_args(args, name):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(Path(args.out) / f"{name}-run"), max_steps=args.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=8, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=0, lr_scheduler_type="constant",
    )


def run_welore(model, tok, args):
    """WeLore at the same parameter budget (reduction bisected), then a short fine-tune of only the LRC factors."""
    from peft import get_peft_model
    from transformers import Trainer

    from hf_lowrank import WeLoreLRCConfig
    from hf_lowrank.demo import wordnet
    from hf_lowrank.ops.svd import break_even_rank
    from hf_lowrank.targets import find_target_linears
    from hf_lowrank.tuners.welore.allocation import welore_allocation
    from hf_lowrank.tuners.welore.spectra import compute_spectra

    targets = find_target_linears(model)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    spectra = compute_spectra(targets, progress=False)  # once: get_peft_model below finds them in the cache
    budget = args.keep * sum(o * i for o, i in shapes.values())

    def params(ranks):
        return sum(
            ranks[n] * (o + i) if n in ranks and ranks[n] <= break_even_rank(o, i) else o * i
            for n, (o, i) in shapes.items()
        )

    lo, hi = 0.01, 0.95  # achieved reduction -> parameters is monotone: bisect for the budget
    for _ in range(14):
        mid = (lo + hi) / 2
        alloc = welore_allocation(spectra, shapes, mid)
        lo, hi = (lo, mid) if params({n: alloc.ranks[n] for n in alloc.lrc}) <= budget else (mid, hi)
    reduction = hi
    peft_model = get_peft_model(model, WeLoreLRCConfig(reduction=reduction))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    rows, collator = _lm_trainer_inputs(tok, wordnet.prose_texts("train", n=8 * args.steps), TRAIN_MAX_LENGTH)
    Trainer(model=peft_model, args=_training_args(args, "welore"), train_dataset=rows, data_collator=collator).train()
    merged = peft_model.merge_and_unload()
    return merged, {"reduction": round(reduction, 4), "trainable_params": trainable}


def run_calibration(model, tok, args):
    """Calibration only (no training): Grams of every block Linear on bundled prose, weighted SVD."""
    from hf_lowrank import CompressionConfig, calibration_batches, compress_model
    from hf_lowrank.demo import wordnet

    batches = calibration_batches(tok, wordnet.prose_texts("train", n=args.calib_texts), max_length=256)
    config = CompressionConfig(keep=args.keep, weighting=args.calibration_weighting, allocation=args.allocation)
    report = compress_model(model, config, calibration=batches)
    return model, {"mean_rel_error": _mean_error(report), "calibration_tokens": report.info["calibration_tokens"],
                   "weighting": report.info["weighting"], "allocation": report.info["allocation"]}


def run_fisher_lora(model, tok, args):
    """FisherLoRA: LoRA SFT on the bundled definitions collects the Kronecker Fisher; save compresses the merged model.

    The same run also yields today's diagonal (two-sided) Fisher: that row is compressed from the same adapter."""
    from datasets import Dataset
    from trl import SFTConfig

    from hf_lowrank import CompressionConfig, FisherLoRAConfig, LowRankSFTTrainer
    from hf_lowrank.demo import wordnet
    from hf_lowrank.precision import training_dtype_kwargs

    precision, why = training_dtype_kwargs()
    print(f"  training dtype: {why}")
    config = FisherLoRAConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                              fisher_weighting="kronecker",
                              compression=CompressionConfig(keep=args.keep, allocation=args.fisher_allocation,
                                                            loss_normalization=args.loss_normalization))
    trainer = LowRankSFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(Path(args.out) / "fisher_lora-run"), max_steps=args.steps, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=1e-3, max_length=TRAIN_MAX_LENGTH, logging_steps=8, save_strategy="no",
            report_to=[], use_cpu=not torch.cuda.is_available(), seed=0, **precision,
            # trl turns it on by default; the activations of a 96-token batch of this model fit, and recomputing
            # them cost 30 s of the demo's SFT on a 2-core CPU
            gradient_checkpointing=False,
        ),
        train_dataset=Dataset.from_list(wordnet.sft_examples("train", n=8 * args.steps)),
        processing_class=tok,
        peft_config=config,
    )
    trainer.train()
    folder = Path(args.out) / "fisher_lora-compressed"
    trainer.save_model(str(folder))  # merge, Fisher-weighted SVD, factorized checkpoint
    from hf_lowrank import load_compressed

    compressed = load_compressed(folder)
    report = trainer.compression_report
    from hf_lowrank import compress_model

    fisher = trainer.fisher_callback.collector.reduced_state()
    diag_config = CompressionConfig(keep=args.keep, weighting="two_sided", allocation="uniform")
    diag_report = compress_model(trainer.model, diag_config, fisher=fisher, progress=False)  # in place: the last use
    diag = trainer.model.get_base_model()
    _EXTRA_ROWS.append(("fisher_lora_2s", diag, {"mean_rel_error": _mean_error(diag_report),
                                                 "fisher_weighting": "two_sided", "allocation": "uniform"}))
    return compressed, {"mean_rel_error": _mean_error(report), "fisher_weighting": config.fisher_weighting,
                        "allocation": args.fisher_allocation}


_EXTRA_ROWS: list = []  # rows a runner produces besides its own (the diagonal FisherLoRA from the same SFT run)


METHODS = {"svd": run_svd, "welore": run_welore, "calibration": run_calibration, "fisher_lora": run_fisher_lora}


if __name__ == "__main__":
    main()
