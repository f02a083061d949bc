"""WeLore's rank allocation: min-max normalised spectra, one global threshold, LRC split.

WeLore: Jaiswal, Yin, Zhang, Liu, Zhao, Tian and Wang, 2024, "From GaLore to WeLore: How Low-Rank Weights
Non-uniformly Emerge from Low-Rank Gradients", arXiv:2407.11239.

Pure functions from spectra to ``{module name: rank}``; :mod:`hf_lowrank.tuners.welore` computes the spectra
of a model and builds the PEFT method on :func:`welore_ranks`. Also reachable from :mod:`.rank_allocation`.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ._checks import _check_spectrum

__all__ = ["WeLoreAllocation", "normalized_spectrum", "welore_ranks"]

logger = logging.getLogger(__name__)


def normalized_spectrum(S: torch.Tensor) -> torch.Tensor:
    """Min-max normalised singular values, as the WeLore authors compute them.

    Args:
        S: ``(k,)`` singular values (any order).

    Returns:
        ``(k,)`` float64 tensor, sorted descending, ``(s - s_min) / (s_max - s_min)`` in ``[0, 1]``. A constant
        spectrum has no decay to exploit: it maps to all ones when non-zero (every direction matters equally, the
        layer keeps its full rank under any threshold ``<= 1``) and to all zeros when it is identically zero.
    """
    S = _check_spectrum("spectrum", S)
    s_max, s_min = S[0], S[-1]
    span = s_max - s_min
    if span <= 0:
        return torch.ones_like(S) if s_max > 0 else torch.zeros_like(S)
    return ((S - s_min) / span).clamp_(0.0, 1.0)


def _is_lrc(rank, full, lrc_ratio: float):
    """THE low-rank-component rule of WeLore, ``rank < lrc_ratio * min(out, in)`` (ints, or float64 tensors)."""
    return rank < lrc_ratio * full


def _check_lrc_ratio(lrc_ratio: float) -> None:
    if isinstance(lrc_ratio, bool) or not isinstance(lrc_ratio, (int, float)) or not 0 < lrc_ratio <= 1:
        raise ValueError(f"lrc_ratio must be in (0, 1] (WeLore uses 0.5), got {lrc_ratio!r}.")


def _check_reduction(reduction: float) -> None:
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0 < reduction < 1:
        raise ValueError(
            f"reduction must be a fraction in (0, 1): the share of the target layers' ranks to remove (e.g. 0.3), "
            f"got {reduction!r}."
        )


@dataclass
class WeLoreAllocation:
    """Result of :func:`welore_ranks`.

    Attributes:
        ranks: ``{name: rank}`` each module really keeps: its threshold rank, except that N-LRCs kept exact
            (``nlrc="keep"``) keep their full rank ``min(out, in)``.
        threshold_ranks: ``{name: rank}`` the global threshold (plus the one-rank landing) gives every module, pins
            included, before ``nlrc="keep"`` restores the N-LRCs.
        lrc: names of the low-rank components (``threshold rank < lrc_ratio * min(out, in)``), sorted.
        nlrc: names of the other modules, sorted.
        threshold: the global threshold ``k`` on min-max normalised singular values (1.0 when every free module is cut
            to rank 1).
        target: the requested reduction.
        achieved_reduction: ``sum(full - ranks) / sum(full)``: what was really removed.
        attempted_reduction: the same with ``threshold_ranks``, the figure the WeLore authors log (it overstates the
            reduction when N-LRCs are kept).
        lrc_ratio: the LRC criterion.
        nlrc_mode: ``"keep"`` or ``"truncate"``.
        pinned: names whose rank was pinned.
        tie_breaks: ranks moved one at a time after the threshold to land on the target (removed below a threshold
            step, or given back above it); 0 when the threshold alone was closest.
    """

    ranks: dict[str, int]
    threshold_ranks: dict[str, int]
    lrc: list[str]
    nlrc: list[str]
    threshold: float
    target: float
    achieved_reduction: float
    attempted_reduction: float
    lrc_ratio: float
    nlrc_mode: str
    pinned: list[str] = field(default_factory=list)
    tie_breaks: int = 0


_HALF = 0.5 - 1e-9  # half a rank, less float noise: a target half-way between two counts lands on the larger one


def _unreachable_message(
    reduction: float, *, below: float, above: float | None, most: float, ceiling: float, pinned_share: float | None,
    lrc_ratio: float, nlrc: str,
) -> str:
    """Why ``reduction`` cannot be reached, and the fix in the right direction.

    Three cases: the target is beyond the most WeLore can remove (lower it; ``ceiling`` is what cutting every free
    layer to rank 1 would remove, reached when every layer counts); it is below the smallest non-zero reduction (with
    ``nlrc="keep"`` a layer removes nothing until its rank drops under ``lrc_ratio * min(out, in)``, so the first
    layer to count removes more than ``1 - lrc_ratio`` of its rank at once: raise the target, or raise ``lrc_ratio``
    for smaller steps); or it falls in a gap between two reachable reductions (typically left by pins): name both.
    """
    head = f"reduction {reduction:.2%} cannot be reached on these targets with lrc_ratio={lrc_ratio} and nlrc={nlrc!r}"
    steps = (
        ""
        if nlrc == "truncate"
        else " (with nlrc='keep' a layer removes no rank until its rank drops below lrc_ratio * min(out, in), so the "
        "reduction moves in steps)"
    )
    pins = (
        f"; the rank_pattern pins alone remove {pinned_share:.2%} (pin other ranks to shift the steps)"
        if pinned_share is not None
        else ""
    )
    finer = "raise lrc_ratio (up to 1.0, where every removed rank counts)" + (
        " or use nlrc='truncate'" if nlrc == "keep" else ""
    )
    if above is None or reduction > most:
        why = (
            f" (every layer already keeps a single rank{', pinned ones their pinned rank' if pinned_share else ''})"
            if most >= ceiling - 1e-9
            else " (with nlrc='keep' a layer removes no rank unless its rank drops below lrc_ratio * min(out, in))"
        )
        more = f", or {finer}" if most < ceiling - 1e-9 else ""
        return (
            f"{head}: the most WeLore can remove is {most:.2%}{why}{pins}. Lower reduction to at most {most:.2%}"
            f"{more}."
        )
    if below * 1e6 < 1:  # nothing reachable under the target but 0
        return (
            f"{head}: the smallest reduction WeLore reaches is {above:.2%}, above the target{steps}{pins}. Raise "
            f"reduction to at least {above:.2%}, or raise lrc_ratio (up to 1.0, where every removed rank counts) so "
            "that smaller steps count."
        )
    return (
        f"{head}: it falls in a gap between the reachable reductions {below:.2%} (below) and {above:.2%} (above)"
        f"{steps}{pins}. Set reduction to at most {below:.2%} or at least {above:.2%}, or {finer} for finer steps."
    )


def welore_ranks(
    spectra: Mapping[str, torch.Tensor],
    reduction: float,
    *,
    lrc_ratio: float = 0.5,
    nlrc: str = "keep",
    pinned: Mapping[str, int] | None = None,
    max_iter: int = 100,
) -> WeLoreAllocation:
    """WeLore (Jaiswal et al., 2024, arXiv:2407.11239): one global threshold on min-max normalised spectra, set for an ACHIEVED reduction.

    Every free module keeps ``r_l(k) = max(1, #(s_norm_l >= k))``. The achieved reduction counts only what is really
    removed: with ``nlrc="keep"`` (N-LRCs keep their full weight, as in the authors' code) a module removes ranks only
    when it is an LRC (``r_l < lrc_ratio * min(out, in)``), with ``"truncate"`` every module does. Both are
    non-decreasing step functions of ``k``, so ``k`` is bisected over the distinct normalised singular values for the
    largest ``k`` whose reduction does not exceed the target.

    One threshold step can remove many ranks at once (equal normalised values, or a layer turning LRC and dropping
    all its tail at once under ``"keep"``), so we then land on the target one rank at a time, in the order the
    global threshold itself would go: either below the step, removing further ranks from LRCs, smallest kept
    normalised value first, or above it, giving ranks back to LRCs that stay LRC, largest removed value first. Equal
    values go in module-name order (a module's tied values one after another). The closer of the two wins; a target
    exactly half-way between two reachable counts lands on the larger one. The result is within half a rank of the
    target unless no LRC has room to move.

    Args:
        spectra: ``{name: (min(out, in),) singular values}`` of the free and the pinned modules (full spectra: a
            module's full rank is the length of its spectrum).
        reduction: target achieved reduction in ``(0, 1)``.
        lrc_ratio: LRC criterion, in ``(0, 1]``.
        nlrc: ``"keep"`` (N-LRCs stay exact) or ``"truncate"`` (N-LRCs are cut to their threshold rank too).
        pinned: ``{name: rank}`` fixed ranks (e.g. from ``rank_pattern``); they count towards the achieved reduction
            and are split into LRC / N-LRC by the same rule.
        max_iter: cap on bisection steps, ``>= 1``.

    Returns:
        :class:`WeLoreAllocation`.

    Raises:
        ValueError: bad arguments or spectra, pinned ranks out of range, or a target that the pinned modules already
            exceed or no threshold can reach (the message names the reachable reductions and the fix).
    """
    _check_reduction(reduction)
    _check_lrc_ratio(lrc_ratio)
    if nlrc not in ("keep", "truncate"):
        raise ValueError(f"nlrc must be 'keep' (N-LRCs stay exact, as the authors do) or 'truncate', got {nlrc!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1 (the cap on bisection steps, default 100), got {max_iter!r}.")
    if not spectra:
        raise ValueError("spectra is empty: pass {module name: singular values} for at least one module.")
    names = sorted(spectra)
    norm = {n: normalized_spectrum(_check_spectrum(n, spectra[n])) for n in names}  # descending float64
    full = {n: len(norm[n]) for n in names}
    pinned = dict(pinned or {})
    for n, r in pinned.items():
        if n not in spectra:
            raise ValueError(f"pinned module '{n}' has no spectrum: pinned names must be among the spectra.")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= full[n]:
            raise ValueError(f"rank_pattern pins '{n}' to {r!r}, outside [1, min(out, in) = {full[n]}].")
    count_all = nlrc == "truncate"
    total = sum(full.values())
    target = reduction * total  # ranks to remove
    pinned_removed = sum(full[n] - r for n, r in pinned.items() if count_all or _is_lrc(r, full[n], lrc_ratio))
    if pinned_removed > target + 0.5:
        raise ValueError(
            f"rank_pattern alone removes {pinned_removed / total:.2%} of the target ranks, more than the requested "
            f"reduction {reduction:.2%}: raise reduction or pin higher ranks."
        )
    free = [n for n in names if n not in pinned]
    asc = [norm[n].flip(0).contiguous() for n in free]  # count(s >= k) = len - searchsorted(asc, k, side="left")
    fullt = torch.tensor([full[n] for n in free], dtype=torch.long)

    def ranks_at(k: float) -> torch.Tensor:
        if not free:
            return torch.zeros(0, dtype=torch.long)
        kk = torch.tensor([k], dtype=torch.float64)
        return torch.stack([len(a) - torch.searchsorted(a, kk, side="left")[0] for a in asc]).clamp_min(1)

    def removed(r: torch.Tensor) -> int:
        gone = fullt - r
        if not count_all:
            gone = torch.where(_is_lrc(r.double(), fullt.double(), lrc_ratio), gone, torch.zeros_like(gone))
        return int(gone.sum()) + pinned_removed

    def land(r: torch.Tensor, step: int) -> tuple[dict[str, int], int, int]:
        """From the ranks ``r``, move LRC ranks by ``step`` (-1: remove, +1: give back) until the target is closest."""
        ranks, got, moves = dict(zip(free, r.tolist())), removed(r), 0

        def key(n: str) -> tuple[float, str]:
            return (float(norm[n][ranks[n] - 1]), n) if step < 0 else (-float(norm[n][ranks[n]]), n)

        def movable(n: str) -> bool:
            if step < 0:
                return ranks[n] > 1
            return ranks[n] < full[n] and (count_all or _is_lrc(ranks[n] + 1, full[n], lrc_ratio))

        heap = [key(n) for n in free if movable(n) and (step > 0 or count_all or _is_lrc(ranks[n], full[n], lrc_ratio))]
        heapq.heapify(heap)
        # remove while half a rank short or more, give back while more than half a rank over: half-way keeps the larger
        while heap and (target - got >= _HALF if step < 0 else got - target > 1 - _HALF):
            n = heapq.heappop(heap)[1]
            ranks[n] += step
            got -= step
            moves += 1
            if movable(n):
                heapq.heappush(heap, key(n))
        return ranks, got, moves

    values = torch.unique(torch.cat([norm[n] for n in free])) if free else torch.zeros(0, dtype=torch.float64)
    cands = torch.cat([values, torch.tensor([math.inf], dtype=torch.float64)])  # ascending; inf: all free at rank 1
    lo, hi = 0, len(cands) - 1
    r_lo, r_top = ranks_at(float(cands[0])), ranks_at(math.inf)
    if removed(r_top) <= target:
        lo, r_lo = hi, r_top
    else:
        for _ in range(max_iter):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            r_mid = ranks_at(float(cands[mid]))
            if removed(r_mid) <= target:
                lo, r_lo = mid, r_mid
            else:
                hi = mid
    best, got, moves = land(r_lo, -1)  # below the step
    threshold, got_above = float(cands[lo]), None  # got_above: the nearest removal above the target
    if lo + 1 < len(cands) and abs(target - got) >= _HALF:
        ranks_b, got_above, moves_b = land(ranks_at(float(cands[lo + 1])), +1)  # above the step
        if abs(got_above - target) < abs(got - target):
            best, got, moves, threshold = ranks_b, got_above, moves_b, float(cands[lo + 1])
    threshold_ranks = {n: int(pinned[n] if n in pinned else best[n]) for n in names}
    lrc = [n for n in names if _is_lrc(threshold_ranks[n], full[n], lrc_ratio)]
    ranks = {n: threshold_ranks[n] if count_all or n in lrc else full[n] for n in names}
    achieved = sum(full[n] - ranks[n] for n in names) / total
    if abs(achieved - reduction) * total > max(0.5, 0.005 * total) and achieved < reduction:
        raise ValueError(
            _unreachable_message(
                reduction,
                below=achieved,
                above=None if got_above is None else got_above / total,
                most=removed(r_top) / total,
                ceiling=sum(full[n] - pinned.get(n, 1) for n in names) / total,
                pinned_share=pinned_removed / total if pinned else None,
                lrc_ratio=lrc_ratio,
                nlrc=nlrc,
            )
        )
    if abs(achieved - reduction) > 0.005:
        logger.warning(
            "WeLore achieved a rank reduction of %.2f%% for a target of %.2f%%: too few low-rank components can move "
            "by one rank to land closer.", 100 * achieved, 100 * reduction,
        )
    return WeLoreAllocation(
        ranks=ranks,
        threshold_ranks=threshold_ranks,
        lrc=lrc,
        nlrc=[n for n in names if n not in set(lrc)],
        threshold=1.0 if threshold == math.inf else threshold,
        target=float(reduction),
        achieved_reduction=float(achieved),
        attempted_reduction=sum(full[n] - threshold_ranks[n] for n in names) / total,
        lrc_ratio=float(lrc_ratio),
        nlrc_mode=nlrc,
        pinned=sorted(pinned),
        tie_breaks=moves,
    )
