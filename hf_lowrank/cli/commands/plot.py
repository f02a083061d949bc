"""``hf-lowrank plot spectra|ranks``: the pictures of :mod:`hf_lowrank.demo.plotting` from the command line."""

from __future__ import annotations

from pathlib import Path

from ...demo.plotting import plot_ranks, plot_spectra, ranks_from_adapter, ranks_from_report
from ...targets import TARGETS_HELP, find_target_linears, parse_targets
from ...tuners.welore.allocation import welore_allocation, welore_ranks_for_model
from ...tuners.welore.spectra import compute_spectra, default_spectra_cache
from ..common import load_model_for_cli

__all__ = ["add_parser"]


def _cmd_spectra(args) -> int:
    model, _ = load_model_for_cli(args.model)
    targets = find_target_linears(model, parse_targets(args.target_modules))
    spectra = compute_spectra(targets, cache=default_spectra_cache(args.cache_dir), progress=True)
    threshold = None
    if args.reduction is not None:
        shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
        threshold = welore_allocation(spectra, shapes, args.reduction, lrc_ratio=args.lrc_ratio).threshold
    out = plot_spectra(spectra, args.out, threshold=threshold, title=f"{Path(args.model).name}: normalised spectra")
    print(f"wrote {out}")
    return 0


def _cmd_ranks(args) -> int:
    source = Path(args.model)
    labels = ("low-rank component (LRC)", "N-LRC")
    if (source / "compression_report.json").is_file():  # a compressed checkpoint: its rank map
        ranks, shapes, lrc, report = ranks_from_report(source)
        info = report.get("info") or {}
        title = f"{source.name}: {report.get('method', '?')}, {info.get('allocation', 'uniform')} allocation"
        labels = ("factorized", "kept dense")
    elif (source / "adapter_config.json").is_file():
        ranks, shapes, lrc = ranks_from_adapter(source)
        title = f"{source.name}: WeLoreLRC adapter"
    else:
        if args.reduction is None:
            raise SystemExit("plot ranks MODEL needs --reduction (e.g. 0.3), or pass a saved WeLoreLRC adapter folder.")
        model, _ = load_model_for_cli(args.model)
        _, alloc = welore_ranks_for_model(
            model, args.reduction, parse_targets(args.target_modules), lrc_ratio=args.lrc_ratio, nlrc=args.nlrc,
            cache=default_spectra_cache(args.cache_dir),
        )
        ranks, shapes, lrc = alloc.ranks, alloc.shapes, alloc.lrc
        title = f"{Path(args.model).name}: WeLore at {args.reduction:.0%}"
        print(alloc.summary())
    out = plot_ranks(ranks, shapes, args.out, lrc=lrc, title=title, labels=labels)
    print(f"wrote {out}")
    return 0


def add_parser(subparsers) -> None:
    """Add ``plot spectra`` and ``plot ranks`` to the ``hf-lowrank`` command."""
    p = subparsers.add_parser("plot", help="PNG pictures: normalised spectra per layer type, WeLore kept-rank map")
    sub = p.add_subparsers(dest="plot_command", required=True)

    common = dict(
        target_modules=dict(default=None, help=f"{TARGETS_HELP} (default: block Linears)"),
        cache_dir=dict(default=None, help="folder caching spectra between runs (default: $HF_LOWRANK_SPECTRA_CACHE)"),
        lrc_ratio=dict(type=float, default=0.5, help="LRC criterion: kept rank < lrc_ratio * full rank"),
    )
    s = sub.add_parser("spectra", help="normalised singular values per layer type (WeLore Figure 4)")
    s.add_argument("model", help="model folder, Hub id, or 'smollm2' / 'minilm'")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--reduction", type=float, default=None, help="also draw the WeLore threshold for this reduction")
    for flag, kw in common.items():
        s.add_argument("--" + flag.replace("_", "-"), dest=flag, **kw)
    s.set_defaults(func=_cmd_spectra)

    r = sub.add_parser("ranks", help="kept rank per layer: a compressed checkpoint's rank map (e.g. the global "
                       "allocation), or WeLore's LRC vs N-LRC (Figure 6)")
    r.add_argument("model", help="a compressed checkpoint folder (its compression_report.json), a saved WeLoreLRC "
                   "adapter folder, or a model (folder, Hub id, 'smollm2' / 'minilm') with --reduction")
    r.add_argument("--out", required=True, help="PNG file to write")
    r.add_argument("--reduction", type=float, default=None, help="WeLore target reduction (needed for a model)")
    r.add_argument("--nlrc", choices=("keep", "truncate"), default="keep", help="what happens to N-LRCs")
    for flag, kw in common.items():
        r.add_argument("--" + flag.replace("_", "-"), dest=flag, **kw)
    r.set_defaults(func=_cmd_ranks)
