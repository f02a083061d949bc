"""``hf-lowrank inspect``: ranks, parameters, size and per-module error of a factorized checkpoint (checked first:
the rank map against the factor tensors, and every shard's safetensors header)."""

from __future__ import annotations

import json
from pathlib import Path

from ...compression.checkpoint import check_compressed_checkpoint, check_safetensors_file
from ...io import read_json

__all__ = ["add_parser"]


def _cmd_inspect(args) -> int:
    path = Path(args.path)
    cfg = read_json(path / "config.json", what="model config")
    qcfg = cfg.get("quantization_config") or {}
    if qcfg.get("quant_method") != "hf_lowrank":
        print(f"{path}: not an hf-lowrank factorized checkpoint (no hf_lowrank quantization_config).")
        return 1
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


def add_parser(sub):
    """Add ``inspect`` to the ``hf-lowrank`` subcommands."""
    i = sub.add_parser("inspect", help="ranks, parameters, size and per-module error of a factorized checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_inspect)
    return i
