"""WeLore data-free vs data-aware (whitened spectra) on SmolLM2-135M, at equal parameters, no fine-tuning.

Both variants run the same WeLore rule (min-max normalised spectra, one global threshold, LRC / N-LRC split with
``lrc_ratio=0.5``, N-LRCs kept exact): ``weights`` thresholds the singular values of each weight (the paper, the
package default), ``whitened`` those of ``W L_in`` with ``L_in`` the Cholesky factor of the module's input Gram on
the calibration texts (``welore_ranks_for_model(..., grams_in=...)``), and factorizes the LRCs with the whitened SVD
from the same Grams (``compress_model(..., grams_in=...)``). WeLore's knob is the achieved RANK reduction, and at
one rank reduction the two variants keep different parameter counts; so for every parameter budget (``--keeps``:
the fraction of the target Linears' parameters kept) each variant's reduction is bisected until its allocation
keeps that fraction, and every row reports what it really kept.

A context row per budget is ``compress_model``'s whitened uniform allocation (the same fraction of every module,
ranks multiples of 8, from the same Grams; ``--no-uniform`` drops it). With ``--ablation`` two more rows per budget
separate the two halves of the data-aware variant: the data-free ranks with whitened factors, and the whitened ranks
with plain SVD factors.

Scoring: perplexity of the compressed model on ``prose_texts("test", n=32)`` (max 256 tokens each); calibration on
``prose_texts("train", n=64)`` (disjoint texts). Targets: ``mlp`` (gate/up/down of the 30 blocks) and ``all`` (the
seven block Linears).

Run: ``python benchmarks/welore_data_aware.py [--targets mlp,all] [--keeps 0.9,0.8] [--out benchmarks/results/
welore_data_aware.json]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGETS = {"mlp": ["gate_proj", "up_proj", "down_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _log(msg: str) -> None:
    print(f"[welore-data-aware {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _regex(names):
    return r".*\.layers\.\d+\.(mlp|self_attn)\.(" + "|".join(names) + ")"


def _allocation_for_keep(spectra, shapes, keep, *, tol=0.002, steps=30):
    """The WeLore allocation (data-free or whitened, as the spectra are) whose kept parameter fraction is closest to
    ``keep``: the reduction is bisected (the kept fraction falls as the reduction rises), unreachable reductions
    skipped."""
    from hf_lowrank.tuners.welore import welore_allocation

    def kept(a):
        return a.params_after / a.params_before

    lo, hi, best = 1e-4, 0.9999, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        try:
            alloc = welore_allocation(spectra, shapes, mid)
        except ValueError as exc:  # unreachable: beyond the most WeLore removes, or below / between its steps
            if "the most WeLore can remove" in str(exc):
                hi = mid
            else:
                lo = mid
            continue
        if best is None or abs(kept(alloc) - keep) < abs(kept(best) - keep):
            best = alloc
        if abs(kept(alloc) - keep) <= tol:
            break
        if kept(alloc) > keep:
            lo = mid
        else:
            hi = mid
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="mlp,all", help="comma-separated: mlp, all")
    parser.add_argument("--keeps", default="0.9,0.8", help="fractions of the target parameters kept")
    parser.add_argument("--eval-texts", type=int, default=32)
    parser.add_argument("--calibration-texts", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--ablation", action="store_true", help="add the two ablation rows per budget")
    parser.add_argument("--no-uniform", action="store_true", help="drop compress_model's whitened uniform row")
    parser.add_argument("--svd", choices=("auto", "exact", "randomized"), default="exact",
                        help="SVD of the factors (default exact: rows do not depend on a random range finder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started, cpu_started = time.perf_counter(), time.process_time()

    from hf_lowrank import calibration_batches, compress_model
    from hf_lowrank.calibration.grams import calibration_grams
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.demo.wordnet import prose_texts
    from hf_lowrank.targets import find_target_linears
    from hf_lowrank.tuners.welore import compute_spectra, whitening_factors

    dense, tok = load_smollm2()
    dense.eval()
    eval_texts = prose_texts("test", n=args.eval_texts)

    def ppl(model):
        return round(perplexity(model, tok, eval_texts, max_length=args.max_length, progress=False), 2)

    t0 = time.perf_counter()
    dense_ppl = ppl(dense)
    eval_s = time.perf_counter() - t0
    _log(f"dense perplexity {dense_ppl} ({eval_s:.0f}s)")

    kinds = [t.strip() for t in args.targets.split(",") if t.strip()]
    keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    every = find_target_linears(dense, _regex(sorted({n for k in kinds for n in TARGETS[k]})))
    t0 = time.perf_counter()
    batches = calibration_batches(tok, prose_texts("train", n=args.calibration_texts), max_length=args.max_length)
    grams, tokens = calibration_grams(dense, every, batches, progress=False)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    factors, fallbacks = whitening_factors(every, grams)
    spectra = {
        "weights": compute_spectra(every, progress=False),
        "whitened": compute_spectra(every, in_factors=factors, progress=False),
    }
    spectra_s = time.perf_counter() - t0
    del factors
    _log(f"calibration {tokens} tokens ({calib_s:.0f}s); spectra of {len(every)} modules ({spectra_s:.0f}s)")

    rows = []

    def row(kind, keep, label, ranks, alloc, grams_in, extra=None):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        report = compress_model(model, ranks, grams_in=grams_in, target_modules=_regex(TARGETS[kind]),
                                method=args.svd, progress=False, report_method="welore")
        seconds = time.perf_counter() - t
        result = {
            "targets": kind,
            "keep_target": keep,
            "method": label,
            "perplexity": ppl(model),
            "kept": round((alloc.params_after if alloc else report.params_after) / (
                alloc.params_before if alloc else report.params_before), 4),
            "factorize_s": round(seconds, 1),
        }
        if alloc is not None:
            result.update(
                reduction=round(alloc.target, 4),
                achieved_reduction=round(alloc.achieved_reduction, 4),
                lrc=len(alloc.lrc),
                nlrc=len(alloc.nlrc),
            )
        result.update(extra or {})
        rows.append(result)
        _log(f"{kind} keep {keep} {label}: perplexity {result['perplexity']} (kept {result['kept']})")
        del model

    for kind in kinds:
        targets = find_target_linears(dense, _regex(TARGETS[kind]))
        shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
        sub = {v: {n: spectra[v][n] for n in targets} for v in spectra}
        for keep in keeps:
            allocs = {v: _allocation_for_keep(sub[v], shapes, keep) for v in sub}
            ranks = {v: {n: a.ranks[n] for n in a.lrc} for v, a in allocs.items()}

            def whitening(r):
                return {n: grams[n] for n in r}

            row(kind, keep, "welore data-free (weight spectra, SVD factors)", ranks["weights"], allocs["weights"], None)
            row(kind, keep, "welore whitened (whitened spectra, whitened factors)", ranks["whitened"],
                allocs["whitened"], whitening(ranks["whitened"]))
            if args.ablation:
                row(kind, keep, "ablation: data-free ranks, whitened factors", ranks["weights"], allocs["weights"],
                    whitening(ranks["weights"]))
                row(kind, keep, "ablation: whitened ranks, SVD factors", ranks["whitened"], allocs["whitened"], None)
            if not args.no_uniform:
                row(kind, keep, "context: compress_model whitened uniform", keep, None, whitening(targets))

    result = {
        "command": command_line("welore_data_aware.py", args),
        "model": "SmolLM2-135M-Instruct (fp32, CPU, hf_lowrank.demo.models.load_smollm2)",
        "eval": f"perplexity on bundled prose_texts('test', n={args.eval_texts}), max_length {args.max_length}",
        "calibration": f"prose_texts('train', n={args.calibration_texts}), max_length {args.max_length}",
        "calibration_tokens": tokens,
        "gram_fallbacks": fallbacks,
        "fine_tuning": "none",
        "threads": args.threads,
        "dense_perplexity": dense_ppl,
        "rows": rows,
        "timing_s": {"eval_dense": round(eval_s, 1), "calibration": round(calib_s, 1),
                     "spectra_both": round(spectra_s, 1), "total_wall": round(time.perf_counter() - started, 1),
                     "total_cpu": round(time.process_time() - cpu_started, 1),
                     "note": "wall seconds on a shared core; total_cpu is this process's CPU time"},
    }
    write_summary(result, args.out)


if __name__ == "__main__":
    main()
