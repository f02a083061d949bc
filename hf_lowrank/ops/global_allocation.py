"""The global rank allocation: per-module ranks minimising the summed weighted truncation loss under one budget,
counted in parameters (float factors) or in stored bytes (group-wise quantized factors).

Pure functions from spectra and shapes to ``{module name: rank or None}`` (``None``: the module stays dense).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ._checks import _check_shape, _check_spectrum
from .quant_lowrank import factor_bytes

__all__ = ["BUDGET_UNITS", "GlobalAllocation", "LOSS_NORMALIZATIONS", "global_ranks"]

LOSS_NORMALIZATIONS = ("none", "relative")
BUDGET_UNITS = ("parameters", "bytes")
"""What :func:`global_ranks` spends: ``"parameters"`` (``keep`` of ``sum(out * in)``) or ``"bytes"`` (``keep`` of the
targets' bf16 bytes, ``2 * sum(out * in)``, the factors counted as stored codes plus scales)."""


@dataclass
class GlobalAllocation:
    """Result of :func:`global_ranks`.

    Attributes:
        ranks: ``{name: rank}``, or ``None`` for a module kept dense (its rank reached break-even).
        budget: what the allocation may spend, in ``unit``: ``keep * sum(out * in)`` parameters, or ``keep * 2 *
            sum(out * in)`` bytes.
        used: what the allocation spends, in ``unit`` (dense modules at ``out * in`` parameters / bf16 bytes).
        loss: summed loss of the allocation (in the units of the spectra after ``normalize``; with ``noise``, the
            truncation tails plus the modelled quantization noise of the kept components).
        unit: ``"parameters"`` or ``"bytes"``.
    """

    ranks: dict[str, int | None]
    budget: float
    used: int
    loss: float
    unit: str = "parameters"


def _check_noise(noise: Mapping[str, float] | None, names: list[str]) -> dict[str, float]:
    if noise is None:
        return {}
    if not isinstance(noise, Mapping):
        raise ValueError(f"noise must be a dict {{module name: fraction}} or None, got {type(noise).__name__}.")
    unknown = sorted(set(noise) - set(names))
    if unknown:
        raise ValueError(f"noise names modules without a spectrum: {unknown[:5]}.")
    for n, v in noise.items():
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")):
            raise ValueError(f"noise['{n}'] = {v!r}: a fraction of the kept energy, a number >= 0.")
    return {n: float(v) for n, v in noise.items()}


def _pool(steps: list[list]) -> list[list]:
    """Adjacent steps pooled where a later one removes more per unit than the one before (pool adjacent
    violators), so that the blocks' gains per unit decrease: ``[[gain, cost, [(gain, cost, kind), ...]], ...]``."""
    pooled: list[list] = []
    for gain, cost, is_rank in steps:
        pooled.append([gain, cost, [(gain, cost, is_rank)]])
        while len(pooled) > 1 and pooled[-1][0] * pooled[-2][1] > pooled[-2][0] * pooled[-1][1]:
            g, co, parts = pooled.pop()
            pooled[-1] = [pooled[-1][0] + g, pooled[-1][1] + co, pooled[-1][2] + parts]
    return pooled


def global_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    keep: float,
    *,
    normalize: str = "none",
    min_rank: int = 1,
    multiple: int = 1,
    bits: int | None = None,
    group_size: int = 64,
    noise: Mapping[str, float] | None = None,
) -> GlobalAllocation:
    """Per-module ranks minimising the summed truncation loss under one budget of parameters or bytes.

    The spectra are those of the weighted weights (Kronecker-factored Fisher sides as in GFWSVD, Chekalina et al.,
    2025, arXiv:2505.17974; or whitened inputs as in SVD-LLM, Wang et al., 2024, arXiv:2403.07378), so that a tail
    measures the loss a truncation costs.

    The loss of keeping rank ``k`` in module ``l`` is its tail ``sum_{i >= k} s_{l,i}^2``; each rank costs
    ``out_l + in_l`` parameters. The tails are convex, so taking singular values greedily by loss removed per
    parameter, ``s^2 / (out + in)``, is optimal for the summed loss. A module whose rank would reach break-even
    (``k (out + in) >= out * in``) is kept dense instead: that last step costs ``out * in - k_be (out + in)``
    parameters and removes the whole remaining tail; where it would be taken before the rank steps it follows, the
    steps are pooled (adjacent violators) so the greedy order stays that of a concave gain. Every module keeps at
    least ``min_rank``, except a module in which no factor pair saves parameters (rank 1 already costs
    ``out + in >= out * in``, e.g. a ``(1, n)`` gate): it stays dense. With ``multiple > 1`` a rank step takes
    singular values up to the next multiple of it (what is left below break-even joins the dense step), so every rank
    above ``min_rank`` is a multiple: the optimum over those ranks (factor pairs with aligned inner dimensions run at
    their FLOP ratio, odd ones slower).

    Bytes (``bits`` set): the factors are stored as ``bits``-bit group-wise codes with an fp16 scale and offset per
    ``group_size`` codes (:func:`~hf_lowrank.ops.quant_lowrank.factor_bytes`), a step from rank ``a`` to ``b`` costs
    ``factor_bytes(b) - factor_bytes(a)``, a module kept dense costs its bf16 bytes ``2 * out * in`` (dense modules
    are not quantized: the allocation prices them at what they store), and the budget is ``keep`` of the targets' bf16
    bytes. Break-even moves accordingly: a 4-bit factor pair stays cheaper than the bf16 weight up to full rank in
    most shapes, so the allocation keeps a module dense only when its loss is worth 16 bits per weight.

    Quantization noise (``noise``): rounding the factors adds error, so a kept component removes less loss than its
    ``s^2``. The model here is that a module's rounding noise is a fixed fraction ``noise[l]`` of the energy its
    factors keep (round-to-nearest error scales with the group's range, i.e. with the factors' magnitudes): the loss
    at rank ``k`` is ``tail(k) + noise[l] * head(k)``, a rank step gains ``(1 - noise[l]) s^2`` (nothing once
    ``noise[l] >= 1``) and the dense step removes the remaining tail and the noise of the kept head. The fraction is
    measured per module (e.g. by quantizing at a probe rank: ``(e_q^2 - e^2) / (1 - e^2)`` with ``e`` and ``e_q``
    the relative weighted errors before and after rounding), so modules whose factors quantize badly (outlier-heavy
    singular vectors) get fewer of the bytes. The same idea as pricing the quantization error into a rank search in
    CALDERA (Saha et al., 2024, arXiv:2405.18886); the measured-noise model is ours.

    Args:
        spectra: ``{name: singular values}`` of the weighted matrices (full spectra; see
            :func:`~hf_lowrank.ops.fisher.weighted_spectrum`). Their squares must be on one common scale (e.g. the
            output error on the same calibration tokens, or the Kronecker-Fisher loss) unless ``normalize`` makes
            them comparable.
        shapes: ``{name: (out, in)}``.
        keep: fraction of the summed dense parameters ``sum(out * in)`` kept (``bits`` set: of their bf16 bytes), in
            ``(0, 1]``.
        normalize: ``"none"`` (raw losses) or ``"relative"`` (each module's ``s^2`` divided by its total, i.e. the
            relative error of the module).
        min_rank: smallest rank any module gets, ``>= 1``.
        multiple: ranks above ``min_rank`` are multiples of this, ``>= 1``.
        bits: ``None`` (a parameter budget) or the factor bit width in ``[2, 8]`` (a byte budget).
        group_size: codes per scale and offset with ``bits``, ``>= 1``.
        noise: ``{name: fraction >= 0}`` of each module's kept energy lost to rounding (missing modules: 0).

    Returns:
        :class:`GlobalAllocation`.

    Raises:
        ValueError: empty or inconsistent inputs, a budget below ``min_rank`` everywhere.
    """
    if not spectra:
        raise ValueError("spectra is empty: pass {module name: singular values} for at least one module.")
    if not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0 < keep <= 1):
        unit = "parameters" if bits is None else "bf16 bytes"
        raise ValueError(f"keep must be a fraction of {unit} in (0, 1], got {keep!r}.")
    if normalize not in LOSS_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {LOSS_NORMALIZATIONS}, got {normalize!r}.")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}.")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}.")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        raise ValueError(f"bits must be None (a parameter budget) or an int in [2, 8], got {bits!r}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}.")
    names = list(spectra)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f"no shape for modules {missing[:5]}: shapes must cover every module in spectra.")
    noise = _check_noise(noise, names)

    def factor_cost(out_f: int, in_f: int, rank: int) -> int:
        if bits is None:
            return rank * (out_f + in_f)
        return factor_bytes(out_f, in_f, rank, bits, group_size) if rank > 0 else 0

    def dense_cost_of(out_f: int, in_f: int) -> int:
        return out_f * in_f * (1 if bits is None else 2)

    def break_even(out_f: int, in_f: int) -> int:
        """The largest rank whose factors still cost less than the dense weight (0: none does)."""
        dense = dense_cost_of(out_f, in_f)
        lo, hi = 0, min(out_f, in_f)
        if factor_cost(out_f, in_f, hi) < dense:
            return hi
        while hi - lo > 1:  # factor_cost(lo) < dense <= factor_cost(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if factor_cost(out_f, in_f, mid) < dense else (lo, mid)
        return lo

    budget = float(keep) * sum(dense_cost_of(*_check_shape(n, shapes[n])) for n in names)
    values, costs, owners, kinds = [], [], [], []  # one entry per (pooled) greedy step
    ranks: dict[str, int] = {}
    dense: dict[str, bool] = {}
    used = 0.0
    base_loss = 0.0
    for idx, n in enumerate(names):
        out_f, in_f = _check_shape(n, shapes[n])
        S = _check_spectrum(n, spectra[n])
        sq = S.square()
        if normalize == "relative":
            total = float(sq.sum())
            sq = sq / total if total > 0 else sq
        keeps = max(0.0, 1.0 - noise.get(n, 0.0))  # share of a kept component's energy that rounding leaves
        k_be = break_even(out_f, in_f)
        if k_be == 0:  # no factor pair saves anything (a 1 x n gate): dense, and no step to take
            ranks[n], dense[n] = 0, True
            used += dense_cost_of(out_f, in_f)
            continue
        start = min(min_rank, len(sq), k_be)
        ranks[n], dense[n] = start, False
        used += factor_cost(out_f, in_f, start)
        base_loss += float(sq[start:].sum()) + (1.0 - keeps) * float(sq[:start].sum())
        # steps: ranks start+1 .. top (``multiple`` at a time, ``top`` the last multiple below break-even; one
        # singular value each when multiple == 1), then the dense step
        top = max(start, min(k_be, len(sq)) // multiple * multiple)
        edges = [start, *range((start // multiple + 1) * multiple, top + 1, multiple)]
        steps = [[keeps * float(sq[a:b].sum()), float(factor_cost(out_f, in_f, b) - factor_cost(out_f, in_f, a)), b - a]
                 for a, b in zip(edges, edges[1:])]
        rest = float(sq[top:].sum()) + (1.0 - keeps) * float(sq[:top].sum())
        dense_cost = dense_cost_of(out_f, in_f) - factor_cost(out_f, in_f, top)
        if dense_cost > 0:
            steps.append([rest, float(dense_cost), 0])  # kind 0: the dense step
        for gain, cost, parts in _pool(steps):
            values.append(gain / cost)
            costs.append(cost)
            owners.append(idx)
            kinds.append(parts)
    if used > budget + 1e-6:
        unit = "parameters" if bits is None else "bytes"
        raise ValueError(
            f"keep={keep} leaves {budget:,.0f} {unit}, less than rank {min_rank} in every module needs "
            f"({used:,.0f}); raise keep or lower min_rank."
        )
    loss = base_loss
    # a max-heap of blocks by loss removed per unit; the sequence number keeps each module's blocks in order
    heap = [(-v, i, owners[i], costs[i], kinds[i]) for i, v in enumerate(values)]
    heapq.heapify(heap)
    seq = len(heap)
    blocked: set[int] = set()
    while heap:
        _, _, owner, block_cost, parts = heapq.heappop(heap)
        if owner in blocked:
            continue
        fits = used + block_cost <= budget + 1e-6
        if not fits and noise and any(not is_rank for _, _, is_rank in parts):
            # the dense step does not fit: the rank steps pooled with it were worth their place only together with
            # it (with rounding noise the dense step also removes the noise of the whole kept head, so a noisy
            # module pools its rank steps with it); they go back at their own worth
            for gain, cost, rank_parts in _pool([list(p) for p in parts if p[2]]):
                heapq.heappush(heap, (-gain / cost, seq, owner, cost, rank_parts))
                seq += 1
            continue
        for gain, cost, is_rank in parts:  # a pooled block that does not fit: its rank steps while they fit
            if not fits and used + cost > budget + 1e-6:
                blocked.add(owner)  # later steps of this module are worth less; others may still fit
                break
            used += cost
            if is_rank:
                ranks[names[owner]] += is_rank
            else:
                dense[names[owner]] = True
            loss -= gain
    result = {n: (None if dense[n] else ranks[n]) for n in names}
    spent = sum(dense_cost_of(*shapes[n]) if result[n] is None else factor_cost(*shapes[n], result[n]) for n in names)
    return GlobalAllocation(ranks=result, budget=budget, used=int(spent), loss=max(loss, 0.0),
                            unit="parameters" if bits is None else "bytes")
