"""SPSFT vs LoRA on SmolLM2-135M: trainable parameters, training memory above the frozen model, step time, loss.

Seed 004 Table 6/7 compare SPSFT r=2k with LoRA r=k (about the same trainable parameters; LoRA alpha 16, dropout
0.1) and report "mem" = peak training memory minus the memory of inference with the pre-trained model. This script
measures the same on SmolLM2-135M (float32, CPU), side by side in one run, for two target sets (all Linear layers of
the blocks; MLP only = the seed's "FA" setting) and three methods: SPSFT r=2k, LoRA r=k (alpha 16, dropout 0.1 as in
the seed) and LoRA r=k with dropout 0 (peft's default).

Memory method (CPU has no allocator statistics): a ``TorchDispatchMode`` sees every tensor an operator returns,
tracks each new storage (not views, not in-place results) until Python frees it (``weakref.finalize`` on the
storage), and records the peak of the live bytes. Everything the step allocates is counted: activations saved for
backward, logits, transient buffers, gradients, AdamW state (created in the measured first step). Weights that
exist before the step are not counted, so the figure is "peak training memory above the frozen model". The
seed's own definition (minus an inference pass with the pre-trained model) is reported too. Breakdown: the tensors
saved for backward are collected with ``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage,
parameters excluded) and attributed to the innermost module that saved them.

Timing: after the measured step, ``--steps`` more steps per method, interleaved method by method so that load from
other processes hits all methods alike; the median step time is reported and ratios are SPSFT / LoRA.

Loss (a separate phase, without the meter, at a CPU-affordable ``--loss-seq-len`` / ``--loss-batch-size``): every
method and every seed starts from the same pre-trained weights and trains ``--loss-steps`` steps on the same packed
batches of the bundled SFT data (WordNet definitions, train split) in the same order; held-out loss is measured on
``--loss-eval-batches`` batches of the test split before (identical for all methods: every adapter starts at zero)
and after training. Seeds change only the random state (LoRA's ``A`` init, dropout masks), not the data. Per method:
final train loss (mean of the last 5 steps) and held-out loss after, averaged over seeds. Noise, per metric: the
larger of the spread (max - min) across seeds of any method and the gap between LoRA with dropout 0.1 and with
dropout 0 (two variants the seed treats as the same baseline). ``loss_within_noise``: |SPSFT - LoRA| <= noise for
both LoRA variants on both metrics; ``spsft_not_worse``: SPSFT - min(LoRA) <= noise.

Learning rates: constant, AdamW, 3e-3 for both by default, chosen by final train loss (not the held-out loss) in a
sweep at the loss phase's defaults (all_linear, 30 steps, seq 128, batch 4, seed 0; ``--phases loss``): SPSFT 3e-4 /
1e-3 / 3e-3 / 1e-2 -> 2.83 / 2.41 / 2.23 / 2.36 (peak at 3e-3); LoRA (dropout 0) 5e-4 / 1e-3 / 3e-3 -> 2.31 / 2.16 /
2.11 (still improving at 3e-3, so LoRA is if anything under-tuned). The seed's Llama rates (SPSFT 2e-5, LoRA 1e-4,
several epochs with linear decay) belong to another regime: here both losses keep falling as the rate rises to 3e-3,
so at low rates the gap would measure the rate rather than the method. Other rates: ``--lr-spsft`` / ``--lr-lora``.

Usage: ``python benchmarks/spsft.py`` (memory/time at seq 512, batch 4: 10-20 s per metered step on 2 CPU cores,
several times that when they are busy; then the loss phase; about 12 minutes in all) or ``python benchmarks/spsft.py --quick`` (seq 128, batch 2, MLP-only targets, LoRA
dropout 0.1 vs SPSFT only, short loss phase). ``--phases memory`` or ``--phases loss`` runs one phase.
Prints one JSON object with a top-level ``summary`` (ratios SPSFT / LoRA per target set, goals, loss verdict).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import weakref
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MLP = ["gate_proj", "up_proj", "down_proj"]
TARGETS = {"all_linear": "all-linear", "mlp_only": MLP}
METHODS = ("spsft", "lora_dropout0.1", "lora_dropout0")
MiB = 2**20


# ---------------------------------------------------------------------------------------------------- measurement
class LiveTensorMeter(TorchDispatchMode):
    """Peak of the bytes of tensor storages allocated inside the context and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            weakref.finalize(storage, self._free, key)
            self.peak = max(self.peak, self.current)
        return out


@contextmanager
def saved_tensor_census(model: torch.nn.Module):
    """Collect the storages saved for backward, attributed to the innermost running module."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    stack: list[str] = []
    by_storage: dict[int, tuple[str, int]] = {}
    handles = []

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)

        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in own and key not in by_storage and st.nbytes() > 0:
            by_storage[key] = (stack[-1] if stack else "", st.nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield by_storage
    finally:
        for h in handles:
            h.remove()


def categorize(module_name: str) -> str:
    if ".lora_" in module_name:
        return "lora_adapter"  # dropout output + mask, A x
    if module_name.endswith(("_proj", "_proj.base_layer")):
        return "target_linear_input"  # the input x of an adapted Linear (kept by SPSFT's row update / LoRA's A)
    if "self_attn" in module_name:
        return "attention"
    if ".mlp" in module_name:
        return "mlp_activation"
    if "norm" in module_name:
        return "norms"
    if "lm_head" in module_name:
        return "lm_head"
    return "loss_and_other"


# ---------------------------------------------------------------------------------------------------- models, data
SPSFT_ROWS = {"importance": "l2", "calib": None}
"""How SPSFT selects its rows (``--spsft-importance``): ``l2`` (data-free) or ``taylor`` (scored on ``calib``, the
first ``--calib-batches`` training batches, through :func:`hf_lowrank.tuners.spsft.spsft_importance`)."""


def build(method: str, targets, k: int, *, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.tuners.spsft import SPSFTConfig

    model, _ = load_smollm2(dtype=dtype)
    if method == "spsft" and SPSFT_ROWS["importance"] != "l2":
        from hf_lowrank.tuners.spsft import spsft_importance

        model = get_peft_model(model, SPSFTConfig(r=2 * k, target_modules=targets, importance="taylor"))
        spsft_importance(model, [{"input_ids": ids, "labels": ids} for ids in SPSFT_ROWS["calib"]], progress=False)
        model.train()
        return model
    if method == "spsft":
        config = SPSFTConfig(r=2 * k, target_modules=targets)
    elif method.startswith("lora"):
        dropout = 0.1 if method == "lora_dropout0.1" else 0.0
        config = LoraConfig(r=k, lora_alpha=16, lora_dropout=dropout, target_modules=targets)
    else:
        raise ValueError(method)
    model = get_peft_model(model, config)
    model.train()
    return model


def make_batches(tokenizer, n: int, batch: int, seq_len: int, split: str) -> list[torch.Tensor]:
    from hf_lowrank.demo import wordnet

    need = n * batch * seq_len
    ids: list[int] = []
    for ex in wordnet.sft_examples(split):
        ids.extend(tokenizer(ex["prompt"] + ex["completion"])["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"not enough bundled text for {n} batches of {batch}x{seq_len} tokens")
    flat = torch.tensor(ids[:need], dtype=torch.long)
    return list(flat.view(n, batch, seq_len))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_step(model, optimizer, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


@torch.no_grad()
def eval_loss(model, batches) -> float:
    was = model.training
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in batches]
    model.train(was)
    return sum(losses) / len(losses)


def measure_first_step(model, optimizer, ids) -> dict:
    """One training step under the meter; the saved-tensor census covers its forward."""
    gc.collect()
    meter = LiveTensorMeter()
    t0 = time.perf_counter()
    with meter:
        with saved_tensor_census(model) as saved:
            out = model(input_ids=ids, labels=ids)
        after_forward = meter.current
        logits_bytes = out.logits.untyped_storage().nbytes()
        out.loss.backward()
        loss = float(out.loss.detach())
        del out
        grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        opt_state = sum(
            v.untyped_storage().nbytes()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    by_category: dict[str, int] = defaultdict(int)
    for module_name, nbytes in saved.values():
        by_category[categorize(module_name)] += nbytes
    return {
        "peak_mib": meter.peak / MiB,
        "after_forward_mib": after_forward / MiB,
        "saved_for_backward_mib": sum(n for _, n in saved.values()) / MiB,
        "saved_by_category_mib": {k: round(v / MiB, 2) for k, v in sorted(by_category.items())},
        "logits_mib": logits_bytes / MiB,
        "grads_mib": grads / MiB,
        "optimizer_state_mib": opt_state / MiB,
        "first_step_s": seconds,
        "first_loss": loss,
    }


def inference_peak(model, ids) -> float:
    gc.collect()
    meter = LiveTensorMeter()
    with torch.no_grad(), model.disable_adapter(), meter:
        model(input_ids=ids, labels=ids)
    return meter.peak / MiB


# ---------------------------------------------------------------------------------------------------- memory/time phase
def run_group(name, targets, methods, batches, eval_batches, args) -> dict:
    models = {m: build(m, targets, args.k) for m in methods}
    lrs = {m: (args.lr_spsft if m == "spsft" else args.lr_lora) for m in methods}
    optims = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=lrs[m]) for m in methods}
    out: dict = {"methods": {}}
    out["inference_peak_mib"] = inference_peak(models[methods[0]], batches[0])
    for m in methods:
        res = {"trainable_params": trainable(models[m]), "lr": lrs[m]}
        if eval_batches:
            res["eval_loss_before"] = eval_loss(models[m], eval_batches)
        res.update(measure_first_step(models[m], optims[m], batches[0]))
        res["mem_seed_definition_mib"] = res["peak_mib"] - out["inference_peak_mib"]
        res["train_losses"] = [res.pop("first_loss")]
        res["step_times_s"] = []
        out["methods"][m] = res
        print(f"[{name}] {m}: peak {res['peak_mib']:.0f} MiB, first step {res['first_step_s']:.1f}s", file=sys.stderr)
    for step in range(1, args.steps + 1):
        for m in methods:  # interleaved: background load hits every method alike
            t0 = time.perf_counter()
            loss = train_step(models[m], optims[m], batches[step % len(batches)])
            out["methods"][m]["step_times_s"].append(time.perf_counter() - t0)
            out["methods"][m]["train_losses"].append(loss)
        print(f"[{name}] step {step}/{args.steps} done", file=sys.stderr)
    for m in methods:
        res = out["methods"][m]
        res["median_step_s"] = statistics.median(res["step_times_s"]) if res["step_times_s"] else None
        if eval_batches:
            res["eval_loss_after"] = eval_loss(models[m], eval_batches)
    spsft = out["methods"].get("spsft")
    if spsft:
        ratios = {}
        for m in methods:
            if m == "spsft":
                continue
            other = out["methods"][m]
            ratios[f"spsft_over_{m}"] = {
                "trainable_params": spsft["trainable_params"] / other["trainable_params"],
                "peak_mem_above_model": spsft["peak_mib"] / other["peak_mib"],
                "mem_seed_definition": spsft["mem_seed_definition_mib"] / other["mem_seed_definition_mib"],
                "saved_for_backward": spsft["saved_for_backward_mib"] / other["saved_for_backward_mib"],
                "median_step_time": (
                    spsft["median_step_s"] / other["median_step_s"]
                    if spsft["median_step_s"] and other["median_step_s"]
                    else None
                ),
            }
        out["ratios"] = ratios
    del models, optims
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------------- loss phase
FINAL_WINDOW = 5  # final train loss = mean of the last this many steps


def loss_run(method: str, targets, lr: float, seed: int, train_batches, eval_batches, k: int) -> dict:
    """Train one fresh adapter for ``len(train_batches)`` steps (constant LR, AdamW) and measure held-out loss."""
    torch.manual_seed(seed)  # LoRA's A init and the dropout masks; SPSFT (l2 rows, zero init) draws nothing
    model = build(method, targets, k)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    t0 = time.perf_counter()
    losses = [train_step(model, optimizer, ids) for ids in train_batches]
    train_s = time.perf_counter() - t0
    after = eval_loss(model, eval_batches)
    del model, optimizer
    gc.collect()
    return {
        "train_losses": [round(x, 4) for x in losses],
        "final_train_loss": statistics.fmean(losses[-FINAL_WINDOW:]),
        "eval_loss_after": after,
        "train_s": round(train_s, 1),
    }


def _verdict(per_method: dict, metric: str) -> dict:
    """Noise of ``metric`` and SPSFT's distance from each LoRA variant (see the module docstring)."""
    means = {m: statistics.fmean(r[metric]) for m, r in per_method.items()}
    spreads = {m: max(r[metric]) - min(r[metric]) for m, r in per_method.items() if len(r[metric]) > 1}
    loras = [m for m in means if m.startswith("lora")]
    dropout_gap = (
        abs(means["lora_dropout0.1"] - means["lora_dropout0"])
        if "lora_dropout0.1" in means and "lora_dropout0" in means
        else None
    )
    parts = [v for v in [*spreads.values(), dropout_gap] if v is not None]
    noise = max(parts) if parts else None
    out: dict = {
        "means": means,
        "seed_spread": spreads,
        "lora_dropout_gap": dropout_gap,
        "noise": noise,
    }
    if "spsft" in means and loras:
        diffs = {f"spsft_minus_{m}": means["spsft"] - means[m] for m in loras}
        out.update(diffs)
        if noise is not None:
            out["within_noise"] = all(abs(d) <= noise for d in diffs.values())
            out["spsft_not_worse"] = means["spsft"] - min(means[m] for m in loras) <= noise
        else:
            out["within_noise"] = out["spsft_not_worse"] = None  # one seed, one LoRA variant: no noise estimate
    return out


def run_loss_group(name, targets, methods, train_batches, eval_batches, args) -> dict:
    """The loss phase for one target set: every method x every seed from the same start on the same batches."""
    lrs = {m: (args.lr_spsft if m == "spsft" else args.lr_lora) for m in methods}
    base = build(methods[0], targets, args.k)
    with base.disable_adapter():
        before = eval_loss(base, eval_batches)
    del base
    gc.collect()
    per_method: dict = {m: {"lr": lrs[m], "runs": []} for m in methods}
    for seed in range(args.loss_seeds):
        for m in methods:
            if m == "spsft" and seed > 0:
                # l2 rows, zero init, no dropout: SPSFT draws no random numbers, so every seed repeats seed 0's run
                per_method[m]["runs"].append({**per_method[m]["runs"][0], "seed": seed, "same_as_seed": 0})
                continue
            res = loss_run(m, targets, lrs[m], seed, train_batches, eval_batches, args.k)
            per_method[m]["runs"].append({"seed": seed, **res})
            print(
                f"[loss {name}] seed {seed} {m}: final train {res['final_train_loss']:.4f}, "
                f"eval {before:.4f} -> {res['eval_loss_after']:.4f} ({res['train_s']:.0f}s)",
                file=sys.stderr,
            )
    metrics = {
        m: {k: [r[k] for r in v["runs"]] for k in ("final_train_loss", "eval_loss_after")}
        for m, v in per_method.items()
    }
    for m, v in per_method.items():
        v["final_train_loss_mean"] = statistics.fmean(metrics[m]["final_train_loss"])
        v["eval_loss_after_mean"] = statistics.fmean(metrics[m]["eval_loss_after"])
    verdicts = {
        metric: _verdict({m: metrics[m] for m in methods}, metric)
        for metric in ("final_train_loss", "eval_loss_after")
    }
    within = [v.get("within_noise") for v in verdicts.values()]
    not_worse = [v.get("spsft_not_worse") for v in verdicts.values()]
    return {
        "eval_loss_before": before,
        "methods": per_method,
        "verdicts": verdicts,
        "loss_within_noise": None if None in within or not within else all(within),
        "spsft_not_worse": None if None in not_worse or not not_worse else all(not_worse),
    }


# ---------------------------------------------------------------------------------------------------- summary
GOALS = {  # seed 004 / issue 7: SPSFT / LoRA ratios
    "mem_vs_lora_dropout0.1_max": 0.8,
    "step_time_vs_lora_dropout0.1_max": 1.0,
    "mem_vs_lora_dropout0_max": 1.0,
    "step_time_vs_lora_dropout0_max": 1.0,
}


def summarize(result: dict) -> dict:
    """Ratios SPSFT / LoRA per target set, the issue's goals checked against them, and the loss verdicts."""
    summary: dict = {"goals": GOALS}
    for name, group in result.get("groups", {}).items():
        row: dict = {}
        methods = group["methods"]
        if "spsft" in methods:
            row["trainable_params"] = {m: r["trainable_params"] for m, r in methods.items()}
            for other in ("lora_dropout0.1", "lora_dropout0"):
                ratios = group["ratios"].get(f"spsft_over_{other}")
                if ratios is None:
                    continue
                row[f"mem_ratio_vs_{other}"] = round(ratios["peak_mem_above_model"], 4)
                row[f"mem_seed_definition_ratio_vs_{other}"] = round(ratios["mem_seed_definition"], 4)
                row[f"step_time_ratio_vs_{other}"] = (
                    round(ratios["median_step_time"], 4) if ratios["median_step_time"] is not None else None
                )
                row[f"mem_goal_met_vs_{other}"] = ratios["peak_mem_above_model"] <= GOALS[f"mem_vs_{other}_max"]
                row[f"step_time_goal_met_vs_{other}"] = (
                    ratios["median_step_time"] <= GOALS[f"step_time_vs_{other}_max"]
                    if ratios["median_step_time"] is not None
                    else None
                )
            row["peak_mem_above_model_mib"] = {m: round(r["peak_mib"], 1) for m, r in methods.items()}
            row["median_step_s"] = {
                m: round(r["median_step_s"], 2) if r["median_step_s"] else None for m, r in methods.items()
            }
        summary[name] = row
    loss_groups = result.get("loss", {}).get("groups", {})
    if loss_groups:
        loss: dict = {}
        for name, group in loss_groups.items():
            loss[name] = {
                "eval_loss_before": round(group["eval_loss_before"], 4),
                **{
                    f"{metric}_{m}": round(v, 4)
                    for metric, verdict in group["verdicts"].items()
                    for m, v in verdict["means"].items()
                },
                **{f"{metric}_noise": verdict["noise"] for metric, verdict in group["verdicts"].items()},
                "loss_within_noise": group["loss_within_noise"],
                "spsft_not_worse": group["spsft_not_worse"],
            }
        summary["loss"] = loss
        flags = [g["loss_within_noise"] for g in loss_groups.values()]
        summary["loss_within_noise"] = None if None in flags else all(flags)
        flags = [g["spsft_not_worse"] for g in loss_groups.values()]
        summary["spsft_loss_not_worse"] = None if None in flags else all(flags)
    return summary


def machine_info() -> dict:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "niceness": os.nice(0),
        "load_average_at_start": os.getloadavg(),
        "note": "shared machine: other processes ran at the same time; compare ratios measured side by side",
    }


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    import os
    import shlex

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seq 128, batch 2, MLP-only, SPSFT vs LoRA dropout 0.1")
    p.add_argument("--phases", nargs="+", default=["memory", "loss"], choices=["memory", "loss"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--k", type=int, default=8, help="LoRA rank k; SPSFT uses r=2k rows")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per method after the measured one")
    p.add_argument("--eval-batches", type=int, default=0, help="memory phase: held-out batches for loss before/after")
    p.add_argument("--loss-steps", type=int, default=30, help="loss phase: training steps per run")
    p.add_argument("--loss-seq-len", type=int, default=128)
    p.add_argument("--loss-batch-size", type=int, default=4)
    p.add_argument("--loss-seeds", type=int, default=2, help="loss phase: runs per method (seeds 0..n-1)")
    p.add_argument("--loss-eval-batches", type=int, default=8, help="loss phase: held-out batches")
    p.add_argument("--loss-targets", nargs="+", default=None, choices=list(TARGETS), help="default: --targets")
    p.add_argument("--lr-spsft", type=float, default=3e-3)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spsft-importance", default="l2", choices=["l2", "taylor"], help="SPSFT row selection")
    p.add_argument("--calib-batches", type=int, default=4, help="training batches that score rows for 'taylor'")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.batch_size = 128, 2
        if args.targets == list(TARGETS):
            args.targets = ["mlp_only"]
        if args.methods == list(METHODS):
            args.methods = ["spsft", "lora_dropout0.1"]
        args.loss_steps, args.loss_seq_len, args.loss_batch_size, args.loss_eval_batches = 8, 64, 2, 2
    if args.loss_targets is None:
        args.loss_targets = args.targets
    if "loss" in args.phases and args.loss_steps < FINAL_WINDOW:
        raise ValueError(f"--loss-steps must be >= {FINAL_WINDOW} (the final train loss averages that many steps)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from hf_lowrank.demo.models import load_smollm2

    _, tokenizer = load_smollm2()
    result = {
        "benchmark": "spsft_vs_lora",
        "command": shlex.join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])]),
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "config": {
            "lora_r": args.k,
            "lora_alpha": 16,
            "spsft_r": 2 * args.k,
            "spsft_importance": args.spsft_importance,
            "lr_spsft": args.lr_spsft,
            "lr_lora": args.lr_lora,
            "optimizer": "AdamW (torch defaults, weight decay 0.01), constant learning rate",
            "threads": args.threads,
        },
    }
    t0 = time.perf_counter()
    SPSFT_ROWS["importance"] = args.spsft_importance
    if "memory" in args.phases:
        batches = make_batches(tokenizer, args.steps + 1, args.batch_size, args.seq_len, "train")
        SPSFT_ROWS["calib"] = batches[: args.calib_batches]
        eval_batches = (
            make_batches(tokenizer, args.eval_batches, args.batch_size, args.seq_len, "test")
            if args.eval_batches
            else []
        )
        result["config"]["memory_phase"] = {
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "steps_after_measured": args.steps,
            "memory_method": "TorchDispatchMode storage tracker: peak live bytes allocated during one training step",
        }
        result["groups"] = {}
        for name in args.targets:
            result["groups"][name] = run_group(name, TARGETS[name], args.methods, batches, eval_batches, args)
        result["memory_phase_wall_s"] = round(time.perf_counter() - t0, 1)
    if "loss" in args.phases:
        t1 = time.perf_counter()
        train_batches = make_batches(tokenizer, args.loss_steps, args.loss_batch_size, args.loss_seq_len, "train")
        eval_batches = make_batches(tokenizer, args.loss_eval_batches, args.loss_batch_size, args.loss_seq_len, "test")
        SPSFT_ROWS["calib"] = train_batches[: args.calib_batches]
        result["config"]["loss_phase"] = {
            "steps": args.loss_steps,
            "seq_len": args.loss_seq_len,
            "batch_size": args.loss_batch_size,
            "seeds": args.loss_seeds,
            "eval_batches": args.loss_eval_batches,
            "data": "wordnet.sft_examples prompt+completion, packed with EOS; train split for training, test split "
            "held out",
            "final_train_loss": f"mean of the last {FINAL_WINDOW} steps",
            "noise": "max(spread across seeds of any method, |LoRA dropout 0.1 - LoRA dropout 0|), per metric",
        }
        result["loss"] = {"groups": {}}
        for name in args.loss_targets:
            result["loss"]["groups"][name] = run_loss_group(
                name, TARGETS[name], args.methods, train_batches, eval_batches, args
            )
        result["loss_phase_wall_s"] = round(time.perf_counter() - t1, 1)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["summary"] = summarize(result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
