"""The stages of every compression, in order: targets -> weight source -> weighting sides -> plan or allocate ->
factorize -> swap (all or nothing) -> mark.

:func:`hf_lowrank.compress_model` runs them on a plain model; ``compress_peft_model`` (a LoRA model) and the trainer's
compress-on-save go through ``compress_model`` after swapping each adapted layer for a Linear holding its effective
weight (the LoRA weight source). Each stage is one function here, so that each job has one place: the factor layer
of one module is built by :func:`factorize` only, the ranks by :func:`plan_modules` only, modules are replaced by
:func:`swap_modules` only and the checkpoint record is written by :func:`mark` only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.grams import CalibrationGrams, calibration_grams
from ..fisher.state import DEFAULT_EPS, DEFAULT_EXPONENT
from ..modules import LowRankLinear, dense_weight, is_conv1d, set_submodule
from ..ops.fisher import (
    fisher_weights,
    gram_factor,
    gram_shrinkage,
    weighted_lowrank,
    weighted_relative_error,
    weighted_spectrum,
)
from ..ops.rank_allocation import global_ranks
from ..ops.svd import factorized_params, relative_error
from ..quantized_modules import quantize_lowrank
from ..targets import find_linears, find_target_linears, pattern_key
from .checkpoint import mark_compressed
from .config import CompressionConfig
from .ranks import check_pattern_keys, plan_ranks
from .report import CompressionReport, ModuleReport, stored_bytes

logger = logging.getLogger("hf_lowrank.compression.compress")

__all__ = [
    "Side",
    "calibration_statistics",
    "factorize",
    "factorize_linear",
    "factorize_plan",
    "mark",
    "plan_modules",
    "restore_modules",
    "select_targets",
    "shapes_of",
    "swap_modules",
    "weighting_sides",
]


def shapes_of(targets: Mapping[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of the target Linears."""
    return {n: (m.out_features, m.in_features) for n, m in targets.items()}


def calibration_statistics(model, targets, calibration, *, kronecker: bool, max_gram_dim: int | None,
                           name: str = "weighting", progress: bool = True):
    """``(input Grams, output-gradient Grams or None, tokens)`` of ``targets``, collected from calibration batches on
    ``model`` or taken from :class:`~hf_lowrank.calibration.grams.CalibrationGrams` (refused when ``kronecker`` needs output
    Grams they lack; ``name`` is the argument the caller's user spelled)."""
    if isinstance(calibration, CalibrationGrams):
        if kronecker and calibration.outputs is None:
            raise ValueError(
                "These CalibrationGrams hold input Grams only (collected with outputs=False), but "
                f"{name}='kronecker' needs the output-gradient Grams too: collect them with "
                f"calibration_grams(..., outputs=True), or pass {name}='whitened'."
            )
        return calibration.inputs, (calibration.outputs if kronecker else None), int(calibration.tokens)
    collected = calibration_grams(model, targets, calibration, outputs=kronecker, max_dim=max_gram_dim,
                                  progress=progress)
    return collected[0], (collected[1] if kronecker else None), collected[-1]


# ------------------------------------------------------------------------------------------------------- targets
def select_targets(model: nn.Module, config: CompressionConfig, state=None) -> dict[str, nn.Module]:
    """``{name: Linear}`` to compress: ``config.target_modules``; without it, a Fisher state's modules (when the config
    sets a rank or keep), the Linear layers a ``rank_pattern`` alone matches, or every Linear in the blocks."""
    targets = config.target_modules
    if targets is None and state is not None and (config.rank is not None or config.keep is not None):
        names = dict(model.named_modules())
        missing = [n for n in state.modules if n not in names]
        if missing:
            raise ValueError(
                f"The Fisher state names {len(missing)} module(s) this model does not have (e.g. '{missing[0]}'): "
                "it was collected on another model. Collect it on this model, or pass target_modules."
            )
        if not state.modules:
            raise ValueError("No target modules matched: the Fisher state is empty of modules.")
        targets = state.modules
    if targets is None and config.rank is None and config.keep is None and config.rank_pattern:
        linears = find_linears(model)
        check_pattern_keys(config.rank_pattern, linears, "rank_pattern")
        return {n: m for n, m in linears.items() if pattern_key(config.rank_pattern, n) is not None}
    return find_target_linears(model, targets)


# ------------------------------------------------------------------------------------------------ weighting sides
@dataclass
class Side:
    """The weighting of one module: its output and input factors (``None``: unweighted on that side)."""

    out_factor: torch.Tensor | None = None
    in_factor: torch.Tensor | None = None
    scale: float = 1.0
    fallback: bool = False
    #: the sides ("input", "output") whose Gram was given but is all zero: no data reached them, so they are unweighted
    empty: tuple[str, ...] = ()

    @property
    def weighted(self) -> bool:
        return self.out_factor is not None or self.in_factor is not None


def weighting_sides(targets, row_weights, col_weights, grams_in, grams_out, damping, *, exponent=DEFAULT_EXPONENT,
                    eps=DEFAULT_EPS, tokens=None):
    """``{name: Side}``: each side's factor from a diagonal Fisher or a Gram (a shared Gram is factorized once).

    ``exponent`` and ``eps`` shape the diagonal Fisher weights (:func:`~hf_lowrank.ops.fisher.fisher_weights`); Grams
    do not use them.

    With ``tokens`` (the calibration tokens the Grams were summed over), each full Gram is shrunk toward its diagonal
    by :func:`~hf_lowrank.ops.fisher.gram_shrinkage`."""
    for label, weights in (("row_weights", row_weights), ("col_weights", col_weights), ("grams_in", grams_in),
                           ("grams_out", grams_out)):
        unknown = [n for n in (weights or {}) if n not in targets]
        if unknown:
            raise ValueError(
                f"{label} has entries for {len(unknown)} module(s) that are not compression targets (e.g. "
                f"'{unknown[0]}'): they were collected on another model or other target modules. Use the full module "
                "names of the targets."
            )
    factors: dict[int, object] = {}

    def factor(G, name):
        if id(G) not in factors:
            shrinkage = gram_shrinkage(G.shape[0], tokens) if tokens is not None and G.ndim == 2 else 0.0
            factors[id(G)] = gram_factor(G, damping=damping, shrinkage=shrinkage, name=name)
        return factors[id(G)]

    sides = {}
    for name, module in targets.items():
        side = Side()
        for which, diag, grams, size in (("out", row_weights, grams_out, module.out_features),
                                         ("in", col_weights, grams_in, module.in_features)):
            d = _lookup(diag, name, (size,), "row_weights" if which == "out" else "col_weights")
            G = grams.get(name) if grams else None
            if grams is not None and G is None and d is None:  # Grams collected, none for this module: no data
                side.empty += ("output" if which == "out" else "input",)
            if d is not None and G is not None:
                raise ValueError(
                    f"Module '{name}' has both a diagonal Fisher and a Gram on its {which}put side; pass one of them."
                )
            if d is not None:
                setattr(side, f"{which}_factor", fisher_weights(d.float(), exponent=exponent, eps=eps))
            elif G is not None:
                if tuple(G.shape) not in ((size, size), (size,)):
                    raise ValueError(
                        f"The {which}put Gram of '{name}' has shape {tuple(G.shape)} but the module needs ({size}, "
                        f"{size}) (or its diagonal): it was collected on a model of another shape."
                    )
                f = factor(G, name)
                if f.fallback == "zero":  # no data reached this side: it stays unweighted, and the report says so
                    side.empty += ("output" if which == "out" else "input",)
                    continue
                setattr(side, f"{which}_factor", f.L)
                side.scale *= f.scale
                side.fallback = side.fallback or f.fallback == "eigh"
        sides[name] = side
    return sides


def _lookup(weights: Mapping[str, torch.Tensor] | None, name: str, shape: tuple[int], what: str):
    if not weights or name not in weights:
        return None
    w = weights[name]
    if tuple(w.shape) != shape:
        raise ValueError(
            f"{what}['{name}'] has shape {tuple(w.shape)} but the module needs {shape}: the Fisher was collected on "
            "a model of another shape. Collect it again on this model."
        )
    return w


# ------------------------------------------------------------------------------------------------ plan or allocate
def plan_modules(targets, sides, config: CompressionConfig, allocation: str, loss_normalization: str,
                 progress: bool = False) -> dict[str, int | None]:
    """The rank of every target (``None``: kept dense), the one place ranks are decided.

    ``allocation="global"`` spends ``config.keep`` of all targets' parameters on the singular values of the weighted
    spectra with the most loss per parameter (:func:`~hf_lowrank.ops.rank_allocation.global_ranks`); ``"uniform"``
    plans each module from ``config.rank`` / ``keep`` / ``rank_pattern`` (:func:`~.ranks.plan_ranks`)."""
    shapes = shapes_of(targets)
    if allocation != "global":
        return plan_ranks(shapes, rank=config.rank, keep=config.keep, rank_pattern=config.rank_pattern,
                          multiple=config.rank_multiple, what="rank_pattern")
    spectra = {}
    for name in tqdm(list(targets), desc="spectra (global allocation)", disable=not progress, unit="module"):
        side = sides[name]
        S = weighted_spectrum(dense_weight(targets[name]), out_factor=side.out_factor, in_factor=side.in_factor,
                              name=name)
        spectra[name] = S * math.sqrt(side.scale)  # back on the raw scale of the Grams: comparable across modules
    return global_ranks(spectra, shapes, config.keep, normalize=loss_normalization,
                        multiple=config.rank_multiple).ranks


# ------------------------------------------------------------------------------------------------------- factorize
def factorize(module: nn.Module, rank: int, side: Side, config: CompressionConfig, *, name: str | None = None
              ) -> tuple[LowRankLinear, float, float]:
    """The factor layer of one module: ``(LowRankLinear, relative error, weighted relative error)``.

    The one place a factor layer is built. The dense weight (dequantized for bitsandbytes layers) is read once; the
    factors are the weighted rank-``rank`` minimiser (:func:`hf_lowrank.ops.fisher.weighted_lowrank`) under the
    side's factors; the new layer has the module's bias, device and ``config.dtype`` (default: the weight's floating
    dtype, float32 for a quantized weight).
    """
    W = dense_weight(module)
    out_dtype = config.torch_dtype or (W.dtype if W.is_floating_point() and W.dtype != torch.uint8 else torch.float32)
    down, up = weighted_lowrank(W, rank, out_factor=side.out_factor, in_factor=side.in_factor,
                                method=config.svd_method, name=name)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    new = LowRankLinear.from_factors(down.to(out_dtype), up.to(out_dtype), bias, dtype=out_dtype).to(W.device)
    new.conv1d = is_conv1d(module)
    if config.factor_bits is not None:  # codes fitted to the same weighted target (the refit needs W and L_in)
        new = quantize_lowrank(new, config.factor_bits, group_size=config.group_size, W=W, in_factor=side.in_factor)
    W_hat = new.up.weight.float() @ new.down.weight.float()
    err = relative_error(W.float(), W_hat)
    werr = weighted_relative_error(W.float(), W_hat, side.out_factor, side.in_factor)
    return new, err, werr


def factorize_linear(module: nn.Module, rank: int, out_factor: torch.Tensor | None = None,
                     in_factor: torch.Tensor | None = None, *, method: str = "auto", dtype: torch.dtype | None = None,
                     name: str | None = None) -> tuple[LowRankLinear, float, float]:
    """:func:`factorize` with the side's factors and the SVD method / dtype given one by one."""
    return factorize(module, rank, Side(out_factor, in_factor), CompressionConfig(svd_method=method, dtype=dtype),
                     name=name)


def factorize_plan(targets, plan, sides, report: CompressionReport, allocation: str, config: CompressionConfig,
                   progress: bool) -> dict[str, LowRankLinear]:
    """Factor layers of every planned module (none swapped in yet); the per-module rows go into ``report``."""
    replacements: dict[str, LowRankLinear] = {}
    for name in tqdm(list(plan), desc=f"compress ({report.method})", disable=not progress, unit="module"):
        module, rank = targets[name], plan[name]
        out_f, in_f = module.out_features, module.in_features
        bias = 0 if getattr(module, "bias", None) is None else out_f
        before = out_f * in_f + bias
        if rank is None:
            reason = "kept dense by the global allocation" if allocation == "global" else "rank saves no parameters"
            size = stored_bytes(module)
            report.modules.append(ModuleReport(name, (out_f, in_f), None, before, before, skipped=reason,
                                               bytes_before=size, bytes_after=size))
            continue
        side = sides[name]
        new, err, werr = factorize(module, rank, side, config, name=name)
        new.train(module.training)
        replacements[name] = new
        report.modules.append(
            ModuleReport(name, (out_f, in_f), rank, before, factorized_params(out_f, in_f, rank) + bias, err,
                         werr if side.weighted else None)
        )
        report.modules[-1].bytes_before, report.modules[-1].bytes_after = stored_bytes(module), stored_bytes(new)
    kept = [m for m in report.modules if m.skipped is not None and m.bytes_before]
    if config.factor_bits is not None and kept:
        share = sum(m.bytes_after for m in kept) / max(sum(m.bytes_after or 0 for m in report.modules), 1)
        logger.warning(
            "factor_bits=%d: %d module(s) stay dense in their own dtype (not quantized; e.g. '%s'), %.0f%% of the "
            "targets' bytes after compression (report.bytes_after). For a budget in bytes use allocation='uniform', "
            "which factorizes every module.", config.factor_bits, len(kept), kept[0].name, 100 * share)
    return replacements


# ------------------------------------------------------------------------------------------------------------ swap
def swap_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Put every ``replacements[name]`` in place of module ``name``; returns the modules replaced. All or nothing:
    on a failure the ones already swapped are put back before the error propagates."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            originals[name] = model.get_submodule(name)
            set_submodule(model, name, new)
    except BaseException:
        restore_modules(model, originals)
        raise
    return originals


def restore_modules(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    """Undo :func:`swap_modules` (the modules it returned go back in place)."""
    for name, module in originals.items():
        set_submodule(model, name, module)


# ------------------------------------------------------------------------------------------------------------ mark
def mark(model: nn.Module, report: CompressionReport, checkpoint_extra: Mapping | None = None) -> None:
    """Record the factorized modules in the model's config, so that ``save_pretrained`` writes a factorized
    checkpoint that ``from_pretrained`` rebuilds (:func:`~.checkpoint.mark_compressed`); a plain ``nn.Module`` is
    left alone."""
    mark_compressed(model, report.ranks, method=report.method, extra=dict(checkpoint_extra or {}) or None)
