"""The ``hf-lowrank`` command: compress, inspect, residual, plot.

``MODEL`` arguments accept a local folder, a Hub id, or ``smollm2`` / ``minilm`` for the embedded offline
SmolLM2-135M / all-MiniLM-L6-v2 (:func:`hf_lowrank.offline.resolve_model_alias`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from ..targets import TARGETS_HELP, parse_targets

__all__ = ["CliError", "load_model_for_cli", "main", "resolve_model_class"]

# Modules that contribute subcommands through `add_parser(subparsers)`; each is optional at import time so one
# method's missing extra (e.g. matplotlib for plots) never breaks the others.
_PLUGIN_MODULES = ("hf_lowrank.cli.residual", "hf_lowrank.cli.plot")

_MODEL_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "base": "AutoModel",
}
"""Short names for ``--model-class``; any transformers class name (``RobertaForSequenceClassification``) works too."""


class CliError(Exception):
    """A problem the command reports as one line on stderr with exit status 2 (as argparse does for bad usage)."""


def _model_path(model: str) -> str:
    from ..offline import resolve_model_alias

    return resolve_model_alias(model)


def _class_named(name: str):
    import transformers

    cls = getattr(transformers, _MODEL_CLASSES.get(name, name), None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        return None
    return cls


def resolve_model_class(model: str, model_class: str | None = None, *, gguf_file: str | None = None, config=None):
    """The transformers class to build ``model`` with.

    Given ``model_class`` (a short name of :data:`_MODEL_CLASSES` or a transformers class name), that class.
    Otherwise the class that ``config.json`` records in ``architectures`` (what ``save_pretrained`` writes), looked up
    in transformers as pipelines do (``getattr(transformers, name)``); so a sequence classifier stays one instead of
    being rebuilt as a causal LM with a random head. A GGUF file without ``architectures`` is read as a causal LM
    (the models transformers reads from GGUF).

    Raises:
        CliError: the class is unknown, or ``config.json`` does not say and no ``model_class`` was given.
    """
    shorts = ", ".join(_MODEL_CLASSES)
    if model_class:
        cls = _class_named(model_class)
        if cls is None:
            raise CliError(
                f"unknown --model-class {model_class!r}: use one of {shorts} or a transformers model class name "
                "such as RobertaForSequenceClassification."
            )
        return cls
    if config is None:
        import transformers

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        config = transformers.AutoConfig.from_pretrained(_model_path(model), **kwargs)
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = _class_named(name)
        if cls is not None:
            return cls
    if not names and gguf_file:
        return _class_named("causal-lm")
    import transformers

    if names:
        found = f"names {names}, which transformers {transformers.__version__} does not have"
    else:
        found = "has no 'architectures' entry"
    raise CliError(
        f"cannot tell which model class to build for {model}: its config (model_type "
        f"{getattr(config, 'model_type', None)!r}) {found}; pass --model-class ({shorts}, or a transformers class "
        "name such as T5ForConditionalGeneration)."
    )


#: A local folder holds a tokenizer only when one of these is in it. Without them transformers 5 still builds one
#: for some model types (GPT-2, RoBERTa) with an empty vocabulary ("hello world" -> no ids), which compress would
#: then save beside the model as if it were the model's.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str, *, gguf_file: str | None = None):
    """The tokenizer saved with the model at ``path`` (a local folder, a Hub id, or a GGUF file's folder), or ``None``
    when there is none: a local folder without any of :data:`_TOKENIZER_FILES` gives ``None`` without asking
    transformers."""
    import transformers

    if not gguf_file and os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, TypeError):
        return None


def load_model_for_cli(model: str, *, model_class: str | None = None, gguf_file: str | None = None, dtype=None):
    """Load ``model`` (folder, Hub id or ``smollm2``) with its tokenizer when one is there.

    ``model_class``: see :func:`resolve_model_class` (default: the class that the model's config records).
    """
    import torch
    import transformers

    from ..compression.checkpoint import load_compressed

    path = _model_path(model)
    kwargs = {"dtype": dtype or torch.float32}
    if gguf_file:
        cls = resolve_model_class(model, model_class, gguf_file=gguf_file)
        kwargs["gguf_file"] = gguf_file
        net = cls.from_pretrained(path, **kwargs)
        quantizer = getattr(net, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(net)
    else:
        config = transformers.AutoConfig.from_pretrained(path)
        cls = resolve_model_class(model, model_class, config=config)
        if getattr(config, "quantization_config", None) and (
            (config.quantization_config or {}).get("quant_method") == "hf_lowrank"
        ):
            net = load_compressed(path, cls, **kwargs)
        else:
            net = cls.from_pretrained(path, **kwargs)
    tok = load_tokenizer(path, gguf_file=gguf_file)
    return net, tok


def _ranks_arg(args) -> int | float | dict:
    if args.rank is not None:
        return args.rank
    return args.keep


def _cmd_compress(args) -> int:
    from ..compression.checkpoint import save_compressed
    from ..compression.compress import compress_model

    model, tok = load_model_for_cli(args.model, model_class=args.model_class, gguf_file=args.gguf_file)
    targets = parse_targets(args.target_modules)
    started = time.perf_counter()
    if args.method == "svd":
        calibration = _calibration_arg(args, tok)
        if calibration is None and (args.sequential or args.allocation == "global" or args.calibration_weighting):
            raise CliError("--sequential, --allocation global and --calibration-weighting need --calibration "
                           "FILE|bundled.")
        report = compress_model(model, _ranks_arg(args), target_modules=targets, svd_method=args.svd,
                                calibration=calibration, weighting=args.calibration_weighting,
                                allocation=args.allocation, sequential=args.sequential)
    elif args.method == "fwsvd":
        if not args.fisher:
            raise SystemExit("--method fwsvd needs --fisher FILE (the Fisher state a FisherCollectorCallback saved).")
        report = compress_model(model, _ranks_arg(args), fisher=args.fisher, weighting=args.weighting,
                                target_modules=targets, svd_method=args.svd, allocation=args.allocation)
    elif args.method == "welore":
        report = _compress_welore(args, model, tok, targets)
    else:  # argparse restricts the choices
        raise SystemExit(f"unknown method {args.method}")
    elapsed = time.perf_counter() - started
    save_compressed(model, args.out, tokenizer=tok, report=report)
    _write_card(args, model, report)
    print(report.summary())
    print(f"compressed in {elapsed:.1f}s; saved to {args.out}")
    return 0


def _compress_welore(args, model, tok, targets):
    """WeLore ranks, then the LRCs factorized (N-LRCs stay dense). With ``--calibration`` data-aware: the threshold
    runs on the whitened spectra and the factors are the whitened SVD, both from the same input Grams (collected
    once, forward passes only)."""
    from ..compression.compress import compress_model
    from ..peft_configs.welore import welore_ranks_for_model

    if args.calibration_weighting == "kronecker":
        raise CliError("--method welore is data-aware through input Grams only (whitened spectra): use "
                       "--calibration-weighting whitened or leave it out.")
    calibration = _calibration_arg(args, tok)
    if calibration is None:
        if args.calibration_weighting:
            raise CliError("--calibration-weighting needs --calibration FILE|bundled.")
        ranks, allocation = welore_ranks_for_model(model, args.reduction, target_modules=targets)
        report = compress_model(model, ranks, svd_method=args.svd, report_method="welore")
        print(f"WeLore: target reduction {args.reduction:.3f}, achieved {allocation.achieved_reduction:.4f}")
        return report
    from ..statistics import calibration_grams
    from ..targets import find_target_linears

    grams, tokens = calibration_grams(model, find_target_linears(model, targets), calibration)
    ranks, allocation = welore_ranks_for_model(model, args.reduction, target_modules=targets, grams_in=grams)
    welore = {"spectra": "whitened", "reduction": args.reduction,
              "achieved_reduction": allocation.achieved_reduction, "calibration_tokens": tokens,
              "lrc": len(allocation.lrc), "nlrc": len(allocation.nlrc)}
    report = compress_model(model, ranks, svd_method=args.svd, report_method="welore",
                            grams_in={n: grams[n] for n in ranks if n in grams}, checkpoint_extra=welore)
    report.info["welore"] = welore
    report.info["calibration_tokens"] = tokens
    print(f"WeLore (whitened spectra, {tokens} calibration tokens): target reduction {args.reduction:.3f}, "
          f"achieved {allocation.achieved_reduction:.4f}")
    return report


def _calibration_arg(args, tok):
    """Calibration batches from ``--calibration``: 'bundled' (WordNet prose), a .txt file (one text per non-empty
    line) or a .jsonl file (one {"text": ...} per line)."""
    source = getattr(args, "calibration", None)
    if not source:
        return None
    if tok is None:
        raise CliError("--calibration needs the model's tokenizer, and none was found next to the model.")
    from ..evaluation import calibration_batches

    if source == "bundled":
        from ..bundled import prose_texts

        texts = prose_texts("train", n=args.calibration_texts)
    else:
        path = Path(source)
        if not path.is_file():
            raise CliError(f"--calibration {source!r} is neither 'bundled' nor a file.")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            try:
                texts = [json.loads(line)["text"] for line in lines]
            except (ValueError, KeyError, TypeError) as exc:
                raise CliError(f"--calibration {source}: each line must be a JSON object with 'text' ({exc}).") from None
        else:
            texts = lines
        texts = texts[: args.calibration_texts]
        if not texts:
            raise CliError(f"--calibration {source} holds no text.")
    return calibration_batches(tok, texts, max_length=256)


def _write_card(args, model, report) -> None:
    from ..model_card import write_model_card

    if not report.ranks:  # nothing factorized: a dense checkpoint, no card that calls it a factorized one
        return
    if args.method == "welore":
        settings = {"reduction": args.reduction}
        if args.calibration:
            settings.update(spectra="whitened", calibration=args.calibration)
    else:
        settings = {"rank": args.rank} if args.rank is not None else {"keep": args.keep}
        if args.method == "fwsvd":
            settings.update(fisher=args.fisher, weighting=args.weighting)
    settings.update(svd=args.svd, target_modules=args.target_modules or "default")
    after = sum(p.numel() for p in model.parameters())
    write_model_card(  # the method is the one config.json records (e.g. "kronecker" for --method svd with data)
        args.out,
        base_model=args.model if _model_path(args.model) == args.model else model.config.name_or_path,  # alias
        method=report.method,
        settings=settings,
        ranks=report.ranks,
        params_before=after + report.params_before - report.params_after,
        params_after=after,
    )


def _cmd_inspect(args) -> int:
    from ..compression.checkpoint import check_safetensors_file
    from ..io import read_json

    path = Path(args.path)
    cfg = read_json(path / "config.json", what="model config")
    qcfg = cfg.get("quantization_config") or {}
    if qcfg.get("quant_method") != "hf_lowrank":
        print(f"{path}: not an hf-lowrank factorized checkpoint (no hf_lowrank quantization_config).")
        return 1
    from ..compression.checkpoint import check_compressed_checkpoint

    check_compressed_checkpoint(path)  # rank map vs factor tensors, both ways, naming the module
    shards = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
    for shard in shards:
        check_safetensors_file(shard)
    size = sum(p.stat().st_size for p in shards)
    report_path = path / "compression_report.json"
    report = read_json(report_path, what="compression report") if report_path.is_file() else None
    per_module = {m["name"]: m for m in (report or {}).get("modules", [])}
    rows = []
    for name, rank in qcfg.get("ranks", {}).items():
        info = per_module.get(name, {})
        rows.append((name, rank, info.get("shape"), info.get("params_after"), info.get("rel_error")))
    summary = {
        "path": str(path),
        "method": qcfg.get("method"),
        "format_version": qcfg.get("format_version"),
        "factorized_modules": len(rows),
        "file_bytes": size,
        "params_before": (report or {}).get("params_before"),
        "params_after": (report or {}).get("params_after"),
        "kept_fraction": (report or {}).get("kept_fraction"),
    }
    if args.json:
        summary["modules"] = [dict(zip(("name", "rank", "shape", "params", "rel_error"), r)) for r in rows]
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        print(f"{key:>18}: {value}")
    print(f"\n{'module':<48} {'rank':>5} {'shape':>12} {'params':>10} {'rel.err':>8}")
    for name, rank, shape, params, err in rows:
        shape_s = "x".join(map(str, shape)) if shape else "-"
        err_s = f"{err:.4f}" if err is not None else "-"
        print(f"{name:<48} {rank:>5} {shape_s:>12} {params if params is not None else '-':>10} {err_s:>8}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-lowrank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("lm-eval", add_help=False,
                   help="evaluate with lm-evaluation-harness (bundled tasks included): hf-lowrank lm-eval --model hf "
                   "--model_args pretrained=DIR --tasks hf_lowrank_wordnet")
    c = sub.add_parser("compress", help="factorize a model's Linear layers and save a factorized checkpoint")
    c.add_argument("model", help="model folder, Hub id, or 'smollm2' / 'minilm' for an embedded offline model")
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--method", choices=("svd", "fwsvd", "welore"), default="svd")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--keep", type=float, default=0.8, help="fraction of each module's parameters kept (svd/fwsvd)")
    size.add_argument("--rank", type=int, default=None, help="one rank for every target module (svd/fwsvd)")
    c.add_argument("--reduction", type=float, default=0.3,
                   help="achieved effective rank reduction (welore; data-aware with --calibration)")
    c.add_argument("--fisher", default=None, help="Fisher state file saved by FisherCollectorCallback (fwsvd)")
    c.add_argument("--weighting", choices=("kronecker", "row", "two_sided"), default=None,
                   help="Fisher weighting (fwsvd); default kronecker when the state holds Grams, else two_sided")
    c.add_argument("--target-modules", default=None, help=f"{TARGETS_HELP} (default: block Linears)")
    c.add_argument("--calibration", default=None,
                   help="'bundled' or a .txt/.jsonl file of texts. svd: weighs each weight by the Grams measured on "
                   "them (see --calibration-weighting); welore: data-aware, the threshold runs on the spectra "
                   "whitened by their input Grams and the factors are the whitened SVD")
    c.add_argument("--calibration-texts", type=int, default=128, help="calibration texts used (default 128)")
    c.add_argument("--calibration-weighting", choices=("whitened", "kronecker"), default=None,
                   help="with --calibration: 'kronecker' (input and loss-gradient Grams: forward + backward passes; "
                   "default for causal LMs) or 'whitened' (input Grams only, SVD-LLM)")
    c.add_argument("--allocation", choices=("uniform", "global"), default=None,
                   help="rank allocation (svd, fwsvd; default: global with Kronecker Grams, from --calibration or "
                   "a Fisher state, else uniform)")
    c.add_argument("--sequential", action="store_true",
                   help="block-by-block whitened calibration, each block measured after the compressed ones before it")
    c.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto", help="SVD algorithm")
    c.add_argument("--gguf-file", default=None, help="GGUF file inside MODEL to read the weights from")
    c.add_argument(
        "--model-class",
        default=None,
        help=f"class to build the model with: {', '.join(_MODEL_CLASSES)} or a transformers class name "
        "(default: the 'architectures' that the model's config.json records)",
    )
    c.set_defaults(func=_cmd_compress)

    i = sub.add_parser("inspect", help="ranks, parameters, size and per-module error of a factorized checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_inspect)

    for module_name in _PLUGIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        from ..lm_eval_cli import main as lm_eval_main

        return lm_eval_main(argv[1:])
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"hf-lowrank: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as exc:  # the package's errors name the problem and the fix
        if debug:
            raise
        print(f"hf-lowrank: error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2

