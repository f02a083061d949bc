"""Singular-value spectra of a model's Linear weights (cached) and the WeLore rank allocation built on them.

Computing every spectrum is the expensive step of WeLore (a full ``svdvals`` per weight: about 10-20 s for the 210
Linears of SmolLM2-135M on 2 CPU cores), so spectra are cached, keyed by a content hash of the weight (and of the
Fisher weighting when one is applied). The cache lives in memory for the process and, optionally, on disk as small
safetensors files (``SpectraCache(directory=...)``, or the environment variable ``HF_LOWRANK_SPECTRA_CACHE``), so a
second ``get_peft_model`` of the same base model, in this process or the next, skips the SVDs.

:func:`welore_allocation` is the rank choice of METHODS.md section 2 in the form the PEFT method needs: the target is
the ACHIEVED effective rank reduction counting what is really removed. With ``nlrc="keep"`` (the authors' code) the
non-low-rank components keep their full weight, so their threshold ranks do not count as removed; the global
threshold is bisected on that achieved figure, not on the attempted one the authors log.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...io import atomic_save_safetensors
from ...ops.rank_allocation import normalized_spectrum, split_lrc
from ...ops.svd import factorized_params, singular_values

__all__ = [
    "SPECTRA_CACHE_ENV",
    "SpectraCache",
    "WeLoreLRCAllocation",
    "compute_spectra",
    "default_spectra_cache",
    "match_rank_pattern",
    "weight_fingerprint",
    "welore_allocation",
    "welore_ranks_for_model",
]

logger = logging.getLogger(__name__)

SPECTRA_CACHE_ENV = "HF_LOWRANK_SPECTRA_CACHE"
_FINGERPRINT_VERSION = b"hf-lowrank-spectrum-v1"


# --------------------------------------------------------------------------------------------------------------------
# Fingerprints and the cache
# --------------------------------------------------------------------------------------------------------------------


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.contiguous().reshape(-1).cpu()
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))


def weight_fingerprint(
    weight: torch.Tensor, row_weights: torch.Tensor | None = None, col_weights: torch.Tensor | None = None
) -> str:
    """Content hash of a weight (and of the optional row/column weighting applied before the SVD).

    A BLAKE2b digest of the raw bytes, the shape and the dtype: the same weight gives the same key in any process,
    and any change of a single value (fine-tuning, another checkpoint) gives another key. Hashing runs at memory
    speed (under a second for all of SmolLM2), far below the SVDs it saves.

    Args:
        weight: ``(out, in)`` weight (any dtype and device; copied to the CPU one tensor at a time).
        row_weights: optional ``(out,)`` row weighting.
        col_weights: optional ``(in,)`` column weighting.

    Returns:
        A 40-character hex string.
    """
    h = hashlib.blake2b(_FINGERPRINT_VERSION, digest_size=20)
    _hash_tensor(h, weight)
    for tag, extra in ((b"row", row_weights), (b"col", col_weights)):
        if extra is not None:
            h.update(tag)
            _hash_tensor(h, extra.float())
    return h.hexdigest()


class SpectraCache:
    """Singular values keyed by :func:`weight_fingerprint`, in memory and optionally on disk.

    Args:
        directory: folder for one ``<fingerprint>.safetensors`` file per spectrum (written atomically); ``None`` or
            ``""`` keeps spectra in memory only (``Path("")`` would be the current directory, which nobody means).
        max_entries: bound on the in-memory entries (oldest dropped first); spectra are small (``min(out, in)``
            floats each), the default holds those of several 7B models.
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_entries: int = 100_000) -> None:
        self.directory = None if directory is None or directory == "" else Path(directory)
        self.max_entries = int(max_entries)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached spectrum for ``key`` (a CPU float tensor), or ``None``."""
        S = self._memory.get(key)
        if S is None:
            path = self._path(key)
            if path is not None and path.is_file():
                from safetensors import SafetensorError
                from safetensors.torch import load_file

                try:
                    S = load_file(str(path))["S"]
                except (SafetensorError, KeyError, OSError) as exc:  # a damaged file is a miss, not a failure
                    logger.warning("ignoring unreadable cached spectrum %s (%s)", path, exc)
                    S = None
                if S is not None:
                    self._remember(key, S)
        if S is None:
            self.misses += 1
        else:
            self.hits += 1
        return S

    def put(self, key: str, S: torch.Tensor) -> None:
        """Store a spectrum (in memory, and on disk when the cache has a directory)."""
        S = S.detach().to("cpu").contiguous()
        self._remember(key, S)
        path = self._path(key)
        if path is not None:
            try:
                atomic_save_safetensors({"S": S}, path, metadata={"format": "hf_lowrank.spectrum.v1"})
            except OSError as exc:  # a read-only or full disk must not stop the method
                logger.warning("could not write the spectra cache %s (%s); continuing in memory", path, exc)

    def _remember(self, key: str, S: torch.Tensor) -> None:
        self._memory.pop(key, None)
        self._memory[key] = S
        while len(self._memory) > self.max_entries:
            self._memory.pop(next(iter(self._memory)))

    def clear(self) -> None:
        """Forget the in-memory entries (files on disk are kept)."""
        self._memory.clear()


_DEFAULT_CACHES: dict[str | None, SpectraCache] = {}


def default_spectra_cache(directory: str | os.PathLike | None = None) -> SpectraCache:
    """The process-wide cache for ``directory``.

    ``None`` (default): ``$HF_LOWRANK_SPECTRA_CACHE`` when set, else memory only. ``""``: memory only, whatever the
    environment says (an explicit "no disk cache"; ``Path("")`` would otherwise resolve to the current directory and
    scatter ``<hash>.safetensors`` files there).
    """
    if directory is None:
        directory = os.environ.get(SPECTRA_CACHE_ENV) or None
    elif directory == "":
        directory = None
    key = None if directory is None else str(Path(directory).expanduser().resolve())
    if key not in _DEFAULT_CACHES:
        _DEFAULT_CACHES[key] = SpectraCache(key)
    return _DEFAULT_CACHES[key]


def _side_weights(fisher: Mapping[str, torch.Tensor] | None, name: str, size: int, what: str) -> torch.Tensor | None:
    if not fisher or name not in fisher:
        return None
    from ...ops.fisher import fisher_weights

    f = fisher[name]
    if tuple(f.shape) != (size,):
        raise ValueError(
            f"{what}['{name}'] has shape {tuple(f.shape)} but the module needs ({size},): the Fisher was collected on "
            "a model of another shape. Collect it again on this model."
        )
    return fisher_weights(f.float())


@torch.no_grad()
def compute_spectra(
    targets: Mapping[str, nn.Module],
    *,
    cache: SpectraCache | None = None,
    row_fisher: Mapping[str, torch.Tensor] | None = None,
    col_fisher: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Singular values of each target's weight, from the cache when possible.

    Without Fisher these are the spectra of ``W``; with ``row_fisher`` / ``col_fisher`` (accumulated Fisher per output
    row ``(out,)`` / input column ``(in,)``, e.g. from a FisherLoRA run) they are the spectra of ``D_out W D_in`` with
    ``D = diag(fisher_weights(F))``, the matrix whose truncation FWSVD optimises (METHODS.md section 1), so the global
    threshold ranks layers by how low-rank they are *where the data puts weight*.

    Args:
        targets: ``{name: Linear}`` (``nn.Linear`` or bitsandbytes 4/8-bit, dequantized for the SVD).
        cache: a :class:`SpectraCache` (default: :func:`default_spectra_cache`).
        row_fisher: optional ``{name: (out,) Fisher}``; modules without an entry are unweighted on that side.
        col_fisher: optional ``{name: (in,) Fisher}``.
        progress: show a progress bar over the weights whose spectrum is not cached.

    Returns:
        ``{name: (min(out, in),) singular values}``, descending, float32 on the CPU.
    """
    from ...modules import dense_weight

    cache = cache if cache is not None else default_spectra_cache()
    spectra: dict[str, torch.Tensor] = {}
    todo: list[tuple[str, str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    for name, module in targets.items():
        W = dense_weight(module)
        if not W.is_floating_point():
            W = W.float()
        rw = _side_weights(row_fisher, name, W.shape[0], "row_fisher")
        cw = _side_weights(col_fisher, name, W.shape[1], "col_fisher")
        key = weight_fingerprint(W, rw, cw)
        S = cache.get(key)
        if S is not None and S.numel() == min(W.shape):
            spectra[name] = S.float()
        else:
            todo.append((name, key, W, rw, cw))
    for name, key, W, rw, cw in tqdm(todo, desc="WeLore spectra", unit="weight", disable=not progress or not todo):
        A = W.float()
        if rw is not None:
            A = rw.to(A.device)[:, None] * A
        if cw is not None:
            A = A * cw.to(A.device)[None, :]
        S = singular_values(A, name=name).float().cpu()
        cache.put(key, S)
        spectra[name] = S
    return {name: spectra[name] for name in targets}


# --------------------------------------------------------------------------------------------------------------------
# Rank allocation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class WeLoreLRCAllocation:
    """Outcome of :func:`welore_allocation`: ranks, the LRC / N-LRC split, and what they achieve.

    Attributes:
        ranks: ``{name: rank}`` the rank each target really keeps: the threshold rank for low-rank components and
            for truncated N-LRCs, the full rank ``min(out, in)`` for N-LRCs kept exact (``nlrc="keep"``).
        threshold_ranks: ``{name: rank}`` the rank the global threshold (plus the final one-rank adjustments) gives
            every target, before ``nlrc="keep"`` restores the N-LRCs.
        lrc: names of the low-rank components (factorized, trainable).
        nlrc: names of the non-low-rank components (frozen; dense).
        shapes: ``{name: (out, in)}``.
        threshold: the global threshold ``k`` on min-max normalised singular values.
        target: the requested reduction.
        achieved_reduction: ``sum(full - ranks) / sum(full)`` over all targets: what was really removed.
        attempted_reduction: the same with every target cut to its threshold rank, the figure the WeLore authors log
            (it overstates the reduction when N-LRCs are kept).
        lrc_ratio: a target is an LRC when its threshold rank is below ``lrc_ratio * min(out, in)``.
        nlrc_mode: ``"keep"`` or ``"truncate"``.
        pinned: names whose rank came from ``rank_pattern``.
        weighted: whether the spectra were Fisher-weighted.
    """

    ranks: dict[str, int]
    threshold_ranks: dict[str, int]
    lrc: list[str]
    nlrc: list[str]
    shapes: dict[str, tuple[int, int]]
    threshold: float
    target: float
    achieved_reduction: float
    attempted_reduction: float
    lrc_ratio: float
    nlrc_mode: str
    pinned: list[str] = field(default_factory=list)
    weighted: bool = False

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
        return (
            f"WeLore: achieved rank reduction {self.achieved_reduction:.2%} (target {self.target:.2%}; threshold "
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
    """Rank pinned for module ``name`` by ``rank_pattern`` (peft's convention: a key matches a module whose full name
    ends with it, as a regular expression on dot boundaries; the first matching key wins)."""
    for key, rank in (rank_pattern or {}).items():
        if rank_pattern_regex(key).match(name):
            return int(rank)
    return None


def rank_pattern_regex(key: str) -> re.Pattern:
    """The compiled form of a ``rank_pattern`` key (it matches a module whose full name ends with it, on a dot
    boundary); a key that is not a string or not a valid regular expression raises ``ValueError`` naming it."""
    if not isinstance(key, str):
        raise ValueError(f"rank_pattern keys must be regex strings, got the key {key!r}.")
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error as exc:
        raise ValueError(
            f"rank_pattern key {key!r} is not a valid regular expression ({exc}); escape special characters "
            "(re.escape) or fix the pattern."
        ) from None


def _validate_reduction(reduction: float) -> None:
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0 < reduction < 1:
        raise ValueError(
            f"reduction must be a fraction in (0, 1): the share of the target layers' ranks to remove (e.g. 0.3), "
            f"got {reduction!r}."
        )


def _unreachable_message(
    reduction: float,
    *,
    below: float,
    above: float | None,
    most: float,
    ceiling: float,
    pinned_share: float | None,
    lrc_ratio: float,
    nlrc: str,
) -> str:
    """Why ``reduction`` cannot be reached, and the fix in the right direction.

    Three cases: the target is beyond the most WeLore can remove (lower it; ``ceiling`` is what cutting every free
    layer to rank 1 would remove, reached when every layer counts); it is below the smallest non-zero
    reduction (with ``nlrc="keep"`` a layer removes nothing until its rank drops under ``lrc_ratio * min(out, in)``,
    so the first layer to count removes more than ``1 - lrc_ratio`` of its rank at once: raise the target, or
    raise ``lrc_ratio`` for smaller steps); or it falls in a gap between two
    reachable reductions (typically left by ``rank_pattern`` pins): name both sides.
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


def welore_allocation(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    reduction: float,
    *,
    lrc_ratio: float = 0.5,
    nlrc: str = "keep",
    pinned: Mapping[str, int] | None = None,
    weighted: bool = False,
    max_iter: int = 100,
) -> WeLoreLRCAllocation:
    """WeLore ranks for an ACHIEVED rank reduction, with the LRC / N-LRC split.

    Every free module keeps ``r_l(k) = max(1, #(s_norm_l >= k))`` (min-max normalised spectrum, one global ``k``).
    The achieved reduction counts only what is really removed: with ``nlrc="keep"`` a module removes ranks only when
    it is an LRC (``r_l < lrc_ratio * min(out, in)``), with ``"truncate"`` every module does. Both are
    non-decreasing step functions of ``k``, so ``k`` is bisected over the distinct normalised singular values for the
    largest ``k`` whose reduction does not exceed the target. One threshold step can remove many ranks at once (equal
    values, or a layer turning LRC and dropping all its tail at once under ``"keep"``), so we then land on the target
    one rank at a time: either below the step, removing further ranks from LRCs in order of their smallest kept
    normalised value, or above it, giving back ranks to LRCs (that stay LRC) in order of their largest removed value;
    the closer of the two wins. The result is within half a rank of the target unless no LRC has room to move.

    Args:
        spectra: ``{name: (min(out, in),) singular values}`` of the free and the pinned modules (full spectra).
        shapes: ``{name: (out, in)}`` for the same names.
        reduction: target achieved reduction in ``(0, 1)``.
        lrc_ratio: LRC criterion, in ``(0, 1]``.
        nlrc: ``"keep"`` (N-LRCs stay exact) or ``"truncate"`` (N-LRCs are cut to their threshold rank too).
        pinned: ``{name: rank}`` fixed ranks (from ``rank_pattern``); they count towards the achieved reduction
            and are split into LRC / N-LRC by the same rule.
        weighted: recorded in the result (spectra were Fisher-weighted).
        max_iter: cap on bisection steps.

    Returns:
        :class:`WeLoreLRCAllocation`.

    Raises:
        ValueError: bad ``reduction`` / ``lrc_ratio`` / ``nlrc``, missing shapes, spectra of the wrong length, pinned
            ranks out of range, or a target that the pinned modules already exceed or no threshold can reach.
    """
    _validate_reduction(reduction)
    if isinstance(lrc_ratio, bool) or not isinstance(lrc_ratio, (int, float)) or not 0 < lrc_ratio <= 1:
        raise ValueError(f"lrc_ratio must be in (0, 1] (WeLore uses 0.5), got {lrc_ratio!r}.")
    if nlrc not in ("keep", "truncate"):
        raise ValueError(f"nlrc must be 'keep' (N-LRCs stay exact, as the authors do) or 'truncate', got {nlrc!r}.")
    if not spectra:
        raise ValueError("spectra is empty: pass {module name: singular values} for at least one module.")
    pinned = dict(pinned or {})
    names = sorted(spectra)
    for n in list(pinned):
        if n not in spectra:
            raise ValueError(f"pinned module '{n}' has no spectrum: pinned names must be among the spectra.")
    shp: dict[str, tuple[int, int]] = {}
    for n in names:
        if n not in shapes:
            raise ValueError(f"no shape for module '{n}': shapes must cover every module in spectra.")
        o, i = (int(s) for s in shapes[n])
        shp[n] = (o, i)
        if spectra[n].ndim != 1 or spectra[n].numel() != min(o, i):
            raise ValueError(
                f"spectrum of '{n}' has {spectra[n].numel()} values but its ({o}, {i}) weight has {min(o, i)}: pass "
                "the full spectrum (hf_lowrank.ops.svd.singular_values)."
            )
    for n, r in pinned.items():
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(shp[n]):
            raise ValueError(f"rank_pattern pins '{n}' to {r!r}, outside [1, {min(shp[n])}] for its {shp[n]} weight.")
    count_all = nlrc == "truncate"
    full = {n: min(shp[n]) for n in names}
    limit = {n: lrc_ratio * full[n] for n in names}
    total = sum(full.values())

    def removed_by(n: str, r: int) -> int:
        return full[n] - r if (count_all or r < limit[n]) else 0

    pinned_removed = sum(removed_by(n, r) for n, r in pinned.items())
    free = [n for n in names if n not in pinned]
    target_removed = reduction * total
    if pinned_removed > target_removed + 0.5:
        raise ValueError(
            f"rank_pattern alone removes {pinned_removed / total:.2%} of the target ranks, more than the requested "
            f"reduction {reduction:.2%}: raise reduction or pin higher ranks."
        )
    norm = {n: normalized_spectrum(spectra[n]) for n in free}  # descending float64
    asc = [norm[n].flip(0).contiguous() for n in free]
    fullt = torch.tensor([full[n] for n in free], dtype=torch.long)
    limt = torch.tensor([limit[n] for n in free], dtype=torch.float64)

    def ranks_at(k: float) -> torch.Tensor:
        if not free:
            return torch.zeros(0, dtype=torch.long)
        kk = torch.tensor([k], dtype=torch.float64)
        r = torch.stack([len(a) - torch.searchsorted(a, kk, side="left")[0] for a in asc])
        return r.clamp_min(1)

    def removed(r: torch.Tensor) -> int:
        if not free:
            return pinned_removed
        gone = fullt - r
        if not count_all:
            gone = torch.where(r.double() < limt, gone, torch.zeros_like(gone))
        return int(gone.sum()) + pinned_removed

    if free:
        cands = torch.cat([torch.unique(torch.cat([norm[n] for n in free])), torch.tensor([math.inf])])
    else:
        cands = torch.tensor([math.inf], dtype=torch.float64)
    lo, hi = 0, len(cands) - 1
    r_lo = ranks_at(float(cands[0]))
    r_top = ranks_at(float(cands[hi]))
    if removed(r_top) <= target_removed:
        lo, r_lo = hi, r_top
    else:
        for _ in range(max_iter):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            r_mid = ranks_at(float(cands[mid]))
            if removed(r_mid) <= target_removed:
                lo, r_lo = mid, r_mid
            else:
                hi = mid
    # candidate A: from below the step, remove further ranks from LRCs (smallest kept normalised value first)
    ranks_a = {n: int(r) for n, r in zip(free, r_lo.tolist())}
    got_a = removed(r_lo)
    heap = [(float(norm[n][ranks_a[n] - 1]), n) for n in free if ranks_a[n] > 1 and (count_all or ranks_a[n] < limit[n])]
    heapq.heapify(heap)
    while heap and target_removed - got_a >= 0.5:
        _, n = heapq.heappop(heap)
        ranks_a[n] -= 1
        got_a += 1
        if ranks_a[n] > 1:
            heapq.heappush(heap, (float(norm[n][ranks_a[n] - 1]), n))
    best_ranks, best_got, threshold = ranks_a, got_a, float(cands[lo])
    got_above: int | None = None  # the smallest removal above the target that one threshold step further reaches
    # candidate B: from above the step, give ranks back to LRCs that stay LRC (largest removed value first)
    if lo + 1 < len(cands) and abs(target_removed - got_a) >= 0.5:
        r_hi = ranks_at(float(cands[lo + 1]))
        ranks_b = {n: int(r) for n, r in zip(free, r_hi.tolist())}
        got_b = removed(r_hi)

        def can_grow(n: str) -> bool:
            r = ranks_b[n]
            return r < full[n] and (count_all or r + 1 < limit[n])

        heap_b = [(-float(norm[n][ranks_b[n]]), n) for n in free if can_grow(n)]
        heapq.heapify(heap_b)
        while heap_b and got_b - target_removed >= 0.5:
            _, n = heapq.heappop(heap_b)
            ranks_b[n] += 1
            got_b -= 1
            if can_grow(n):
                heapq.heappush(heap_b, (-float(norm[n][ranks_b[n]]), n))
        got_above = got_b
        if abs(got_b - target_removed) < abs(best_got - target_removed):
            best_ranks, best_got, threshold = ranks_b, got_b, float(cands[lo + 1])
    threshold_ranks = {**best_ranks, **pinned}
    lrc_set, nlrc_set = split_lrc(threshold_ranks, shp, lrc_ratio)
    if nlrc == "keep":
        ranks = {n: (threshold_ranks[n] if n in lrc_set else full[n]) for n in names}
    else:
        ranks = dict(threshold_ranks)
    achieved = sum(full[n] - ranks[n] for n in names) / total
    attempted = sum(full[n] - threshold_ranks[n] for n in names) / total
    if abs(achieved - reduction) * total > max(0.5, 0.005 * total) and achieved < reduction:
        raise ValueError(
            _unreachable_message(
                reduction,
                below=achieved,
                above=None if got_above is None else got_above / total,
                most=removed(ranks_at(math.inf)) / total,
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
    if threshold == math.inf:
        threshold = 1.0
    return WeLoreLRCAllocation(
        ranks={n: int(ranks[n]) for n in names},
        threshold_ranks={n: int(threshold_ranks[n]) for n in names},
        lrc=sorted(lrc_set),
        nlrc=sorted(nlrc_set),
        shapes=shp,
        threshold=threshold,
        target=float(reduction),
        achieved_reduction=float(achieved),
        attempted_reduction=float(attempted),
        lrc_ratio=float(lrc_ratio),
        nlrc_mode=nlrc,
        pinned=sorted(pinned),
        weighted=weighted,
    )


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
) -> tuple[dict[str, int], WeLoreLRCAllocation]:
    """WeLore ranks for a model, in the form :func:`hf_lowrank.compress_model` takes.

    Args:
        model: a transformers model (or any module with Linear layers).
        reduction: target achieved rank reduction over the targets, in ``(0, 1)``.
        target_modules: see :func:`hf_lowrank.find_target_linears` (default: the Linears of the transformer blocks).
        progress: progress bar for the spectra.
        lrc_ratio, nlrc, rank_pattern: as in :class:`~hf_lowrank.peft_configs.welore.WeLoreLRCConfig`.
        row_fisher, col_fisher: optional Fisher (``{name: (out,)}`` / ``{name: (in,)}``) weighting the spectra.
        cache: spectra cache (default: the process-wide one).

    Returns:
        ``(ranks, allocation)``: ``ranks`` maps each LRC to its rank (what ``compress_model`` factorizes; N-LRCs
        stay dense there), ``allocation`` the full :class:`WeLoreLRCAllocation`.
    """
    from ...compression.compress import find_target_linears

    _validate_reduction(reduction)
    targets = find_target_linears(model, target_modules)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    pinned = {n: r for n in targets if (r := match_rank_pattern(rank_pattern, n)) is not None}
    spectra = compute_spectra(targets, cache=cache, row_fisher=row_fisher, col_fisher=col_fisher, progress=progress)
    alloc = welore_allocation(
        spectra, shapes, reduction, lrc_ratio=lrc_ratio, nlrc=nlrc, pinned=pinned,
        weighted=bool(row_fisher) or bool(col_fisher),
    )
    return {n: alloc.ranks[n] for n in alloc.lrc}, alloc
