"""What a collected Fisher state gives each compression target: its weighting sides, for every entry point.

A state whose tensors hold NaN / inf entries (a corrupt file, or a state built by hand: the collector itself drops
non-finite gradients) is used with those entries set to zero, for the diagonal Fisher
(:func:`hf_lowrank.ops.fisher.fisher_weights`) and for the Kronecker Grams alike; the modules concerned are named in a
warning and in the report (``info['non_finite_fisher']``), so the fallback is never silent.
"""

from __future__ import annotations

import warnings

import torch

from .state import FisherState, FisherStateError

__all__ = ["degenerate_fisher", "fisher_sides"]

_WEIGHTING_KINDS = {"kronecker": ("Gin", "Gout"), "row": ("A", "B", "W"), "two_sided": ("A", "B", "W")}


def _finite(t: torch.Tensor) -> torch.Tensor:
    return t if bool(torch.isfinite(t).all()) else torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def degenerate_fisher(state: FisherState, names, weighting: str) -> tuple[list[str], list[str]]:
    """``(dead, broken)``: the modules whose Fisher (the tensors ``weighting`` reads) is all zero or non-finite, and
    those with any NaN / inf entry."""
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
    return dead, broken


def _warn(dead: list[str], broken: list[str], total: int) -> None:
    lines = []
    if dead:
        every = " (every module)" if len(dead) == total else ""
        lines.append(
            f"the Fisher of {len(dead)} module(s){every} is all zero or non-finite, so their compression falls back "
            f"to plain SVD although it is labelled Fisher-weighted: {', '.join(dead[:8])}"
            + (", ..." if len(dead) > 8 else "")
        )
    if broken:
        lines.append(
            f"{len(broken)} module(s) have NaN/inf Fisher entries, treated as zero (listed in "
            f"report.info['non_finite_fisher']): {', '.join(broken[:8])}" + (", ..." if len(broken) > 8 else "")
        )
    warnings.warn(
        "Fisher state: " + "; ".join(lines) + ". The state is corrupt or no usable gradient reached these modules; "
        "collect the Fisher again (check the loss for NaN), or compress without the Fisher (plain SVD).",
        UserWarning,
        stacklevel=4,
    )


def fisher_sides(state: FisherState, targets, weighting: str):
    """``(row_weights, col_weights, grams_in, grams_out, non_finite)`` of the targets from a Fisher state.

    ``weighting`` is ``"kronecker"`` (the state's input and output-gradient Grams) or ``"row"`` / ``"two_sided"``
    (its diagonal row / column Fisher). NaN / inf entries become zero; ``non_finite`` lists the modules that had any.

    Raises:
        FisherStateError: a target has no Fisher, Fisher of another shape, or no Grams for ``"kronecker"``.
        ValueError: an unknown ``weighting``.
    """
    if weighting not in _WEIGHTING_KINDS:
        raise ValueError(f"fisher_weighting must be 'kronecker', 'two_sided' or 'row', got {weighting!r}.")
    state.check_shapes({n: (m.out_features, m.in_features) for n, m in targets.items()})
    dead, broken = degenerate_fisher(state, targets, weighting)
    if dead or broken:
        _warn(dead, broken, len(targets))
    if weighting == "kronecker":
        grams = {name: state.grams(name) for name in targets}
        return (None, None, {n: _finite(g[0]) for n, g in grams.items()}, {n: _finite(g[1]) for n, g in grams.items()},
                broken)
    rows, cols = state.weights(weighting, names=list(targets))  # fisher_weights zeroes their non-finite entries
    return rows, cols or None, None, None, broken


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
