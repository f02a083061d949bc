"""Throughput of compress_model on every SmolLM2 Linear, as ratios measured side by side in one run.

Figures (JSON on stdout):
- ``compress_over_bare_svd``: wall time of ``compress_model`` (exact SVD, all target Linears, reports included)
  divided by a bare ``torch.linalg.svd`` loop over the same matrices. Goal <= 1.15: the glue costs little.
- ``randomized``: at a small rank, the randomized path's speed-up over the exact truncated SVD and the ratio of
  its reconstruction error to the exact (Eckart-Young optimal) error.

Run: ``python benchmarks/compress_throughput.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="first 6 blocks only, one repeat")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--small-rank", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hf_lowrank import compress_model
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.ops.svd import relative_error, split_factors, truncated_svd
    from hf_lowrank.targets import find_target_linears

    model, _ = load_smollm2()
    if args.quick:
        model.model.layers = model.model.layers[:6]
    repeats = 1 if args.quick else 2
    targets = find_target_linears(model)
    weights = [m.weight.detach() for m in targets.values()]

    def bare_svd_loop():
        for W in weights:
            torch.linalg.svd(W.float(), full_matrices=False)

    def compress_all():
        compress_model(copy.deepcopy(model), args.keep, method="exact", progress=False)

    # Interleave the two measurements so machine noise hits both alike.
    bare, comp = [], []
    for _ in range(repeats):
        bare.append(_timed(bare_svd_loop, 1))
        comp.append(_timed(compress_all, 1))
    t_bare, t_comp = min(bare), min(comp)

    # Randomized vs exact at a small rank, on the same matrices.
    def exact_small():
        return [truncated_svd(W, args.small_rank, method="exact") for W in weights]

    def random_small():
        return [truncated_svd(W, args.small_rank, method="randomized") for W in weights]

    t_exact = _timed(exact_small, repeats)
    t_random = _timed(random_small, repeats)
    err_ratio = []
    for W, ex, rn in zip(weights, exact_small(), random_small()):
        d_e, u_e = split_factors(*ex)
        d_r, u_r = split_factors(*rn)
        e_exact = relative_error(W, u_e @ d_e)
        e_rand = relative_error(W, u_r @ d_r)
        err_ratio.append(e_rand / max(e_exact, 1e-12))

    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct",
                "target_linears": len(weights),
                "threads": args.threads,
                "keep": args.keep,
                "compress_model_s": round(t_comp, 3),
                "bare_svd_loop_s": round(t_bare, 3),
                "compress_over_bare_svd": round(t_comp / t_bare, 3),
                "goal_compress_over_bare_svd": 1.15,
                "randomized": {
                    "rank": args.small_rank,
                    "exact_truncated_s": round(t_exact, 3),
                    "randomized_s": round(t_random, 3),
                    "speedup": round(t_exact / t_random, 2),
                    "error_ratio_mean": round(sum(err_ratio) / len(err_ratio), 5),
                    "error_ratio_max": round(max(err_ratio), 5),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
