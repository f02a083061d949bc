"""The size-quality frontier: perplexity vs weight bytes of the block Linears, every scheme side by side.

SmolLM2-135M, every block Linear (210 modules). Bytes: the stored weight bytes of those Linears, scales, offsets and
codebooks included, relative to bf16 (2 bytes per original weight). Every row is evaluated in float32 compute with its
weights exactly as stored (fake quantization: the codes dequantized), on held-out text of another kind than the
calibration text (Python's documentation, ``pydoc_data.topics``) and on held-out bundled prose, with the data and the
evaluation of ``benchmarks/calibration_size.py`` (imported, not copied). Calibration (and healing) text: the bundled
training prose. Rows (``--rows``; results merged into ``--out`` by row name, so the grid runs in parts):

- ``dense``: the bf16 weights;
- round-to-nearest of the dense weights, the schemes users pick instead: ``rtn_int8_g128``, ``rtn_int4_g128``,
  ``rtn_int3_g128``, ``rtn_int2_g64`` (asymmetric min/max groups with fp16 scale and offset, ``hf_lowrank.ops.quant``)
  and ``nf4`` / ``nf4_dq`` (bitsandbytes' own ``quantize_4bit``: NF4 codebook, absmax per block of 64 in fp32, or
  8-bit with double quantization as ``bnb_4bit_use_double_quant=True`` stores it; Dettmers et al., 2023,
  arXiv:2305.14314);
- ``lowrank_<keep>``: ``compress_model``'s calibrated default at keep 0.9 / 0.8 / 0.6 with bf16 factors;
  ``lowrank_<keep>_q8`` / ``_q4``: the same with 8-bit / 4-bit group-wise factors (``factor_bits=``, group 64);
- ``lowrank_<keep>_heal``: the bf16-factor model after ``--heal-steps`` steps of the LoRA heal of
  ``examples/heal.py`` (imported), merged; the row keeps the curve at ``--heal-eval-at`` steps;
- ``heal_targets``: at keep 0.6, LoRA on ``up`` + ``down``, on ``up`` only, and training the factors themselves,
  each ``--heal-steps`` steps, the prose perplexity along the way (which heal is better per step);
- ``nf4_corr<r>`` / ``nf4_loftq<r>``: NF4 plus the data-aware low-rank correction of the quantization error
  (``hf_lowrank.quantization_correction``) vs peft's data-free LoftQ initialisation (Li et al., 2023,
  arXiv:2310.08659) at rank 16 / 64, adapter bytes (bf16) counted.

GPTQ (Frantar et al., 2022, arXiv:2210.17323) and AWQ (Lin et al., 2023, arXiv:2306.00978) need a GPU; none was lent
to the session that produced the results, so they are not rows (the JSON says so).

Run: ``python benchmarks/size_frontier.py --rows dense nf4 rtn_int4_g128 --out benchmarks/results/size_frontier.json
--plot benchmarks/results/size_frontier.png`` (each row a minute or two on 2 cores; ``--plot-only`` redraws the PNG
from the JSON).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path

import torch
from calibration_size import _batches, _calibration_chunks, _other_kind_texts
from results_io import command_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RTN = {"rtn_int8_g128": (8, 128), "rtn_int4_g128": (4, 128), "rtn_int3_g128": (3, 128), "rtn_int2_g64": (2, 64)}
KEEPS = ("0.9", "0.8", "0.6")
LOWRANK = [f"lowrank_{k}{s}" for k in KEEPS for s in ("", "_q8", "_q4", "_heal")]
# uniform ranks: every block Linear factorized, so the factor bits set the bytes (the global allocation keeps some
# modules dense, in their own dtype, which dominates the bytes of its quantized rows)
UNIFORM = [f"lowrank_u{k}_q{b}" for k in KEEPS for b in (4, 3)]
CORRECTION = [f"nf4_{kind}{r}" for kind in ("corr", "loftq") for r in (16, 64)]
ROWS = ["dense", *RTN, "nf4", "nf4_dq", *LOWRANK, *UNIFORM, "heal_targets", *CORRECTION]
GPU_NOTE = ("GPTQ and AWQ rows need a GPU (their packages quantize with CUDA kernels); no GPU was lent to this "
            "session, so they are not measured here.")


def _heal_module():
    path = Path(__file__).resolve().parents[1] / "examples" / "heal.py"
    spec = importlib.util.spec_from_file_location("heal_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bf16_(tensor: torch.Tensor) -> None:
    """Round a float32 tensor to bf16 in place (the stored precision), keeping float32 compute."""
    tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))


@torch.no_grad()
def _dense_bytes(targets) -> int:
    return sum(2 * m.weight.numel() + (2 * m.bias.numel() if m.bias is not None else 0) for m in targets.values())


@torch.no_grad()
def _rtn_(targets, bits: int, group_size: int) -> int:
    from hf_lowrank.ops.quant import dequantize_rtn, quantize_rtn

    total = 0
    for m in targets.values():
        q = quantize_rtn(m.weight.data, bits, group_size=group_size)
        m.weight.data.copy_(dequantize_rtn(q, m.weight.dtype))
        total += q.nbytes() + (2 * m.bias.numel() if m.bias is not None else 0)
    return total


@torch.no_grad()
def _nf4_(targets, double_quant: bool) -> int:
    """bitsandbytes' NF4 of each weight (blocks of 64, flattened as bitsandbytes does), dequantized in place."""
    import bitsandbytes.functional as bnbf

    total = 0
    for m in targets.values():
        packed, state = bnbf.quantize_4bit(m.weight.data, blocksize=64, quant_type="nf4",
                                           compress_statistics=double_quant)
        m.weight.data.copy_(bnbf.dequantize_4bit(packed, state).to(m.weight.dtype))
        stats = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
        if state.nested:
            s2 = state.state2
            stats += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size() + 4
        total += packed.numel() * packed.element_size() + stats + (2 * m.bias.numel() if m.bias is not None else 0)
    return total


@torch.no_grad()
def _lowrank_bytes(model, targets_names) -> int:
    """bf16 bytes of the factor pairs (and of any target left dense)."""
    from hf_lowrank import LowRankLinear

    total = 0
    for name in targets_names:
        m = model.get_submodule(name)
        params = [m.down.weight, m.up.weight, m.up.bias] if isinstance(m, LowRankLinear) else [m.weight, m.bias]
        total += sum(2 * p.numel() for p in params if p is not None)
    return total


@torch.no_grad()
def _factors_to_bf16_(model) -> None:
    from hf_lowrank import LowRankLinear

    for m in model.modules():
        if isinstance(m, LowRankLinear):
            for p in (m.down.weight, m.up.weight, m.up.bias):
                if p is not None:
                    _bf16_(p.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["dense", *RTN, "nf4", "nf4_dq"])
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-prose", type=int, default=16)
    parser.add_argument("--heal-steps", type=int, default=50)
    parser.add_argument("--heal-batch", type=int, default=4, help="chunks of 128 tokens per heal step")
    parser.add_argument("--heal-lr", type=float, default=1e-3)
    parser.add_argument("--heal-eval-at", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--compare-steps", type=int, default=20, help="heal steps per variant in heal_targets")
    parser.add_argument("--grams-cache", default=None, help="file keeping the calibration Grams between parts")
    parser.add_argument("--out", default=None, help="JSON to merge the rows into (by row name)")
    parser.add_argument("--plot", default=None, help="PNG of the frontier drawn from the merged JSON")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG (and refresh not_measured) only")
    args = parser.parse_args()
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROWS}")
    previous = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    if args.plot_only:
        if not (args.plot and previous):
            raise SystemExit("--plot-only needs --plot and an existing --out JSON")
        previous["not_measured"] = _not_measured(previous)
        from hf_lowrank.io import atomic_write_json

        atomic_write_json(args.out, previous)
        plot(previous, args.plot)
        return

    from hf_lowrank import compress_model
    from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.targets import find_target_linears

    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    dense, tok = load_smollm2()
    with torch.no_grad():
        for m in find_target_linears(dense).values():  # the reference stores bf16 weights
            _bf16_(m.weight.data)
    names = list(find_target_linears(dense))
    dense_bytes = _dense_bytes(find_target_linears(dense))
    other, prose = _other_kind_texts(tok, args.eval_windows), wordnet.prose_texts("test", n=args.eval_prose)

    def score(model) -> dict:
        return {"ppl_other_kind": round(perplexity(model, tok, other, progress=False), 3),
                "ppl_prose": round(perplexity(model, tok, prose, progress=False), 3)}

    grams = None

    def calibration():
        nonlocal grams
        if grams is None:
            cache = Path(args.grams_cache) if args.grams_cache else None
            if cache is not None and cache.exists():
                grams = torch.load(cache)
            else:
                pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                ((_, chunk),) = list(_calibration_chunks(tok, [args.calibration_tokens], 256))
                g_in, g_out, n = calibration_grams(dense, find_target_linears(dense), _batches(chunk, pad),
                                                   outputs=True, progress=False)
                grams = {"in": g_in, "out": g_out, "tokens": n}
                if cache is not None:
                    torch.save(grams, cache)
        return CalibrationGrams(grams["in"], grams["out"], grams["tokens"])

    def compressed(keep: float, **kwargs):
        model = copy.deepcopy(dense)
        report = compress_model(model, keep, calibration=calibration(), progress=False, **kwargs)
        return model, report

    heal_mod = _heal_module() if any(r.endswith("_heal") or r == "heal_targets" for r in args.rows) else None

    def prose_only(m) -> dict:
        return {"ppl_prose": round(perplexity(m, tok, prose, progress=False), 3)}

    def heal_chunks():
        # The calibration text's source, continued past the calibration tokens.
        chunks = heal_mod.token_chunks(tok, wordnet.prose_texts("train"), 128)
        return chunks[-(-args.calibration_tokens // 128):]

    rows = {r["row"]: r for r in previous.get("rows", [])}
    for row in args.rows:
        start = time.perf_counter()
        entry: dict = {"row": row}
        if row == "dense" or row in RTN or row in ("nf4", "nf4_dq"):
            model = copy.deepcopy(dense)
            targets = find_target_linears(model)
            if row == "dense":
                nbytes, entry["scheme"] = dense_bytes, "bf16 weights"
            elif row in RTN:
                bits, group = RTN[row]
                nbytes = _rtn_(targets, bits, group)
                entry["scheme"] = f"round-to-nearest int{bits}, asymmetric, group {group}, fp16 scale+offset"
            else:
                nbytes = _nf4_(targets, row == "nf4_dq")
                entry["scheme"] = ("bitsandbytes NF4, blocksize 64, absmax "
                                   + ("8-bit, double quantization" if row == "nf4_dq" else "fp32"))
            entry.update(score(model))
        elif row in UNIFORM:
            keep, bits = re.fullmatch(r"lowrank_u(0\.\d)_q(\d)", row).groups()
            model, report = compressed(float(keep), factor_bits=int(bits), group_size=64, allocation="uniform")
            nbytes = report_bytes(report, model, names)
            entry["scheme"] = f"compress_model keep {keep}, uniform ranks, {bits}-bit group-64 factors"
            entry["kept_fraction"] = round(report.kept_fraction, 4)
            entry.update(score(model))
        elif row.startswith("lowrank_"):
            keep, suffix = re.fullmatch(r"lowrank_(0\.\d)(_q8|_q4|_heal)?", row).groups()
            if suffix in ("_q8", "_q4"):
                bits = int(suffix[2:])
                model, report = compressed(float(keep), factor_bits=bits, group_size=64)
                nbytes = report_bytes(report, model, names)
                entry["scheme"] = f"compress_model keep {keep}, {bits}-bit group-64 factors"
            else:
                model, report = compressed(float(keep))
                _factors_to_bf16_(model)
                nbytes = _lowrank_bytes(model, names)
                entry["scheme"] = f"compress_model keep {keep}, bf16 factors"
                if suffix == "_heal":
                    entry["compressed"] = score(model)

                    def evaluate(m):
                        return score(m)

                    model, history = heal_mod.heal(model, heal_chunks(), steps=args.heal_steps, lr=args.heal_lr,
                                                   batch_size=args.heal_batch, evaluate=evaluate,
                                                   eval_at=args.heal_eval_at, log=print)
                    _factors_to_bf16_(model)
                    entry["heal"] = {"steps": args.heal_steps, "lr": args.heal_lr, "lora_r": 16, "batch": args.heal_batch,
                                     "seq": 128, "targets": "LoRA on up and down, merged", "curve": history}
                    entry["scheme"] += f", healed {args.heal_steps} steps"
            entry["kept_fraction"] = round(report.kept_fraction, 4)
            entry.update(score(model))
        elif row == "heal_targets":
            nbytes = None
            curves = {}
            base, _ = compressed(0.6)
            _factors_to_bf16_(base)
            eval_at = sorted({args.compare_steps // 2, args.compare_steps})
            for targets in ("factors", "up", "full"):
                _, history = heal_mod.heal(copy.deepcopy(base), heal_chunks(), steps=args.compare_steps,
                                           batch_size=args.heal_batch, lr=args.heal_lr, targets=targets,
                                           evaluate=prose_only, eval_at=[0, *eval_at] if not curves else eval_at,
                                           log=print)
                curves[targets] = history
            entry["scheme"] = ("keep 0.6: LoRA r16 on up+down vs on up only vs training the factors themselves "
                               f"(lr {args.heal_lr}, factors lr {args.heal_lr / 10}), batch {args.heal_batch}x128")
            entry["curves"] = curves
        else:
            nbytes = correction_row(row, entry, dense, calibration, score, names)
        if nbytes is not None:
            entry["bytes"] = nbytes
            entry["bytes_vs_bf16"] = round(nbytes / dense_bytes, 4)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(entry), flush=True)
        rows[row] = entry
        if args.out:
            _write(args, previous, rows, dense_bytes)
    if args.out:
        result = _write(args, previous, rows, dense_bytes)
        if args.plot:
            plot(result, args.plot)


def report_bytes(report, model, names) -> int:
    """Stored bytes of the block Linears of a model with quantized factors: each layer's own ``nbytes()`` (codes,
    scales, offsets, bias), bf16 for any target left dense."""
    from hf_lowrank import LowRankLinear

    total = 0
    for name in names:
        m = model.get_submodule(name)
        if hasattr(m, "nbytes"):
            total += int(m.nbytes())
        elif isinstance(m, LowRankLinear):  # a float factor pair: its ``weight`` is the product, not what is stored
            total += _lowrank_bytes(model, [name])
        elif isinstance(getattr(m, "weight", None), torch.Tensor):
            total += 2 * m.weight.numel() + (2 * m.bias.numel() if m.bias is not None else 0)
        else:
            raise SystemExit(f"{name}: {type(m).__name__} has no byte accounting (nbytes())")
    return total


@torch.no_grad()
def correction_row(row, entry, dense, calibration, score, names) -> int:
    """NF4 of the dense weights plus a rank-r correction of ``W - Q(W)`` folded in: ``quantization_correction``'s
    data-aware (Kronecker-weighted) fit, or its data-free plain SVD of the residual (LoftQ's one-iteration
    initialisation). The adapter is rounded to bf16 and counted in bf16."""
    try:
        from hf_lowrank import quantization_correction
    except ImportError:
        raise SystemExit(f"row {row} needs hf_lowrank.quantization_correction (not on this branch yet)") from None
    from transformers import BitsAndBytesConfig

    kind, rank = re.fullmatch(r"nf4_(corr|loftq)(\d+)", row).groups()
    rank = int(rank)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    if kind == "corr":
        report = quantization_correction(dense, nf4, rank, calibration=calibration(), progress=False)
    else:
        report = quantization_correction(dense, nf4, rank, calibration=None, weighting="none", progress=False)
    model = copy.deepcopy(dense)
    from hf_lowrank.targets import find_target_linears

    targets = find_target_linears(model)
    nbytes = _nf4_(targets, double_quant=False)
    for name, (A, B) in report.factors.items():
        A, B = A.to(torch.bfloat16).float(), B.to(torch.bfloat16).float()
        targets[name].weight.data += (B @ A).to(targets[name].weight.dtype)
        nbytes += 2 * (A.numel() + B.numel())
    entry["scheme"] = (f"bitsandbytes NF4 (fp32 absmax) + rank-{rank} correction, "
                       + ("Kronecker-weighted on the calibration text" if kind == "corr"
                          else "data-free (plain SVD of W - Q(W), LoftQ's one-iteration initialisation)"))
    entry["corrected_modules"] = len(report.factors)
    entry.update(score(model))
    return nbytes


def _write(args, previous, rows, dense_bytes) -> dict:
    from hf_lowrank.io import atomic_write_json

    commands = list(previous.get("commands", []))
    command = command_line("size_frontier.py", args, skip=("out", "plot", "grams_cache"))
    if command not in commands:
        commands.append(command)
    order = {name: i for i, name in enumerate(ROWS)}
    result = {
        "model": "SmolLM2-135M-Instruct (offline GGUF)",
        "targets": "all 210 block Linears",
        "bytes": "stored weight bytes of the block Linears (codes, scales, offsets, codebooks), relative to bf16",
        "dense_bf16_bytes": dense_bytes,
        "calibration": f"bundled prose_texts('train'), first {args.calibration_tokens} tokens",
        "evaluation": {"other_kind": f"pydoc_data.topics, {args.eval_windows} windows of 256 tokens",
                       "prose": f"prose_texts('test', n={args.eval_prose})",
                       "compute": "float32, weights as stored (dequantized)"},
        "notes": [GPU_NOTE],
        "torch_threads": torch.get_num_threads(),
        "rows": sorted(rows.values(), key=lambda r: order.get(r["row"], len(order))),
        "commands": commands,
    }
    result["finite"] = all(math.isfinite(r.get("ppl_other_kind", 0.0)) for r in result["rows"])
    result["not_measured"] = _not_measured(result)
    atomic_write_json(args.out, result)
    return result


def _not_measured(result: dict) -> list[str]:
    """The grid's rows missing from ``result`` (and the classifier grid, which this script does not run)."""
    done = {r["row"] for r in result["rows"]}
    return [r for r in ROWS if r not in done] + ["MiniLM classifier accuracy on the grid (not implemented here)"]


def plot(result: dict, out: str) -> None:
    """Perplexity (log) vs bytes relative to bf16, one panel per evaluation text, one series per scheme family."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hf_lowrank.io import atomic_write_bytes

    rows = {r["row"]: r for r in result["rows"] if "bytes_vs_bf16" in r}
    families = [
        ("round-to-nearest (dense)", [*RTN, "nf4", "nf4_dq"], "tab:gray", "o"),
        ("hf-lowrank, bf16 factors", [f"lowrank_{k}" for k in KEEPS], "tab:blue", "s"),
        ("hf-lowrank, 8-bit factors", [f"lowrank_{k}_q8" for k in KEEPS], "tab:cyan", "s"),
        ("hf-lowrank, 4-bit factors", [f"lowrank_{k}_q4" for k in KEEPS], "tab:purple", "s"),
        ("hf-lowrank, uniform ranks, 4-bit factors", [f"lowrank_u{k}_q4" for k in KEEPS], "tab:olive", "v"),
        ("hf-lowrank, uniform ranks, 3-bit factors", [f"lowrank_u{k}_q3" for k in KEEPS], "tab:brown", "v"),
        ("hf-lowrank + LoRA heal", [f"lowrank_{k}_heal" for k in KEEPS], "tab:green", "^"),
        ("NF4 + data-aware correction", [f"nf4_corr{r}" for r in (16, 64)], "tab:red", "D"),
        ("NF4 + LoftQ", [f"nf4_loftq{r}" for r in (16, 64)], "tab:orange", "D"),
    ]
    fig = Figure(figsize=(11, 4.6))
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate((("ppl_other_kind", "held-out text of another kind (Python docs)"),
                                      ("ppl_prose", "held-out bundled prose"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for label, members, color, marker in families:
            pts = sorted((rows[m]["bytes_vs_bf16"], rows[m][key], m) for m in members if m in rows)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label,
                        linestyle="-" if label.startswith(("round", "hf")) else "none")
                for x, y, name in pts:
                    ax.annotate(name.replace("lowrank_", "").replace("rtn_", ""), (x, y), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
        if "dense" in rows:
            ax.axhline(rows["dense"][key], color="black", linestyle="--", linewidth=0.8, label="dense bf16")
        ax.set_yscale("log")
        ax.set_xlabel("weight bytes of the block Linears / bf16")
        ax.set_ylabel("perplexity")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if i == 1:
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("SmolLM2-135M, all 210 block Linears: size-quality frontier", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out, buf.getvalue())


if __name__ == "__main__":
    main()
