"""What every JSON-printing benchmark ends with: the command that reproduces it, and the result written atomically."""

from __future__ import annotations

import argparse
import json


def command_line(script: str, args: argparse.Namespace, skip: tuple[str, ...] = ("out",)) -> str:
    """``python benchmarks/<script> --flag value ...`` from parsed ``args`` (lists space-separated), without ``skip``.

    A ``store_true`` flag appears bare when set and not at all when unset; an option left at ``None`` is left out.
    """
    parts = []
    for key, value in vars(args).items():
        if key in skip or value is None or value is False:
            continue
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return f"python benchmarks/{script} " + " ".join(parts)


def write_summary(summary: dict, out) -> None:
    """Print ``summary`` as JSON and, when ``out`` is given, write it there atomically."""
    print(json.dumps(summary, indent=1))
    if out:
        from hf_lowrank.io import atomic_write_json

        atomic_write_json(out, summary)
