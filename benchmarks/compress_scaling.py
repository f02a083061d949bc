"""Wall time and peak memory of ``compress_model``'s default as models grow, and what that means at 7B and 70B.

Llama-shaped causal LMs built from configs with RANDOM weights (no download: the time and memory of calibration and
factorization depend on the shapes, not on the values), float32, on the CPU or the GPU when one is present:

- ``smollm2-135m``: SmolLM2-135M's shape (width 576, MLP 1536, 9 heads / 3 KV heads, 49,152-token vocabulary);
- ``smollm2-360m``: SmolLM2-360M's (960, 2560, 15 / 5 heads);
- ``llama-3.2-1b``: Llama-3.2-1B's (2048, 8192, 32 / 8 heads, 128,256 tokens, tied embeddings);

each at ``--layers`` transformer blocks (all of them, or fewer to fit the time: every block has the same shape, so
the per-block cost is measured on a few and the depth series of the smallest shape checks that it is linear). Per
row, in a fresh subprocess each (peak RSS, Linux ``VmHWM``, reset after the model is built):

- ``default``: ``compress_model(model, --keep, calibration=batches)`` (Kronecker-factored Fisher, global allocation)
  on ``--calib-batches`` batches of 4 x 128 random tokens;
- ``svd``: the bare SVD loop, ``compress_model(model, --keep)`` (plain SVD, uniform ranks, no statistics).

The memory the statistics take is also COMPUTED from the shapes: the float32 Grams as ``compress_model`` logs them
(``gram_memory_bytes``, every module's own Grams), the distinct Grams actually held (modules fed one tensor share an
input Gram: q/k/v, gate/up), and the float64 Cholesky factor of every distinct Gram, which the weighting holds until
its modules are factorized (the Grams ``compress_model`` collects are freed as they are factorized, so the tensors
held then peak at about the factors; the process peak measured stays nearer Grams + factors). The fit: per-block time ``t = a * width**p`` over the rows (``p`` printed), times scale with
depth; memory by the formula (checked against the measured peaks), extrapolated to Llama-2-7B, Llama-3-8B and
Llama-2-70B, with and without ``max_gram_dim`` (sides wider than it keep their diagonal).

Run: ``python benchmarks/compress_scaling.py --rows smollm2-135m:30 smollm2-135m:8 --out part1.json`` and so on, then
``python benchmarks/compress_scaling.py --merge part1.json part2.json --out benchmarks/results/compress_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results_io import command_line, write_summary  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {  # hidden, intermediate, heads, kv heads, vocab, layers of the real model, tied embeddings
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, num_hidden_layers=30, tie_word_embeddings=True),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_attention_heads=15, num_key_value_heads=5,
                         vocab_size=49152, num_hidden_layers=32, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, num_hidden_layers=16, tie_word_embeddings=True),
    # extrapolation targets (not built)
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000, num_hidden_layers=32, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, num_hidden_layers=32, tie_word_embeddings=False),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=32000, num_hidden_layers=80, tie_word_embeddings=False),
}
BUILT = ("smollm2-135m", "smollm2-360m", "llama-3.2-1b")
TARGETS = ("llama-2-7b", "llama-3-8b", "llama-2-70b")


def block_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """``{projection: (out, in)}`` of one Llama block."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}


def statistics_bytes(shape: dict, layers: int, max_dim: int | None = None) -> dict[str, int]:
    """Bytes of the calibration statistics of ``layers`` blocks (Kronecker: input and output-gradient Grams).

    ``logged``: float32, every module's Grams (what ``gram_memory_bytes`` gives); ``grams``: float32, the distinct
    Grams (q/k/v share one input Gram, gate/up another); ``factors``: float64 Cholesky factors of the distinct Grams.
    """
    def side(n):
        return n if max_dim is not None and n > max_dim else n * n

    s = block_shapes(shape)
    logged = sum(side(o) + side(i) for o, i in s.values())
    distinct_in = side(s["q"][1]) + side(s["o"][1]) + side(s["gate"][1]) + side(s["down"][1])
    distinct = distinct_in + sum(side(o) for o, _ in s.values())
    return {"logged": 4 * layers * logged, "grams": 4 * layers * distinct, "factors": 8 * layers * distinct}


def params(shape: dict, layers: int) -> int:
    block = sum(o * i for o, i in block_shapes(shape).values()) + 2 * shape["hidden_size"]
    emb = shape["vocab_size"] * shape["hidden_size"] * (1 if shape["tie_word_embeddings"] else 2)
    return layers * block + emb + shape["hidden_size"]


# ------------------------------------------------------------------------------------------------- one measurement
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(name: str, layers: int, mode: str, keep: float, calib_batches: int, max_gram_dim) -> dict:
    """One row in this process (called in a fresh subprocess by :func:`main`)."""
    import logging

    import torch
    import transformers

    from hf_lowrank import compress_model

    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.LlamaConfig(**{**SHAPES[name], "num_hidden_layers": layers}, max_position_embeddings=256)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = transformers.LlamaForCausalLM(config).float().to(device).eval()
    built = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (4, 128), generator=generator)}
               for _ in range(calib_batches)]
    rss_model = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    kwargs = {"calibration": batches, "max_gram_dim": max_gram_dim} if mode == "default" else {}
    report = compress_model(model, keep, progress=False, **kwargs)
    seconds = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.synchronize()
    out = {"row": name, "layers": layers, "mode": mode, "device": device, "threads": torch.get_num_threads(),
           "params": params(SHAPES[name], layers),
           "build_seconds": round(built, 1), "seconds": round(seconds, 1),
           "rss_model_gb": round(rss_model / 2**30, 3), "peak_rss_gb": round(_status("VmHWM") / 2**30, 3),
           "calibration_tokens": report.info.get("calibration_tokens"), "weighting": report.info.get("weighting"),
           "allocation": report.info.get("allocation"), "kept_fraction": round(report.kept_fraction, 4),
           "max_gram_dim": max_gram_dim}
    out["peak_above_model_gb"] = round(out["peak_rss_gb"] - out["rss_model_gb"], 3)
    if device == "cuda":
        out["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if mode == "default":
        stats = statistics_bytes(SHAPES[name], layers, max_gram_dim)
        out["statistics_gb"] = {k: round(v / 2**30, 3) for k, v in stats.items()}
    return out


# ------------------------------------------------------------------------------------------------- fit and merge
def block_work(shape: dict) -> float:
    """A cost proxy of one block's factorization: ``sum max(o, i) min(o, i)^2`` (an SVD of each module) plus ``n^3``
    for every distinct Gram side (its Cholesky factorization)."""
    s = block_shapes(shape)
    svd = sum(max(o, i) * min(o, i) ** 2 for o, i in s.values())
    grams = [s["q"][1], s["o"][1], s["gate"][1], s["down"][1]] + [o for o, _ in s.values()]
    return float(svd + sum(n**3 for n in grams))


def _loglog(xs: list[float], ys: list[float]) -> tuple[float, float]:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    p = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)
    return math.exp(my - p * mx), p


def fit(rows: list[dict]) -> dict:
    """Per-block seconds over the built shapes (the run with the most blocks of each: a run of few blocks also
    carries the fixed cost of embeddings, LM head and allocation, so its per-block time is an upper bound), as
    ``a * width**p`` (the growth exponent in the width) and as ``a * work**q`` (:func:`block_work`), extrapolated
    to the targets' full depth with the latter."""
    out = {}
    for mode in ("default", "svd"):
        best: dict[str, dict] = {}
        for r in rows:
            if r["mode"] == mode and r.get("max_gram_dim") is None and r["layers"] >= best.get(r["row"], {}).get(
                    "layers", 0):
                best[r["row"]] = r
        if len(best) < 2:
            continue
        per_block = {n: r["seconds"] / r["layers"] for n, r in best.items()}
        _, p = _loglog([SHAPES[n]["hidden_size"] for n in per_block], list(per_block.values()))
        a, q = _loglog([block_work(SHAPES[n]) for n in per_block], list(per_block.values()))
        out[mode] = {"per_block_seconds": {n: round(v, 2) for n, v in per_block.items()},
                     "from_layers": {n: r["layers"] for n, r in best.items()},
                     "width_exponent": round(p, 2), "work_exponent": round(q, 2),
                     "extrapolated_hours": {t: round(a * block_work(SHAPES[t]) ** q * SHAPES[t]["num_hidden_layers"]
                                                     / 3600, 2) for t in BUILT + TARGETS}}
    return out


def memory_table() -> dict:
    """Statistics memory of every shape at full depth: the default (Kronecker) with full Grams, with
    ``max_gram_dim=hidden_size`` (the residual-stream sides full, the MLP's wide sides diagonal) and 4096; and
    ``sequential=True`` (whitened: one block's input Grams at a time). ``factors_gb``: the tensors ``compress_model``
    holds at most when it collects the Grams itself (each Gram freed once factorized); ``grams_and_factors_gb``: the
    bound its logged estimate uses (freed blocks may stay with the allocator), and what Grams passed in hold."""
    table = {}
    for name in BUILT + TARGETS:
        shape, layers = SHAPES[name], SHAPES[name]["num_hidden_layers"]
        n = params(shape, layers)
        row = {"params_b": round(n / 1e9, 3), "weights_fp32_gb": round(n * 4 / 2**30, 2),
               "weights_bf16_gb": round(n * 2 / 2**30, 2)}
        for label, max_dim in (("full", None), ("max_gram_dim_hidden_size", shape["hidden_size"]),
                               ("max_gram_dim_4096", 4096)):
            b = statistics_bytes(shape, layers, max_dim)
            row[label] = {"logged_gb": round(b["logged"] / 2**30, 2), "grams_gb": round(b["grams"] / 2**30, 2),
                          "factors_gb": round(b["factors"] / 2**30, 2),
                          "grams_and_factors_gb": round((b["grams"] + b["factors"]) / 2**30, 2),
                          "one_block_grams_and_factors_gb": round((b["grams"] + b["factors"]) / layers / 2**30, 2)}
        h, i = shape["hidden_size"], shape["intermediate_size"]
        one_block_inputs = 3 * h * h + i * i  # whitened: q/k/v, o, gate/up, down input Grams
        row["sequential_whitened_one_block_gb"] = {"grams": round(4 * one_block_inputs / 2**30, 2),
                                                   "grams_and_factors": round(12 * one_block_inputs / 2**30, 2)}
        table[name] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["smollm2-135m:30"],
                        help="NAME:LAYERS[:MAX_GRAM_DIM] of the built shapes " + ", ".join(BUILT))
    parser.add_argument("--modes", nargs="+", default=["default", "svd"])
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--merge", nargs="*", default=None, help="merge these part JSONs instead of measuring")
    parser.add_argument("--note", action="append")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        name, layers, mode, max_dim = json.loads(args.child)
        print("RESULT " + json.dumps(measure(name, layers, mode, args.keep, args.calib_batches, max_dim)), flush=True)
        return
    if args.merge is not None:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        rows = [r for p in parts for r in p["measured"]]
        summary = {"weights": "random (built from configs): time and memory depend on the shapes, not the values",
                   "measured": rows, "time_fit": fit(rows), "statistics_memory": memory_table(),
                   "notes": args.note or [], "command": " && ".join(p["command"] for p in parts)}
        write_summary(summary, args.out)
        return
    rows, command = [], command_line("compress_scaling.py", args, skip=("out", "child"))
    for spec in args.rows:
        name, layers, *rest = spec.split(":")
        if name not in BUILT:
            raise SystemExit(f"unknown row {name!r}; choose from {BUILT}")
        max_dim = int(rest[0]) if rest else None
        for mode in args.modes:
            child = json.dumps([name, int(layers), mode, max_dim])
            proc = subprocess.run([sys.executable, __file__, "--child", child, "--keep", str(args.keep),
                                   "--calib-batches", str(args.calib_batches)], capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{spec} {mode} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[0][7:]))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:  # what is measured so far survives a run stopped by a time limit
                from hf_lowrank.io import atomic_write_json

                atomic_write_json(args.out, {"measured": rows, "command": command})
    write_summary({"measured": rows, "command": command}, args.out)


if __name__ == "__main__":
    main()
