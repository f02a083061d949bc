"""How much calibration text the data-aware default needs: perplexity vs calibration tokens, side by side.

SmolLM2-135M, every block Linear (210 modules), ``--keep`` of their parameters. Calibration text: the bundled WordNet
prose (``prose_texts("train")``, as the README recommends); evaluation on text of ANOTHER kind: Python's own
documentation (``pydoc_data.topics``, shipped with every Python; ``--eval-windows`` windows of 256 tokens spread over
it), and on the held-out bundled prose. The Grams are collected once, cumulatively (Grams are sums over tokens, so
the Grams of the first ``n`` tokens plus those of the next ``m`` are those of ``n + m``), and every row compresses a
fresh copy of the dense model from them:

- ``default``: ``compress_model(model, keep, calibration=CalibrationGrams(...))``: the Kronecker weighting, global
  allocation, each Gram shrunk toward its diagonal by ``d / (d + tokens)``;
- ``whitened_uniform``: the same input Grams alone, uniform ranks (SVD-LLM's whitening);
- ``raw_grams``: the default's Grams passed as ``grams_in=`` / ``grams_out=`` (no token count, so no shrinkage),
  global allocation: what the default did before the shrinkage.

Run: ``python benchmarks/calibration_size.py --out benchmarks/results/calibration_size.json`` (about an hour on 2
cores; ``--tokens 256 4096`` for a quick look).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import time
import warnings

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _other_kind_texts(tok, windows: int, length: int = 256) -> list[str]:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tok(text).input_ids
    step = len(ids) // windows
    return [tok.decode(ids[i * step : i * step + length]) for i in range(windows)]


def _calibration_chunks(tok, budgets: list[int], max_length: int):
    """Texts adding up to each budget's new tokens (the last one truncated), in the prose's fixed order."""
    from hf_lowrank.demo import wordnet

    texts, pos, total = wordnet.prose_texts("train"), 0, 0
    for budget in budgets:
        chunk, need = [], budget - total
        while need > 0:
            ids = tok(texts[pos], truncation=True, max_length=max_length).input_ids[:need]
            pos += 1
            if len(ids) >= 2:
                chunk.append(ids)
                need -= len(ids)
        total = budget
        yield budget, chunk


def _batches(chunk, pad_id: int, batch_size: int = 8):
    out = []
    for start in range(0, len(chunk), batch_size):
        rows = chunk[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-prose", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rows", nargs="+", default=["default", "whitened_uniform", "raw_grams"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from tqdm.auto import tqdm

    from hf_lowrank import compress_model
    from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.targets import find_target_linears

    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)
    torch.manual_seed(0)
    dense, tok = load_smollm2()
    targets = find_target_linears(dense)
    other, prose = _other_kind_texts(tok, args.eval_windows), wordnet.prose_texts("test", n=args.eval_prose)

    def score(model):
        return {"ppl_other_kind": round(perplexity(model, tok, other, progress=False), 3),
                "ppl_prose": round(perplexity(model, tok, prose, progress=False), 3)}

    result = {"model": "SmolLM2-135M-Instruct (offline GGUF)", "targets": len(targets), "keep": args.keep,
              "calibration": "bundled prose_texts('train')", "evaluation": {
                  "other_kind": f"pydoc_data.topics, {args.eval_windows} windows of 256 tokens",
                  "prose": f"prose_texts('test', n={args.eval_prose})"},
              "dense": score(dense), "rows": []}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sums_in: dict[str, torch.Tensor] = {}
    sums_out: dict[str, torch.Tensor] = {}
    tokens = 0
    collect_s = 0.0
    for _budget, chunk in _calibration_chunks(tok, sorted(args.tokens), args.max_length):
        start = time.perf_counter()
        g_in, g_out, n = calibration_grams(dense, targets, _batches(chunk, pad), outputs=True, progress=False)
        collect_s += time.perf_counter() - start
        tokens += n
        for sums, new in ((sums_in, g_in), (sums_out, g_out)):
            seen: dict[int, torch.Tensor] = {}  # keep the sharing of one input Gram by q/k/v (and gate/up)
            for name, G in new.items():
                if name in sums:
                    if id(sums[name]) not in seen:
                        seen[id(sums[name])] = sums[name].add_(G)
                else:
                    sums[name] = seen.setdefault(id(G), G.clone())
        del g_in, g_out
        for row in tqdm(args.rows, desc=f"{tokens} tokens", unit="row"):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if row == "default":
                    report = compress_model(model, args.keep, calibration=CalibrationGrams(sums_in, sums_out, tokens),
                                            progress=False)
                elif row == "whitened_uniform":
                    report = compress_model(model, args.keep, calibration=CalibrationGrams(sums_in, None, tokens),
                                            calibration_weighting="whitened", progress=False)
                elif row == "raw_grams":
                    report = compress_model(model, args.keep, grams_in=sums_in, grams_out=sums_out,
                                            allocation="global", progress=False)
                else:
                    raise SystemExit(f"unknown row {row!r}")
            errors = [m.rel_error for m in report.modules if m.rank is not None]
            entry = {"row": row, "tokens": tokens, "tokens_per_dim": round(tokens / 1536, 3),
                     "kept_fraction": round(report.kept_fraction, 4), "compress_s": round(time.perf_counter() - start, 1),
                     "modules_worse_than_zero": sum(e > 1 for e in errors), "max_rel_error": round(max(errors), 3),
                     **score(model)}
            result["rows"].append(entry)
            tqdm.write(str(entry))
            del model
        if args.out:  # a long run keeps what it measured so far
            from hf_lowrank.io import atomic_write_json

            atomic_write_json(args.out, {**result, "partial": True, "command": command_line("calibration_size.py", args)})
    result["collect_s"] = round(collect_s, 1)
    by = {(r["row"], r["tokens"]): r for r in result["rows"]}
    most = 16384 if 16384 in args.tokens else max(args.tokens)  # the goal's reference: the 16k-token figure
    if ("default", most) in by:
        goals = {}
        for t in sorted(args.tokens):
            if ("default", t) in by and ("whitened_uniform", t) in by:
                d, w = by[("default", t)]["ppl_other_kind"], by[("whitened_uniform", t)]["ppl_other_kind"]
                goals[str(t)] = {"default_vs_whitened_uniform": round(d / w, 3),
                                 f"default_vs_{most}_tokens": round(d / by[("default", most)]["ppl_other_kind"], 3)}
        result["ratios_other_kind"] = goals
    result["command"] = command_line("calibration_size.py", args)
    result["torch_threads"] = torch.get_num_threads()
    result["finite"] = all(math.isfinite(r["ppl_other_kind"]) for r in result["rows"])
    write_summary(result, args.out)


if __name__ == "__main__":
    main()
