"""``hf-lowrank residual encode|decode|export-lora|info``: the ERE residual from the command line.

Plugged into ``hf_lowrank.cli`` through :func:`add_parser`. ``BASE`` and ``FINETUNED`` are local folders, Hub ids,
or ``smollm2`` / ``minilm`` for the embedded offline models.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ...compression.ere import EREResidual, encode_residual, load_residual
from ...demo.models import resolve_model_alias
from ...io import atomic_directory
from ...lora_export import save_as_lora
from ...targets import TARGETS_HELP, parse_targets
from ..common import load_tokenizer

__all__ = ["add_parser"]


def _load(path: str, architecture: str | None, dtype: str):
    import torch
    import transformers

    folder = resolve_model_alias(path)
    if architecture is None:
        config = transformers.AutoConfig.from_pretrained(folder)
        archs = getattr(config, "architectures", None) or []
        architecture = archs[0] if archs else "AutoModelForCausalLM"
    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise SystemExit(f"unknown model class {architecture!r}; pass --model-class with a transformers class name.")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(folder, dtype=getattr(torch, dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), architecture


def _tokenizer(*paths: str):
    """The first of ``paths`` that holds a tokenizer gives it (``None`` when none does)."""
    for path in paths:
        tok = load_tokenizer(resolve_model_alias(path))
        if tok is not None:
            return tok
    return None


def _cmd_encode(args) -> int:
    started = time.perf_counter()
    finetuned, arch = _load(args.finetuned, args.model_class, args.dtype)
    base, _ = _load(args.base, arch, args.dtype)
    targets = parse_targets(args.target_modules)
    res = encode_residual(
        base,
        finetuned,
        rank=args.rank,
        bits=args.bits,
        alpha=args.alpha,
        target_modules=targets,
        group_size=args.group_size,
        refit=args.refit,
        store_exact=args.store_exact.split(",") if args.store_exact else None,
        progress=not args.quiet,
        path=args.out,
    )
    tok = _tokenizer(args.finetuned, args.base)
    if tok is not None:
        tok.save_pretrained(args.out)
    report = res.report
    if args.json:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "entries" or args.per_tensor}, indent=2))
    else:
        print(report.summary(per_tensor=args.per_tensor))
        print(f"saved to {args.out} in {time.perf_counter() - started:.1f}s")
    return 0


def _cmd_decode(args) -> int:
    started = time.perf_counter()
    model_class = None
    if args.model_class:
        import transformers

        model_class = getattr(transformers, args.model_class, None)
        if model_class is None:
            raise SystemExit(f"unknown model class {args.model_class!r}.")

    model = load_residual(resolve_model_alias(args.base), args.residual, model_class, progress=not args.quiet)
    tok = _tokenizer(args.residual, args.base)
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"decoded {type(model).__name__} ({n / 1e6:.1f}M parameters) in {time.perf_counter() - started:.1f}s; saved to {args.out}"
    )
    return 0


def _cmd_export(args) -> int:
    base = None
    if args.base:
        arch = EREResidual.load(args.residual).manifest.get("architecture")
        base, _ = _load(args.base, arch, args.dtype)
    out = save_as_lora(args.out, args.residual, base_model=base, progressbar=not args.quiet)
    cfg = json.loads((Path(out) / "adapter_config.json").read_text())
    size = (Path(out) / "adapter_model.safetensors").stat().st_size
    print(
        f"LoRA adapter written to {out}: {len(cfg.get('target_modules') or [])} LoRA modules, "
        f"modules_to_save={cfg.get('modules_to_save')}, bias={cfg.get('bias')}, "
        f"trainable tokens={sorted((cfg.get('trainable_token_indices') or {}).keys())}, {size / 2**20:.2f} MiB"
    )
    return 0


def _cmd_info(args) -> int:
    res = EREResidual.load(args.residual)
    m = res.manifest
    kinds: dict[str, int] = {}
    for e in m["tensors"].values():
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    ranks = list(res.ranks.values())
    info = {
        "path": args.residual,
        "format_version": m["format_version"],
        "architecture": m.get("architecture"),
        "base": m["base"].get("name_or_path"),
        "base_fingerprint": m["base"]["fingerprint"]["sha256"],
        "bits": m["bits"],
        "group_size": m["group_size"],
        "prior_rank": m["prior_rank"],
        "alpha": m["alpha"],
        "weights_bytes": m["weights"]["bytes"],
        "finetuned_bytes": m.get("finetuned_bytes"),
        "fraction": m["weights"]["bytes"] / m["finetuned_bytes"] if m.get("finetuned_bytes") else None,
        "tensors": kinds,
        "ranks": {"min": min(ranks), "mean": sum(ranks) / len(ranks), "max": max(ranks)} if ranks else None,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {value}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``residual {encode,decode,export-lora,info}`` to the ``hf-lowrank`` subcommands."""
    p = subparsers.add_parser(
        "residual", help="ERE: store a fully fine-tuned model as a compressed residual over its base"
    )
    sub = p.add_subparsers(dest="residual_command", required=True)

    e = sub.add_parser("encode", help="encode FINETUNED as a residual over BASE")
    e.add_argument("base", help="base model folder / Hub id / smollm2 / minilm")
    e.add_argument("finetuned", help="fully fine-tuned model folder")
    e.add_argument("--out", required=True, help="residual folder to write")
    e.add_argument("--rank", type=int, default=32, help="prior (average) rank r_avg")
    e.add_argument("--bits", type=int, default=4, help="2..8 quantized factors, 16 fp16, 32 fp32")
    e.add_argument("--alpha", type=float, default=0.5, help="prior-rank blend weight in [0, 1]")
    e.add_argument("--group-size", type=int, default=64, help="entries per quantization scale")
    e.add_argument("--target-modules", default=None, help=f"modules to low-rank encode: {TARGETS_HELP}")
    e.add_argument("--store-exact", default=None, help="comma-separated tensor/module names to store exactly")
    e.add_argument("--refit", action="store_true", help="refit singular values to the quantized factors")
    e.add_argument("--model-class", default=None, help="transformers class (default: FINETUNED's architecture)")
    e.add_argument("--dtype", default="float32", help="dtype to load both models in")
    e.add_argument("--per-tensor", action="store_true", help="print one line per tensor")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_encode)

    d = sub.add_parser("decode", help="rebuild the fine-tuned model from BASE and RESIDUAL as a checkpoint")
    d.add_argument("base", help="base model folder / Hub id / smollm2 / minilm")
    d.add_argument("residual", help="residual folder")
    d.add_argument("--out", required=True, help="checkpoint folder to write (atomically)")
    d.add_argument("--model-class", default=None, help="transformers class (default: the recorded architecture)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_decode)

    x = sub.add_parser("export-lora", help="write RESIDUAL as a vanilla PEFT LoRA adapter")
    x.add_argument("residual", help="residual folder")
    x.add_argument("--out", required=True, help="adapter folder to write (atomically)")
    x.add_argument("--base", default=None, help="base model (needed for row-sparse embeddings / modules_to_save)")
    x.add_argument("--dtype", default="float32", help="dtype to load the base in")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.set_defaults(func=_cmd_export)

    i = sub.add_parser("info", help="format, base fingerprint, sizes and ranks of a residual folder")
    i.add_argument("residual", help="residual folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_info)
    return p
