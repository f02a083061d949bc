"""WeLoreLRC benchmark (seed 001, Table 1 and the fine-tuning cost claims) on SmolLM2-135M and bundled held-out prose.

One run, side by side on the same model and texts:

- ``dense``: perplexity of the unmodified model on ``prose_texts("test")``.
- per effective rank reduction (ERR, default 10/20/30/40/50%):
  ``uniform``: every target Linear cut by the same fraction of its rank (exact truncated SVD, as the seed's
  baseline); ``welore``: ``get_peft_model(model, WeLoreLRCConfig(reduction=ERR))`` (non-uniform ranks, N-LRCs kept
  exact) with its achieved and attempted reduction, the LRC count, parameters kept and the trainable share.
- ``finetune``: the WeLore model at ``--ft-err`` after a short LRC fine-tune (AdamW on bundled train prose; only
  the LRC factors train), perplexity before/after and its ratio to dense (goal from the issue: <= 2x dense at 20%).
- ``cost``: LRC fine-tuning (the PEFT model: only LRC factors train) vs full fine-tuning of the same compressed
  model (``merge_and_unload``, every parameter trainable). Step time: median over ``--cost-steps`` steps taken in
  turn, in this process. Memory: each in a fresh subprocess (the adapter reloaded with
  ``PeftModel.from_pretrained``; the compressed checkpoint with ``load_compressed``), peak RSS during two training
  steps (``/proc/self/status`` VmHWM, reset before the first step), plus the analytic bytes of parameters +
  gradients + AdamW state.

The seed's anchors (LLaMA-2 7B, C4): uniform vs WeLore 10.58 vs 7.13 at 10%, 91.99 vs 14.41 at 30%; ~3x throughput
and ~0.6x memory of full fine-tuning. SmolLM2-135M is far less low-rank, so the figures here are much harsher.

Run: ``python benchmarks/welore.py [--quick] [--threads N]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _log(msg: str) -> None:
    print(f"[welore-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _train_chunks(tokenizer, n_texts: int, seq: int) -> torch.Tensor:
    from hf_lowrank.demo.wordnet import prose_texts

    texts = prose_texts("train", n_texts)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    n = len(ids) // seq
    return ids[: n * seq].view(n, seq)


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _train_steps(model, chunks: torch.Tensor, *, steps: int, batch: int, lr: float, warmup: int, log_every: int = 0):
    """AdamW on the trainable parameters; returns per-step wall times and losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    times, losses = [], []
    for step in range(steps):
        start = (step * batch) % max(len(chunks) - batch, 1)
        ids = chunks[start : start + batch]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            _log(f"  step {step + 1}/{steps} loss {losses[-1]:.3f} ({times[-1]:.1f}s)")
    model.eval()
    return times, losses


def _interleaved_step_times(models: dict, chunks: torch.Tensor, *, steps: int, batch: int) -> dict:
    """Median training-step time of each model, steps taken in turn (A B A B ...) so that a change of machine
    load hits every model alike; the first step of each (optimizer state allocation) is not timed."""
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in models.items()}
    times: dict = {k: [] for k in models}
    for step in range(steps + 1):
        ids = chunks[step * batch : (step + 1) * batch]
        for key, model in models.items():
            model.train()
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opts[key].step()
            opts[key].zero_grad(set_to_none=True)
            if step:
                times[key].append(time.perf_counter() - t0)
            model.eval()
    return {k: statistics.median(v) for k, v in times.items()}


def _state_bytes(model) -> dict:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    t_bytes = sum(p.numel() * p.element_size() for p in trainable)
    # gradients (same dtype as the parameter) + AdamW exp_avg and exp_avg_sq
    return {
        "param_bytes": params,
        "trainable_params": sum(p.numel() for p in trainable),
        "all_params": sum(p.numel() for p in model.parameters()),
        "train_state_bytes": params + 3 * t_bytes,
    }


def _worker(args) -> None:
    """Fine-tuning cost in a fresh process: ``--worker lrc`` (PEFT, LRC factors only) or ``full``."""
    torch.set_num_threads(args.threads)
    from hf_lowrank.demo.models import load_smollm2

    workdir = Path(args.workdir)
    base, tok = load_smollm2()
    if args.quick:
        base.model.layers = base.model.layers[: args.quick_layers]
        base.config.num_hidden_layers = args.quick_layers
    if args.worker == "lrc":
        from peft import PeftModel

        import hf_lowrank.tuners.welore  # noqa: F401  (registers the PEFT type)

        model = PeftModel.from_pretrained(base, workdir / "adapter", is_trainable=True)
    else:
        from hf_lowrank.compression.checkpoint import load_compressed

        del base
        model = load_compressed(workdir / "merged")
        model.requires_grad_(True)
    gc.collect()
    chunks = _train_chunks(tok, 64, args.seq)
    rss_before = _status_bytes("VmRSS")
    reset = _reset_peak_rss()
    # two steps: the first allocates gradients and AdamW state, the second runs with everything in place
    times, _ = _train_steps(model, chunks, steps=2, batch=args.batch, lr=1e-5, warmup=1)
    peak = _status_bytes("VmHWM") if reset else None
    out = {
        "isolated_step_time_s": times[-1],
        "rss_before_training_bytes": rss_before,
        "peak_rss_training_bytes": peak,
        **_state_bytes(model),
    }
    print(json.dumps(out))


def _run_worker(kind: str, workdir: Path, args) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", kind, "--workdir", str(workdir), "--threads", str(args.threads),
        "--batch", str(args.batch), "--seq", str(args.seq),
    ]
    if args.quick:
        cmd += ["--quick", "--quick-layers", str(args.quick_layers)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"the {kind} cost worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _row_fisher(model, targets: dict, chunks: torch.Tensor, *, batches: int, batch: int) -> dict:
    """Empirical Fisher per output row of each target weight: sum over batches of ``(dL/dW)^2`` summed over inputs."""
    fisher = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in targets.items()}
    model.eval()
    for b in range(batches):
        ids = chunks[b * batch : (b + 1) * batch]
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        for name, module in targets.items():
            fisher[name] += module.weight.grad.double().square().sum(dim=1)
    model.zero_grad(set_to_none=True)
    return {name: f.float() for name, f in fisher.items()}


@torch.no_grad()
def _uniform_truncate(model, svds: dict, err: float) -> dict:
    """Cut every target to ``round((1 - err) * full)`` ranks in place (dense); returns params kept if each layer is
    stored in its cheaper form (factor pair below the break-even rank, dense otherwise)."""
    from hf_lowrank.ops.svd import factorized_params

    before = after = 0
    removed = total = 0
    for name, (U, S, Vh) in svds.items():
        module = model.get_submodule(name)
        out_f, in_f = module.weight.shape
        k = len(S)
        r = max(1, round((1 - err) * k))
        module.weight.copy_(((U[:, :r] * S[:r]) @ Vh[:r]).to(module.weight.dtype))
        before += out_f * in_f
        after += min(out_f * in_f, factorized_params(out_f, in_f, r))
        removed += k - r
        total += k
    return {"achieved_reduction": removed / total, "target_params_kept_fraction": after / before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 blocks, few texts, 2 ERRs, few steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    parser.add_argument("--errs", default="0.1,0.2,0.3,0.4,0.5", help="comma-separated target reductions")
    parser.add_argument("--eval-texts", type=int, default=24, help="held-out prose paragraphs for perplexity")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--ft-err", type=float, default=0.2, help="ERR of the fine-tuned WeLore model")
    parser.add_argument("--ft-steps", type=int, default=20, help="LRC fine-tuning steps (0: skip the fine-tune)")
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--cost-steps", type=int, default=3,
        help="timed LRC / full fine-tuning steps, interleaved, after 1 warm-up each (0: skip the cost part)",
    )
    parser.add_argument(
        "--fisher", action="store_true",
        help="also WeLore on Fisher-weighted spectra (row Fisher of the dense model on train prose) at every ERR",
    )
    parser.add_argument("--fisher-batches", type=int, default=8, help="batches of train prose for the row Fisher")
    parser.add_argument("--quick-layers", type=int, default=6)
    parser.add_argument("--worker", choices=("lrc", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.errs = "0.2,0.4" if args.errs == parser.get_default("errs") else args.errs
        args.eval_texts = min(args.eval_texts, 8)
        args.max_length = min(args.max_length, 128)
        args.ft_steps = min(args.ft_steps, 3)
        args.cost_steps = min(args.cost_steps, 1)
        args.batch = min(args.batch, 4)
    if args.worker:
        _worker(args)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the randomized SVD of small-rank LRC factors
    from peft import get_peft_model

    from hf_lowrank.compression.compress import find_target_linears
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.demo.wordnet import prose_texts
    from hf_lowrank.ops.svd import full_svd
    from hf_lowrank.tuners.welore import WeLoreLRCConfig, default_spectra_cache, weight_fingerprint

    started = time.perf_counter()
    base, tok = load_smollm2()
    if args.quick:
        base.model.layers = base.model.layers[: args.quick_layers]
        base.config.num_hidden_layers = args.quick_layers
    errs = [float(e) for e in args.errs.split(",")]
    texts = prose_texts("test", args.eval_texts)

    def ppl(model) -> float:
        return perplexity(model, tok, texts, max_length=args.max_length, batch_size=8, progress=False)

    result: dict = {
        "model": "SmolLM2-135M-Instruct" + (f" (first {args.quick_layers} blocks, --quick)" if args.quick else ""),
        "eval": {"texts": len(texts), "max_length": args.max_length, "source": "hf_lowrank.demo.wordnet.prose_texts('test')"},
        "threads": args.threads,
    }
    t0 = time.perf_counter()
    result["dense_ppl"] = ppl(base)
    result["dense_eval_s"] = time.perf_counter() - t0
    _log(f"dense perplexity {result['dense_ppl']:.2f} ({result['dense_eval_s']:.0f}s)")
    dense_params = sum(p.numel() for p in base.parameters())

    # One exact SVD per target serves the uniform baseline at every ERR; its singular values seed WeLore's spectra
    # cache (keyed by the weight's content hash), so get_peft_model below computes no spectrum.
    targets = find_target_linears(base)
    t0 = time.perf_counter()
    svds, cache = {}, default_spectra_cache()
    for name, module in targets.items():
        U, S, Vh = full_svd(module.weight.detach(), name=name)
        svds[name] = (U, S, Vh)
        cache.put(weight_fingerprint(module.weight), S)
    result["svd_all_targets_s"] = time.perf_counter() - t0
    _log(f"{len(svds)} target SVDs in {result['svd_all_targets_s']:.0f}s")
    chunks = _train_chunks(tok, 2000 if not args.quick else 50, args.seq)
    row_fisher = None
    if args.fisher:
        t0 = time.perf_counter()
        # held-out from the fine-tuning stream: the last batches of the train chunks
        fisher_chunks = chunks[-args.fisher_batches * args.batch :]
        row_fisher = _row_fisher(base, targets, fisher_chunks, batches=args.fisher_batches, batch=args.batch)
        base.requires_grad_(True)
        result["fisher"] = {
            "batches": args.fisher_batches, "batch": args.batch, "seq": args.seq,
            "collect_s": time.perf_counter() - t0, "data": "bundled train prose (tail of the stream)",
        }
        _log(f"row Fisher collected in {result['fisher']['collect_s']:.0f}s")

    rows = []
    ft_model = None
    for err in errs:
        row: dict = {"err": err}
        uni = copy.deepcopy(base)
        row["uniform"] = _uniform_truncate(uni, svds, err)
        row["uniform"]["ppl"] = ppl(uni)
        del uni
        t0 = time.perf_counter()
        peft_model = get_peft_model(copy.deepcopy(base), WeLoreLRCConfig(reduction=err, progress=False))
        build_s = time.perf_counter() - t0
        alloc = peft_model.welore_allocation
        trainable, total = peft_model.get_nb_trainable_parameters()
        row["welore"] = {
            "ppl": ppl(peft_model),
            "achieved_reduction": alloc.achieved_reduction,
            "attempted_reduction": alloc.attempted_reduction,
            "threshold": alloc.threshold,
            "lrc": len(alloc.lrc),
            "nlrc": len(alloc.nlrc),
            "target_params_kept_fraction": alloc.params_after / alloc.params_before,
            "model_params_kept_fraction": total / dense_params,
            "trainable_share": trainable / total,
            "get_peft_model_s": build_s,
        }
        _log(
            f"ERR {err:.0%}: uniform {row['uniform']['ppl']:.4g}, WeLore {row['welore']['ppl']:.4g} "
            f"(achieved {alloc.achieved_reduction:.2%}, {len(alloc.lrc)} LRCs, built in {build_s:.0f}s)"
        )
        if row_fisher is not None:
            t0 = time.perf_counter()
            config = WeLoreLRCConfig(reduction=err, progress=False).with_fisher(row_fisher=row_fisher)
            fisher_model = get_peft_model(copy.deepcopy(base), config)
            falloc = fisher_model.welore_allocation
            row["welore_fisher"] = {
                "ppl": ppl(fisher_model),
                "achieved_reduction": falloc.achieved_reduction,
                "lrc": len(falloc.lrc),
                "target_params_kept_fraction": falloc.params_after / falloc.params_before,
                "get_peft_model_s": time.perf_counter() - t0,
            }
            del fisher_model
            _log(f"  Fisher-weighted WeLore {row['welore_fisher']['ppl']:.4g} ({len(falloc.lrc)} LRCs)")
        rows.append(row)
        if abs(err - args.ft_err) < 1e-9 and args.ft_steps > 0:
            ft_model = peft_model
        else:
            del peft_model
        gc.collect()
    result["by_err"] = rows
    del svds

    if args.ft_steps <= 0:
        result["wall_s"] = time.perf_counter() - started
        print(json.dumps(_finite(result), indent=2))
        return
    if ft_model is None:
        ft_model = get_peft_model(copy.deepcopy(base), WeLoreLRCConfig(reduction=args.ft_err, progress=False))
    before = next((r["welore"]["ppl"] for r in rows if abs(r["err"] - args.ft_err) < 1e-9), None) or ppl(ft_model)
    _log(f"LRC fine-tune at ERR {args.ft_err:.0%}: {args.ft_steps} steps x {args.batch} x {args.seq} tokens")
    times, losses = _train_steps(
        ft_model, chunks, steps=args.ft_steps, batch=args.batch, lr=args.ft_lr, warmup=max(1, args.ft_steps // 10),
        log_every=10,
    )
    after = ppl(ft_model)
    result["finetune"] = {
        "err": args.ft_err,
        "steps": args.ft_steps,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.ft_lr,
        "train_tokens": args.ft_steps * args.batch * args.seq,
        "data": "hf_lowrank.demo.wordnet.prose_texts('train') (same WordNet-prose distribution as the test split)",
        "ppl_before": before,
        "ppl_after": after,
        "after_over_dense": after / result["dense_ppl"],
        "goal_within_2x_dense_met": after <= 2 * result["dense_ppl"],
        "first_loss": losses[0],
        "last_loss": statistics.mean(losses[-3:]),
        "median_step_s": statistics.median(times),
    }
    _log(f"fine-tuned: {before:.4g} -> {after:.4g} (dense {result['dense_ppl']:.4g})")

    if args.cost_steps <= 0:
        result["wall_s"] = time.perf_counter() - started
        print(json.dumps(_finite(result), indent=2))
        return
    # Step time: the LRC PEFT model vs the same compressed model with every parameter trainable, interleaved.
    full_model = copy.deepcopy(ft_model).merge_and_unload()
    full_model.requires_grad_(True)
    cost_chunks = chunks[-(args.cost_steps + 1) * args.batch :]
    step_s = _interleaved_step_times(
        {"lrc": ft_model, "full": full_model}, cost_chunks, steps=args.cost_steps, batch=args.batch
    )
    del full_model
    _log(f"step time LRC {step_s['lrc']:.1f}s vs full {step_s['full']:.1f}s")
    # Memory: each in a fresh process (peak RSS cannot be attributed inside one process).
    with tempfile.TemporaryDirectory(prefix="welore-bench-") as tmp:
        work = Path(tmp)
        ft_model.save_pretrained(work / "adapter")
        merged = ft_model.merge_and_unload()
        merged.save_pretrained(work / "merged")
        del ft_model, merged
        gc.collect()
        lrc = _run_worker("lrc", work, args)
        full = _run_worker("full", work, args)
    lrc["step_time_s"], full["step_time_s"] = step_s["lrc"], step_s["full"]
    cost = {"timed_steps": args.cost_steps, "lrc": lrc, "full": full}
    cost["step_time_ratio_lrc_over_full"] = lrc["step_time_s"] / full["step_time_s"]
    cost["throughput_ratio_lrc_over_full"] = full["step_time_s"] / lrc["step_time_s"]
    cost["train_state_ratio_lrc_over_full"] = lrc["train_state_bytes"] / full["train_state_bytes"]
    cost["trainable_ratio_lrc_over_full"] = lrc["trainable_params"] / full["trainable_params"]
    if lrc["peak_rss_training_bytes"] and full["peak_rss_training_bytes"]:
        cost["peak_rss_ratio_lrc_over_full"] = lrc["peak_rss_training_bytes"] / full["peak_rss_training_bytes"]
    result["cost"] = cost
    result["seed_anchors"] = {  # LLaMA-2 7B on C4, Table 1 and Figure 1 of the seed
        "llama2_7b_c4_uniform_vs_welore": {"10%": [10.58, 7.13], "30%": [91.99, 14.41], "50%": ["NaN", 1836.62]},
        "welore_finetuned_50%": 11.87,
        "lrc_vs_full_finetune": {"throughput": "~3x", "memory": "~0.6x"},
    }
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(_finite(result), indent=2))


def _finite(obj):
    """JSON has no inf/NaN: write them as strings."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


if __name__ == "__main__":
    main()
