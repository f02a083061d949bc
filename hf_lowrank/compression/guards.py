"""Checks around a compression that say what a number means or what fell back: tokens per Gram dimension, Grams
that no data reached, an int rank that removes most parameters, weights that are not Linear layers, a call that
factorized nothing."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping

from torch import nn

from ..calibration.grams import gram_memory_bytes
from ..modules import LowRankLinear

logger = logging.getLogger("hf_lowrank.compression.compress")


#: Calibration tokens per Gram dimension below which the data-aware factorization is measured to lose more than it
#: gains on text of another kind than the calibration text (``benchmarks/calibration_size.py``).
MIN_TOKENS_PER_DIMENSION = 2.0


def log_tokens_per_dimension(tokens: int, shapes: Mapping[str, tuple[int, int]], max_gram_dim: int | None) -> None:
    """Say how many calibration tokens each Gram dimension got, and warn below :data:`MIN_TOKENS_PER_DIMENSION`."""
    sides = [d for shape in shapes.values() for d in shape if max_gram_dim is None or d <= max_gram_dim]
    widest = max(sides, default=0)
    if not widest:
        return
    ratio = tokens / widest
    logger.warning("calibration: %d tokens, %.2f per dimension of the widest full Gram (%d); each Gram is shrunk "
                   "toward its diagonal by d / (d + tokens).", tokens, ratio, widest)
    if ratio < MIN_TOKENS_PER_DIMENSION:
        warnings.warn(
            f"Only {tokens} calibration tokens for Grams of up to {widest} dimensions ({ratio:.2f} tokens per "
            f"dimension): the statistics are mostly noise, so they are shrunk strongly toward their diagonals and the "
            f"result is close to a per-feature-scaled SVD. Pass at least {math.ceil(MIN_TOKENS_PER_DIMENSION * widest)}"
            " tokens (more batches or longer texts) for the full benefit of calibration.",
            UserWarning,
            stacklevel=4,
        )


def check_empty_sides(sides, want_in: bool, want_out: bool, from_calibration: bool) -> None:
    """Refuse when no calibration statistic reached any target on a side that was asked for (the result would be
    plain SVD labelled data-aware)."""
    if not sides:
        return
    where = "calibration batches" if from_calibration else "Grams"
    if want_in and all("input" in side.empty for side in sides.values()):
        raise ValueError(
            f"Every input Gram is zero: no usable calibration data reached any target module (all {where} were "
            "non-finite, i.e. NaN/inf activations, or they never reach these modules). Check the batches (and the "
            "model's dtype: fp16 overflows), or compress without calibration for plain SVD."
        )
    if want_out and all("output" in side.empty for side in sides.values()):
        raise ValueError(
            "Every output-gradient Gram is zero: the loss sent no gradient to any target module. For a causal LM "
            "each sequence needs at least 2 tokens (the next-token labels of a 1-token sequence are empty) and the "
            "labels must not all be -100; or use weighting='whitened' (input Grams only)."
        )


def warn_small_int_rank(ranks, targets, plan) -> None:
    """An ``int`` is an absolute rank: warn when it removes most of the parameters (``1`` was probably meant as 1.0)."""
    if not isinstance(ranks, int) or isinstance(ranks, bool) or not plan:
        return
    before = sum(targets[n].out_features * targets[n].in_features for n in plan)
    after = sum(targets[n].out_features * targets[n].in_features if r is None
                else r * (targets[n].out_features + targets[n].in_features) for n, r in plan.items())
    if after < 0.5 * before:
        warnings.warn(
            f"ranks={ranks} is an absolute rank (an int): every target module keeps rank {ranks}, {after / before:.1%}"
            f" of their parameters. For a fraction of the parameters pass a float, e.g. {float(min(ranks, 1))!r} or "
            "0.8.",
            UserWarning,
            stacklevel=4,
        )


def warn_nothing_factorized(model: nn.Module, report) -> None:
    """A compression that factorized no module leaves the model as it was: say so and why (each module's
    ``skipped`` reason), and name an earlier compression when the model already holds factor layers (a mixture of
    experts keeps its 1-row router gates dense, so the "already compressed" refusal does not see it)."""
    earlier = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    reason = next((m.skipped for m in report.modules if m.skipped), "no target")
    message = (f"compress_model factorized no module: all {len(report.modules)} targets stay dense "
               f"(e.g. {report.modules[0].name if report.modules else '-'}: {reason}); the model is unchanged.")
    if earlier:
        message += (f" It already holds {len(earlier)} LowRankLinear layers (e.g. '{earlier[0]}') from an earlier "
                    "compression: compress the original model, or hf_lowrank.decompress_model(model) first.")
    else:
        message += " Pass a smaller keep fraction (a float below 1.0) or rank to compress it."
    warnings.warn(message, UserWarning, stacklevel=3)


def warn_keep_missed(config, report, allocation: str, tolerance: float = 0.02) -> None:
    """A keep fraction the ranks could not reach is said, with the achieved figure and the fix: ranks in multiples of
    ``rank_multiple`` on narrow modules (64 wide: the nearest rank that saves parameters may keep 0.75 for 0.8)
    cannot always spend the budget, and ``report.kept_fraction`` alone is easy to miss."""
    if (config.keep is None or config.rank is not None or config.rank_pattern or not report.ranks
            or config.budget_unit_for(allocation) != "parameters"):
        return
    kept = report.kept_fraction
    if abs(kept - config.keep) <= tolerance:
        return
    warnings.warn(
        f"keep={config.keep} asked, {kept:.4f} of the target parameters kept: the {allocation} ranks (multiples of "
        f"rank_multiple={config.rank_multiple}) cannot spend this budget on these modules. Pass rank_multiple=1, "
        + ("" if allocation == "global" else "allocation='global', ") + "or a keep that the reported ranks reach.",
        UserWarning, stacklevel=3,
    )


def eligibility(model: nn.Module, targets: Mapping[str, nn.Module]) -> dict:
    """What ``keep`` refers to: the targets' parameters, and any weight that is no Linear layer and so cannot be a
    target (the fused 3-D expert tensors of a mixture of experts), named with a warning so that a keep fraction is
    never read as one of the whole model."""
    target_params = sum(m.out_features * m.in_features for m in targets.values())
    total = sum(p.numel() for p in model.parameters())
    ineligible = {n: p.numel() for n, p in model.named_parameters() if p.ndim >= 3}
    info = {"target_parameters": target_params, "model_parameters": total}
    if ineligible:
        count = sum(ineligible.values())
        info["not_eligible"] = ineligible
        warnings.warn(
            f"{len(ineligible)} weight tensor(s) with {count:,} parameters ({count / max(total, 1):.1%} of the model) "
            f"are not Linear layers and stay as they are, e.g. {next(iter(ineligible))} (fused mixture-of-experts "
            f"weights): the keep fraction applies to the {len(targets)} target Linear modules ({target_params:,} "
            "parameters) only. report.info['not_eligible'] lists them.",
            UserWarning,
            stacklevel=4,
        )
    return info


def statistics_memory_bytes(shapes: Mapping[str, tuple[int, int]], *, outputs: bool, max_dim: int | None) -> int:
    """Upper bound on the bytes the calibration statistics of a compression hold besides the model.

    The float32 Grams (:func:`~hf_lowrank.calibration.grams.gram_memory_bytes`, shared Grams counted once per module,
    so an over-count), plus the float64 Cholesky factor of every full Gram (twice the Gram's bytes), plus the float64
    temporaries of factorizing the widest full Gram (about five ``n x n`` matrices). ``compress_model`` frees each
    Gram it collected once factorized and each factor once its modules are, but the Grams still count: memory freed
    in blocks below glibc's mmap threshold (at most 32 MB by default: sides up to about 2,900 wide) can stay with the
    allocator instead of returning to the system, so the process's peak can stay near Grams plus factors.
    """
    grams = gram_memory_bytes(shapes, outputs=outputs, max_dim=max_dim)
    sides = [d for out_f, in_f in shapes.values() for d in ((in_f, out_f) if outputs else (in_f,))]
    widest = max((d for d in sides if max_dim is None or d <= max_dim), default=0)
    return 3 * grams + 40 * widest * widest
