"""``hf-lowrank compress``: factorize a model's Linear layers (SVD, Fisher-weighted SVD or WeLore) and save a
factorized checkpoint with its model card."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ...calibration import calibration_batches
from ...calibration.grams import calibration_grams
from ...cards import write_model_card
from ...compression.checkpoint import save_compressed
from ...compression.compress import compress_model
from ...demo.wordnet import prose_texts
from ...targets import TARGETS_HELP, find_target_linears, parse_targets
from ...tuners.welore import welore_ranks_for_model
from ..common import _MODEL_CLASSES, CliError, _model_path, load_model_for_cli

__all__ = ["add_parser"]


def _ranks_arg(args) -> int | float | dict:
    if args.rank is not None:
        return args.rank
    return args.keep


def _cmd_compress(args) -> int:
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
    if source == "bundled":
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


def add_parser(sub):
    """Add ``compress`` to the ``hf-lowrank`` subcommands."""
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
    return c
