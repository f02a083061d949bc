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
Loss: every method sees the same batches in the same order; the training loss of each step is reported, and the
loss on held-out batches before and after training (``--eval-batches``).

Usage: ``python benchmarks/spsft.py`` (seq 512, batch 4: about 100 s per step on 2 busy CPU cores) or
``python benchmarks/spsft.py --quick`` (seq 128, batch 2, MLP-only targets and LoRA dropout 0.1 vs SPSFT only).
Prints one JSON object.
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
def build(method: str, targets, k: int, *, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    from hf_lowrank.offline import load_smollm2
    from hf_lowrank.peft_configs.spsft import SPSFTConfig

    model, _ = load_smollm2(dtype=dtype)
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
    from hf_lowrank import bundled

    need = n * batch * seq_len
    ids: list[int] = []
    for ex in bundled.sft_examples(split):
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


# ---------------------------------------------------------------------------------------------------- main
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
                    spsft["median_step_s"] / other["median_step_s"] if spsft["median_step_s"] else None
                ),
            }
        out["ratios"] = ratios
    del models, optims
    gc.collect()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seq 128, batch 2, MLP-only, SPSFT vs LoRA dropout 0.1")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--k", type=int, default=8, help="LoRA rank k; SPSFT uses r=2k rows")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per method after the measured one")
    p.add_argument("--eval-batches", type=int, default=0, help="held-out batches for the loss before/after")
    p.add_argument("--lr-spsft", type=float, default=1e-4)
    p.add_argument("--lr-lora", type=float, default=2e-4)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument(
        "--methods",
        nargs="+",
        default=["spsft", "lora_dropout0.1", "lora_dropout0"],
        choices=["spsft", "lora_dropout0.1", "lora_dropout0"],
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.batch_size = 128, 2
        if args.targets == list(TARGETS):
            args.targets = ["mlp_only"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from hf_lowrank.offline import load_smollm2

    _, tokenizer = load_smollm2()
    batches = make_batches(tokenizer, args.steps + 1, args.batch_size, args.seq_len, "train")
    eval_batches = (
        make_batches(tokenizer, args.eval_batches, args.batch_size, args.seq_len, "test") if args.eval_batches else []
    )
    result = {
        "benchmark": "spsft_vs_lora",
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "config": {
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "lora_r": args.k,
            "lora_alpha": 16,
            "spsft_r": 2 * args.k,
            "steps_after_measured": args.steps,
            "threads": args.threads,
            "memory_method": "TorchDispatchMode storage tracker: peak live bytes allocated during one training step",
        },
        "groups": {},
    }
    t0 = time.perf_counter()
    for name in args.targets:
        result["groups"][name] = run_group(name, TARGETS[name], args.methods, batches, eval_batches, args)
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
