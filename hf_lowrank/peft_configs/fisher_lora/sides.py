"""What the collected Fisher gives each module's SVD: the Kronecker (Gram) or diagonal (row / column) weighting
sides, and the checks and warnings on a state before it is used (adapter rank, all-zero or non-finite Fisher)."""

from __future__ import annotations

from ...compression.fisher_sides import _finite, _warn, degenerate_fisher
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


def _warn_degenerate_fisher(state: FisherState, names, weighting: str) -> list[str]:
    """Warn when a module's Fisher carries no information or has NaN/inf entries; return the latter's names."""
    dead, broken = degenerate_fisher(state, names, weighting)
    if dead or broken:
        _warn(dead, broken, len(list(names)))
    return broken


def _fisher_side(state: FisherState, name: str, weighting: str, exponent: float, eps: float, damping: float):
    """``(out_factor, in_factor, scale, fell_back)`` of module ``name`` from the collected state."""
    if weighting == "kronecker":
        # non-finite entries are treated as zero, as for the diagonal Fisher (and warned about with it)
        G_in, G_out = (_finite(G) for G in state.grams(name))
        f_in, f_out = gram_factor(G_in, damping=damping, name=name), gram_factor(G_out, damping=damping, name=name)
        return f_out.L, f_in.L, f_in.scale * f_out.scale, "eigh" in (f_in.fallback, f_out.fallback)
    row, col = state.row_col(name, weighting)
    rw = fisher_weights(row, exponent=exponent, eps=eps) if row is not None else None
    cw = fisher_weights(col, exponent=exponent, eps=eps) if col is not None else None
    return rw, cw, 1.0, False

