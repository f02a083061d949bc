"""Inference speed of factorized SmolLM2-135M vs dense: prefill throughput, decode latency, per-module times.

Every model is the embedded SmolLM2 (fp32) with ALL block Linears compressed by ``compress_model`` to ``--keeps``
of their parameters (the weighting does not change the speed, only the ranks do; plain SVD is used). Measured side
by side in one process, the models interleaved in every repetition, median of ``--repeats``:

- prefill: one forward over ``(batch, --tokens)`` random tokens without KV cache -> tokens/s and the time ratio to
  dense;
- decode: per-token latency of one cached step after a ``--tokens`` prompt (median over ``--decode-steps``);
- per module: each distinct ``(out, in, rank)`` factorized module on ``(batch * tokens, in)`` activations vs its
  dense Linear, next to its FLOP ratio ``rank (in + out) / (in out)``; the goal is time ratio <= 1.1x FLOP ratio.

Run: ``python benchmarks/inference_speed.py --threads 1 --out benchmarks/results/inference_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@torch.inference_mode()
def _prefill(model, ids):
    model(input_ids=ids, use_cache=False)


@torch.inference_mode()
def _decode_step_s(model, ids, steps: int) -> float:
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


@torch.inference_mode()
def _module_rows(report, model, batch: int, tokens: int, repeats: int) -> list[dict]:
    """Factorized vs dense time of each distinct (out, in, rank) module, interleaved, median of ``repeats``."""
    from torch import nn

    seen, rows = set(), []
    for m in report.modules:
        if m.rank is None or (m.shape, m.rank) in seen:
            continue
        seen.add((m.shape, m.rank))
        out_f, in_f = m.shape
        low = model.get_submodule(m.name)
        dense = nn.Linear(in_f, out_f, bias=low.bias is not None)
        x = torch.randn(batch * tokens, in_f)
        for _ in range(3):  # warm up both kernels
            dense(x), low(x)
        t_dense, t_low = [], []
        for _ in range(repeats):
            t_dense.append(_seconds(dense, x))
            t_low.append(_seconds(low, x))
        flop = m.rank * (in_f + out_f) / (in_f * out_f)
        ratio = statistics.median(t_low) / statistics.median(t_dense)
        rows.append({"shape": [out_f, in_f], "rank": m.rank, "flop_ratio": round(flop, 3),
                     "time_ratio": round(ratio, 3), "time_vs_flop": round(ratio / flop, 3),
                     "dense_ms": round(1e3 * statistics.median(t_dense), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--module-repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from hf_lowrank import compress_model
    from hf_lowrank.offline import load_smollm2

    dense, _ = load_smollm2()
    dense.eval()
    models, reports = {"dense": dense}, {}
    for keep in args.keeps:
        model = copy.deepcopy(dense)
        reports[keep] = compress_model(model, keep, method="randomized", progress=False)
        models[f"keep {keep}"] = model.eval()

    vocab = dense.config.vocab_size
    prefill, decode = {}, {}
    for batch in args.batches:
        ids = torch.randint(0, vocab, (batch, args.tokens))
        for model in models.values():  # warm-up
            _prefill(model, ids)
        times = {name: [] for name in models}
        steps = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(_seconds(_prefill, model, ids))
                steps[name].append(_decode_step_s(model, ids, args.decode_steps))
        base, base_step = statistics.median(times["dense"]), statistics.median(steps["dense"])
        for name in models:
            t, s = statistics.median(times[name]), statistics.median(steps[name])
            prefill.setdefault(name, {})[f"batch {batch}"] = {
                "tokens_per_s": round(batch * args.tokens / t, 1), "time_vs_dense": round(t / base, 3)}
            decode.setdefault(name, {})[f"batch {batch}"] = {
                "ms_per_token_step": round(1e3 * s, 2), "time_vs_dense": round(s / base_step, 3)}
            print(json.dumps({"model": name, "batch": batch, **prefill[name][f"batch {batch}"],
                              "decode_ms": round(1e3 * s, 2)}), flush=True)

    modules = {}
    for keep in args.keeps:
        for batch in args.batches:
            rows = _module_rows(reports[keep], models[f"keep {keep}"], batch, args.tokens, args.module_repeats)
            modules[f"keep {keep}, batch {batch}"] = rows
            print(json.dumps({"keep": keep, "batch": batch, "modules": rows}), flush=True)

    worst = max(r["time_vs_flop"] for rows in modules.values() for r in rows)
    summary = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU), all block Linears, plain SVD ranks",
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "tokens": args.tokens,
        "prefill": prefill,
        "decode": decode,
        "modules": modules,
        "ranks": {str(k): sorted({m.rank for m in r.modules if m.rank is not None}) for k, r in reports.items()},
        "dense_modules": {str(k): sum(1 for m in r.modules if m.skipped) for k, r in reports.items()},
        "goals": {
            "no_keep_slower_than_dense_prefill": all(
                v["time_vs_dense"] <= 1.0 for name, d in prefill.items() if name != "dense" for v in d.values()),
            "worst_module_time_vs_flop_ratio": worst,
            "module_goal_1.1x_met": worst <= 1.1,
            "prefill_keep_0.5_vs_dense": {b: v["time_vs_dense"] for b, v in prefill.get("keep 0.5", {}).items()},
        },
        "command": "python benchmarks/inference_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        from hf_lowrank.io import atomic_write_json

        atomic_write_json(args.out, summary)


if __name__ == "__main__":
    main()
