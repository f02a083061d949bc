"""Quantized factors: naive rounding vs the refit of ``up``, per-module weighted error and perplexity.

SmolLM2-135M, every block Linear (210 modules), compressed by ``compress_model``'s default at ``--keep`` of their
parameters (Kronecker weighting, global allocation) from ``--tokens`` tokens of the bundled prose. Each factor pair
is then quantized group-wise (``--group-size`` along each factor's input dimension) at each of ``--bits``, two ways:

- ``naive``: both factors rounded independently;
- ``refit``: ``down`` rounded, ``up`` refitted in closed form to the weighted target
  (:func:`hf_lowrank.ops.quant_lowrank.refit_up` with the module's input Gram factor), then rounded.

Bytes: the block Linears' weights, the factor codes (with scales, offsets and bias) plus the modules the global
allocation kept dense counted in bf16 (they are not quantized), against all of them in bf16. Reported per scheme: the mean and median of the per-module weighted relative error ``||L_out^T (W - W_hat) L_in|| /
||L_out^T W L_in||`` (the Kronecker weighting the factors were fitted with), how many modules the refit made
worse, and perplexity on ``--eval-windows`` windows of Python's documentation (text of another kind than the
calibration) and ``--eval-prose`` held-out prose texts. ``--forward`` also times one SmolLM2 MLP ``up_proj`` at rank
336: ``LowRankLinear`` vs ``QuantizedLowRankLinear`` (4-bit), a prefill of 256 tokens and a one-token step.

Run: ``python benchmarks/factor_quantization.py --forward --out benchmarks/results/factor_quantization.json`` (about
5 minutes on 2 cores), and ``--allocation uniform --out benchmarks/results/factor_quantization_uniform.json``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time
import warnings

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def forward_cost(bits: int, group_size: int, dtype: torch.dtype) -> dict:
    """Milliseconds per call of one SmolLM2 ``up_proj`` (576 -> 1536) at rank 336, float factors vs codes."""
    from hf_lowrank.modules import LowRankLinear
    from hf_lowrank.quantized_modules import quantize_lowrank

    torch.manual_seed(0)
    dense = torch.nn.Linear(576, 1536, bias=False)
    layer = LowRankLinear.from_dense(dense, 336).to(dtype)
    qlayer = quantize_lowrank(layer, bits, group_size=group_size)
    out = {"shape": [1536, 576], "rank": 336, "bits": bits, "dtype": str(dtype), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for label, x, repeats in (("prefill_256", torch.randn(1, 256, 576, dtype=dtype), 50),
                                  ("decode_1", torch.randn(1, 1, 576, dtype=dtype), 200)):
            f, q = _time(lambda x=x: layer(x), repeats), _time(lambda x=x: qlayer(x), repeats)
            out[label] = {"lowrank_ms": round(f, 4), "quantized_ms": round(q, 4), "ratio": round(q / f, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--allocation", default=None, choices=["uniform", "global"],
                        help="compress_model's allocation (default: its own, global for this setting)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--schemes", nargs="+", default=["naive", "refit", "gptq"])
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-prose", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--forward", action="store_true", help="also time the forward of one layer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from calibration_size import _batches, _calibration_chunks, _other_kind_texts

    from hf_lowrank import compress_model
    from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.modules import LowRankLinear, set_submodule
    from hf_lowrank.ops.fisher import DEFAULT_DAMPING, gram_factor, gram_shrinkage, weighted_relative_error
    from hf_lowrank.ops.quant_lowrank import quantize_factor_pair
    from hf_lowrank.quantized_modules import QuantizedLowRankLinear
    from hf_lowrank.targets import find_target_linears

    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)
    torch.manual_seed(0)
    dense, tok = load_smollm2()
    targets = find_target_linears(dense)
    weights = {n: m.weight.detach().float().clone() for n, m in targets.items()}
    other, prose = _other_kind_texts(tok, args.eval_windows), wordnet.prose_texts("test", n=args.eval_prose)

    def score(model):
        return {"ppl_other_kind": round(perplexity(model, tok, other, progress=False), 3),
                "ppl_prose": round(perplexity(model, tok, prose, progress=False), 3)}

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _, chunk = next(_calibration_chunks(tok, [args.tokens], args.max_length))
    start = time.perf_counter()
    g_in, g_out, tokens = calibration_grams(dense, targets, _batches(chunk, pad), outputs=True, progress=False)
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_model(model, args.keep, calibration=CalibrationGrams(g_in, g_out, tokens),
                                allocation=args.allocation, progress=False)
    result = {"model": "SmolLM2-135M-Instruct (offline GGUF)", "targets": len(targets), "keep": args.keep,
              "allocation": report.info.get("allocation"), "factorized": len(report.ranks),
              "kept_fraction": round(report.kept_fraction, 4), "calibration_tokens": tokens,
              "group_size": args.group_size, "compress_s": round(time.perf_counter() - start, 1),
              "evaluation": {"other_kind": f"pydoc_data.topics, {args.eval_windows} windows of 256 tokens",
                             "prose": f"prose_texts('test', n={args.eval_prose})"},
              "dense": score(dense), "float_factors": score(model), "rows": []}
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    dense_bytes = sum(2 * w.numel() for w in weights.values())  # every block Linear in bf16
    float_bytes = sum(2 * (m.up.weight.numel() + m.down.weight.numel()) for m in lowrank.values()) + sum(
        2 * w.numel() for n, w in weights.items() if n not in lowrank)
    result["dense"].update(bytes=dense_bytes, bytes_vs_bf16=1.0)
    result["float_factors"].update(bytes=float_bytes, bytes_vs_bf16=round(float_bytes / dense_bytes, 4))
    print("dense", result["dense"], "float factors", result["float_factors"], flush=True)

    factors: dict[int, torch.Tensor] = {}

    def side(G, name):  # as compress_model factors a Gram (a shared Gram once)
        if id(G) not in factors:
            shrink = gram_shrinkage(G.shape[0], tokens) if G.ndim == 2 else 0.0
            factors[id(G)] = gram_factor(G, damping=DEFAULT_DAMPING, shrinkage=shrink, name=name).L
        return factors[id(G)]

    layers = lowrank
    float_err = {}
    for bits in args.bits:
        for scheme in args.schemes:
            try:
                start = time.perf_counter()
                errors, new_layers, nbytes = {}, {}, 0
                for name, layer in layers.items():
                    L_in, L_out = side(g_in[name], name), side(g_out[name], name)
                    W = weights[name]
                    down, up = layer.down.weight.float(), layer.up.weight.float()
                    if name not in float_err:
                        float_err[name] = weighted_relative_error(W, up @ down, L_out, L_in)
                    q = quantize_factor_pair(down, up, bits, group_size=args.group_size, scheme=scheme, W=W,
                                             in_factor=L_in)
                    errors[name] = weighted_relative_error(W, q.up_hat @ q.down_hat, L_out, L_in)
                    new = QuantizedLowRankLinear.from_codes(q.down, q.up, layer.bias, dtype=down.dtype, scheme=scheme)
                    new_layers[name] = new
                    nbytes += new.nbytes()
                quantized = copy.deepcopy(model)
                for name, new in new_layers.items():
                    set_submodule(quantized, name, new)
                errs = list(errors.values())
                kept_dense = sum(2 * w.numel() for n, w in weights.items() if n not in layers)  # left dense, bf16
                row = {"bits": bits, "scheme": scheme, "quantize_s": round(time.perf_counter() - start, 1),
                       "weighted_rel_error_mean": round(statistics.fmean(errs), 5),
                       "weighted_rel_error_median": round(statistics.median(errs), 5),
                       "float_factor_weighted_rel_error_mean": round(statistics.fmean(float_err.values()), 5),
                       "factor_bytes": nbytes, "dense_kept_bf16_bytes": kept_dense, "bytes": nbytes + kept_dense,
                       "dense_bf16_bytes": dense_bytes,
                       "bytes_vs_bf16": round((nbytes + kept_dense) / dense_bytes, 4), **score(quantized)}
                result["rows"].append(row)
                result.setdefault("_errors", {})[(bits, scheme)] = errors
                print(row, flush=True)
                del quantized
            except Exception as exc:  # one failing scheme must not lose the others' rows
                result["rows"].append({"bits": bits, "scheme": scheme, "error": f"{type(exc).__name__}: {exc}"})
                print("FAILED", bits, scheme, exc, flush=True)
    per = result.pop("_errors", {})
    for (bits, scheme), errors in per.items():  # modules whose weighted error the scheme made worse than naive
        naive = per.get((bits, "naive"))
        if naive is not None and scheme != "naive":
            worse = [n for n in naive if errors[n] > naive[n] * (1 + 1e-9)]
            result.setdefault("modules_worse_than_naive", {})[f"{scheme}_{bits}bit"] = len(worse)
    if args.forward:
        result["forward"] = [forward_cost(4, args.group_size, dt) for dt in (torch.float32, torch.bfloat16)]
        print(result["forward"], flush=True)
    result["command"] = command_line("factor_quantization.py", args)
    result["torch_threads"] = torch.get_num_threads()
    write_summary(result, args.out)


if __name__ == "__main__":
    main()
