"""The ``hf-lowrank`` command: compress, inspect, residual, plot, lm-eval.

``MODEL`` arguments accept a local folder, a Hub id, or ``smollm2`` / ``minilm`` for the embedded offline
SmolLM2-135M / all-MiniLM-L6-v2 (:func:`hf_lowrank.demo.models.resolve_model_alias`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .commands import compress, inspect
from .common import CliError, load_model_for_cli, load_tokenizer, resolve_model_class

# Each subcommand lives in its own module of hf_lowrank.cli.commands; this one builds the parser and dispatches.
__all__ = ["CliError", "build_parser", "load_model_for_cli", "load_tokenizer", "main", "resolve_model_class"]

# Modules that contribute subcommands through `add_parser(subparsers)`; each is optional at import time so one
# method's missing extra (e.g. matplotlib for plots) never breaks the others.
_PLUGIN_MODULES = ("hf_lowrank.cli.commands.residual", "hf_lowrank.cli.commands.plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-lowrank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("lm-eval", add_help=False,
                   help="evaluate with lm-evaluation-harness (bundled tasks included): hf-lowrank lm-eval --model hf "
                   "--model_args pretrained=DIR --tasks hf_lowrank_wordnet")
    compress.add_parser(sub)
    inspect.add_parser(sub)
    for module_name in _PLUGIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        from .commands.lm_eval import main as lm_eval_main

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

