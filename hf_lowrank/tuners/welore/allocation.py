"""WeLore's rank allocation for the PEFT method: the ops allocation with shapes, pins from ``rank_pattern``, spectra.

The rank rule itself is :func:`hf_lowrank.ops.rank_allocation.welore_ranks` (Jaiswal et al., 2024, arXiv:2407.11239): the target is
the ACHIEVED effective rank reduction counting what is really removed. With ``nlrc="keep"`` (the authors' code) the
non-low-rank components keep their full weight, so their threshold ranks do not count as removed; the global
threshold is bisected on that achieved figure, not on the attempted one the authors log. This module adds what the
PEFT method needs around it: the module shapes (parameter accounting), ``rank_pattern`` pins and the spectra of a
model's target Linears (:mod:`.spectra`).

Data-aware WeLore (``calibration=`` / ``grams_in=`` here, ``WeLoreLRCConfig(spectra="whitened")`` for the PEFT
method) runs the SAME rule on the whitened spectra, the singular values of ``W L_in`` where ``L_in L_in^T`` is the
module's calibration input Gram ``sum x x^T`` (normalised by its mean diagonal and damped, as ``compress_model``
does; SVD-LLM's truncation-aware whitening, Wang, Zheng, Wan and Zhang, 2024, arXiv:2403.07378). ``sum_{i>k} s_i^2`` of a whitened spectrum is the
output error ``||(W - W_k) X||_F^2`` of the best rank-``k`` approximation on the calibration inputs, so a direction
the data never excites falls into the tail however large it is in ``W``.

Normalisation: none is added. WeLore's rule min-max normalises each module's spectrum, ``(s - s_min) / (s_max -
s_min)``, and that is invariant to multiplying a module's spectrum by any positive constant: the scale of each Gram
(number of calibration tokens, activation magnitude, the mean diagonal ``gram_factor`` divides out) cancels exactly,
and no per-module rescaling (by ``||W L_in||_F``, or back to the raw Gram scale as ``compress_model``'s global
allocation does to compare raw losses across modules) can change the ranks. What the threshold compares is the
SHAPE of each whitened spectrum, as the data-free rule compares the shape of each weight spectrum. The damping
(``lambda * I`` added to the normalised Gram) is the one knob that shapes the whitened tail: directions of the input
that the calibration data leaves at zero keep a floor of ``sqrt(lambda)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ...calibration.grams import calibration_grams
from ...ops.svd import factorized_params
from ...ops.welore_allocation import WeLoreAllocation, _check_reduction, welore_ranks
from ...targets import find_target_linears, pattern_key
from .spectra import SpectraCache, compute_spectra, whitening_factors

logger = logging.getLogger(__name__)

__all__ = [
    "WeLoreLRCAllocation",
    "calibration_whitening",
    "match_rank_pattern",
    "welore_allocation",
    "welore_allocation_for_targets",
    "welore_ranks_for_model",
]


@dataclass
class WeLoreLRCAllocation(WeLoreAllocation):
    """Outcome of :func:`welore_allocation`: a :class:`~hf_lowrank.ops.rank_allocation.WeLoreAllocation` (ranks,
    threshold ranks, the LRC / N-LRC split, threshold, achieved and attempted reduction) with the module shapes and
    what the ranks cost in parameters.

    Attributes:
        shapes: ``{name: (out, in)}``.
        weighted: whether the spectra were Fisher-weighted.
        whitened: whether the spectra were whitened by calibration input Grams (data-aware WeLore).
        calibration_tokens: tokens the Grams were measured on (``None``: not known here, or data-free).
    """

    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    weighted: bool = False
    whitened: bool = False
    calibration_tokens: int | None = None

    @property
    def full_ranks(self) -> dict[str, int]:
        return {n: min(s) for n, s in self.shapes.items()}

    @property
    def params_before(self) -> int:
        """Weight parameters of the targets when dense (biases excluded)."""
        return sum(o * i for o, i in self.shapes.values())

    @property
    def params_after(self) -> int:
        """Weight parameters after compression: LRC factor pairs plus dense N-LRCs."""
        lrc = set(self.lrc)
        return sum(factorized_params(o, i, self.ranks[n]) if n in lrc else o * i for n, (o, i) in self.shapes.items())

    @property
    def lrc_params(self) -> int:
        """Parameters of the LRC factor pairs (what trains)."""
        return sum(factorized_params(*self.shapes[n], self.ranks[n]) for n in self.lrc)

    @property
    def param_saving(self) -> float:
        """Fraction of the targets' weight parameters removed."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    def summary(self) -> str:
        spectra = " (whitened spectra, data-aware)" if self.whitened else ""
        return (
            f"WeLore{spectra}: achieved rank reduction {self.achieved_reduction:.2%} (target {self.target:.2%}; threshold "
            f"k={self.threshold:.4f}, attempted {self.attempted_reduction:.2%}); {len(self.lrc)} LRCs factorized and "
            f"trainable, {len(self.nlrc)} N-LRCs {'kept exact' if self.nlrc_mode == 'keep' else 'truncated'} and "
            f"frozen; target weights {self.params_before:,} -> {self.params_after:,} parameters "
            f"({self.param_saving:.2%} saved), LRC factors {self.lrc_params:,}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = {n: list(s) for n, s in self.shapes.items()}
        d.update(
            params_before=self.params_before,
            params_after=self.params_after,
            lrc_params=self.lrc_params,
            param_saving=self.param_saving,
        )
        return d


def match_rank_pattern(rank_pattern: Mapping[str, int] | None, name: str) -> int | None:
    """Rank pinned for module ``name`` by ``rank_pattern`` (peft's pattern-key rule, :func:`hf_lowrank.targets.
    pattern_key`: a key is a regex matched against the end of the full name on a dot boundary; the first wins)."""
    key = pattern_key(rank_pattern, name)
    return None if key is None else int(rank_pattern[key])


def welore_allocation(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    reduction: float,
    *,
    lrc_ratio: float = 0.5,
    nlrc: str = "keep",
    pinned: Mapping[str, int] | None = None,
    weighted: bool = False,
    whitened: bool = False,
    max_iter: int = 100,
) -> WeLoreLRCAllocation:
    """WeLore ranks for an ACHIEVED rank reduction, with the LRC / N-LRC split and the parameter accounting.

    The ranks are those of :func:`hf_lowrank.ops.rank_allocation.welore_ranks` (one global threshold, then one rank
    at a time in threshold order to land within half a rank of the target); this checks that every spectrum is the
    full spectrum of its ``(out, in)`` weight and records the shapes.

    Args:
        spectra: ``{name: (min(out, in),) singular values}`` of the free and the pinned modules (full spectra).
        shapes: ``{name: (out, in)}`` for the same names.
        reduction, lrc_ratio, nlrc, pinned, max_iter: as for :func:`~hf_lowrank.ops.rank_allocation.welore_ranks`.
        weighted: recorded in the result (spectra were Fisher-weighted).
        whitened: recorded in the result (spectra were whitened by calibration Grams).

    Returns:
        :class:`WeLoreLRCAllocation`.

    Raises:
        ValueError: missing shapes, spectra of the wrong length, and everything ``welore_ranks`` refuses.
    """
    shp: dict[str, tuple[int, int]] = {}
    for n in sorted(spectra):
        if n not in shapes:
            raise ValueError(f"no shape for module '{n}': shapes must cover every module in spectra.")
        o, i = (int(s) for s in shapes[n])
        shp[n] = (o, i)
        S = spectra[n]
        if isinstance(S, torch.Tensor) and (S.ndim != 1 or S.numel() != min(o, i)):
            raise ValueError(
                f"spectrum of '{n}' has {S.numel()} values but its ({o}, {i}) weight has {min(o, i)}: pass "
                "the full spectrum (hf_lowrank.ops.svd.singular_values)."
            )
    alloc = welore_ranks(spectra, reduction, lrc_ratio=lrc_ratio, nlrc=nlrc, pinned=pinned, max_iter=max_iter)
    return WeLoreLRCAllocation(
        **{f.name: getattr(alloc, f.name) for f in fields(alloc)}, shapes=shp, weighted=weighted, whitened=whitened
    )


def welore_allocation_for_targets(
    targets: Mapping[str, nn.Module],
    reduction: float,
    *,
    lrc_ratio: float = 0.5,
    nlrc: str = "keep",
    rank_pattern: Mapping[str, int] | None = None,
    row_fisher: Mapping[str, torch.Tensor] | None = None,
    col_fisher: Mapping[str, torch.Tensor] | None = None,
    in_factors: Mapping[str, torch.Tensor] | None = None,
    cache: SpectraCache | None = None,
    progress: bool = True,
) -> WeLoreLRCAllocation:
    """:func:`welore_allocation` on the spectra of ``{name: Linear}`` targets, ``rank_pattern`` keys pinning ranks.

    Args:
        targets: ``{name: Linear}`` (see :func:`~.spectra.compute_spectra`).
        reduction, lrc_ratio, nlrc: as for :func:`welore_allocation` (``reduction`` is checked before any SVD).
        rank_pattern: ``{key: rank}`` pins (see :func:`match_rank_pattern`).
        row_fisher, col_fisher, in_factors, cache, progress: as for :func:`~.spectra.compute_spectra`
            (``in_factors``: the whitened spectra of data-aware WeLore, see the module docstring).
    """
    _check_reduction(reduction)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    pinned = {n: r for n in targets if (r := match_rank_pattern(rank_pattern, n)) is not None}
    spectra = compute_spectra(targets, cache=cache, row_fisher=row_fisher, col_fisher=col_fisher,
                              in_factors=in_factors, progress=progress)
    return welore_allocation(
        spectra, shapes, reduction, lrc_ratio=lrc_ratio, nlrc=nlrc, pinned=pinned,
        weighted=bool(row_fisher) or bool(col_fisher), whitened=bool(in_factors),
    )


def calibration_whitening(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    *,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    grams_in: Mapping[str, torch.Tensor] | None = None,
    damping: float | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int | None]:
    """Whitening factors of data-aware WeLore: from calibration batches (their input Grams collected first, forward
    passes only, :func:`hf_lowrank.calibration.grams.calibration_grams`) or from Grams collected beforehand.

    Args:
        model: the (dense) model the batches run through.
        targets: ``{name: Linear}`` of ``model``.
        calibration: batches (dicts with ``input_ids``, optionally ``attention_mask``; e.g.
            :func:`hf_lowrank.calibration_batches`); or
        grams_in: ``{name: (in, in) Gram}`` already collected (Grams of non-targets are ignored).
        damping: Gram damping (default :data:`hf_lowrank.ops.fisher.DEFAULT_DAMPING`).
        progress: progress bar over the batches.

    Returns:
        ``({name: L_in}, tokens)`` (``tokens`` is ``None`` for ``grams_in``). Targets that no calibration token reached
        have no factor (their spectrum stays the weight's; a warning names them).

    Raises:
        ValueError: both or neither of ``calibration`` and ``grams_in``, or a target whose Gram has the wrong shape.
    """
    if (calibration is None) == (grams_in is None):
        raise ValueError("Data-aware WeLore needs calibration batches (calibration=) or input Grams (grams_in=), one "
                         "of the two.")
    tokens = None
    if calibration is not None:
        grams_in, tokens = calibration_grams(model, targets, calibration, progress=progress)
    grams = {n: G for n, G in grams_in.items() if n in targets}
    factors, fallbacks = whitening_factors(targets, grams, damping=damping)
    missing = [n for n in targets if n not in factors]
    if missing:
        logger.warning("WeLore whitening: no calibration Gram for %d target(s) (e.g. %s); their spectra stay the "
                       "weight's.", len(missing), missing[0])
    if fallbacks:
        logger.warning("WeLore whitening: the Gram of %d module(s) was singular even after damping (e.g. %s); its "
                       "factor comes from the clamped eigendecomposition.", len(fallbacks), fallbacks[0])
    return factors, tokens


def welore_ranks_for_model(
    model: nn.Module,
    reduction: float,
    target_modules: str | Sequence[str] | None = None,
    progress: bool = True,
    *,
    lrc_ratio: float = 0.5,
    nlrc: str = "keep",
    rank_pattern: Mapping[str, int] | None = None,
    row_fisher: Mapping[str, torch.Tensor] | None = None,
    col_fisher: Mapping[str, torch.Tensor] | None = None,
    cache: SpectraCache | None = None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    grams_in: Mapping[str, torch.Tensor] | None = None,
    damping: float | None = None,
) -> tuple[dict[str, int], WeLoreLRCAllocation]:
    """WeLore ranks for a model, in the form :func:`hf_lowrank.compress_model` takes.

    Data-free by default (the spectra of the weights). With ``calibration`` (or ``grams_in``) the threshold runs on
    the whitened spectra instead (data-aware WeLore, see the module docstring); the factors that match that
    allocation are the whitened factorization with the same Grams and damping::

        grams, _ = calibration_grams(model, find_target_linears(model), batches)
        ranks, alloc = welore_ranks_for_model(model, 0.3, grams_in=grams)
        compress_model(model, ranks, grams_in={n: grams[n] for n in ranks})

    (or ``compress_model(model, ranks, calibration=batches, calibration_weighting="whitened")``, which measures the
    same Grams again).

    Args:
        model: a transformers model (or any module with Linear layers).
        reduction: target achieved rank reduction over the targets, in ``(0, 1)``.
        target_modules: see :func:`hf_lowrank.find_target_linears` (default: the Linears of the transformer blocks).
        progress: progress bar for the spectra (and the calibration batches).
        lrc_ratio, nlrc, rank_pattern: as in :class:`~hf_lowrank.tuners.welore.WeLoreLRCConfig`.
        row_fisher, col_fisher: optional Fisher (``{name: (out,)}`` / ``{name: (in,)}``) weighting the spectra.
        cache: spectra cache (default: the process-wide one).
        calibration: calibration batches (dicts with ``input_ids``, optionally ``attention_mask``, e.g.
            :func:`hf_lowrank.calibration_batches`): their input Grams whiten the spectra.
        grams_in: ``{name: (in, in) Gram}`` collected beforehand (:func:`hf_lowrank.calibration.grams.calibration_grams`),
            instead of ``calibration``.
        damping: Gram damping ``lambda`` (default :data:`hf_lowrank.ops.fisher.DEFAULT_DAMPING`, as
            ``compress_model``'s).

    Returns:
        ``(ranks, allocation)``: ``ranks`` maps each LRC to its rank (what ``compress_model`` factorizes; N-LRCs
        stay dense there), ``allocation`` the full :class:`WeLoreLRCAllocation` (``allocation.whitened`` says
        whether it was data-aware).
    """

    _check_reduction(reduction)
    targets = find_target_linears(model, target_modules)
    in_factors, tokens = None, None
    if calibration is not None or grams_in is not None:
        in_factors, tokens = calibration_whitening(model, targets, calibration=calibration, grams_in=grams_in,
                                                   damping=damping, progress=progress)
    alloc = welore_allocation_for_targets(
        targets, reduction, lrc_ratio=lrc_ratio, nlrc=nlrc, rank_pattern=rank_pattern, row_fisher=row_fisher,
        col_fisher=col_fisher, in_factors=in_factors, cache=cache, progress=progress,
    )
    alloc.calibration_tokens = tokens
    return {n: alloc.ranks[n] for n in alloc.lrc}, alloc
