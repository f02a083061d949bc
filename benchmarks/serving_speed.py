"""Serving speed of compressed SmolLM2-135M vs dense, in vLLM and in transformers' ``generate``, side by side.

Rows (every block Linear of the offline SmolLM2-135M-Instruct is a target; LM head, embeddings and attention stay
dense):

- ``dense``: the model as it is;
- ``default-0.8`` / ``default-0.6``: ``compress_model(model, keep, calibration=...)``'s default (Kronecker-factored
  Fisher from bundled prose, global rank allocation: uneven ranks, some modules left dense);
- ``uniform-0.8`` / ``uniform-0.6``: the same statistics, ``allocation="uniform"`` (the same fraction per module).

The calibration statistics are collected once (:class:`hf_lowrank.calibration.grams.CalibrationGrams`) and every row
compresses a fresh copy from them. Workloads, each timed ``--repeats`` times, median reported:

- ``prefill``: ``--prefill-batch`` random-token prompts of ``--prefill-tokens`` tokens, one new token
  (``max_tokens=1``): prompt tokens/s;
- ``decode``: ``--decode-batch`` prompts of ``--decode-prompt`` tokens, ``--decode-tokens`` new tokens each (no
  end-of-sequence stop): generated tokens/s over the whole request (its short prefill included).

Within one process the models take turns in every repetition (order rotated each time) and ``vs_dense`` is the
median over repetitions of the PAIRED speed ratio ``tokens_per_s / dense tokens_per_s`` (above 1: faster), so slow
drifts of a shared machine cancel. Every process measures ``dense`` beside its rows.

Stages (each a separate process; ``--dir`` holds the checkpoints and the parts):

1. ``prepare`` (main environment): compress and ``save_compressed`` every row (and save the dense model) into
   ``--dir``, with the FLOP ratio of the block Linears per row in ``manifest.json``;
2. ``vllm`` (an environment with vLLM and hf-lowrank importable: the plugin registers through the
   ``vllm.general_plugins`` entry point): ``vllm.LLM(folder)`` per row, all rows' engines alive in one process,
   prefix caching off (the prompts repeat), ``enforce_eager``; ``--onednn-factors`` measures a PROTOTYPE of a plugin
   change instead (the factor GEMMs through vLLM's prepacked oneDNN matmul, as vLLM's dense CPU layers run);
3. ``transformers`` (main environment): ``load_compressed(folder)`` per row, ``generate`` (eager, ``use_cache=True``,
   greedy); prefill = ``generate(max_new_tokens=1)``;
4. ``merge``: the parts into one JSON with the goals of the serving issue (never slower than dense at any keep, and
   >= 1.3x at keep 0.6 for prefill) and the FLOP bound: the speed-up the FLOPs of the step allow,
   ``1 / step_flop_ratio`` (block Linears with their ranks, plus the dense LM head on the positions whose logits are
   computed and the attention scores at the workload's context lengths).

The device is chosen automatically (CUDA when available: float16 on a GPU, float32 on the CPU).

Run (CPU, 2 cores, each step a few minutes)::

    python benchmarks/serving_speed.py prepare --dir /tmp/serve
    /path/to/vllm-venv/bin/python benchmarks/serving_speed.py vllm --dir /tmp/serve --rows default-0.8 default-0.6
    /path/to/vllm-venv/bin/python benchmarks/serving_speed.py vllm --dir /tmp/serve --rows uniform-0.8 uniform-0.6
    python benchmarks/serving_speed.py transformers --dir /tmp/serve
    python benchmarks/serving_speed.py merge --dir /tmp/serve --out benchmarks/results/serving_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# vLLM's CPU backend: a small KV cache, no thread pinning (the machine is shared), the engine in this process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))
from results_io import command_line, write_summary  # noqa: E402

ROWS = ("dense", "default-0.8", "default-0.6", "uniform-0.8", "uniform-0.6")


def _device_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", "float16"
    return "cpu", "float32"


def _rotated(names: list[str], turn: int) -> list[str]:
    k = turn % len(names)
    return names[k:] + names[:k]


def _prompts(vocab: int, batch: int, tokens: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, tokens), generator=generator).tolist()  # clear of special tokens


# --------------------------------------------------------------------------------------------------- prepare
def _linear_flops(shapes: dict, ranks: dict) -> int:
    """Multiply-adds per token of the block Linears: ``r (in + out)`` factorized, ``in out`` dense."""
    return sum(ranks[n] * (o + i) if n in ranks else o * i for n, (o, i) in shapes.items())


def prepare(args) -> None:
    import copy

    from hf_lowrank import calibration_batches, compress_model, save_compressed
    from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.models import load_smollm2
    from hf_lowrank.targets import find_target_linears

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    dense, tok = load_smollm2()
    dense.eval()
    targets = find_target_linears(dense)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    batches = calibration_batches(tok, wordnet.prose_texts("train", n=args.calib_texts), max_length=args.calib_length)
    t0 = time.perf_counter()
    g_in, g_out, tokens = calibration_grams(dense, targets, batches, outputs=True, progress=False)
    grams = CalibrationGrams(g_in, g_out, tokens)
    manifest = {"calibration_tokens": tokens, "calibration_seconds": round(time.perf_counter() - t0, 1),
                "config": {k: dense.config.to_dict()[k] for k in ("hidden_size", "intermediate_size",
                                                                   "num_hidden_layers", "num_attention_heads",
                                                                   "num_key_value_heads", "vocab_size")},
                "dense_block_linear_macs_per_token": _linear_flops(shapes, {}), "rows": {}}
    dense.save_pretrained(out / "dense")
    tok.save_pretrained(out / "dense")
    manifest["rows"]["dense"] = {"folder": str(out / "dense"), "block_linear_flop_ratio": 1.0, "kept_fraction": 1.0}
    for row in ROWS[1:]:
        kind, keep = row.split("-")
        model = copy.deepcopy(dense)
        t1 = time.perf_counter()
        extra = {"allocation": "uniform"} if kind == "uniform" else {}
        report = compress_model(model, float(keep), calibration=grams, progress=False, **extra)
        seconds = time.perf_counter() - t1
        save_compressed(model, out / row, tokenizer=tok, report=report)
        ranks = {m.name: m.rank for m in report.modules if m.skipped is None}
        manifest["rows"][row] = {
            "folder": str(out / row), "compress_seconds": round(seconds, 1),
            "kept_fraction": round(report.kept_fraction, 4),
            "block_linear_flop_ratio": round(_linear_flops(shapes, ranks) / _linear_flops(shapes, {}), 4),
            "factorized_modules": len(ranks), "dense_modules": len(shapes) - len(ranks),
            "weighting": report.info.get("weighting"), "allocation": report.info.get("allocation"),
            "block_linear_macs_per_token": _linear_flops(shapes, ranks)}
        print(json.dumps({row: manifest["rows"][row]}), flush=True)
        del model
    manifest["command"] = _command(args, skip=("out", "note", "rows"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


# --------------------------------------------------------------------------------------------------- timing
def _timed(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Each call once as a warm-up, then ``repeats`` rounds, the models taking turns (order rotated each round)."""
    for fn in calls.values():
        fn()
    times = {n: [] for n in calls}
    for rep in range(repeats):
        for n in _rotated(list(calls), rep):
            start = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - start)
    return times


def _rows_of(times: dict[str, list[float]], tokens: int) -> dict[str, dict]:
    """tokens/s (median), and the median paired speed ratio to dense of the same round."""
    out = {}
    for name, ts in times.items():
        paired = [b / t for t, b in zip(ts, times["dense"])]
        out[name] = {"tokens_per_s": round(tokens / statistics.median(ts), 1),
                     "vs_dense": round(statistics.median(paired), 3),
                     "vs_dense_best": round(min(times["dense"]) / min(ts), 3),
                     "seconds": [round(t, 3) for t in ts]}
    return out


def _workloads(args, vocab: int) -> dict:
    return {"prefill": (_prompts(vocab, args.prefill_batch, args.prefill_tokens, 1), 1),
            "decode": (_prompts(vocab, args.decode_batch, args.decode_prompt, 2), args.decode_tokens)}


def _tokens(kind: str, prompts, new: int) -> int:
    return sum(len(p) for p in prompts) if kind == "prefill" else len(prompts) * new


def _rows(args) -> list[str]:
    rows = ["dense"] + [r for r in args.rows if r != "dense"]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROWS}")
    return rows


def _manifest(args) -> dict:
    path = Path(args.dir) / "manifest.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the prepare stage first")
    return json.loads(path.read_text())


def _onednn_factors() -> None:
    """PROTOTYPE of a plugin change, for measurement only: run the factor GEMMs of the hf_lowrank vLLM linear method
    through vLLM's prepacked oneDNN matmul, as vLLM's own dense CPU path does (``dispatch_cpu_unquantized_gemm``),
    instead of ``F.linear`` on unpacked weights. CPU only; the plugin itself is unchanged."""
    import torch
    from vllm import _custom_ops as ops

    from hf_lowrank.integrations import _vllm_method as method

    cls = method.LowRankLinearMethod
    loaded, original_apply = cls.process_weights_after_loading, cls.apply

    def process(self, layer):
        loaded(self, layer)
        down = getattr(layer, method.DOWN_PARAM)
        self.onednn = {"down": ops.create_onednn_mm(down.data.t().contiguous(), 32),
                       "ups": [None if up is None else ops.create_onednn_mm(up.t().contiguous(), 32)
                               for up in layer.hf_lowrank_ups],
                       "dense": ops.create_onednn_mm(layer.weight.data.t().contiguous(), 32)
                       if "weight" in layer._parameters else None}

    def apply(self, layer, x, bias=None):
        handles = getattr(self, "onednn", None)
        if handles is None:
            return original_apply(self, layer, x, bias)
        hidden = ops.onednn_mm(handles["down"], x, None)
        if len(self.pieces) == 1:
            return ops.onednn_mm(handles["ups"][0], hidden, bias)
        dense = ops.onednn_mm(handles["dense"], x, None) if handles["dense"] is not None else None
        parts = []
        for piece, up in zip(self.pieces, handles["ups"]):
            if up is None:
                parts.append(dense[..., piece[1]: piece[2]])
            else:
                parts.append(ops.onednn_mm(up, hidden[..., piece[1]: piece[2]].contiguous(), None))
        out = torch.cat(parts, dim=-1)
        return out + bias if bias is not None else out

    cls.process_weights_after_loading, cls.apply = process, apply


def run_vllm(args) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    manifest, rows = _manifest(args), _rows(args)
    if args.onednn_factors:
        _onednn_factors()
    device, dtype = _device_dtype()
    work = _workloads(args, manifest["config"]["vocab_size"])
    longest = max(len(p[0]) + new for p, new in work.values())
    batch = max(len(p) for p, _ in work.values())
    engines, started = {}, {}
    for row in rows:
        t0 = time.perf_counter()
        engines[row] = LLM(model=manifest["rows"][row]["folder"], dtype=dtype, enforce_eager=True,
                           enable_prefix_caching=False, max_model_len=longest + 8, max_num_seqs=batch,
                           max_num_batched_tokens=max(longest + 8, args.prefill_batch * args.prefill_tokens),
                           gpu_memory_utilization=0.12, seed=0)
        started[row] = round(time.perf_counter() - t0, 1)
    results = {}
    for kind, (prompts, new) in work.items():
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
        requests = [{"prompt_token_ids": p} for p in prompts]
        calls = {row: (lambda llm=llm, r=requests, s=params: llm.generate(r, s, use_tqdm=False))
                 for row, llm in engines.items()}
        results[kind] = _rows_of(_timed(calls, args.repeats), _tokens(kind, prompts, new))
        print(json.dumps({kind: {r: {k: v for k, v in x.items() if k != "seconds"} for r, x in results[kind].items()}}),
              flush=True)
    return {"engine": "vllm" + ("-onednn-factors-prototype" if args.onednn_factors else ""),
            "vllm_version": vllm.__version__, "torch": torch.__version__, "device": device,
            "dtype": dtype, "engine_start_seconds": started, "threads": torch.get_num_threads(), **results}


def run_transformers(args) -> dict:
    import torch
    import transformers

    from hf_lowrank import load_compressed

    manifest, rows = _manifest(args), _rows(args)
    device, dtype = _device_dtype()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for row in rows:
        folder = manifest["rows"][row]["folder"]
        model = load_compressed(folder, dtype=getattr(torch, dtype)) if row != "dense" else \
            transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        model.generation_config.eos_token_id = None
        models[row] = model.to(device).eval()
    results = {}
    for kind, (prompts, new) in _workloads(args, manifest["config"]["vocab_size"]).items():
        ids = torch.tensor(prompts, device=device)

        def call(model, ids=ids, new=new):
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, use_cache=True, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()

        calls = {row: (lambda m=m: call(m)) for row, m in models.items()}
        results[kind] = _rows_of(_timed(calls, args.repeats), _tokens(kind, prompts, new))
        print(json.dumps({kind: {r: {k: v for k, v in x.items() if k != "seconds"} for r, x in results[kind].items()}}),
              flush=True)
    return {"engine": "transformers generate (eager, use_cache=True, greedy)", "transformers": transformers.__version__,
            "torch": torch.__version__, "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **results}


# --------------------------------------------------------------------------------------------------- merge
def _step_flop_ratio(manifest: dict, row: str, kind: str, args_used: dict) -> float:
    """FLOPs of the compressed step / the dense step: block Linears, the LM head on the positions whose logits are
    computed, attention scores and values at the workload's contexts (multiply-adds per generated / prompt token)."""
    c = manifest["config"]
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    if kind == "prefill":
        n = args_used["prefill_tokens"]
        context, head = n / 2, vocab * hidden / n  # causal: mean context n/2; logits of the last position only
    else:
        context, head = args_used["decode_prompt"] + args_used["decode_tokens"] / 2, vocab * hidden
    other = head + layers * 2 * hidden * context
    dense = manifest["dense_block_linear_macs_per_token"]
    mine = manifest["rows"][row].get("block_linear_macs_per_token", dense)
    return (mine + other) / (dense + other)


def merge(args) -> dict:
    manifest = _manifest(args)
    parts = [json.loads(p.read_text()) for p in sorted(Path(args.dir).glob("part-*.json"))]
    if not parts:
        raise SystemExit(f"no part-*.json in {args.dir}: run the vllm / transformers stages first")
    engines: dict[str, dict] = {}
    for part in parts:
        key = part["engine"] if part["engine"].startswith("vllm") else "transformers"
        entry = engines.setdefault(key, {"runs": []})
        entry["runs"].append({k: v for k, v in part.items() if k not in ("prefill", "decode")})
        for kind in ("prefill", "decode"):
            for row, res in part[kind].items():
                if row == "dense" and row in entry.get(kind, {}):
                    entry[kind][row].setdefault("other_runs", []).append(res["tokens_per_s"])
                    continue
                entry.setdefault(kind, {})[row] = {**res, "run": part["run"]}
    used = parts[0]["args"]
    flops = {row: {"block_linear_flop_ratio": info["block_linear_flop_ratio"], "kept_fraction": info["kept_fraction"],
                   **{f"{kind}_step_flop_ratio": round(_step_flop_ratio(manifest, row, kind, used), 4)
                      for kind in ("prefill", "decode")}}
             for row, info in manifest["rows"].items()}
    goals = {}
    for engine, entry in engines.items():
        g = {}
        for kind in ("prefill", "decode"):
            rows = {r: x for r, x in entry.get(kind, {}).items() if r != "dense"}
            g[f"{kind}_never_slower_than_dense"] = {
                "met": all(x["vs_dense"] >= 1.0 for x in rows.values()),
                "vs_dense": {r: x["vs_dense"] for r, x in rows.items()}}
            g[f"{kind}_at_flop_bound"] = {
                r: {"vs_dense": x["vs_dense"], "bound": round(1 / flops[r][f"{kind}_step_flop_ratio"], 3),
                    "met": x["vs_dense"] >= 1 / flops[r][f"{kind}_step_flop_ratio"]} for r, x in rows.items()}
        prefill = entry.get("prefill", {})
        g["prefill_keep_0.6_at_least_1.3x"] = {
            r: {"vs_dense": prefill[r]["vs_dense"], "met": prefill[r]["vs_dense"] >= 1.3}
            for r in ("default-0.6", "uniform-0.6") if r in prefill}
        goals[engine] = g
    return {"model": "SmolLM2-135M-Instruct (offline copy), block Linears compressed; LM head, embeddings and "
                     "attention dense",
            "calibration_tokens": manifest["calibration_tokens"], "rows": flops, "workloads": used,
            **engines, "goals": goals,
            "notes": args.note or []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("prepare", "vllm", "transformers", "merge"))
    parser.add_argument("--dir", required=True, help="checkpoints, manifest.json and the per-run part-*.json")
    parser.add_argument("--rows", nargs="+", default=list(ROWS[1:]), help="rows measured beside dense in this run")
    parser.add_argument("--calib-texts", type=int, default=32)
    parser.add_argument("--calib-length", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--decode-prompt", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="transformers: torch threads (default: torch's)")
    parser.add_argument("--onednn-factors", action="store_true",
                        help="vllm: PROTOTYPE, the factor GEMMs through vLLM's prepacked oneDNN matmul (CPU)")
    parser.add_argument("--note", action="append", help="merge: a note recorded in the JSON")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(args)
        return
    if args.stage == "merge":
        summary = merge(args)
        commands = [_manifest(args)["command"]] + [p["command"] for p in _parts_commands(args)]
        summary["command"] = " && ".join(commands + [f"python benchmarks/serving_speed.py merge --dir {args.dir}"])
        write_summary(summary, args.out)
        return
    result = run_vllm(args) if args.stage == "vllm" else run_transformers(args)
    result["args"] = {k: v for k, v in vars(args).items() if k not in ("stage", "dir", "rows", "note", "out")}
    result["command"] = _command(args, skip=("out", "note"))
    name = f"part-{args.stage}{'-onednn' if args.onednn_factors else ''}-{'_'.join(_rows(args)[1:])}.json"
    result["run"] = name
    (Path(args.dir) / name).write_text(json.dumps(result, indent=1))
    write_summary(result, args.out)


def _command(args, skip) -> str:
    """The stage's command line (the stage positional first)."""
    line = command_line("serving_speed.py", args, skip=tuple(skip) + ("stage",))
    return line.replace("serving_speed.py", f"serving_speed.py {args.stage}", 1)


def _parts_commands(args) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(args.dir).glob("part-*.json"))]


if __name__ == "__main__":
    main()
