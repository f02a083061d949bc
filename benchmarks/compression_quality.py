"""Compression quality of SmolLM2-135M at equal parameters: plain SVD, diagonal Fisher, whitening, Kronecker Fisher.

Every row compresses the same target Linears of the embedded SmolLM2 to the same parameter budget (``--keep`` of
their dense parameters) and is scored by perplexity on held-out bundled prose (``prose_texts("test")``). Data-aware
rows see only other prose (``prose_texts("train")``): the calibration batches, and the LoRA probe of the VRAM-limited
FisherLoRA pipeline (``merge_before_compress=False``: LoRA trains only to collect statistics; the original weights
are compressed), which runs ``--steps`` steps on the same texts. No row is fine-tuned after compression.

Rows: ``svd`` (uniform), ``fisher_two_sided`` (today's FisherLoRA diagonal weighting, uniform), ``whitened`` (the
calibration Grams, SVD-LLM's whitening; uniform and global allocation, raw and per-module relative losses; and
block-by-block ``sequential`` calibration), ``calibration kronecker`` (``compress_model``'s default for causal LMs:
input and loss-gradient Grams from forward + backward passes over the calibration batches, no training; uniform,
global, and global with ``--kronecker-max-dim``),
``kronecker`` (input and output-gradient Grams from the LoRA probe; uniform and global). Costs, measured in the same
run: LoRA probe step time with the Kronecker Grams and with the diagonal Fisher hooks vs a plain peft LoRA step, the
Grams' memory vs the LoRA training state, the compression time vs the bare SVD loop.

Run: ``python benchmarks/compression_quality.py --targets mlp --keep 0.8 [--out benchmarks/results/...json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGETS = {"mlp": ["gate_proj", "up_proj", "down_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _regex(names):
    return r".*\.layers\.\d+\.(mlp|self_attn)\.(" + "|".join(names) + ")"


def _probe(dense, tok, texts, args, *, kind):
    """A ``--steps`` LoRA pass on the calibration texts: 'plain' (peft LoRA), 'two_sided' or 'kronecker' (FisherLoRA)."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from hf_lowrank import FisherLoRAConfig, LowRankTrainer

    rows = [{"input_ids": tok(t, truncation=True, max_length=args.max_length).input_ids} for t in texts]
    common = dict(r=8, lora_alpha=16, target_modules=TARGETS[args.targets], task_type="CAUSAL_LM")
    if kind == "plain":
        model, trainer_cls = get_peft_model(copy.deepcopy(dense), LoraConfig(**common)), Trainer
    else:
        # 'kronecker': full Grams on every side; 'kronecker_small': sides wider than --kronecker-max-dim diagonal
        extra = {"kronecker_max_dim": args.kronecker_max_dim if kind == "kronecker_small" else None}
        cfg = FisherLoRAConfig(**common, fisher_weighting=kind.replace("_small", ""), merge_before_compress=False,
                               compress_keep=args.keep, **extra)
        model, trainer_cls = get_peft_model(copy.deepcopy(dense), cfg), LowRankTrainer
    targs = TrainingArguments(
        output_dir=str(Path(args.work) / f"probe-{kind}"), max_steps=args.steps, per_device_train_batch_size=4,
        learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, seed=0, logging_steps=10**6,
        disable_tqdm=True, bf16=False,
    )
    trainer = trainer_cls(model=model, args=targs, train_dataset=rows,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    start = time.perf_counter()
    trainer.train()
    step_s = (time.perf_counter() - start) / args.steps
    state = trainer.fisher_callback.collector.reduced_state() if kind != "plain" else None
    return model, state, step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="mlp")
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--calib-texts", type=int, default=128)
    parser.add_argument("--eval-texts", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kronecker-max-dim", type=int, default=1024,
                        help="also run the Kronecker rows with sides wider than this kept diagonal (0: skip)")
    parser.add_argument("--work", default="runs/compression_quality")
    parser.add_argument("--rows", default="whitened,sequential,calibration,probes",
                        help="row groups to run besides plain SVD: whitened (uniform, global raw/relative), "
                        "whitened-uniform, sequential, calibration, calibration-global (the default row only), probes (plain, two_sided, kronecker and, with "
                        "--kronecker-max-dim, kronecker_small) or a comma list of probe kinds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    groups = set(args.rows.split(","))
    probe_kinds = {"plain", "two_sided", "kronecker", "kronecker_small"}
    if "probes" in groups:
        groups |= probe_kinds
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from hf_lowrank import calibration_batches, compress_model
    from hf_lowrank.calibration.grams import calibration_grams
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.tuners.fisher_lora import compress_peft_model

    dense, tok = load_smollm2()
    dense.eval()
    test = wordnet.prose_texts("test", n=args.eval_texts)
    calib = wordnet.prose_texts("train", n=args.calib_texts)
    batches = calibration_batches(tok, calib, max_length=args.max_length, batch_size=8)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    pattern = _regex(TARGETS[args.targets])

    def ppl(model):
        return round(perplexity(model, tok, test, max_length=args.max_length, batch_size=8, progress=False), 2)

    rows: list[dict] = []

    def record(name, model, report, seconds, **extra):
        row = {"method": name, "perplexity": ppl(model), "kept": round(report.kept_fraction, 4),
               "dense_modules": sum(1 for m in report.modules if m.skipped), "compress_s": round(seconds, 1), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    dense_ppl = ppl(dense)
    print(json.dumps({"method": "dense", "perplexity": dense_ppl}), flush=True)

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    svd_report = compress_model(model, args.keep, target_modules=pattern, method="exact", progress=False)
    svd_s = time.perf_counter() - start
    record("svd uniform", model, svd_report, svd_s)
    uniform_ranks = svd_report.ranks
    del model

    from hf_lowrank.compression.compress import find_target_linears

    start = time.perf_counter()
    grams, _ = calibration_grams(dense, find_target_linears(dense, pattern), batches, progress=False)
    gram_s = time.perf_counter() - start
    whitened_rows = (("uniform", "none"), ("global", "none"), ("global", "relative"))
    if "whitened" not in groups:
        whitened_rows = whitened_rows[:1] if "whitened-uniform" in groups else ()
    for alloc, norm in whitened_rows:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = compress_model(model, uniform_ranks if alloc == "uniform" else args.keep, grams_in=grams,
                                allocation=alloc, loss_normalization=norm, target_modules=pattern, method="exact",
                                progress=False)
        label = f"whitened {alloc}" + (f" ({norm})" if alloc == "global" else "")
        record(label, model, report, time.perf_counter() - start)
        del model

    if "sequential" in groups:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = compress_model(model, uniform_ranks, calibration=batches, sequential=True, target_modules=pattern,
                                method="exact", progress=False)
        record("whitened sequential uniform", model, report, time.perf_counter() - start)
        del model

    # calibration only, Kronecker: input and loss-gradient Grams from forward + backward passes (no training)
    settings = [("uniform", uniform_ranks, None), ("global", args.keep, None)]
    if args.kronecker_max_dim:
        settings.append(("global", args.keep, args.kronecker_max_dim))
    if "calibration" not in groups:
        settings = [("global", args.keep, None)] if "calibration-global" in groups else []
    for alloc, ranks, max_dim in settings:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = compress_model(model, ranks, calibration=batches, calibration_weighting="kronecker",
                                allocation=alloc, max_gram_dim=max_dim, target_modules=pattern, method="exact",
                                progress=False)
        label = f"calibration kronecker {alloc}" + (f" (max_gram_dim {max_dim})" if max_dim else "")
        record(label, model, report, time.perf_counter() - start)
        del model

    probes, gram_bytes = {}, {}
    kinds = [k for k in ("plain", "two_sided", "kronecker", "kronecker_small") if k in groups]
    if not args.kronecker_max_dim and "kronecker_small" in kinds:
        kinds.remove("kronecker_small")
    if kinds and kinds[0] != "plain":
        kinds.insert(0, "plain")  # every probe's cost is a ratio to a plain LoRA step
    for kind in kinds:
        peft_model, state, step_s = _probe(dense, tok, calib, args, kind=kind)
        probes[kind] = step_s
        if kind == "plain":
            lora_bytes = sum(4 * p.numel() * 4 for p in peft_model.parameters() if p.requires_grad)  # p, grad, Adam
            continue
        settings = {"two_sided": [("uniform", "none")], "kronecker_small": [("global", "none")]}.get(
            kind, [("uniform", "none"), ("global", "none"), ("global", "relative")])
        for alloc, norm in settings:
            start = time.perf_counter()
            model, report = compress_peft_model(peft_model, fisher=state, weighting=kind.replace("_small", ""),
                                                allocation=alloc, loss_normalization=norm, svd_method="exact",
                                                progress=False)
            label = f"fisher_lora {kind} {alloc}" + (f" ({norm})" if alloc == "global" else "")
            if kind == "kronecker_small":
                label = f"fisher_lora kronecker (kronecker_max_dim {args.kronecker_max_dim}) {alloc}"
            record(label, model, report, time.perf_counter() - start)
            del model
        if kind.startswith("kronecker"):
            gram_bytes[kind] = sum(4 * t.numel() for k, t in state.tensors.items() if ".gram_" in k)
        del peft_model, state

    summary = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "targets": args.targets,
        "keep": args.keep,
        "calibration_tokens": tokens,
        "probe_steps": args.steps,
        "eval_texts": len(test),
        "dense_perplexity": dense_ppl,
        "rows": rows,
        "costs": {
            "probe_step_s": {k: round(v, 3) for k, v in probes.items()},
            **{f"{k}_step_vs_lora": round(probes[k] / probes["plain"], 3) for k in probes if k != "plain"},
            **{f"{k}_gram_MB": round(v / 2**20, 1) for k, v in gram_bytes.items()},
            **{f"{k}_grams_vs_lora_training_state": round(v / lora_bytes, 2) for k, v in gram_bytes.items()},
            "model_fp32_MB": round(sum(4 * p.numel() for p in dense.parameters()) / 2**20, 1),
            "calibration_gram_collection_s": round(gram_s, 1),
            **({"whitened_uniform_compress_vs_svd": round(rows[1]["compress_s"] / max(svd_s, 1e-9), 2)}
               if whitened_rows else {}),
        },
        "command": command_line("compression_quality.py", args, skip=("out", "work")),
    }
    write_summary(summary, args.out)


if __name__ == "__main__":
    main()
