"""QLoRA initialisations side by side: peft's default, LoftQ's data-free split, hf-lowrank's data-aware correction.

SmolLM2-135M loaded in 4 bits by bitsandbytes (NF4, block 64, float32 compute: ``AutoModelForCausalLM.
from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` of the float32 weights, on the CPU), LoRA of rank
``--rank`` (``lora_alpha = rank``, scale 1, no dropout) on every block Linear (210 modules), three initialisations:

- ``default``: peft's own (``get_peft_model``; A Kaiming-uniform, B = 0: step 0 is the bare NF4 model);
- ``loftq_data_free``: LoftQ's one-iteration, data-free initialisation (Li et al., 2023, arXiv:2310.08659): the
  rank-``r`` SVD split of ``W - Q(W)`` by peft's own ``peft.utils.loftq_utils._low_rank_decomposition``, ``Q`` the
  NF4 round trip the base holds. peft's ``replace_lora_weights_loftq`` hard-codes a CUDA / XPU device and does not
  run on a CPU; this is its split of the same residual (as in ``benchmarks/quantization_correction.py``), written as an
  adapter and loaded like the next one;
- ``data_aware``: :func:`hf_lowrank.quantization_correction` of the same NF4 quantization, Kronecker Grams of the
  dense model on ``--tokens`` tokens of the bundled prose (``prose_texts("train")``, the calibration text of
  ``benchmarks/quantization_correction.py``), written as a vanilla peft adapter.

The two adapters are loaded with ``PeftModel.from_pretrained(nf4_base, adapter, is_trainable=True)`` on a fresh NF4
base each. Every run trains with the same seed, data order, AdamW and learning rate: ``--steps`` steps of
``--batch`` prose texts of ``--seq`` tokens (training texts of the calibration's kind, none of those the correction
was fitted on). Perplexity at step 0 and after the last step on ``--eval-windows`` windows of Python's documentation
(text of another kind) and ``--eval-prose`` held-out prose texts, as ``benchmarks/size_frontier.py`` does.

Run: ``python benchmarks/qlora_init.py --out benchmarks/results/qlora_init.json --plot
benchmarks/results/qlora_init.png``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from results_io import command_line, write_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INITS = ("default", "loftq_data_free", "data_aware")


def _nf4():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _nf4_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=_nf4(), device_map="cpu",
                                                dtype=torch.float32)


def _train_batches(tok, args) -> list[dict]:
    """``steps`` batches of ``batch`` prose texts truncated to ``seq`` tokens, in a fixed order (texts after the
    first 2,000 of ``prose_texts("train")``: the calibration chunk uses the first few hundred)."""
    from hf_lowrank import calibration_batches
    from hf_lowrank.demo import wordnet

    texts = wordnet.prose_texts("train")[2000 : 2000 + args.batch * args.steps]
    if len(texts) < args.batch * args.steps:
        raise SystemExit(f"only {len(texts)} training texts for {args.steps} steps of {args.batch}")
    return calibration_batches(tok, texts, max_length=args.seq, batch_size=args.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4352)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-prose", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None, help="PNG of the loss curves")
    args = parser.parse_args()

    from calibration_size import _batches, _calibration_chunks, _other_kind_texts
    from peft import LoraConfig, PeftModel, get_peft_model
    from quantization_correction import _loftq

    import hf_lowrank
    from hf_lowrank.compression.correction import write_adapter
    from hf_lowrank.demo import wordnet
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2

    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dense, tok = load_smollm2()
    dense = dense.float()
    targets = sorted(hf_lowrank.find_target_linears(dense))
    other, prose = _other_kind_texts(tok, args.eval_windows), wordnet.prose_texts("test", n=args.eval_prose)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _, chunk = next(_calibration_chunks(tok, [args.tokens], args.max_length))
    train = _train_batches(tok, args)

    def score(model):
        model.eval()
        with torch.no_grad():
            return {"ppl_other_kind": round(perplexity(model, tok, other, progress=False), 3),
                    "ppl_prose": round(perplexity(model, tok, prose, progress=False), 3)}

    result = {"model": "SmolLM2-135M-Instruct (offline GGUF, float32 weights), bitsandbytes NF4 base on the CPU",
              "quantization": "bitsandbytes NF4, block 64, fp32 absmax, no double quantization, float32 compute",
              "lora": {"rank": args.rank, "alpha": args.rank, "dropout": 0.0, "targets": len(targets)},
              "training": {"steps": args.steps, "batch": args.batch, "seq": args.seq, "optimizer": "AdamW",
                           "lr": args.lr, "seed": args.seed,
                           "texts": f"prose_texts('train')[2000:{2000 + args.batch * args.steps}]"},
              "calibration": f"prose_texts('train'), first {args.tokens} tokens (data_aware only)",
              "evaluation": {"other_kind": f"pydoc_data.topics, {args.eval_windows} windows of 256 tokens",
                             "prose": f"prose_texts('test', n={args.eval_prose})"},
              "inits": {}}
    with tempfile.TemporaryDirectory(prefix="qlora_init_") as tmp:
        tmp = Path(tmp)
        dense.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        result["dense"] = score(dense)
        print("dense", result["dense"], flush=True)
        adapters, fit = {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if "data_aware" in args.inits:
                start = time.perf_counter()
                report = hf_lowrank.quantization_correction(dense, _nf4(), args.rank, target_modules=targets,
                                                            calibration=_batches(chunk, pad), progress=False,
                                                            output_dir=tmp / "data_aware")
                summary = report.summary()
                fit["data_aware"] = {"fit_s": round(time.perf_counter() - start, 1),
                                     "calibration_tokens": summary.get("calibration_tokens"),
                                     **{k: round(summary[k], 4) for k in ("mean_error_before", "mean_error_after",
                                                                          "mean_weighted_error_before",
                                                                          "mean_weighted_error_after")}}
                adapters["data_aware"] = report.output_dir
            if "loftq_data_free" in args.inits:
                start = time.perf_counter()
                report = _loftq(dense, targets, _nf4(), args.rank)
                adapters["loftq_data_free"] = write_adapter(report, tmp / "loftq", model=dense)
                fit["loftq_data_free"] = {"fit_s": round(time.perf_counter() - start, 1)}
        del dense
        for init in args.inits:
            start = time.perf_counter()
            base = _nf4_base(tmp / "base")
            torch.manual_seed(args.seed)
            if init == "default":
                config = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=targets,
                                    task_type="CAUSAL_LM")
                model = get_peft_model(base, config)
            else:
                model = PeftModel.from_pretrained(base, adapters[init], is_trainable=True)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            entry = {**fit.get(init, {}), "trainable_params": trainable, "step0": score(model)}
            print(init, "step 0", entry["step0"], flush=True)
            torch.manual_seed(args.seed)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
            losses = []
            model.train()
            for batch in train:
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                loss = model(**batch, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(round(float(loss), 4))
            entry["losses"] = losses
            entry["loss_first"] = losses[0]
            entry["loss_last5_mean"] = round(sum(losses[-5:]) / len(losses[-5:]), 4)
            entry["final"] = score(model)
            entry["seconds"] = round(time.perf_counter() - start, 1)
            print(init, "final", entry["final"], "losses", losses[:3], "...", losses[-3:], flush=True)
            result["inits"][init] = entry
            del model, base, optimizer
            if args.out:  # each finished initialisation survives an interrupted run
                from hf_lowrank.io import atomic_write_json

                atomic_write_json(args.out, {**result, "partial": True})
    result["comparison"] = _compare(result["inits"])
    result["command"] = command_line("qlora_init.py", args)
    result["torch_threads"] = torch.get_num_threads()
    if args.plot:
        plot(result, args.plot)
    write_summary(result, args.out)


def _compare(inits: dict) -> dict:
    """Whether the data-aware initialisation beats each other one, at step 0 and after the last step."""
    out = {}
    if "data_aware" not in inits:
        return out
    ours = inits["data_aware"]
    for other in ("default", "loftq_data_free"):
        if other not in inits:
            continue
        row = {}
        for when in ("step0", "final"):
            for metric in ("ppl_other_kind", "ppl_prose"):
                row[f"{when}_{metric}"] = {"data_aware": ours[when][metric], other: inits[other][when][metric],
                                          "data_aware_better": ours[when][metric] < inits[other][when][metric]}
        row["loss_last5_mean"] = {"data_aware": ours["loss_last5_mean"], other: inits[other]["loss_last5_mean"],
                                  "data_aware_better": ours["loss_last5_mean"] < inits[other]["loss_last5_mean"]}
        out[f"data_aware_vs_{other}"] = row
    return out


def plot(result: dict, out: str) -> None:
    """Training loss per step, one line per initialisation."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hf_lowrank.io import atomic_write_bytes

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = {"default": "peft default (B = 0)", "loftq_data_free": "LoftQ data-free (1 iteration)",
              "data_aware": "hf-lowrank data-aware correction"}
    colors = {"default": "tab:gray", "loftq_data_free": "tab:orange", "data_aware": "tab:red"}
    for init, entry in result["inits"].items():
        losses = entry["losses"]
        ax.plot(range(1, len(losses) + 1), losses, color=colors[init], label=labels[init])
    t = result["training"]
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"QLoRA r{result['lora']['rank']} on SmolLM2-135M NF4: {t['batch']} x {t['seq']} tokens a step, "
                 f"lr {t['lr']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(Path(out), buf.getvalue())


if __name__ == "__main__":
    main()
