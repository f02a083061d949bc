"""Peak memory of a FisherLoRA probe with Kronecker Grams vs a plain peft LoRA run, on the embedded SmolLM2.

Each kind runs in its own Python process (peak RSS is per process and never goes down): load SmolLM2 (fp32, CPU),
then ``--steps`` LoRA training steps on bundled prose exactly as ``benchmarks/compression_quality.py``'s probe does
(r=8 on the MLP or all block Linears, batch 4, ``--max-length`` tokens). Kinds: ``plain`` (peft LoRA, ``Trainer``),
``kronecker_default`` (``FisherLoRAConfig(fisher_weighting="kronecker")`` with its default
``kronecker_max_dim="hidden_size"``: full Grams on 576-wide sides, diagonal on 1536-wide ones) and
``kronecker_full`` (every side a full Gram). Reported: the process's peak RSS (``VmHWM``) and its RSS after loading
the model (``VmRSS`` before training), in MB, and the ratios of the peaks and of the training increments
(peak minus loaded) to the plain run. The issue's goal: peak memory <= 1.3x plain LoRA.

Run: ``python benchmarks/probe_memory.py --targets mlp --steps 8 --out benchmarks/results/probe_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ("plain", "kronecker_default", "kronecker_full")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def _child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compression_quality import TARGETS, _probe

    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.models import load_smollm2

    dense, tok = load_smollm2()
    texts = wordnet.prose_texts("train", n=max(4 * args.steps, 8))
    loaded = _status_mb("VmRSS")
    kind = {"kronecker_default": "kronecker_small", "kronecker_full": "kronecker"}.get(args.child, args.child)
    probe_args = argparse.Namespace(targets=args.targets, max_length=args.max_length, steps=args.steps, keep=0.8,
                                    work=args.work, kronecker_max_dim=None)
    if kind == "kronecker_small":  # the config default, kronecker_max_dim="hidden_size"
        from hf_lowrank.fisher.collector import hidden_size

        probe_args.kronecker_max_dim = hidden_size(dense)
    model, state, step_s = _probe(dense, tok, texts, probe_args, kind=kind)
    grams_mb = 0.0
    if state is not None:
        grams_mb = sum(4 * t.numel() for k, t in state.tensors.items() if ".gram_" in k) / 2**20
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"kind": args.child, "loaded_MB": round(loaded, 1), "peak_MB": round(_status_mb("VmHWM"), 1),
                      "grams_MB": round(grams_mb, 1), "lora_params": lora, "step_s": round(step_s, 3),
                      "targets": TARGETS[args.targets]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", choices=("all", "mlp"), default="mlp")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--child", choices=KINDS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for kind in args.kinds.split(","):
            cmd = [sys.executable, __file__, "--child", kind, "--targets", args.targets, "--steps", str(args.steps),
                   "--max-length", str(args.max_length), "--threads", str(args.threads), "--work", work]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[kind] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(rows[kind]), flush=True)
    plain = rows.get("plain")
    ratios = {}
    if plain:
        for kind, row in rows.items():
            if kind == "plain":
                continue
            ratios[f"{kind}_peak_vs_plain"] = round(row["peak_MB"] / plain["peak_MB"], 3)
            ratios[f"{kind}_training_increment_vs_plain"] = round(
                (row["peak_MB"] - row["loaded_MB"]) / max(plain["peak_MB"] - plain["loaded_MB"], 1e-9), 3)
    result = {"model": "SmolLM2-135M-Instruct (fp32, CPU)", "targets": args.targets, "steps": args.steps,
              "max_length": args.max_length, "rows": rows, "ratios": ratios, "goal": "peak <= 1.3x plain LoRA",
              "command": command_line("probe_memory.py", args, skip=("out", "child", "work"))}
    write_summary(result, args.out)


if __name__ == "__main__":
    main()
