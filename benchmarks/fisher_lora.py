"""FisherLoRA benchmark: task metric after compression, training step time, peak memory. Prints one JSON object.

Two tasks, both measured in one run:

- ``classifier``: all-MiniLM-L6-v2 + a sequence-classification head on the bundled WordNet category task (6
  classes), the seed's RoBERTa/GLUE setting in small. Targets: the FFN (``intermediate.dense``, ``output.dense``).
  Metric: test accuracy.
- ``sft``: SmolLM2-135M-Instruct fine-tuned with ``LowRankSFTTrainer`` on the bundled definition prompts.
  Targets: ``gate_proj``, ``up_proj``, ``down_proj`` (the seed's Mistral choice). Metric: perplexity on held-out
  definition texts.

Rows, at several compression levels (fraction of each target module's parameters kept):

- ``svd_r8`` / ``svd_r1``: plain truncated SVD of the fine-tuned (merged) weights (Fisher = 1);
- ``fwsvd_full_row`` / ``_two_sided``: FWSVD with the Fisher of the FULL gradients ``grad(W)**2`` of the target
  weights, collected on the same r=8 LoRA training run (``fisher_source="full"``), compressing the same merged
  weights: it isolates the quality of the Fisher estimate, which is the seed's claim;
- ``fisher_lora_r8_row`` / ``_two_sided`` (and ``r1``): FWSVD with the Fisher from the LoRA factors' gradients;
- classifier only, ``fullft_*``: the seed's FWSVD protocol, full fine-tuning of the encoder with full-gradient
  Fisher, then ``svd`` / ``fwsvd`` of that model;
- ``uncompressed``: each fine-tuned model before compression.

Step time: the same LoRA model trains on the same batches with the Fisher hooks attached / detached on alternate
steps; the ratio of the medians is reported (goal <= 1.05).

Peak memory: each configuration runs in a fresh subprocess (SmolLM2, a few training steps, then compression) and
reports the peak resident set size of training + compression (the kernel's counter is reset once the model is
loaded) and ``workload``, that peak minus the RSS with the model loaded (activations, gradients, optimizer state,
Fisher, new factors). Configurations: plain LoRA
training; FisherLoRA train + compress, on a copy (``save_model``'s default: the trained model stays usable) and in
place (``LowRankTrainer(inplace=True)``); full-gradient FWSVD on the LoRA run; the seed's FWSVD (full
fine-tuning with AdamW and full-gradient Fisher, then compression). Goals: FisherLoRA <= 0.8x full-gradient FWSVD,
<= 1.05x plain LoRA.

Usage: ``python benchmarks/fisher_lora.py [--quick] [--tasks classifier,sft] [--no-memory]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

CLS_TARGETS = r".*\.layer\.\d+\.(intermediate|output)\.dense"
SFT_TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """Peak RSS since the last :func:`_reset_peak` (VmHWM), or of the whole process where that is not available."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _quiet():
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------------ classifier

def _train_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=out, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=10**6,
                seed=0, data_seed=0, dataloader_num_workers=0, lr_scheduler_type="constant", max_grad_norm=1.0)
    base.update(kw)
    return TrainingArguments(**base)


def _sliced(model, keep):
    """A weight-sharing copy of a compressed model with every factor pair cut to the rank of ``keep``.

    The factors of a (weighted) exact SVD are ordered by singular value, so their first ``k`` rows / columns ARE the
    rank-``k`` (weighted) truncation: lower compression levels reuse the SVD of the highest one.
    """
    from hf_lowrank.compression.compress import set_submodule
    from hf_lowrank.modules import LowRankLinear
    from hf_lowrank.ops.svd import rank_for_keep
    from hf_lowrank.tuners.fisher_lora.compress import shared_weight_copy

    out = shared_weight_copy(model)
    before = after = 0
    for name, m in list(out.named_modules()):
        if isinstance(m, LowRankLinear):
            k = rank_for_keep(m.out_features, m.in_features, keep)
            if k > m.rank:
                raise ValueError("levels must be visited from the highest keep down")
            set_submodule(out, name, LowRankLinear.from_factors(m.down.weight[:k], m.up.weight[:, :k], m.bias))
            before += m.out_features * m.in_features
            after += k * (m.out_features + m.in_features)
    return out, after / before


def _levels(compressed, report, keeps, metric) -> dict:
    """Metric at every keep level; the first (highest) is ``compressed`` itself, the others are slices of it."""
    rows = {}
    for i, keep in enumerate(keeps):
        if i == 0:
            model, kept = compressed, report.kept_fraction
        else:
            model, kept = _sliced(compressed, keep)
        entry = {"metric": metric(model), "kept_fraction": round(kept, 4)}
        if i == 0:
            errs = [m.rel_error for m in report.modules if m.rel_error is not None]
            entry["mean_rel_error"] = round(statistics.mean(errs), 4)
        rows[f"keep_{keep}"] = entry
        del model
        gc.collect()
    return rows


def _compress_levels(peft_model, fisher, source, weighting, keeps, metric):
    from hf_lowrank.tuners.fisher_lora import compress_peft_model

    model, report = compress_peft_model(peft_model, fisher=fisher if source != "none" else None, fisher_source=source,
                                        weighting=weighting, keep=keeps[0], rank=None, rank_pattern=None,
                                        svd_method="exact", progress=False)
    return _levels(model, report, keeps, metric)


def _rows_for_lora_run(peft_model, callbacks, keeps, metric, with_full, with_svd):
    rows: dict[str, dict] = {}
    if with_svd:
        rows["svd"] = _compress_levels(peft_model, None, "none", None, keeps, metric)
    if with_full:
        for weighting in ("row", "two_sided"):
            rows[f"fwsvd_full_{weighting}"] = _compress_levels(peft_model, callbacks["full"], "full", weighting, keeps,
                                                               metric)
    for weighting in ("row", "two_sided"):
        rows[f"fisher_lora_{weighting}"] = _compress_levels(peft_model, callbacks["lora"], "lora", weighting, keeps,
                                                            metric)
    return rows


def bench_classifier(quick: bool, tmp: str) -> dict:
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer

    from hf_lowrank.demo import evaluation, models, wordnet
    from hf_lowrank.trainer import FisherCollectorCallback, LowRankTrainer
    from hf_lowrank.tuners.fisher_lora import FisherLoRAConfig
    from hf_lowrank.tuners.fisher_lora.compress import shared_weight_copy

    n_train, n_test, steps_epochs = (96, 60, 1) if quick else (512, 240, 1)
    keeps = [0.5] if quick else [0.6, 0.4, 0.2]  # highest first (lower levels slice its factors)
    texts, labels, names = wordnet.category_task("train", n=n_train)
    test_texts, test_labels, _ = wordnet.category_task("test", n=n_test)
    _, tok = models.load_minilm(num_labels=len(names))
    train_ds = evaluation.ClassificationDataset(tok, texts, labels, max_length=64)
    collator = DataCollatorWithPadding(tok)

    def metric(model):
        return round(evaluation.accuracy(model, tok, test_texts, test_labels, batch_size=64, max_length=64,
                                         progress=False), 4)

    result: dict = {"task": "WordNet category (6 classes), all-MiniLM-L6-v2 + head", "n_train": n_train,
                    "n_test": n_test, "targets": "FFN intermediate.dense + output.dense (12 modules)",
                    "keep_levels": keeps, "rows": {}, "uncompressed": {}, "train_seconds": {}}
    for r in (8, 1):
        torch.manual_seed(0)
        model, _ = models.load_minilm(num_labels=len(names))
        cfg = FisherLoRAConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=CLS_TARGETS,
                               compress_keep=keeps[0])
        pm = get_peft_model(model, cfg)
        cbs = {"lora": FisherCollectorCallback("lora")}
        if r == 8:
            cbs["full"] = FisherCollectorCallback("full")
        args = _train_args(f"{tmp}/cls_r{r}", per_device_train_batch_size=16, num_train_epochs=steps_epochs,
                           learning_rate=2e-3)
        trainer = LowRankTrainer(model=pm, args=args, train_dataset=train_ds, data_collator=collator,
                                 callbacks=list(cbs.values()))
        t0 = time.perf_counter()
        trainer.train()
        result["train_seconds"][f"lora_r{r}"] = round(time.perf_counter() - t0, 1)
        pm.eval()
        result["uncompressed"][f"lora_r{r}"] = metric(pm)
        rows = _rows_for_lora_run(pm, cbs, keeps, metric, with_full=(r == 8), with_svd=True)
        for name, row in rows.items():
            key = name if name.startswith("fwsvd_full") else name.replace("fisher_lora", f"fisher_lora_r{r}")
            key = f"svd_r{r}" if name == "svd" else key
            result["rows"][key] = row
        if r == 8:
            result["step_time"] = _step_time_ratio(pm, train_ds, collator, quick)
        del trainer, pm, model
        gc.collect()

    # The seed's FWSVD protocol: full fine-tuning with full-gradient Fisher of the FFN.
    torch.manual_seed(0)
    model, _ = models.load_minilm(num_labels=len(names))
    fisher = FisherCollectorCallback("full", target_modules=CLS_TARGETS)
    args = _train_args(f"{tmp}/cls_full", per_device_train_batch_size=16, num_train_epochs=steps_epochs,
                       learning_rate=1e-4)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator, callbacks=[fisher])
    t0 = time.perf_counter()
    trainer.train()
    result["train_seconds"]["full_ft"] = round(time.perf_counter() - t0, 1)
    model.eval()
    result["uncompressed"]["full_ft"] = metric(model)
    from hf_lowrank.compression.compress import compress_model

    for label in ("fullft_svd", "fullft_fwsvd"):
        copy_ = shared_weight_copy(model)
        if label == "fullft_svd":
            rep = compress_model(copy_, keeps[0], target_modules=CLS_TARGETS, method="exact", progress=False)
        else:
            rep = compress_model(copy_, keeps[0], fisher=fisher, fisher_weighting="row", method="exact",
                                 progress=False)
        result["rows"][label] = _levels(copy_, rep, keeps, metric)
        del copy_
    return result


# ------------------------------------------------------------------------------------------------------ sft
def bench_sft(quick: bool, tmp: str) -> dict:
    import trl
    from datasets import Dataset

    from hf_lowrank.demo import evaluation, models, wordnet
    from hf_lowrank.trainer import FisherCollectorCallback, LowRankSFTTrainer
    from hf_lowrank.tuners.fisher_lora import FisherLoRAConfig

    n_train, n_eval, max_steps = (8, 4, 2) if quick else (32, 12, 8)
    keeps = [0.9] if quick else [0.95, 0.9, 0.8]  # highest first
    data = Dataset.from_list(wordnet.sft_examples("train", n=n_train))
    eval_texts = wordnet.definition_texts("test", n=n_eval)
    result: dict = {"task": "SmolLM2-135M-Instruct SFT on bundled definitions", "n_train_examples": n_train,
                    "steps": max_steps, "n_eval_texts": n_eval, "targets": "MLP gate/up/down_proj (90 modules)",
                    "keep_levels": keeps, "rows": {}, "uncompressed": {}, "train_seconds": {}}
    model, tok = models.load_smollm2()
    result["uncompressed"]["base_model"] = round(evaluation.perplexity(model, tok, eval_texts, max_length=64,
                                                                       batch_size=8, progress=False), 3)
    del model

    for r in (8, 1):
        torch.manual_seed(0)
        model, tok = models.load_smollm2()
        cfg = FisherLoRAConfig(r=r, lora_alpha=2 * r, target_modules=SFT_TARGETS, task_type="CAUSAL_LM",
                               compress_keep=keeps[0])
        cbs = {"lora": FisherCollectorCallback("lora")}
        if r == 8:
            cbs["full"] = FisherCollectorCallback("full")
        args = trl.SFTConfig(output_dir=f"{tmp}/sft_r{r}", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                             max_steps=max_steps, learning_rate=1e-3, max_length=64, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", logging_steps=10**6, seed=0,
                             lr_scheduler_type="constant", gradient_checkpointing=False, bf16=False)
        trainer = LowRankSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                    peft_config=cfg, callbacks=list(cbs.values()))
        t0 = time.perf_counter()
        trainer.train()
        result["train_seconds"][f"lora_r{r}"] = round(time.perf_counter() - t0, 1)
        pm = trainer.model.eval()

        def metric(m, tok=tok):
            return round(evaluation.perplexity(m, tok, eval_texts, max_length=64, batch_size=8, progress=False), 3)

        result["uncompressed"][f"lora_r{r}"] = metric(pm)
        rows = _rows_for_lora_run(pm, cbs, keeps, metric, with_full=(r == 8), with_svd=(r == 8))
        for name, row in rows.items():
            key = name if name.startswith("fwsvd_full") else name.replace("fisher_lora", f"fisher_lora_r{r}")
            key = f"svd_r{r}" if name == "svd" else key
            result["rows"][key] = row
        if r == 8:
            batches = [tok([e["prompt"] + e["completion"] for e in wordnet.sft_examples("train", n=4)],
                           padding=True, truncation=True, max_length=64, return_tensors="pt")]
            result["step_time"] = _step_time_ratio(pm, None, None, quick, batches=batches)
        del trainer, pm, model
        gc.collect()
    return result


# ------------------------------------------------------------------------------------------------ step time
def _step_time_ratio(peft_model, dataset, collator, quick, batches=None) -> dict:
    """Median training-step time with the Fisher hooks attached vs detached, alternating step by step."""
    from hf_lowrank.tuners.fisher_lora import FisherCollector

    if batches is None:
        items = [dataset[i] for i in range(32)]
        batches = [collator(items[i:i + 16]) for i in (0, 16)]
    batches = [{k: v for k, v in b.items()} for b in batches]
    for b in batches:
        if "labels" not in b:
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    collector = FisherCollector("lora")
    accumulate, hook_time = collector._accumulate, [0.0]

    def timed(key, grad):  # measures the hooks' own work, free of the step-to-step noise of shared cores
        t0 = time.perf_counter()
        accumulate(key, grad)
        hook_time[0] += time.perf_counter() - t0

    collector._accumulate = timed
    peft_model.train()
    times = {True: [], False: []}
    n = 2 if quick else 6

    def step():
        for b in batches:  # one or two micro-batches (gradient accumulation)
            (peft_model(**b).loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    for i in range(2 * n):
        with_hooks = i % 2 == 1
        if with_hooks:
            collector.attach(peft_model)
        t0 = time.perf_counter()
        step()
        times[with_hooks].append(time.perf_counter() - t0)
        if with_hooks:
            collector.detach()
    peft_model.eval()
    plain, fisher = statistics.median(times[False]), statistics.median(times[True])
    hook_per_step = hook_time[0] / n
    return {"plain_lora_s": round(plain, 4), "fisher_lora_s": round(fisher, 4), "ratio": round(fisher / plain, 4),
            "ratio_of_minima": round(min(times[True]) / min(times[False]), 4),
            "hook_s_per_step": round(hook_per_step, 5), "ratio_from_hook_time": round(1 + hook_per_step / plain, 4),
            "steps_each": n,
            "method": "same model and batches, Fisher hooks attached on alternate steps; ratio of medians; "
                      "ratio_from_hook_time = 1 + (time spent inside the hooks per step) / plain step"}


# ---------------------------------------------------------------------------------------------- memory probes
MEMORY_CONFIGS = ("lora", "fisher_lora", "fisher_lora_inplace", "fwsvd_full_grad", "full_ft_fwsvd")


def memory_probe(config: str, quick: bool) -> dict:
    """One configuration in this (fresh) process: train a few steps, compress, report peak RSS."""
    idle = _rss_mb()
    _quiet()
    from peft import get_peft_model

    from hf_lowrank import compress_model
    from hf_lowrank.demo import models, wordnet
    from hf_lowrank.tuners.fisher_lora import FisherCollector, FisherLoRAConfig, compress_peft_model

    idle = max(idle, _rss_mb())
    model, tok = models.load_smollm2()
    with torch.no_grad():
        for p in model.parameters():  # make the weights resident (from_pretrained may leave them memory-mapped)
            p.data = p.data.clone()
    gc.collect()
    loaded = _rss_mb()
    phase_peak = _reset_peak()  # from here on, VmHWM is the peak of training + compression alone
    keep, steps = 0.9, 1
    texts = [e["prompt"] + e["completion"] for e in wordnet.sft_examples("train", n=8)]
    batch = tok(texts[:4], padding=True, truncation=True, max_length=64, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if config == "full_ft_fwsvd":
        collector = FisherCollector("full", target_modules=SFT_TARGETS).attach(model)
        trained = model
    else:
        pm = get_peft_model(model, FisherLoRAConfig(r=8, lora_alpha=16, target_modules=SFT_TARGETS, compress_keep=keep))
        collector = None
        if config.startswith("fisher_lora"):
            collector = FisherCollector("lora").attach(pm)
        elif config == "fwsvd_full_grad":
            collector = FisherCollector("full").attach(pm)
        trained = pm
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    trained.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        trained(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_peak = _peak_mb()
    if collector is not None:
        collector.detach()
        trained.eval()
        if config == "full_ft_fwsvd":
            del opt
            compress_model(trained, keep, fisher=collector, fisher_weighting="row", progress=False)
        else:
            # "fisher_lora": on a copy, as LowRankTrainer.save_model does by default (the trained model stays usable);
            # "fisher_lora_inplace": LowRankTrainer(inplace=True)
            compress_peft_model(pm, fisher=collector, fisher_source=collector.source,
                                inplace=config in ("fisher_lora_inplace", "fwsvd_full_grad"), progress=False)
    peak = _peak_mb()
    return {"config": config, "idle_rss_mb": round(idle, 1), "model_loaded_rss_mb": round(loaded, 1),
            "train_peak_rss_mb": round(train_peak, 1), "peak_rss_mb": round(peak, 1),
            "workload_mb": round(peak - loaded, 1), "phase_peak": phase_peak,
            "seconds": round(time.perf_counter() - t0, 1)}


def bench_memory(quick: bool) -> dict:
    configs = ("lora", "fisher_lora", "full_ft_fwsvd") if quick else MEMORY_CONFIGS
    probes = {}
    for config in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", config, "--threads",
               str(torch.get_num_threads())] + (["--quick"] if quick else [])
        # A fixed mmap threshold makes glibc return every block >= 128 KiB to the system when it is freed, so RSS
        # follows the live tensors; with the default (adaptive) threshold the peak of the same run varied by ~10%.
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            probes[config] = {"error": proc.stderr[-2000:]}
            continue
        probes[config] = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict = {"model": "SmolLM2-135M-Instruct float32, one training step on 4 x 64 tokens, then compression to keep 0.9 "
                          "of the MLP",
                 "method": "fresh subprocess per configuration; weights made resident, then the kernel's peak-RSS "
                           "counter is reset (VmHWM, /proc/self/clear_refs) so peak_rss = peak of training + compression; "
                           "workload = peak_rss - RSS with the model loaded (activations, gradients, optimizer state, "
                           "Fisher, new factors); glibc with MALLOC_MMAP_THRESHOLD_=131072 so freed blocks leave RSS",
                 "probes": probes, "ratios": {}}

    def ratio(a, b, key):
        if "error" in probes.get(a, {"error": 1}) or "error" in probes.get(b, {"error": 1}):
            return None
        return round(probes[a][key] / probes[b][key], 3)

    for fl in ("fisher_lora", "fisher_lora_inplace"):
        for base in ("lora", "fwsvd_full_grad", "full_ft_fwsvd"):
            for key in ("peak_rss_mb", "workload_mb"):
                value = ratio(fl, base, key)
                if value is not None:
                    out["ratios"][f"{fl}/{base} ({key.removesuffix('_mb')})"] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small configuration (smoke run)")
    parser.add_argument("--tasks", default="classifier,sft")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on shared cores more threads are slower, see the report)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.quick)))
        return 0
    _quiet()
    import contextlib
    import tempfile

    real_stdout = sys.stdout
    started = time.perf_counter()
    out: dict = {"benchmark": "fisher_lora", "quick": args.quick, "torch_threads": torch.get_num_threads(),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cpu", "device": "cpu"}
    # Trainers print their logs to stdout; the JSON object must be the only thing there.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for task in [t for t in args.tasks.split(",") if t]:
            if task not in ("classifier", "sft"):
                raise SystemExit(f"unknown task {task!r}; use classifier and/or sft")
            t0 = time.perf_counter()
            out[task] = bench_classifier(args.quick, tmp) if task == "classifier" else bench_sft(args.quick, tmp)
            out[task]["seconds"] = round(time.perf_counter() - t0, 1)
        if not args.no_memory:
            t0 = time.perf_counter()
            out["memory"] = bench_memory(args.quick)
            out["memory"]["seconds"] = round(time.perf_counter() - t0, 1)
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=1), file=real_stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
