"""Pictures of WeLore's view of a model: normalised spectra per layer type and the kept-rank map.

``plot_spectra`` draws the min-max normalised singular values of every target weight, one panel per layer type
(``self_attn.q_proj``, ``mlp.down_proj``, ...) and one curve per transformer block (as in Figure 4 of WeLore, Jaiswal et
al., 2024, arXiv:2407.11239); a heavy
tail (a curve that drops fast) marks a low-rank-friendly layer. ``plot_ranks`` draws the kept rank of every target as
a fraction of its full rank, per layer type and block, low-rank components in green and the rest in red (as
in Figure 6 of the same paper).

Both render with matplotlib's Agg canvas (no display, no global backend switch) and write the PNG atomically. The
``hf-lowrank plot spectra|ranks`` subcommands (:mod:`hf_lowrank.cli.commands.plot`) call them.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..io import atomic_write_bytes, read_json, read_safetensors_header
from ..ops.rank_allocation import normalized_spectrum
from ..targets import block_index, strip_peft_prefix

__all__ = ["plot_compression_summary", "plot_ranks", "plot_spectra", "ranks_from_adapter"]

def _block_and_kind(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``; names outside blocks get block -1."""
    block = block_index(name)
    if block is None:
        return -1, name
    return block[1], block[2]


def _group(names: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in names:
        block, kind = _block_and_kind(name)
        groups[kind].append((block, name))
    return {k: sorted(v) for k, v in groups.items()}


def _figure(n_panels: int, *, right: float = 0.25, bottom: float = 0.55, panel_w: float = 3.4, panel_h: float = 2.5):
    """A figure with one panel per layer type; margins in inches (a fixed layout: constrained layout costs seconds
    of text measurement per figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, max(n_panels, 1))
    rows = (n_panels + cols - 1) // cols
    left, top, gap_w, gap_h = 0.6, 0.55, 0.55, 0.75
    width = left + right + cols * panel_w + (cols - 1) * gap_w
    height = top + bottom + rows * panel_h + (rows - 1) * gap_h
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
        wspace=gap_w / panel_w, hspace=gap_h / panel_h,
    )
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _check_png(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"the output must be a .png file, got '{out}'.")
    return out


def _save(fig, out: Path, dpi: int) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(out, buf.getvalue())
    return out


def plot_compression_summary(rows: Sequence[Mapping], out: str | Path, *, title: str | None = None, dpi: int = 110):
    """Bar charts of a compression comparison: perplexity (log scale) and stored size per method.

    Args:
        rows: one mapping per method with ``method``, ``perplexity`` and ``file_mb`` (the rows ``make demo``
            prints); an optional ``linear_params`` is written on the size bars as a share of the first row's.
        out: the ``.png`` file to write (atomically).
    """
    out = _check_png(out)
    if not rows:
        raise ValueError("plot_compression_summary needs at least one row (method, perplexity, file_mb).")
    names = [str(r["method"]) for r in rows]
    fig, (ax_ppl, ax_size) = _figure(2, right=0.3, bottom=0.75, panel_w=4.2, panel_h=3.0)
    colors = ["#777777"] + ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"] * 2
    x = range(len(rows))
    ppl = [float(r["perplexity"]) for r in rows]
    ax_ppl.bar(x, ppl, color=colors[: len(rows)])
    ax_ppl.set_yscale("log")
    ax_ppl.set_title("held-out perplexity (lower is better)", fontsize=9)
    for i, v in enumerate(ppl):
        ax_ppl.annotate(f"{v:,.1f}", (i, v), ha="center", va="bottom", fontsize=7)
    size = [float(r["file_mb"]) for r in rows]
    ax_size.bar(x, size, color=colors[: len(rows)])
    ax_size.set_title("checkpoint size (MB)", fontsize=9)
    base = rows[0].get("linear_params")
    for i, r in enumerate(rows):
        label = f"{size[i]:.0f} MB"
        if base and r.get("linear_params"):
            label += f"\n{r['linear_params'] / base:.0%} lin."
        ax_size.annotate(label, (i, size[i]), ha="center", va="bottom", fontsize=7)
    for ax in (ax_ppl, ax_size):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.margins(y=0.15)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out, dpi)


def plot_spectra(
    spectra: Mapping[str, torch.Tensor],
    out: str | Path,
    *,
    threshold: float | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """PNG of min-max normalised singular values, one panel per layer type, one curve per block.

    Args:
        spectra: ``{module name: (k,) singular values}`` (e.g. from
            :func:`hf_lowrank.tuners.welore.compute_spectra`).
        out: the ``.png`` path to write.
        threshold: optional WeLore threshold ``k`` drawn as a line: values above it are kept (green), below removed
            (red).
        title: figure title.
        dpi: resolution.

    Returns:
        The written path.
    """
    from matplotlib import colormaps

    out = _check_png(out)
    if not spectra:
        raise ValueError("spectra is empty: nothing to plot.")
    groups = _group(list(spectra))
    blocks = sorted({b for members in groups.values() for b, _ in members})
    fig, axes = _figure(len(groups), right=1.1 if len(blocks) > 1 else 0.25)
    cmap = colormaps["viridis"]
    span = max(len(blocks) - 1, 1)
    for ax, (kind, members) in zip(axes, sorted(groups.items())):
        for block, name in members:
            s = normalized_spectrum(spectra[name]).numpy()
            x = torch.linspace(0, 1, len(s)).numpy()
            ax.plot(x, s, color=cmap(blocks.index(block) / span), lw=0.9, alpha=0.85)
        if threshold is not None:
            ax.axhspan(threshold, 1.0, color="tab:green", alpha=0.08)
            ax.axhspan(0.0, threshold, color="tab:red", alpha=0.08)
            ax.axhline(threshold, color="tab:red", lw=1.0, ls="--")
        ax.set_title(kind, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("singular value index / rank", fontsize=8)
        ax.set_ylabel("normalised value", fontsize=8)
        ax.tick_params(labelsize=7)
    if len(blocks) > 1:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        sm = ScalarMappable(norm=Normalize(min(blocks), max(blocks)), cmap=cmap)
        cax = fig.add_axes((1 - 0.75 / fig.get_figwidth(), 0.15, 0.12 / fig.get_figwidth(), 0.7))
        fig.colorbar(sm, cax=cax, label="transformer block")
    suffix = f" (threshold k = {threshold:.3f})" if threshold is not None else ""
    fig.suptitle((title or "Normalised singular values per layer type") + suffix, fontsize=11)
    return _save(fig, out, dpi)


def plot_ranks(
    ranks: Mapping[str, int],
    shapes: Mapping[str, tuple[int, int]],
    out: str | Path,
    *,
    lrc: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 110,
    labels: tuple[str, str] = ("low-rank component (LRC)", "N-LRC"),
) -> Path:
    """PNG of kept rank / full rank per block, one panel per layer type; LRCs green, N-LRCs red.

    Args:
        ranks: ``{module name: kept rank}``.
        shapes: ``{module name: (out, in)}``.
        out: the ``.png`` path to write.
        lrc: names of the low-rank components (default: every module whose rank is below its full rank).
        title: figure title.
        dpi: resolution.
        labels: legend of the green and the red bars.

    Returns:
        The written path.
    """
    out = _check_png(out)
    if not ranks:
        raise ValueError("ranks is empty: nothing to plot.")
    missing = [n for n in ranks if n not in shapes]
    if missing:
        raise ValueError(f"no shape for {missing[:3]}: shapes must cover every module in ranks.")
    from matplotlib.ticker import MaxNLocator

    lrc_set = set(lrc) if lrc is not None else {n for n, r in ranks.items() if r < min(shapes[n])}
    groups = _group(list(ranks))
    fig, axes = _figure(len(groups), bottom=0.9)
    kept_total = sum(ranks.values())
    full_total = sum(min(shapes[n]) for n in ranks)
    for ax, (kind, members) in zip(axes, sorted(groups.items())):
        xs = [b for b, _ in members]
        ys = [ranks[n] / min(shapes[n]) for _, n in members]
        colors = ["tab:green" if n in lrc_set else "tab:red" for _, n in members]
        ax.bar(xs, ys, color=colors, width=0.85)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(kind, fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("transformer block", fontsize=8)
        ax.set_ylabel("kept rank / full rank", fontsize=8)
        ax.tick_params(labelsize=7)
    from matplotlib.patches import Patch

    fig.legend(
        handles=[Patch(color="tab:green", label=labels[0]), Patch(color="tab:red", label=labels[1])],
        loc="lower center", ncols=2, fontsize=8,
    )
    fig.suptitle(
        (title or "Kept rank per layer") + f" (rank reduction {1 - kept_total / max(full_total, 1):.1%})", fontsize=11
    )
    return _save(fig, out, dpi)


def ranks_from_adapter(path: str | Path) -> tuple[dict[str, int], dict[str, tuple[int, int]], list[str]]:
    """Ranks, shapes and LRC names of a saved WeLoreLRC adapter, read without loading any model.

    Shapes come from the tensor headers of ``adapter_model.safetensors`` (LRC factors and truncated N-LRCs); an
    N-LRC kept exact has its full rank recorded, which is all the rank map needs.
    """
    path = Path(path)
    cfg = read_json(path / "adapter_config.json", what="adapter config")
    if cfg.get("peft_type") != "WELORE_LRC" or not cfg.get("rank_map"):
        raise ValueError(f"'{path}' is not a WeLoreLRC adapter (peft_type {cfg.get('peft_type')!r}).")
    ranks = {k: int(v) for k, v in cfg["rank_map"].items()}
    weights = path / "adapter_model.safetensors"
    header: dict = {}
    if weights.is_file():
        header, _ = read_safetensors_header(weights, what="adapter weights file", fix="Save the adapter again.")
    down, up, dense = {}, {}, {}
    for key, meta in header.items():
        name = strip_peft_prefix(key)
        for tag, store in ((".welore_down", down), (".welore_up", up), (".welore_weight", dense)):
            if name.endswith(tag):
                store[name[: -len(tag)]] = meta["shape"]
    shapes: dict[str, tuple[int, int]] = {}
    for name, rank in ranks.items():
        if name in down and name in up:
            shapes[name] = (up[name][0], down[name][1])
        elif name in dense:
            shapes[name] = tuple(dense[name])
        else:
            shapes[name] = (rank, rank)  # kept exact: full rank recorded, the aspect ratio does not matter here
    return ranks, shapes, list(cfg.get("lrc_modules") or [])


def ranks_from_report(
    path: str | Path,
) -> tuple[dict[str, int], dict[str, tuple[int, int]], list[str], dict]:
    """``(ranks, shapes, factorized, report)`` of a compressed checkpoint's ``compression_report.json`` (a folder or
    the file). A module kept dense (e.g. by the global allocation) counts as its full rank and is not in
    ``factorized``; ``report`` is the whole JSON (method, info)."""
    path = Path(path)
    file = path / "compression_report.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path} holds no compression_report.json (save_compressed writes one beside the weights).")
    report = read_json(file, what="compression report")
    modules = report.get("modules") or []
    if not modules:
        raise ValueError(f"{file} lists no module: nothing to plot.")
    shapes = {m["name"]: tuple(m["shape"]) for m in modules}
    ranks = {m["name"]: m["rank"] if m.get("rank") is not None else min(m["shape"]) for m in modules}
    return ranks, shapes, [m["name"] for m in modules if m.get("rank") is not None], report
