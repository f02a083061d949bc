"""Data-aware correction of a quantized model vs LoftQ's data-free correction, at equal rank, side by side.

SmolLM2-135M (float32), every block Linear (210 modules) quantized; perplexity on text of ANOTHER kind than the
calibration text (Python's ``pydoc_data.topics``, ``--eval-windows`` windows of 256 tokens) and on the held-out
bundled prose. Calibration: ``--tokens`` tokens of the bundled prose (``prose_texts("train")``), as in
``benchmarks/calibration_size.py``. Rows (``--rows`` runs a part; each run merges its rows into ``--out``):

- ``dense``; ``nf4``: bitsandbytes NF4 (block 64, bitsandbytes' own quantize/dequantize, i.e. the weights a 4-bit
  base holds); ``int3``: group-wise round-to-nearest 3 bits, group 128 (``hf_lowrank.ops.quant``);
- ``nf4_ours_r16`` / ``nf4_ours_r64`` / ``int3_ours_r16``: ``hf_lowrank.quantization_correction`` (Kronecker Grams
  of the dense model); ``*_ours_q_r16``: the same with the Grams collected on the quantized model (``grams_on=``);
- ``nf4_loftq_r16`` / ``nf4_loftq_r64``: LoftQ's one-iteration initialisation, computed by peft's own
  ``peft.utils.loftq_utils._low_rank_decomposition`` of the same residual (peft's ``replace_lora_weights_loftq``
  hard-codes a CUDA / XPU device, so it does not run on a CPU; its split of ``W - Q(W)`` is this one);
- ``int3_svd_r16``: the data-free correction (plain SVD of the residual, ``weighting="none"``);
- ``nf4_ours_r16_train`` / ``nf4_loftq_r16_train``: each adapter as the initialisation of a QLoRA fine-tune (LoRA
  r16 on the NF4 weights, AdamW, ``--train-steps`` steps of 4 prose texts of 128 tokens, other texts than the
  calibration's): the training loss along the way and the perplexities after.

Every corrected row runs the dense model with each target weight replaced by ``Q(W) + B A``
(``compression.correction.fake_quantize``), what ``PeftModel.from_pretrained(bnb_base, adapter)`` computes (tests/
test_correction.py checks that equality on a real 4-bit base).

Run: ``python benchmarks/quantization_correction.py --out benchmarks/results/quantization_correction.json``
(``--rows dense nf4 ...`` for a part).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = ["dense", "nf4", "nf4_ours_r16", "nf4_ours_r64", "nf4_loftq_r16", "nf4_loftq_r64", "int3", "int3_ours_r16",
        "int3_svd_r16", "nf4_ours_q_r16", "int3_ours_q_r16", "nf4_ours_r16_train", "nf4_loftq_r16_train"]


def _quantization(name: str):
    from transformers import BitsAndBytesConfig

    if name.startswith("nf4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return 3


def _loftq(dense, targets, quantization, rank):
    """peft's LoftQ split (one iteration) of each target's residual, as a correction report."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    from hf_lowrank.compression.correction import CorrectionReport, quantized_weight

    report = CorrectionReport(None, {}, rank, "loftq")
    for name in targets:
        W = dense.get_submodule(name).weight.detach()
        out = _low_rank_decomposition(W.float() - quantized_weight(W, quantization, group_size=128),
                                      reduced_rank=rank)
        report.factors[name] = (out["R"].contiguous(), out["L"].contiguous())
    return report


def _qlora(model, report, tok, texts, steps, lr):
    """A LoRA of rank ``report.rank`` on the quantized weights, initialised with ``report``'s factors, trained
    ``steps`` steps (AdamW, batches of 4 texts of 128 tokens): ``(peft model, per-step losses)``."""
    from peft import LoraConfig, get_peft_model

    from hf_lowrank import calibration_batches

    config = LoraConfig(r=report.rank, lora_alpha=report.rank, lora_dropout=0.0, target_modules=list(report.factors))
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, (A, B) in report.factors.items():
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    batches = calibration_batches(tok, texts, max_length=128, batch_size=4)
    losses = []
    peft_model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    peft_model.eval()
    return peft_model, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=ROWS)
    parser.add_argument("--tokens", type=int, default=4352)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-prose", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--grams-cache", default="/tmp/quantization_correction_grams.pt")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROWS}")

    from calibration_size import _batches, _calibration_chunks, _other_kind_texts

    import hf_lowrank
    from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams
    from hf_lowrank.compression.correction import fake_quantize
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2

    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)
    torch.manual_seed(0)
    dense, tok = load_smollm2()
    targets = list(hf_lowrank.targets.find_target_linears(dense))
    other, prose = _other_kind_texts(tok, args.eval_windows), wordnet.prose_texts("test", n=args.eval_prose)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _, chunk = next(_calibration_chunks(tok, [args.tokens], args.max_length))
    batches = _batches(chunk, pad)

    def score(model):
        return {"ppl_other_kind": round(perplexity(model, tok, other, progress=False), 3),
                "ppl_prose": round(perplexity(model, tok, prose, progress=False), 3)}

    grams: dict[str, CalibrationGrams] = {}

    def dense_grams():
        if "dense" not in grams:
            cache = Path(args.grams_cache)
            if cache.is_file():
                saved = torch.load(cache)
                if saved["tokens_asked"] == args.tokens:
                    grams["dense"] = CalibrationGrams(saved["inputs"], saved["outputs"], saved["tokens"])
            if "dense" not in grams:
                g_in, g_out, n = calibration_grams(dense, hf_lowrank.targets.find_target_linears(dense), batches,
                                                   outputs=True, progress=False)
                grams["dense"] = CalibrationGrams(g_in, g_out, n)
                torch.save({"inputs": g_in, "outputs": g_out, "tokens": n, "tokens_asked": args.tokens}, cache)
        return grams["dense"]

    out_path = Path(args.out) if args.out else None
    result = json.loads(out_path.read_text()) if out_path and out_path.is_file() else {}
    result.update({"model": "SmolLM2-135M-Instruct (offline GGUF, float32)", "targets": len(targets),
                   "calibration": f"bundled prose_texts('train'), {args.tokens} tokens",
                   "evaluation": {"other_kind": f"pydoc_data.topics, {args.eval_windows} windows of 256 tokens",
                                  "prose": f"prose_texts('test', n={args.eval_prose})"},
                   "nf4": "bitsandbytes NF4, block 64, no double quantization (its own quantize_4bit)",
                   "int3": "round-to-nearest asymmetric 3 bits, group 128, fp16 scales (hf_lowrank.ops.quant)"})
    rows = result.setdefault("rows", {})
    for row in args.rows:
        start = time.perf_counter()
        entry: dict = {}
        if row == "dense":
            entry.update(score(dense))
        else:
            q = _quantization(row)
            model = copy.deepcopy(dense)
            parts = row.split("_")
            train = parts[-1] == "train"
            parts = parts[:-1] if train else parts
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if len(parts) == 1:
                    fake_quantize(model, q, target_modules=targets, group_size=128)
                else:
                    rank = int(parts[-1][1:])
                    if parts[1] == "loftq":
                        report = _loftq(dense, targets, q, rank)
                    else:
                        kwargs = {"weighting": "none", "calibration": None} if parts[1] == "svd" else {
                            "calibration": batches if "q" in parts else dense_grams(),
                            "grams_on": "quantized" if "q" in parts else "dense"}
                        report = hf_lowrank.quantization_correction(dense, q, rank, target_modules=targets,
                                                                    group_size=128, progress=False, **kwargs)
                        summary = report.summary()
                        entry.update({k: round(summary[k], 4) if summary[k] is not None else None for k in (
                            "mean_error_before", "mean_error_after", "mean_weighted_error_before",
                            "mean_weighted_error_after")})
                        entry["calibration_tokens"] = summary.get("calibration_tokens")
                    entry["adapter_params"] = sum(a.numel() + b.numel() for a, b in report.factors.values())
                    if train:
                        fake_quantize(model, q, target_modules=targets, group_size=128)
                        texts = wordnet.prose_texts("train")[500 : 500 + 4 * args.train_steps]
                        model, losses = _qlora(model, report, tok, texts, args.train_steps, args.lr)
                        entry.update({"train_steps": args.train_steps, "lr": args.lr,
                                      "loss_first": round(losses[0], 4),
                                      "loss_last5_mean": round(sum(losses[-5:]) / len(losses[-5:]), 4),
                                      "losses": [round(v, 4) for v in losses]})
                    else:
                        fake_quantize(model, q, group_size=128, correction=report)
            entry.update(score(model))
            del model
        entry["seconds"] = round(time.perf_counter() - start, 1)
        rows[row] = entry
        print(row, entry, flush=True)
        if out_path:
            from hf_lowrank.io import atomic_write_json

            atomic_write_json(out_path, {**result, "partial": True})
    result["goals"] = _goals(rows)
    result.pop("partial", None)
    commands = result.setdefault("commands", [])
    cmd = command_line("quantization_correction.py", args, skip=("out", "grams_cache"))
    if cmd not in commands:
        commands.append(cmd)
    result["torch_threads"] = torch.get_num_threads()
    result["finite"] = all(math.isfinite(r.get("ppl_other_kind", math.nan)) for r in rows.values())
    write_summary(result, args.out)


def _goals(rows: dict) -> dict:
    """The issue's goals, each met or not with its figures (log perplexity is not used: gaps in perplexity)."""
    goals = {}
    if "dense" not in rows:
        return goals
    for metric in ("ppl_other_kind", "ppl_prose"):
        d = rows["dense"][metric]
        for quant, ours, free in (("int3", "int3_ours_r16", "int3_svd_r16"), ("nf4", "nf4_ours_r16", "nf4_loftq_r16"),
                                  ("nf4", "nf4_ours_r64", "nf4_loftq_r64")):
            if not all(k in rows for k in (quant, ours, free)):
                continue
            gap = rows[quant][metric] - d
            closed = (rows[quant][metric] - rows[ours][metric]) / gap if gap > 0 else None
            over_free = (rows[free][metric] - rows[ours][metric]) / gap if gap > 0 else None
            goals[f"{ours}_{metric}"] = {
                "dense": d, "quantized": rows[quant][metric], "ours": rows[ours][metric], "data_free": rows[free][metric],
                "gap_closed": round(closed, 3) if closed is not None else None,
                "half_gap_met": closed is not None and closed >= 0.5,
                "beats_data_free_by_gap_fraction": round(over_free, 3) if over_free is not None else None,
                "beats_data_free_30pct_met": over_free is not None and over_free >= 0.3}
    return goals


if __name__ == "__main__":
    main()
