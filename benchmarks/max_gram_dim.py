"""What ``max_gram_dim`` costs in quality and saves in memory: the measurement behind its default.

SmolLM2-135M, every block Linear (210 modules), ``--keep`` of their parameters, the default weighting (Kronecker,
global allocation), calibrated as in ``calibration_size.py`` (the bundled prose in its fixed order, ``--tokens``
tokens) and evaluated as there (Python's documentation: another kind of text; held-out prose). One row per
``--max-dims`` value, each a fresh copy of the dense model through ``compress_model(model, keep,
calibration=batches, max_gram_dim=...)`` (the Grams collected by the call itself, so the option is measured end to
end): ``none`` keeps every Gram full; an int keeps the diagonal only of the sides wider than it (SmolLM2's sides are
576 and 1536 wide, so any value in [576, 1536) gives the same statistics as ``"hidden_size"``: the MLP's 1536-wide
sides diagonal; below 576 every side is diagonal, FWSVD-like).

Per row: perplexities, the statistics estimate ``compress_model`` logs (``statistics_memory_bytes``) and the peak
RSS of the call above the RSS before it (Linux ``VmHWM``, reset per row). The same estimate is COMPUTED for the
Llama-2-7B, Llama-3-8B and Llama-2-70B shapes (``compress_scaling.SHAPES``) at full depth, for each setting and for
``"hidden_size"``.

Run: ``python benchmarks/max_gram_dim.py --out benchmarks/results/max_gram_dim.json`` (about 15 minutes on one core).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from calibration_size import _batches, _calibration_chunks, _other_kind_texts
from compress_scaling import SHAPES, TARGETS, _status, block_shapes
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of every block Linear of a Llama shape at full depth."""
    return {f"{layer}.{k}": v for layer in range(shape["num_hidden_layers"]) for k, v in block_shapes(shape).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-dims", nargs="+", default=["none", "1024", "512"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-prose", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from hf_lowrank import compress_model, find_target_linears
    from hf_lowrank.compression.guards import statistics_memory_bytes
    from hf_lowrank.compression.pipeline import shapes_of
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2

    torch.set_num_threads(1)
    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)
    torch.manual_seed(0)
    dense, tok = load_smollm2()
    shapes = shapes_of(find_target_linears(dense))
    other, prose = _other_kind_texts(tok, args.eval_windows), wordnet.prose_texts("test", n=args.eval_prose)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    (_, chunk), = _calibration_chunks(tok, [args.tokens], args.max_length)
    batches = _batches(chunk, pad)

    def score(model):
        return {"ppl_other_kind": round(perplexity(model, tok, other, progress=False), 3),
                "ppl_prose": round(perplexity(model, tok, prose, progress=False), 3)}

    result = {"model": "SmolLM2-135M-Instruct (offline GGUF)", "targets": len(shapes), "keep": args.keep,
              "calibration": f"bundled prose_texts('train'), first {args.tokens} tokens (calibration_size.py's order)",
              "evaluation": {"other_kind": f"pydoc_data.topics, {args.eval_windows} windows of 256 tokens",
                             "prose": f"prose_texts('test', n={args.eval_prose})"},
              "dense": score(dense), "rows": []}
    for spec in args.max_dims:
        max_dim = None if spec == "none" else int(spec)
        model = copy.deepcopy(dense)
        rss_before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = compress_model(model, args.keep, calibration=batches, max_gram_dim=max_dim, progress=False)
        seconds = time.perf_counter() - start
        peak = _status("VmHWM") - rss_before
        estimate = statistics_memory_bytes(shapes, outputs=True, max_dim=max_dim)
        entry = {"max_gram_dim": max_dim, "tokens": report.info["calibration_tokens"],
                 "kept_fraction": round(report.kept_fraction, 4), "seconds": round(seconds, 1),
                 "statistics_estimate_gb": round(estimate / 2**30, 3), "peak_rss_above_start_gb": round(peak / 2**30, 3),
                 "peak_over_estimate": round(peak / estimate, 2), **score(model)}
        result["rows"].append(entry)
        print(entry, flush=True)
        del model
    settings = {"none": None, "hidden_size": "hidden_size", "4096": 4096, "1024": 1024}
    result["statistics_estimate_gb_computed"] = {
        name: {label: round(statistics_memory_bytes(
            _shapes(SHAPES[name]), outputs=True,
            max_dim=SHAPES[name]["hidden_size"] if value == "hidden_size" else value) / 2**30, 1)
            for label, value in settings.items()}
        for name in TARGETS}
    result["command"] = command_line("max_gram_dim.py", args)
    result["torch_threads"] = torch.get_num_threads()
    write_summary(result, args.out)


if __name__ == "__main__":
    main()
