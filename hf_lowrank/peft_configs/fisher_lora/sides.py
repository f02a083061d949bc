"""What the collected Fisher gives each module's SVD: the Kronecker (Gram) or diagonal (row / column) weighting
sides, and the checks and warnings on a state before it is used (adapter rank, all-zero or non-finite Fisher)."""

from __future__ import annotations

import warnings

import torch

from ...fisher_state import FisherState, FisherStateError
from ...ops.fisher import fisher_weights, gram_factor


def _check_adapter_rank(state: FisherState, names, adapter_rank: int) -> None:
    """A LoRA Fisher has the adapter's rank in its shapes: ``F_A`` is ``(r, in)``, checked even without metadata."""
    for name in names:
        a = state.module_fisher(name).get("A")
        if a is not None and a.ndim == 2 and a.shape[0] != adapter_rank:
            raise FisherStateError(
                f"The Fisher of '{name}' was collected with LoRA adapter rank r={a.shape[0]} (F_A {tuple(a.shape)}) "
                f"but the adapter being compressed has r={adapter_rank}: the Fisher of the LoRA factors belongs to "
                "the adapter it was collected with. Collect it again with this adapter."
            )


_WEIGHTING_KINDS = {"kronecker": ("Gin", "Gout"), "row": ("A", "B", "W"), "two_sided": ("A", "B", "W")}


def _warn_degenerate_fisher(state: FisherState, names, weighting: str) -> None:
    """Warn when a module's Fisher carries no information (all zero or non-finite): it gets plain SVD."""
    dead, broken = [], []
    for name in names:
        parts = [t for k, t in state.module_fisher(name).items() if k in _WEIGHTING_KINDS[weighting]]
        if not parts:
            continue
        finite = [torch.isfinite(t) for t in parts]
        if not all(bool(f.all()) for f in finite):
            broken.append(name)
        if not any(bool((t.masked_fill(~f, 0) != 0).any()) for t, f in zip(parts, finite)):
            dead.append(name)
    if not dead and not broken:
        return
    lines = []
    if dead:
        every = " (every module)" if len(dead) == len(list(names)) else ""
        lines.append(
            f"the Fisher of {len(dead)} module(s){every} is all zero or non-finite, so their compression falls back "
            f"to plain SVD although it is labelled Fisher-weighted: {', '.join(dead[:8])}"
            + (", ..." if len(dead) > 8 else "")
        )
    if broken:
        lines.append(
            f"{len(broken)} module(s) have NaN/inf Fisher entries, treated as zero: {', '.join(broken[:8])}"
            + (", ..." if len(broken) > 8 else "")
        )
    warnings.warn(
        "Fisher state: " + "; ".join(lines) + ". The state is corrupt or no usable gradient reached these modules; "
        "collect the Fisher again (check the loss for NaN), or compress with fisher_source='none'.",
        UserWarning,
        stacklevel=3,
    )


def _fisher_side(state: FisherState, name: str, weighting: str, exponent: float, eps: float, damping: float):
    """``(out_factor, in_factor, scale, fell_back)`` of module ``name`` from the collected state."""
    if weighting == "kronecker":
        # non-finite entries are treated as zero, as for the diagonal Fisher (and warned about with it)
        G_in, G_out = (torch.where(torch.isfinite(G), G, torch.zeros_like(G)) for G in state.grams(name))
        f_in, f_out = gram_factor(G_in, damping=damping, name=name), gram_factor(G_out, damping=damping, name=name)
        return f_out.L, f_in.L, f_in.scale * f_out.scale, "eigh" in (f_in.fallback, f_out.fallback)
    row, col = state.row_col(name, weighting)
    rw = fisher_weights(row, exponent=exponent, eps=eps) if row is not None else None
    cw = fisher_weights(col, exponent=exponent, eps=eps) if col is not None else None
    return rw, cw, 1.0, False

