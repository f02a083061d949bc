"""Gram accumulation (calibration, Kronecker-factored Fisher): ``hf_lowrank.ops.gram`` vs the plain way, side by side.

For each ``(tokens, side)`` shape, many accumulators (as many as a model's modules: their memory is cold when each is
next touched), the time per accumulation of

- ``plain``: ``prod = rows.T @ rows``; ``torch.isfinite(prod).all()``; ``acc.add_(prod)`` (what ``GramHooks`` did);
- ``in_place``: :func:`hf_lowrank.ops.gram.gram_accumulate_` (finite check on the rows, ``addmm_`` into the
  accumulator, the blocked symmetric product for a wide side and many rows);
- ``one_gemm``: ``rows.T @ rows`` alone (the floor of the plain way).

Shapes: SmolLM2's sides (576 hidden, 192 k/v, 1536 MLP) at a FisherLoRA micro-batch (4 x 80 tokens) and a
calibration batch (8 x 256 tokens). Prints JSON (``--out`` also writes it).

Run: ``python benchmarks/gram_accumulate.py [--threads 2] [--accumulators 64] [--repeats 5] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results_io import command_line, write_summary

from hf_lowrank.ops.gram import gram_accumulate_

SHAPES = [(320, 192), (320, 576), (2048, 576), (2048, 1536)]


def _plain(acc, rows):
    prod = rows.T @ rows
    if bool(torch.isfinite(prod).all()):
        acc.add_(prod)


def _in_place(acc, rows):
    gram_accumulate_(acc, rows)


def _one_gemm(acc, rows):
    rows.T @ rows


def _time(fn, accs, rows, repeats):
    for acc in accs[:2]:
        fn(acc, rows)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for acc in accs:
            fn(acc, rows)
        runs.append((time.perf_counter() - start) / len(accs))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accumulators", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for tokens, side in SHAPES:
        rows = torch.randn(tokens, side, generator=gen)
        accs = [torch.zeros(side, side) for _ in range(args.accumulators)]
        times = {}
        for name, fn in (("plain", _plain), ("in_place", _in_place), ("one_gemm", _one_gemm)):  # interleaved twice
            times[name] = [_time(fn, accs, rows, args.repeats)]
        for name, fn in (("one_gemm", _one_gemm), ("in_place", _in_place), ("plain", _plain)):
            times[name].append(_time(fn, accs, rows, args.repeats))
        t = {k: min(v) for k, v in times.items()}
        ref = (rows.double().T @ rows.double())
        acc = torch.zeros(side, side)
        gram_accumulate_(acc, rows)
        rows_out.append({
            "tokens": tokens, "side": side,
            "plain_ms": round(t["plain"] * 1e3, 3), "in_place_ms": round(t["in_place"] * 1e3, 3),
            "one_gemm_ms": round(t["one_gemm"] * 1e3, 3),
            "in_place_vs_plain": round(t["in_place"] / t["plain"], 3),
            "in_place_vs_one_gemm": round(t["in_place"] / t["one_gemm"], 3),
            "in_place_rel_error_vs_float64": float(f"{float((acc.double() - ref).abs().max() / ref.abs().max()):.2e}"),
        })
    write_summary({"threads": args.threads, "accumulators": args.accumulators, "rows": rows_out,
                   "command": command_line("gram_accumulate.py", args)}, args.out)


if __name__ == "__main__":
    main()
