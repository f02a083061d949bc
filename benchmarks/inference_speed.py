"""Inference speed of factorized SmolLM2-135M vs dense: prefill, full forward, decode latency, per-module times.

Models (all fp32, the embedded SmolLM2, block Linears only; the LM head and attention stay dense):

- ``uniform keep k``: every block Linear factorized to ``k`` of its parameters (``--keeps``; plain randomized SVD:
  the weighting does not change the speed, only the ranks do), ranks multiples of 8;
- ``global keep k`` (``--global-keeps``): ``compress_model``'s default rank map for a causal LM with calibration
  (Kronecker-factored Fisher from ``--calib-texts`` bundled paragraphs, global allocation under the same total
  budget: some modules stay dense, the others get uneven ranks).

Everything is measured side by side in one process, interleaved at the finest grain (the models take turns within
every repetition, in an order rotated each time), and every ratio is the median over repetitions of the PAIRED ratio
``t_model / t_dense`` of the same repetition, so slow drifts of a shared machine cancel; ``*_min`` fields give the
ratio of the minimum times as a second reading.

- ``prefill``: a forward over ``(batch, --tokens)`` tokens that fills the KV cache and computes the last position's
  logits only, as ``generate()`` does (``logits_to_keep=1``) -> tokens/s and the ratio to dense;
- ``forward``: the same forward without cache and with logits for every position (a scoring / training-style
  forward: the dense 28M-parameter LM head weighs more);
- ``decode``: the latency of one cached step after a ``--tokens`` prompt, the models stepping in turn
  (``--decode-steps`` steps per repetition);
- per module: each distinct ``(out, in, rank)`` factorized module on ``(batch * tokens, in)`` activations vs a dense
  Linear of its shape, next to its FLOP ratio ``rank (in + out) / (in out)``; the goal is time ratio <= 1.1x FLOP
  ratio.

Run: ``python benchmarks/inference_speed.py --threads 1 --out benchmarks/results/inference_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import time

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rotated(names: list[str], turn: int) -> list[str]:
    k = turn % len(names)
    return names[k:] + names[:k]


def _ratios(times: dict[str, list[float]], base: str = "dense") -> dict[str, dict]:
    """Median paired ratio, ratio of minima and median time of each name against ``base``."""
    out = {}
    for name, ts in times.items():
        paired = [t / b for t, b in zip(ts, times[base])]
        out[name] = {"median_s": statistics.median(ts), "vs_dense": round(statistics.median(paired), 3),
                     "vs_dense_min": round(min(ts) / min(times[base]), 3)}
    return out


@torch.inference_mode()
def _interleaved(calls: dict[str, callable], repeats: int) -> dict[str, list[float]]:
    names = list(calls)
    for fn in calls.values():  # warm-up
        fn()
    times = {n: [] for n in names}
    for rep in range(repeats):
        for n in _rotated(names, rep):
            start = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def _decode(models: dict, ids: torch.Tensor, steps: int, repeats: int, around=None) -> dict[str, list[float]]:
    """Per-step decode times of each model, the models stepping in turn (rotated order) after a prefill of ``ids``.

    ``around``: optional ``(name, started: bool)`` callback run just before and just after each timed step.
    """
    names, times = list(models), {n: [] for n in models}
    # transformers 5.2x renamed the KV-cache argument and output ``past_key_values`` -> ``cache`` (the old name warns)
    key = "cache" if "cache" in inspect.signature(next(iter(models.values())).forward).parameters else "past_key_values"
    for rep in range(repeats):
        state = {}
        for n, m in models.items():
            out = m(input_ids=ids, use_cache=True, logits_to_keep=1)
            state[n] = (out[key], out.logits[:, -1:].argmax(-1))
        for step in range(steps):
            for n in _rotated(names, rep * steps + step):
                cache, nxt = state[n]
                if around is not None:
                    around(n, True)
                start = time.perf_counter()
                out = models[n](input_ids=nxt, use_cache=True, **{key: cache})
                times[n].append(time.perf_counter() - start)
                if around is not None:
                    around(n, False)
                state[n] = (out[key], out.logits[:, -1:].argmax(-1))
    return times


@torch.inference_mode()
def _module_rows(report, model, batch: int, tokens: int, repeats: int) -> list[dict]:
    """Factorized vs dense time of each distinct (out, in, rank) module, interleaved, paired median ratio."""
    from torch import nn

    seen, rows = set(), []
    for m in report.modules:
        if m.skipped is not None or (m.shape, m.rank) in seen:
            continue
        seen.add((m.shape, m.rank))
        out_f, in_f = m.shape
        low = model.get_submodule(m.name)
        dense = nn.Linear(in_f, out_f, bias=low.bias is not None)
        x = torch.randn(batch * tokens, in_f)
        calls = {"dense": lambda d=dense, x=x: d(x), "low": lambda lo=low, x=x: lo(x)}
        r = _ratios(_interleaved(calls, repeats))["low"]
        flop = m.rank * (in_f + out_f) / (in_f * out_f)
        rows.append({"shape": [out_f, in_f], "rank": m.rank, "count": sum(
            1 for o in report.modules if o.skipped is None and (o.shape, o.rank) == (m.shape, m.rank)),
            "flop_ratio": round(flop, 3), "time_ratio": r["vs_dense"], "time_vs_flop": round(r["vs_dense"] / flop, 3),
            "time_vs_flop_min": round(r["vs_dense_min"] / flop, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--global-keeps", type=float, nargs="*", default=[0.9, 0.7, 0.5])
    parser.add_argument("--calib-texts", type=int, default=32)
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

    from hf_lowrank import calibration_batches, compress_model
    from hf_lowrank.calibration.grams import calibration_grams
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.targets import find_target_linears

    dense, tok = load_smollm2()
    dense.eval()
    models, reports = {"dense": dense}, {}
    for keep in args.keeps:
        model = copy.deepcopy(dense)
        reports[f"uniform keep {keep}"] = compress_model(model, keep, method="randomized", progress=False)
        models[f"uniform keep {keep}"] = model.eval()
    if args.global_keeps:
        batches = calibration_batches(tok, wordnet.prose_texts("train", n=args.calib_texts), batch_size=8)
        g_in, g_out, _ = calibration_grams(dense, find_target_linears(dense), batches, outputs=True, progress=False)
        for keep in args.global_keeps:
            model = copy.deepcopy(dense)
            name = f"global keep {keep}"
            reports[name] = compress_model(model, keep, grams_in=g_in, grams_out=g_out, progress=False)
            models[name] = model.eval()

    vocab = dense.config.vocab_size
    table = {}
    for batch in args.batches:
        ids = torch.randint(0, vocab, (batch, args.tokens))
        kinds = {
            "prefill": _interleaved({n: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=True, logits_to_keep=1))
                                     for n, m in models.items()}, args.repeats),
            "forward": _interleaved({n: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=False))
                                     for n, m in models.items()}, args.repeats),
            "decode": _decode(models, ids, args.decode_steps, args.repeats),
        }
        for kind, times in kinds.items():
            for name, r in _ratios(times).items():
                row = {"vs_dense": r["vs_dense"], "vs_dense_min": r["vs_dense_min"]}
                if kind == "decode":
                    row["ms_per_step"] = round(1e3 * r["median_s"], 2)
                else:
                    row["tokens_per_s"] = round(batch * args.tokens / r["median_s"], 1)
                table.setdefault(kind, {}).setdefault(name, {})[f"batch {batch}"] = row
                print(json.dumps({"kind": kind, "model": name, "batch": batch, **row}), flush=True)

    modules = {}
    for name, report in reports.items():
        for batch in args.batches:
            rows = _module_rows(report, models[name], batch, args.tokens, args.module_repeats)
            modules[f"{name}, batch {batch}"] = rows
            print(json.dumps({"model": name, "batch": batch, "modules": rows}), flush=True)

    def worst(prefix, key="time_vs_flop"):
        return max((r[key] for k, rows in modules.items() if k.startswith(prefix) for r in rows), default=None)

    uniform = [n for n in models if n.startswith("uniform")]
    summary = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU), block Linears",
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "tokens": args.tokens,
        **table,
        "modules": modules,
        "ranks": {n: sorted({m.rank for m in r.modules if m.skipped is None}) for n, r in reports.items()},
        "dense_modules": {n: sum(1 for m in r.modules if m.skipped is not None) for n, r in reports.items()},
        "kept_fraction": {n: round(r.kept_fraction, 4) for n, r in reports.items()},
        "modules_not_faster_than_dense": {
            k: sum(r["count"] for r in rows if r["time_ratio"] >= 1.0) for k, rows in modules.items()},
        "goals": {
            "no_uniform_keep_slower_than_dense": {
                kind: all(table[kind][n][b]["vs_dense"] <= 1.0 for n in uniform for b in table[kind][n])
                for kind in table},
            "worst_module_time_vs_flop_uniform": worst("uniform"),
            "worst_module_time_vs_flop_uniform_min": worst("uniform", "time_vs_flop_min"),
            "module_goal_1.1x_met_uniform": (worst("uniform") or 0) <= 1.1,
            "worst_module_time_vs_flop_global": worst("global"),
            "prefill_uniform_keep_0.5_vs_dense": table["prefill"].get("uniform keep 0.5"),
            "forward_uniform_keep_0.5_vs_dense": table["forward"].get("uniform keep 0.5"),
        },
        "command": command_line("inference_speed.py", args),
    }
    write_summary(summary, args.out)


if __name__ == "__main__":
    main()
