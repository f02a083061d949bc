"""The size-quality grid of ``benchmarks/size_frontier.py`` on the MiniLM classifier: test accuracy vs weight bytes.

Setting: the dense classifier of ``benchmarks/classifier_quality.py`` (all-MiniLM-L6-v2 + a six-way head, LoRA
fine-tuned on ``wordnet.category_task`` and merged, the same arguments), its 36 encoder block Linears (query, key,
value, attention output, intermediate, output; the pooler and the head stay dense) stored each way below, no
fine-tuning after. Bytes: the stored bytes of those Linears (codes, scales, offsets, codebooks, biases in bf16)
relative to bf16, counted as ``size_frontier.py`` counts them (its helpers). Rows:

- ``dense``; round-to-nearest of the dense weights: ``rtn_int8_g128`` / ``rtn_int4_g128`` / ``rtn_int3_g128``
  (``hf_lowrank.ops.quant``, asymmetric, fp16 scale and offset) and ``nf4`` (bitsandbytes' own NF4, block 64);
- ``lowrank_<keep>`` / ``_q8`` / ``_q4``: ``compress_model`` at keep 0.9 / 0.8 / 0.6 (Kronecker weighting from the
  classification loss on the labelled calibration batches, the global allocation: the ``calibration kronecker
  global (default)`` row of ``classifier_quality.py``), factors in bf16, or stored in 8 / 4 bits, group 64
  (``factor_bits=``, the refit scheme); ``lowrank_u<keep>_q4``: uniform ranks (every block Linear factorized),
  4-bit factors;
- ``nf4_corr16``: NF4 + ``hf_lowrank.quantization_correction`` rank 16 (Kronecker, the same calibration), and
  ``nf4_loftq16``: NF4 + the data-free correction (plain SVD of ``W - Q(W)``, LoftQ's one-iteration initialisation);
  the adapters counted in bf16.

Run: ``python benchmarks/classifier_size.py --out benchmarks/results/classifier_size.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
import warnings

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEEPS = ("0.9", "0.8", "0.6")
ROWS = ["dense", "rtn_int8_g128", "nf4", "rtn_int4_g128", "rtn_int3_g128",
        *[f"lowrank_{k}{s}" for k in KEEPS for s in ("", "_q8", "_q4")], *[f"lowrank_u{k}_q4" for k in KEEPS],
        "nf4_corr16", "nf4_loftq16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--train-texts", type=int, default=1536)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--calib-texts", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--work", default="runs/classifier_size")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from classifier_quality import _calibration_batches, _fine_tune
    from size_frontier import _dense_bytes, _factors_to_bf16_, _lowrank_bytes, _nf4_, _rtn_, report_bytes
    from transformers import BitsAndBytesConfig

    import hf_lowrank
    from hf_lowrank import compress_model, find_target_linears
    from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams
    from hf_lowrank.demo import evaluation, models, wordnet

    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)
    train = wordnet.category_task("train", n=args.train_texts)
    test_texts, test_labels, _ = wordnet.category_task("test")
    _, tok = models.load_minilm()

    def acc(model) -> float:
        return round(evaluation.accuracy(model, tok, test_texts, test_labels, batch_size=64,
                                         max_length=args.max_length, progress=False), 4)

    start = time.perf_counter()
    dense, steps = _fine_tune(args, tok, train)
    fine_tune_s = time.perf_counter() - start
    names = sorted(find_target_linears(dense))
    if len(names) != 36:
        raise SystemExit(f"expected the 36 encoder block Linears, found {len(names)}: {names[:4]}...")
    dense_bytes = _dense_bytes(find_target_linears(dense))

    batches = _calibration_batches(tok, train, args)
    g_in, g_out, tokens = calibration_grams(dense, find_target_linears(dense), batches, outputs=True,
                                            progress=False)
    grams = CalibrationGrams(g_in, g_out, tokens)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")

    rows = []
    for row in args.rows:
        t0 = time.perf_counter()
        entry: dict = {"row": row}
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if row == "dense":
                nbytes, entry["scheme"] = dense_bytes, "bf16 weights (computed in float32)"
            elif row.startswith("rtn_"):
                bits, group = int(row.split("_")[1][3:]), int(row.split("_")[2][1:])
                nbytes = _rtn_(find_target_linears(model), bits, group)
                entry["scheme"] = f"round-to-nearest int{bits}, asymmetric, group {group}, fp16 scale+offset"
            elif row == "nf4":
                nbytes = _nf4_(find_target_linears(model), double_quant=False)
                entry["scheme"] = "bitsandbytes NF4, blocksize 64, absmax fp32"
            elif row.startswith("lowrank_"):
                keep, _, suffix = row.removeprefix("lowrank_").partition("_")
                kwargs = {"factor_bits": int(suffix[1:]), "group_size": 64} if suffix else {}
                if keep.startswith("u"):
                    keep, kwargs["allocation"] = keep[1:], "uniform"
                report = compress_model(model, float(keep), calibration=grams, calibration_weighting="kronecker",
                                        method="exact", progress=False, **kwargs)
                if suffix:
                    nbytes = report_bytes(report, model, names)
                    entry["scheme"] = (f"compress_model keep {keep}, {suffix[1:]}-bit group-64 factors"
                                       + (", uniform ranks" if "allocation" in kwargs else ""))
                else:
                    _factors_to_bf16_(model)
                    nbytes = _lowrank_bytes(model, names)
                    entry["scheme"] = f"compress_model keep {keep}, bf16 factors"
                entry["kept_fraction"] = round(report.kept_fraction, 4)
                entry["dense_modules"] = sum(1 for m in report.modules if m.skipped)
            else:  # nf4_corr16 / nf4_loftq16
                rank = 16
                kwargs = {"calibration": grams} if "corr" in row else {"calibration": None, "weighting": "none"}
                report = hf_lowrank.quantization_correction(dense, nf4, rank, target_modules=names, progress=False,
                                                            **kwargs)
                targets = find_target_linears(model)
                nbytes = _nf4_(targets, double_quant=False)
                with torch.no_grad():
                    for name, (A, B) in report.factors.items():
                        A, B = A.to(torch.bfloat16).float(), B.to(torch.bfloat16).float()
                        targets[name].weight.data += (B @ A).to(targets[name].weight.dtype)
                        nbytes += 2 * (A.numel() + B.numel())
                entry["scheme"] = f"bitsandbytes NF4 + rank-{rank} correction (bf16 adapter), " + (
                    "Kronecker-weighted on the calibration batches" if "corr" in row else
                    "data-free (plain SVD of W - Q(W), LoftQ's one-iteration initialisation)")
        entry.update({"accuracy": acc(model), "bytes": nbytes, "bytes_vs_bf16": round(nbytes / dense_bytes, 4),
                      "seconds": round(time.perf_counter() - t0, 1)})
        rows.append(entry)
        print(json.dumps(entry), flush=True)
        del model

    summary = {
        "model": "all-MiniLM-L6-v2 + sequence classification head (float32 compute, CPU, 1 thread)",
        "task": f"wordnet.category_task: {len(train[2])} WordNet categories",
        "train_texts": len(train[0]), "test_texts": len(test_texts),
        "dense_fine_tune": f"LoRA r=8 on intermediate/output.dense + head, lr 2e-3, batch 16, {steps} steps, merged "
                           "(classifier_quality.py's)",
        "dense_fine_tune_s": round(fine_tune_s, 1),
        "targets": "the 36 block Linears of bert.encoder.layer.N (pooler and classifier dense, not counted)",
        "bytes": "stored bytes of the 36 block Linears (codes, scales, offsets, codebooks, biases bf16) / bf16",
        "dense_bf16_bytes": dense_bytes,
        "calibration": {"texts": sum(len(b["labels"]) for b in batches), "tokens": tokens, "source": "training split, with labels"},
        "rows": rows,
        "command": command_line("classifier_size.py", args, skip=("out", "work")),
    }
    write_summary(summary, args.out)


if __name__ == "__main__":
    main()
