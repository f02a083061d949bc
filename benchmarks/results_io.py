"""What every JSON-printing benchmark ends with: the command that reproduces it, and the result written atomically."""

from __future__ import annotations

import argparse
import json


def command_line(script: str, args: argparse.Namespace, skip: tuple[str, ...] = ("out",)) -> str:
    """``python benchmarks/<script> --flag value ...`` from parsed ``args`` (lists space-separated), without ``skip``."""
    parts = []
    for key, value in vars(args).items():
        if key not in skip:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            parts.append(f"--{key.replace('_', '-')} {shown}")
    return f"python benchmarks/{script} " + " ".join(parts)


def write_summary(summary: dict, out) -> None:
    """Print ``summary`` as JSON and, when ``out`` is given, write it there atomically."""
    print(json.dumps(summary, indent=1))
    if out:
        from hf_lowrank.io import atomic_write_json

        atomic_write_json(out, summary)
