"""Rank allocation across modules: uniform, WeLore global threshold, ERE budget allocation.

Pure functions from spectra and shapes to ``{module name: rank}`` (WeLore: Jaiswal et al., 2024, arXiv:2407.11239;
ERE: Ryu, Seo and Yoo, 2023, arXiv:2305.18425). Spectra are
1-D tensors of singular values (any order; they are sorted here); shapes are ``(out, in)`` tuples. WeLore's
threshold lives in :mod:`.welore_allocation`, the global allocation (parameters or bytes) in
:mod:`.global_allocation`; both are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ._checks import _check_shape, _check_spectrum
from .global_allocation import LOSS_NORMALIZATIONS, GlobalAllocation, global_ranks
from .svd import break_even_rank, rank_for_keep, tail_energy
from .welore_allocation import WeLoreAllocation, normalized_spectrum, welore_ranks

__all__ = [
    "EREAllocation",
    "GlobalAllocation",
    "LOSS_NORMALIZATIONS",
    "WeLoreAllocation",
    "ere_ranks",
    "global_ranks",
    "normalized_spectrum",
    "uniform_ranks",
    "welore_ranks",
]


def uniform_ranks(shapes: Mapping[str, tuple[int, int]], keep: float, *, multiple: int = 1) -> dict[str, int]:
    """The same parameter fraction in every module, rounded so that all modules together keep ``keep`` of their
    parameters as nearly as possible without exceeding it.

    Each module's ideal rank is ``keep * out * in / (out + in)``. Rounding each one down on its own (to a multiple of
    ``multiple``) loses up to a whole step per module: at ``multiple=8`` SmolLM2's block Linears kept 0.78 of their
    parameters for ``keep=0.8``. So the ranks are rounded down first, then raised by one step in order of the largest
    rounding loss (largest remainder) while the total stays within ``keep * sum(out * in)``: every rank is within one
    step of its ideal, no rounding up passes a module's break-even rank, and the total falls short of the budget by
    less than one module's step.

    Args:
        shapes: ``{name: (out, in)}``.
        keep: fraction of the dense parameters kept, in ``(0, 1]``.
        multiple: ranks of at least ``multiple`` are multiples of it (see :data:`~hf_lowrank.ops.svd.RANK_MULTIPLE`);
            a module whose ideal rank is below one step keeps ``floor`` of it (at least 1).

    Returns:
        ``{name: rank}`` (at least 1, at most ``min(out, in)``).
    """
    if not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0 < keep <= 1):
        raise ValueError(f"keep must be a fraction of parameters in (0, 1], got {keep!r}.")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}.")
    names, values, costs, caps, ranks = [], [], [], [], {}
    budget = 0.0
    for name, shape in shapes.items():
        out_f, in_f = _check_shape(name, shape)
        floor_rank = rank_for_keep(out_f, in_f, keep)  # at least 1, at most min(out, in)
        ideal = keep * out_f * in_f / (out_f + in_f)
        budget += keep * out_f * in_f
        if ideal < multiple:  # below one step: the plain floor (steps of one would break the alignment rule)
            ranks[name] = floor_rank
            budget -= floor_rank * (out_f + in_f)
            continue
        names.append(name)
        values.append(ideal / multiple)
        costs.append(multiple * (out_f + in_f))
        caps.append(max(break_even_rank(out_f, in_f), floor_rank) // multiple)  # a step past break-even saves nothing
    for name, steps in zip(names, _round_to_budget(values, costs, caps, budget, names)):
        ranks[name] = steps * multiple
    return {name: ranks[name] for name in shapes}


@dataclass
class EREAllocation:
    """Result of :func:`ere_ranks`.

    Attributes:
        ranks: ``{name: rank}`` pre-blend Lagrangian allocation, rounded so that the budget holds
            (``budget - max(out+in) < used_pre_blend <= budget`` whenever the budget is below full rank).
        blended: ``{name: rank}`` final ranks, the budget-aware rounding of ``(1 - alpha) * relaxed + alpha *
            min(r_avg, len(spectrum))`` (0 for a zero spectrum); never above the budget. This is the allocation to
            use (:func:`hf_lowrank.compression.ere.encode_residual` uses it).
        lam: the Lagrange multiplier found by bisection.
        budget: ``M = r_avg * sum(out + in)``.
        used: parameters of ``blended``, ``sum blended_l * (out_l + in_l) <= budget``.
        relaxed: ``{name: float}`` continuous clamped solution ``r_l(lam)`` before any rounding.
        used_pre_blend: parameters of ``ranks``.
        fit: ``{name: (a_l, b_l)}`` the log-linear tail fit ``log f_l(r) ~= a_l r + b_l``.
    """

    ranks: dict[str, int]
    blended: dict[str, int]
    lam: float
    budget: float
    used: int
    relaxed: dict[str, float] = field(default_factory=dict)
    used_pre_blend: int = 0
    fit: dict[str, tuple[float, float]] = field(default_factory=dict)


_REL_FLOOR = 1e-12  # tail energies below this fraction of the total are rounding noise, excluded from the fit


def _fit_tail(S: torch.Tensor, r_avg: float, fit_range: tuple[float, float] | None) -> tuple[float, float] | None:
    """Least-squares fit of ``log f(r) = a r + b`` on the tail energy of ``S``; ``None`` for a zero spectrum."""
    k = len(S)
    f = tail_energy(S)[:k]  # f[r] = sum_{i > r} s_i^2 (1-based), r = 0..k-1; f[k] = 0 is never usable
    total = float(f[0])
    if total <= 0:
        return None
    if fit_range is None:
        lo, hi = 0, min(k - 1, max(math.ceil(2 * r_avg), 4))
    else:
        lo, hi = math.floor(fit_range[0] * k), min(k - 1, math.ceil(fit_range[1] * k))
    r = torch.arange(k, dtype=torch.float64)
    sel = (r >= lo) & (r <= hi) & (f > _REL_FLOOR * total)
    if int(sel.sum()) < 2:  # range too short or (numerically) rank <= 1 in it: use every usable point
        sel = f > _REL_FLOOR * total
    if int(sel.sum()) < 2:
        # numerical rank 1: the tail drops from f[0] to ~0 after one rank; model that drop explicitly
        return math.log(_REL_FLOOR), math.log(total)
    x, y = r[sel], f[sel].log()
    xm, ym = x.mean(), y.mean()
    a = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    b = float(ym - a * xm)
    # a strictly decreasing positive sequence has a negative least-squares slope; guard the numerics anyway
    a = min(a, -1e-12)
    return a, b


def _round_to_budget(
    values: list[float], cost: list[int], cap: list[int], budget: float, names: list[str]
) -> list[int]:
    """Integer ranks near ``values`` that never spend more than ``budget``: floor each value, then add 1 in order of
    largest fractional part (ties by name) while ``sum rank * cost`` stays within the budget (``1e-6`` slack for a
    float ``r_avg``) and the rank below ``cap``. When ``sum values * cost <= budget``, the result falls short of
    that sum by less than one module's cost unless a cap stops it."""
    ranks = [min(math.floor(x + 1e-9), k) for x, k in zip(values, cap)]
    used = sum(r * c for r, c in zip(ranks, cost))
    for i in sorted(range(len(names)), key=lambda i: (-(values[i] - ranks[i]), names[i])):
        if values[i] - ranks[i] > 1e-9 and ranks[i] < cap[i] and used + cost[i] <= budget + 1e-6:
            ranks[i] += 1
            used += cost[i]
    return ranks


def ere_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    r_avg: float,
    *,
    alpha: float = 0.5,
    fit_range: tuple[float, float] | None = None,
) -> EREAllocation:
    """ERE budget allocation (Ryu, Seo and Yoo, 2023, arXiv:2305.18425, appendix A) with the prior-rank blend.

    For each module the tail energy ``f_l(r) = sum_{i > r} s_i^2`` is fitted by ``g_l(r) = exp(a_l r + b_l)``
    (least squares on ``log f_l``). Minimising ``sum_l g_l(r_l)`` under ``sum_l r_l c_l = M`` (``c_l = out_l +
    in_l``, ``M = r_avg * sum_l c_l``) gives ``r_l(lam) = clamp((log(-c_l / a_l) - b_l + log lam) / a_l, 0, k_l)``;
    ``lam`` is bisected (in log space) until the relaxed allocation spends exactly ``M``. The pre-blend integer
    ranks round the relaxed ones down and then up in order of largest fractional part while the budget allows,
    so they never exceed ``M`` and fall short by less than one module's ``c_l``. The final ranks blend the
    relaxed solution with the prior rank, ``t_l = (1 - alpha) r_l + alpha min(r_avg, k_l)`` (a convex combination
    of two allocations within ``[0, k_l]`` and within ``M``), and round ``t_l`` the same budget-aware way (floor,
    then +1 by largest fractional part, ties by name, while ``M`` allows), not half-up: the paper's
    ``round(.)`` applied to every module independently can overspend ``M`` by up to half a rank per module
    (e.g. three modules rounding ``x.5`` up), and the budget is the point of the allocation. A zero spectrum gets
    rank 0 (nothing to encode).

    Fit range (our choice; the paper states none): by default ``r`` in ``[0, max(ceil(2 r_avg), 4)]`` (capped at
    ``k - 1``). The Lagrangian only equates the marginal gains ``g_l'(r_l)`` at the chosen ranks, which lie around
    ``r_avg``, so the fit should be faithful there; a single exponential fitted over the whole spectrum is pulled
    by the bulk and by the last singular values (where ``log f`` plunges to ``-inf``). Measured on the 36 MiniLM
    encoder weights and on synthetic low-rank-plus-noise residuals (alpha = 0, total true tail energy relative to
    the exact greedy optimum): ``[0, 2 r_avg]`` gave 1.002-1.26x, the first half of the spectrum 1.002-7267x, the
    whole spectrum 1.012-7311x. Points with ``f < 1e-12 f(0)`` (rounding noise) are left out. ``fit_range``
    overrides the range with fractions ``(lo, hi)`` of ``k``. Guards: a zero spectrum gets rank 0 (nothing to
    encode); a numerically rank-1 tail is modelled as dropping by ``1e-12`` after one rank; slopes are kept
    ``< 0``. All spectra are first divided by their common maximum (the allocation does not depend on one common
    scale, and this keeps the squared tail energies inside float64); :attr:`EREAllocation.fit` and ``lam`` refer
    to these normalised spectra.

    Args:
        spectra: ``{name: (k_l,) singular values}`` of the matrices to encode (e.g. residuals ``W_ft - W_base``).
            Pass full spectra: the tail energy beyond a truncated spectrum is unknown, and ranks are capped at
            ``k_l = len(spectrum)``.
        shapes: ``{name: (out, in)}`` for the same names, ``k_l <= min(out, in)``.
        r_avg: prior (average) rank, ``> 0``.
        alpha: blend weight of the prior rank, in ``[0, 1]`` (0: pure Lagrangian, 1: uniform ``r_avg``).
        fit_range: optional ``(lo, hi)`` fractions of ``k_l``, ``0 <= lo < hi <= 1``.

    Returns:
        :class:`EREAllocation`.
    """
    if not spectra:
        raise ValueError("spectra is empty: pass {module name: singular values} for at least one module.")
    if not (isinstance(r_avg, (int, float)) and 0 < r_avg < float("inf")):
        raise ValueError(f"r_avg must be a positive number (the prior rank, e.g. 16), got {r_avg!r}.")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be in [0, 1] (the paper uses 0.5), got {alpha!r}.")
    if fit_range is not None:
        if len(fit_range) != 2 or not 0 <= fit_range[0] < fit_range[1] <= 1:
            raise ValueError(
                f"fit_range must be (lo, hi) fractions of the rank with 0 <= lo < hi <= 1, got {fit_range!r}."
            )
    names = sorted(spectra)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f"no shape for modules {missing[:5]}: shapes must cover every module in spectra.")
    S_all, cost, cap, fits = [], [], [], {}
    for n in names:
        out_f, in_f = _check_shape(n, shapes[n])
        S = _check_spectrum(n, spectra[n])
        if len(S) > min(out_f, in_f):
            raise ValueError(
                f"spectrum of '{n}' has {len(S)} values but its shape {(out_f, in_f)} allows at most {min(out_f, in_f)}."
            )
        S_all.append(S)
        cost.append(out_f + in_f)
        cap.append(len(S))
    # the allocation is invariant to one common scale of every spectrum: divide by the global maximum so that the
    # squared tail energies can neither overflow (spectra above ~1e154) nor underflow (below ~1e-154) float64
    g_max = max(float(S[0]) for S in S_all)
    for n, S in zip(names, S_all):
        fits[n] = _fit_tail(S / g_max if g_max > 0 else S, r_avg, fit_range)
    budget = float(r_avg) * sum(cost)
    active = [i for i, n in enumerate(names) if fits[n] is not None]
    a = torch.tensor([fits[names[i]][0] for i in active], dtype=torch.float64)
    b = torch.tensor([fits[names[i]][1] for i in active], dtype=torch.float64)
    c = torch.tensor([cost[i] for i in active], dtype=torch.float64)
    kmax = torch.tensor([cap[i] for i in active], dtype=torch.float64)
    base = torch.log(-c / a) - b if active else torch.zeros(0, dtype=torch.float64)

    def relaxed_at(log_lam: float) -> torch.Tensor:
        return torch.minimum(((base + log_lam) / a).clamp_min(0.0), kmax)

    def spent(log_lam: float) -> float:
        return float((relaxed_at(log_lam) * c).sum())

    if active:
        # r_l = k_l for log_lam <= a k + b - log(-c/a) = a k - base; r_l = 0 for log_lam >= -base
        lo = float((a * kmax - base).min()) - 1.0
        hi = float((-base).max()) + 1.0
        if spent(lo) <= budget:
            log_lam = lo  # the budget covers every module at full rank
        else:
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if spent(mid) > budget:
                    lo = mid
                else:
                    hi = mid
                if hi - lo < 1e-13 * max(1.0, abs(hi)):
                    break
            log_lam = hi  # spent(hi) <= budget
        rel_active = relaxed_at(log_lam)
    else:
        log_lam = 0.0
        rel_active = torch.zeros(0, dtype=torch.float64)

    relaxed = [0.0] * len(names)
    for j, i in enumerate(active):
        relaxed[i] = float(rel_active[j])
    ranks = _round_to_budget(relaxed, cost, cap, budget, names)
    target = [
        0.0 if fits[n] is None else (1.0 - alpha) * relaxed[i] + alpha * min(float(r_avg), cap[i])
        for i, n in enumerate(names)
    ]
    blended = _round_to_budget(target, cost, cap, budget, names)
    return EREAllocation(
        ranks=dict(zip(names, ranks)),
        blended=dict(zip(names, blended)),
        lam=math.exp(log_lam) if log_lam < 700 else float("inf"),
        budget=budget,
        used=sum(r * cst for r, cst in zip(blended, cost)),
        relaxed=dict(zip(names, relaxed)),
        used_pre_blend=sum(r * cst for r, cst in zip(ranks, cost)),
        fit={n: fits[n] if fits[n] is not None else (0.0, float("-inf")) for n in names},
    )

