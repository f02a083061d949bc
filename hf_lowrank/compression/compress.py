"""``compress_model``: replace Linear layers of a model by ``LowRankLinear`` factor pairs and report what that cost.

What to do is a :class:`~.config.CompressionConfig` (or a keep fraction, a rank or a rank pattern with field
overrides); what to weigh by is the data passed beside it. The stages themselves are in :mod:`.pipeline`.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import warnings
from collections.abc import Iterable, Mapping

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..calibration.grams import CalibrationGrams, check_model_ready, gram_memory_bytes, is_causal_lm
from ..distributed import unwrap_wrappers
from ..fisher.sides import fisher_sides
from ..fisher.state import resolve_fisher
from ..modules import set_submodule
from ..targets import find_target_linears
from .config import ALLOCATIONS, CompressionConfig
from .guards import (
    check_empty_sides,
    eligibility,
    log_tokens_per_dimension,
    statistics_memory_bytes,
    warn_small_int_rank,
)
from .pipeline import (
    calibration_statistics,
    factorize_linear,
    factorize_plan,
    mark,
    plan_modules,
    select_targets,
    shapes_of,
    swap_modules,
    weighting_sides,
)
from .ranks import resolve_ranks
from .report import CompressionReport, ModuleReport
from .sequential import compress_sequential

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOCATIONS",
    "CompressionConfig",
    "CompressionReport",
    "ModuleReport",
    "compress_model",
    "factorize_linear",
    "find_target_linears",
    "resolve_ranks",
    "set_submodule",
]

_weighting_sides = weighting_sides  # the name tuners/welore/spectra.py imports

#: Argument names of ``compress_model`` before ``CompressionConfig``, kept one release (a DeprecationWarning).
DEPRECATED_NAMES = {
    "method": "svd_method",
    "calibration_weighting": "weighting",
    "fisher_weighting": "weighting",
    "exponent": "fisher_exponent",
    "eps": "fisher_eps",
}
_OLD_CHOICES = {"calibration_weighting": ("whitened", "kronecker"),
                "fisher_weighting": ("kronecker", "two_sided", "row")}


@torch.no_grad()
def compress_model(
    model: nn.Module,
    config_or_keep: CompressionConfig | float | int | Mapping[str, int | float] | None = None,
    *,
    calibration: Iterable[Mapping[str, torch.Tensor]] | CalibrationGrams | None = None,
    fisher=None,
    grams_in: Mapping[str, torch.Tensor] | None = None,
    grams_out: Mapping[str, torch.Tensor] | None = None,
    row_weights: Mapping[str, torch.Tensor] | None = None,
    col_weights: Mapping[str, torch.Tensor] | None = None,
    report_method: str | None = None,
    checkpoint_extra: Mapping | None = None,
    progress: bool = True,
    **overrides,
) -> CompressionReport:
    """Replace target Linear layers of ``model`` in place by ``LowRankLinear`` factor pairs, all or nothing.

    Every factor pair is computed before any module is replaced: a failure (an :class:`~hf_lowrank.ops.svd.SVDError`,
    a bad Gram) leaves the model untouched. A module whose rank would not save parameters stays dense and is listed as
    skipped. A transformers model is then marked so that ``save_pretrained`` writes a factorized checkpoint that
    ``from_pretrained`` rebuilds.

    Args:
        model: the model to compress (modified in place). A DDP / ``torch.compile`` wrapper is unwrapped and the model
            under it compressed (wrap the result again to train it). A peft LoRA model (a ``PeftModel`` of a
            FisherLoRA or plain LoRA adapter) is compressed from its adapted Linears' effective weights
            ``W + s B A`` (as :func:`~hf_lowrank.tuners.fisher_lora.compress_peft_model` with ``inplace=True``,
            the adapter's config filling what ``config_or_keep`` leaves out): afterwards ``model.get_base_model()``
            is the compressed transformers model, without LoRA layers.
        config_or_keep: a :class:`CompressionConfig`; or a float keep fraction, an int rank or a rank-pattern dict
            (its keys then choose the targets), the rest of the config from ``overrides``.
        calibration: batches (dicts with ``input_ids``, optionally ``attention_mask`` / ``labels``; a ``DataLoader``
            works) whose Grams weigh the factorization (``config.weighting``), or a
            :class:`~hf_lowrank.calibration.grams.CalibrationGrams` collected earlier. Under ``torch.distributed`` each
            process passes its own shard and every process calls ``compress_model``: the Grams are all-reduced, so
            every process ends with the same factors. Each full Gram is shrunk toward its diagonal by
            ``d / (d + tokens)``; fewer than 2 tokens per dimension of the widest Gram warns. A side no data reached
            is factorized unweighted and named in ``report.info['unweighted_sides']`` and a warning; when no data
            reached any module the call is refused.
        fisher: a Fisher collected in training (a :class:`~hf_lowrank.fisher.state.FisherState`, a
            ``FisherCollector`` or ``FisherCollectorCallback``, or the path of a ``fisher_state.safetensors`` or of its
            folder), with the model's module names. Exclusive with the other data arguments.
        grams_in, grams_out: ``{name: (n, n) or (n,)}`` Grams of the modules' inputs / output gradients, given
            directly.
        row_weights, col_weights: ``{name: (out,)}`` / ``{name: (in,)}`` diagonal Fisher weights, given directly.
        report_method: label recorded in the report and the checkpoint (default from the weighting: ``"svd"``,
            ``"fwsvd"``, ``"whitened"``, ``"kronecker"``, ``"fisher_lora"``).
        checkpoint_extra: further facts recorded with the ranks in the checkpoint's quantization config.
        progress: show progress bars.
        **overrides: :class:`CompressionConfig` fields (``allocation="uniform"``, ``svd_method="exact"``, ...). The
            former names ``method``, ``calibration_weighting``, ``fisher_weighting``, ``exponent``, ``eps`` and
            ``ranks`` still work for one release, with a ``DeprecationWarning`` naming the new one. ``dtype`` here is
            a ``torch.dtype``.

    Returns:
        A :class:`CompressionReport` (``info`` records the weighting, allocation, calibration tokens and any Gram
        whose factorization needed the eigendecomposition fallback).
    """
    given = config_or_keep is not None or bool(overrides)
    config, spelled = build_config(config_or_keep, overrides)
    model = unwrap_wrappers(model)
    if _is_lora_peft_model(model):
        if any(x is not None for x in (row_weights, col_weights, grams_in, grams_out)):
            raise ValueError("A LoRA model is compressed from its effective weights W + s B A: pass fisher= or "
                             "calibration=, not row_weights=/col_weights=/grams_in=/grams_out= (collected on which "
                             "weights?).")
        # the LoRA weight source stand-ins (W + s B A per adapted Linear, 4-bit dequantized) go through this same
        # function; it lives with the LoRA tuner, which imports this module
        from ..tuners.fisher_lora.compress import compress_peft_model

        _, report = compress_peft_model(model, fisher=fisher, calibration=calibration, compression=config if given
                                        else None, inplace=True, progress=progress)
        return report
    check_model_ready(model)  # meta weights, torch.inference_mode(): a clear error before any work
    explicit = any(x is not None for x in (row_weights, col_weights, grams_in, grams_out))
    state = None
    if fisher is not None:
        if explicit or calibration is not None or config.sequential:
            raise ValueError(
                "Pass fisher= or row_weights=/col_weights=/grams_in=/grams_out=/calibration=/sequential=, not both: "
                "the Fisher state gives each module's weighting."
            )
        state = resolve_fisher(fisher)
    weighting = _resolve_weighting(model, config, state, calibration, explicit, spelled.get("weighting", "weighting"))
    kronecker = calibration is not None and weighting == "kronecker"
    allocation = config.allocation
    if allocation == "auto":
        budget = config.keep is not None and not config.rank_pattern
        allocation = "global" if budget and (weighting == "kronecker" or bool(grams_out)) else "uniform"
    targets = select_targets(model, config, state)
    info: dict = eligibility(model, targets)
    if state is not None:
        row_weights, col_weights, grams_in, grams_out, non_finite = fisher_sides(state, targets, weighting)
        if non_finite:
            info["non_finite_fisher"] = non_finite
        report_method = report_method or ("fwsvd" if state.source == "full" else "fisher_lora")
        info.update({"fisher_weighting": weighting, "fisher_exponent": config.fisher_exponent,
                     "fisher_eps": config.fisher_eps, **state.summary()})
    if config.sequential:
        if calibration is None or isinstance(calibration, CalibrationGrams) or grams_in or kronecker:
            raise ValueError(
                "sequential=True measures each block's input Grams on the outputs of the already-compressed blocks "
                f"before it: it needs calibration= (not grams_in=), {spelled.get('weighting', 'weighting')}="
                "'whitened' (the output gradients need the whole model) and allocation='uniform' (or a rank map)."
            )
        plan = plan_modules(targets, None, config, "uniform", "none")
        warn_small_int_rank(config.rank, targets, plan)
        report = CompressionReport(method=report_method or "whitened")
        sides, tokens = compress_sequential(model, targets, plan, calibration, report, config, progress,
                                            row_weights=row_weights, col_weights=col_weights, grams_out=grams_out)
        info.update({"calibration_tokens": tokens, "sequential": True})
        log_tokens_per_dimension(tokens, shapes_of(targets), config.max_gram_dim)
        grams_in, label = True, report.method  # grams_in: for the info below
    else:
        if calibration is not None:
            if grams_in or (kronecker and (grams_out or row_weights)):
                raise ValueError("Pass calibration= or grams_in=/grams_out=, not both (calibration collects the "
                                 "Grams).")
            if not isinstance(calibration, CalibrationGrams):
                _log_statistics_memory(targets, kronecker, config.max_gram_dim)
            grams_in, collected_out, tokens = calibration_statistics(
                model, targets, calibration, kronecker=kronecker, max_gram_dim=config.max_gram_dim,
                name=spelled.get("weighting", "weighting"), progress=progress)
            grams_out = collected_out if kronecker else grams_out
            info["calibration_tokens"] = tokens
            log_tokens_per_dimension(tokens, shapes_of(targets), config.max_gram_dim)
        sides = weighting_sides(targets, row_weights, col_weights, grams_in, grams_out, config.damping,
                                exponent=config.fisher_exponent, eps=config.fisher_eps,
                                tokens=info.get("calibration_tokens"))
        if state is None:  # a useless Fisher state is named by fisher_sides and gives plain SVD, as documented there
            check_empty_sides(sides, grams_in is not None, grams_out is not None, calibration is not None)
        normalization = config.loss_normalization
        if normalization == "auto":
            normalization = "none" if (grams_out or row_weights) else "relative"
        if allocation == "global" and normalization == "none" and not (grams_out or row_weights):
            logger.warning(
                "allocation='global' with loss_normalization='none' and no output-side weighting compares raw output "
                "errors across modules, which are not on the scale of the model's loss (measured worse than uniform "
                "with whitening). Use loss_normalization='relative', allocation='uniform', or weighting='kronecker'."
            )
        plan = plan_modules(targets, sides, config, allocation, normalization, progress)
        if allocation != "global":
            warn_small_int_rank(config.rank, targets, plan)
        weighted = any(side.weighted for side in sides.values())
        label = ("kronecker" if grams_out else "whitened") if (grams_in or grams_out) else (
            "fwsvd" if weighted else "svd")
        report = CompressionReport(method=report_method or label)
        swap_modules(model, factorize_plan(targets, plan, sides, report, allocation, config, progress))
        if allocation == "global":
            info["loss_normalization"] = normalization
    info.update({"allocation": allocation, "weighting": label})
    _record_sides(report, sides, info, gram_settings=bool(grams_in or grams_out), damping=config.damping)
    mark(model, report, checkpoint_extra)
    return report


def _is_lora_peft_model(model: nn.Module) -> bool:
    """A ``PeftModel`` (or peft tuner) carrying LoRA layers; the transformers model inside it is not one, so the LoRA
    route's own call on it takes the plain path."""
    return isinstance(model, (PeftModel, BaseTuner)) and any(isinstance(m, LoraLayer) for m in model.modules())


def build_config(config_or_keep, overrides: Mapping, *, caller: str = "compress_model"
                 ) -> tuple[CompressionConfig, dict[str, str]]:
    """``(config, spelled)`` from ``compress_model``'s second argument and keyword overrides; ``spelled`` maps a
    field to the deprecated argument name it was given by (so that errors name what the caller wrote)."""
    overrides = dict(overrides)
    spelled: dict[str, str] = {}
    if "ranks" in overrides:
        if config_or_keep is not None:
            raise TypeError(f"{caller}() got the keep / rank twice: as the second argument and as ranks=.")
        _deprecated(caller, "ranks", "the second argument (config_or_keep)")
        config_or_keep = overrides.pop("ranks")
    for old, new in DEPRECATED_NAMES.items():
        if old not in overrides:
            continue
        value = overrides.pop(old)
        _deprecated(caller, old, f"{new}=")
        if value is None:
            continue
        if old in _OLD_CHOICES and value not in _OLD_CHOICES[old]:
            raise ValueError(f"{old} must be one of {_OLD_CHOICES[old]}, got {value!r}.")
        if new in overrides and overrides[new] not in (None, "auto", value):
            raise ValueError(f"{spelled.get(new, new)}={overrides[new]!r} and {old}={value!r} disagree; pass {new}= once.")
        overrides[new], spelled[new] = value, old
    dtype = overrides.get("dtype")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"dtype must be a torch.dtype such as torch.float16, got {dtype!r} (a CompressionConfig takes its name, "
            "dtype='float16')."
        )
    known = {f.name for f in dataclasses.fields(CompressionConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; CompressionConfig fields are "
                        f"{sorted(known)}.")
    if isinstance(config_or_keep, CompressionConfig):
        return (dataclasses.replace(config_or_keep, **overrides) if overrides else config_or_keep), spelled
    value = config_or_keep
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        target = {"rank": int(value)}
    elif isinstance(value, float):
        target = {"keep": value}
    elif isinstance(value, Mapping):
        if not value:
            raise ValueError("An empty rank map compresses nothing; name at least one module.")
        target = {"rank_pattern": dict(value)}
    elif value is None:
        target = {}
    else:
        raise ValueError(f"{caller}'s second argument is a CompressionConfig, a float keep fraction, an int rank or a "
                         f"rank-pattern dict, got {value!r}.")
    clash = [k for k in target if overrides.get(k)]
    if clash:
        raise ValueError(f"Pass the {clash[0]} once: as the second argument or as {clash[0]}=, not both.")
    return CompressionConfig(**{**overrides, **target}), spelled


def _deprecated(caller: str, old: str, new: str) -> None:
    warnings.warn(f"{caller}({old}=...) is deprecated and will be removed in the next release: use {new}.",
                  DeprecationWarning, stacklevel=5)  # past build_config, compress_model and torch's no_grad wrapper


def _resolve_weighting(model, config: CompressionConfig, state, calibration, explicit: bool, name: str) -> str | None:
    """The weighting ``"auto"`` means for the data given (``None``: explicit sides or plain SVD); a weighting the
    data cannot give is refused."""
    weighting = config.weighting
    if state is not None:
        if weighting == "whitened":
            raise ValueError(f"{name}='whitened' weighs by calibration input Grams; with fisher= use 'kronecker', "
                             "'two_sided' or 'row' (or leave it 'auto').")
        return state.default_weighting() if weighting == "auto" else weighting
    if weighting in ("two_sided", "row"):
        raise ValueError(f"{name}={weighting!r} (the diagonal Fisher) needs fisher= (a FisherState, collector or "
                         "fisher_state.safetensors); with calibration= use 'whitened' or 'kronecker'.")
    if calibration is not None:
        if weighting == "auto":
            return "kronecker" if (is_causal_lm(model) and not config.sequential) else "whitened"
        return weighting
    if weighting != "auto" and not explicit:
        raise ValueError(f"{name}={weighting!r} needs data to weigh by: calibration= batches (or CalibrationGrams) "
                         "or fisher=. Without data the factorization is plain SVD (leave it 'auto').")
    return None


def _log_statistics_memory(targets, kronecker: bool, max_gram_dim: int | None) -> None:
    """The memory the calibration statistics about to be collected will hold (not logged for statistics passed in:
    those are already held)."""
    shapes = shapes_of(targets)
    grams = gram_memory_bytes(shapes, outputs=kronecker, max_dim=max_gram_dim)
    estimate = statistics_memory_bytes(shapes, outputs=kronecker, max_dim=max_gram_dim)
    logger.warning("calibration: %s Grams of %d modules, %.1f MB of float32 Grams; with their float64 factors at most "
                   "%.1f MB besides the model (max_gram_dim= keeps wide sides diagonal).",
                   "input and output-gradient" if kronecker else "input", len(targets), grams / 2**20,
                   estimate / 2**20)


def _record_sides(report: CompressionReport, sides, info: dict, *, gram_settings: bool, damping: float) -> None:
    """Name in ``report`` (and a warning) the sides no data reached and the Grams that needed the eigh fallback."""
    fallbacks = sorted({n for n, side in sides.items() if side.fallback})
    unweighted = {n: list(side.empty) for n, side in sides.items() if side.empty}
    if unweighted:
        for row in report.modules:
            if row.name in unweighted:
                row.unweighted_sides = unweighted[row.name]
        info["unweighted_sides"] = unweighted
        logger.warning(
            "No calibration data reached %d of %d target module(s) on some side, so those sides fell back to plain "
            "(unweighted) SVD: %s. The report lists them (report.info['unweighted_sides']). Calibrate with batches "
            "that reach every target (e.g. images for a vision tower), or restrict target_modules.",
            len(unweighted), len(sides), ", ".join(f"{n} ({'/'.join(v)})" for n, v in list(unweighted.items())[:6]),
        )
    if fallbacks:
        logger.warning("Gram factorization fell back to the eigendecomposition for %d module(s): %s", len(fallbacks),
                       ", ".join(fallbacks[:8]))
    if gram_settings:
        info.update({"damping": damping, "gram_fallbacks": fallbacks})
    report.info = {**info, **report.info}
