"""Replace Linear layers of a model by ``LowRankLinear`` factor pairs and report what that cost."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import unwrap_wrappers
from ..fisher_state import DEFAULT_EPS, DEFAULT_EXPONENT, resolve_fisher
from ..modules import LowRankLinear, dense_weight, is_conv1d, set_submodule
from ..ops.fisher import (
    DEFAULT_DAMPING,
    fisher_weights,
    gram_factor,
    gram_shrinkage,
    weighted_lowrank,
    weighted_relative_error,
    weighted_spectrum,
)
from ..ops.rank_allocation import global_ranks
from ..ops.svd import RANK_MULTIPLE, factorized_params, relative_error
from ..statistics import (
    GRAM_IN,
    BlockStream,
    CalibrationGrams,
    GramHooks,
    calibration_grams,
    check_model_ready,
    gram_memory_bytes,
    is_causal_lm,
    reduce_grams,
    split_into_blocks,
)
from ..targets import find_linears, find_target_linears, pattern_key
from .checkpoint import mark_compressed
from .fisher_sides import fisher_sides
from .guards import check_empty_sides, eligibility, log_tokens_per_dimension, warn_small_int_rank
from .ranks import check_pattern_keys, resolve_ranks
from .report import CompressionReport, ModuleReport

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOCATIONS",
    "CompressionReport",
    "ModuleReport",
    "compress_model",
    "factorize_linear",
    "find_target_linears",
    "resolve_ranks",
    "set_submodule",
]

RankSpec = int | float | Mapping[str, int | float]


ALLOCATIONS = ("uniform", "global")
CALIBRATION_WEIGHTINGS = ("whitened", "kronecker")


@torch.no_grad()
def compress_model(
    model: nn.Module,
    ranks: RankSpec,
    *,
    rank_pattern: Mapping[str, int | float] | None = None,
    row_weights: Mapping[str, torch.Tensor] | None = None,
    col_weights: Mapping[str, torch.Tensor] | None = None,
    grams_in: Mapping[str, torch.Tensor] | None = None,
    grams_out: Mapping[str, torch.Tensor] | None = None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    calibration_weighting: str | None = None,
    fisher=None,
    fisher_weighting: str | None = None,
    allocation: str | None = None,
    loss_normalization: str | None = None,
    damping: float = DEFAULT_DAMPING,
    max_gram_dim: int | None = None,
    sequential: bool = False,
    rank_multiple: int = RANK_MULTIPLE,
    target_modules: str | Sequence[str] | None = None,
    method: str = "auto",
    exponent: float = DEFAULT_EXPONENT,
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype | None = None,
    report_method: str | None = None,
    checkpoint_extra: Mapping | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Replace target Linear layers of ``model`` in place by ``LowRankLinear`` factor pairs, all or nothing.

    Each module is factorized by the one weighted low-rank path (:func:`hf_lowrank.ops.fisher.weighted_lowrank`):
    the rank-``k`` minimiser of ``||L_out^T (W - W_hat) L_in||_F``, where each side is the identity (plain SVD), a
    diagonal from accumulated Fisher (``row_weights`` / ``col_weights``: FWSVD, METHODS.md section 1) or the
    Cholesky factor of a Gram (``grams_in`` / ``grams_out`` or ``calibration``: whitening and the Kronecker-factored
    Fisher, section 5). A module whose rank would not save parameters (``rank >= out*in/(out+in)``) is left dense
    and listed as skipped. Every factor pair is computed before any module is replaced: a failure (an
    :class:`~hf_lowrank.ops.svd.SVDError`, a bad Gram) leaves the model untouched. A transformers model is then
    marked so that ``save_pretrained`` writes a factorized checkpoint that ``from_pretrained`` rebuilds.

    Args:
        model: the model to compress (modified in place). A DDP / ``torch.compile`` wrapper is unwrapped and the model
            under it compressed (a DDP wrapper does not follow the replaced parameters: wrap the result again to
            train it).
        ranks: ``int`` rank, ``float`` fraction of parameters kept (per module with ``allocation="uniform"``, over
            all targets together with ``"global"``), or a ``rank_pattern`` mapping alone (its keys then choose the
            targets among all Linear layers).
        rank_pattern: ``{key: rank or keep}`` overriding ``ranks`` per module, peft's rule: a key is a regex matched
            against the end of the module name on a dot boundary (a full name or a suffix such as ``"up_proj"``),
            the first matching key wins, a key matching no target is refused (:func:`~.ranks.plan_ranks`).
        row_weights: optional ``{name: (out,) importance}`` (Fisher row sums).
        col_weights: optional ``{name: (in,) importance}`` (Fisher column sums).
        grams_in: optional ``{name: (in, in) or (in,)}`` Grams of the module's inputs ``sum x x^T``.
        grams_out: optional ``{name: (out, out) or (out,)}`` Grams of the gradients at the module's outputs.
        calibration: optional iterable of batches (dicts with ``input_ids``, optionally ``attention_mask``; a
            ``DataLoader`` works): the Grams are collected from them first, as ``calibration_weighting`` says.
            Under ``torch.distributed``, each process passes its own shard (it may be empty) and every process calls
            ``compress_model``; the Grams are all-reduced, so every process compresses with the Grams of all the
            batches and ends with the same factors (see :func:`~hf_lowrank.statistics.calibration_grams`). A
            :class:`~hf_lowrank.statistics.CalibrationGrams` passes statistics collected earlier instead of batches.
            Each full Gram is shrunk toward its diagonal by ``d / (d + tokens)``
            (:func:`~hf_lowrank.ops.fisher.gram_shrinkage`); fewer than 2 tokens per dimension of the widest Gram
            warns. A side no data reached is factorized unweighted and named in ``report.info['unweighted_sides']``
            and a warning; when no data reached any module, the call is refused.
        calibration_weighting: ``"whitened"`` (input Grams, forward passes only: SVD-LLM whitening) or
            ``"kronecker"`` (input Grams and the Grams of the loss gradients at each module's output: a forward and
            a backward pass per batch with the weights frozen, no update; the loss is the batch's ``labels`` or, for
            a causal language model, next-token prediction on ``input_ids``). Default (measured best,
            ``benchmarks/compression_quality.py``): ``"kronecker"`` for a causal language model, else (and with
            ``sequential=True``) ``"whitened"``.
        fisher: optional Fisher collected during training (FWSVD, METHODS.md sections 1 and 5): a
            :class:`~hf_lowrank.fisher_state.FisherState`, a ``FisherCollector`` or ``FisherCollectorCallback``, or
            the path of a ``fisher_state.safetensors`` (or of the checkpoint folder holding it). Its module names
            must be the model's (they are for a state from a ``PeftModel`` of the same base, applied to the base, to
            the merged model or to a full fine-tune). Without ``target_modules`` (and a float or int ``ranks``) the
            targets are the state's modules. Replaces ``row_weights``/``col_weights``/``grams_*``/``calibration``.
        fisher_weighting: with ``fisher``: ``"kronecker"`` (the state's input and output-gradient Grams),
            ``"two_sided"`` or ``"row"`` (its diagonal row / column Fisher). Default: ``"kronecker"`` when the state
            holds Grams for every module it has, else :data:`~hf_lowrank.fisher_state.DEFAULT_WEIGHTING`.
        allocation: ``"uniform"`` (the same fraction in every module) or ``"global"`` (per-module ranks minimising
            the summed weighted truncation loss under the total parameter budget,
            :func:`hf_lowrank.ops.rank_allocation.global_ranks`; needs a float ``ranks``). Default: ``"global"``
            for a float ``ranks`` weighted by output-gradient Grams (Kronecker: their losses are on the scale of the
            model's loss, so they compare across modules), else ``"uniform"`` (whitened or plain losses do not
            compare across modules: global allocation of them measured worse than uniform).
        loss_normalization: with ``"global"``: ``"none"`` (raw weighted losses) or ``"relative"`` (per module).
            Default: ``"none"`` when the output side is weighted (output-gradient Grams or row Fisher: losses on the
            scale of the model's loss), else ``"relative"`` (measured, whitening at 80% of SmolLM2's MLPs: 74.5
            relative vs 296.5 raw; Kronecker: 27.0 raw vs 42.0 relative).
        damping: Gram damping ``lambda`` (``G / mean(diag G) + lambda I``).
        max_gram_dim: calibration Grams of sides wider than this keep their diagonal only.
        sequential: with ``calibration``: compress block by block, each block's input Grams measured on the outputs
            of the already-compressed blocks before it (one block's Grams in memory at a time; all-reduced block by
            block under ``torch.distributed``). Uniform ranks (or a rank map) only.
        rank_multiple: ranks chosen from a float keep (uniform or global) are multiples of this (default 8: factor
            pairs of aligned inner dimension run at their FLOP ratio, odd ones up to 25% slower; 1 turns it off).
            Explicit ranks are used as given.
        target_modules: see :func:`find_target_linears`; with a rank-pattern dict as ``ranks`` and no
            target_modules, the Linear layers its keys match are the targets.
        method: SVD method, ``"auto"``, ``"exact"`` or ``"randomized"``.
        exponent, eps: Fisher weighting, ``D = diag((fisher / mean + eps) ** exponent)``.
        dtype: dtype of the factors (default: the replaced weight's dtype). It may differ from the rest of the
            model: ``LowRankLinear.forward`` casts its input to the factor dtype and its output back.
        report_method: label recorded in the report and the checkpoint (default ``"svd"``, ``"fwsvd"`` or
            ``"whitened"``).
        checkpoint_extra: further facts recorded with the ranks in the checkpoint's quantization config.
        progress: show progress bars.

    Returns:
        A :class:`CompressionReport` (``info`` records the weighting, allocation, calibration tokens and any Gram
        whose factorization needed the eigendecomposition fallback).
    """
    model = unwrap_wrappers(model)
    check_model_ready(model)  # meta weights, torch.inference_mode(): a clear error before any work
    state = None
    if fisher is not None:
        if any(x is not None for x in (row_weights, col_weights, grams_in, grams_out, calibration)) or sequential:
            raise ValueError(
                "Pass fisher= or row_weights=/col_weights=/grams_in=/grams_out=/calibration=/sequential=, not both: "
                "the Fisher state gives each module's weighting."
            )
        state = resolve_fisher(fisher)
        if target_modules is None and not isinstance(ranks, Mapping):
            names = dict(model.named_modules())
            missing = [n for n in state.modules if n not in names]
            if missing:
                raise ValueError(
                    f"The Fisher state names {len(missing)} module(s) this model does not have (e.g. '{missing[0]}'): "
                    "it was collected on another model. Collect it on this model, or pass target_modules."
                )
            if not state.modules:
                raise ValueError("No target modules matched: the Fisher state is empty of modules.")
            target_modules = state.modules
        # resolved once, so that the allocation default below and the factors agree on the weighting
        fisher_weighting = fisher_weighting or state.default_weighting()
    elif fisher_weighting is not None:
        raise ValueError("fisher_weighting= needs fisher= (a FisherState, collector or fisher_state.safetensors).")
    if calibration_weighting is None:
        calibration_weighting = "kronecker" if (is_causal_lm(model) and not sequential) else "whitened"
    if calibration_weighting not in CALIBRATION_WEIGHTINGS:
        raise ValueError(
            f"calibration_weighting must be one of {CALIBRATION_WEIGHTINGS}, got {calibration_weighting!r}."
        )
    kronecker = calibration is not None and calibration_weighting == "kronecker"
    if allocation is None:
        fisher_kronecker = fisher_weighting == "kronecker"
        allocation = "global" if isinstance(ranks, float) and not rank_pattern and (kronecker or fisher_kronecker or bool(grams_out)) \
            else "uniform"
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
    if allocation == "global" and (not isinstance(ranks, float) or rank_pattern):
        raise ValueError(
            f"allocation='global' spreads one parameter budget over all targets: pass ranks as a float keep fraction "
            f"(e.g. 0.8) and no rank_pattern, got {ranks!r}" + (f" and rank_pattern={dict(rank_pattern)!r}." if
                                                                  rank_pattern else ".")
        )
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}.")
    if isinstance(ranks, Mapping) and target_modules is None:
        if not ranks:
            raise ValueError("An empty rank map compresses nothing; name at least one module.")
        linears = find_linears(model)
        check_pattern_keys(ranks, linears, "rank_pattern")
        targets = {n: m for n, m in linears.items() if pattern_key(ranks, n) is not None}
    else:
        targets = find_target_linears(model, target_modules)
    info: dict = eligibility(model, targets)
    if state is not None:
        row_weights, col_weights, grams_in, grams_out, non_finite = fisher_sides(state, targets, fisher_weighting)
        if non_finite:
            info["non_finite_fisher"] = non_finite
        report_method = report_method or ("fwsvd" if state.source == "full" else "fisher_lora")
        info.update({"fisher_weighting": fisher_weighting, "fisher_exponent": exponent, "fisher_eps": eps,
                     **state.summary()})
    if sequential:
        if calibration is None or isinstance(calibration, CalibrationGrams) or grams_in or allocation == "global" \
                or kronecker:
            raise ValueError(
                "sequential=True measures each block's input Grams on the outputs of the already-compressed blocks "
                "before it: it needs calibration= (not grams_in=), calibration_weighting='whitened' (the output "
                "gradients need the whole model) and allocation='uniform' (or a rank map)."
            )
        plan = resolve_ranks(targets, ranks, rank_pattern=rank_pattern, multiple=rank_multiple)
        warn_small_int_rank(ranks, targets, plan)
        report = CompressionReport(method=report_method or "whitened")
        sides, tokens = _compress_sequential(model, targets, plan, calibration, report, row_weights, col_weights,
                                             grams_out, exponent, eps, damping, max_gram_dim, method, dtype, progress)
        info.update({"calibration_tokens": tokens, "sequential": True})
        log_tokens_per_dimension(tokens, _shapes(targets), max_gram_dim)
        grams_in = True  # for the labels below
        default_label = report.method
    else:
        if calibration is not None:
            if grams_in or (kronecker and (grams_out or row_weights)):
                raise ValueError("Pass calibration= or grams_in=/grams_out=, not both (calibration collects the "
                                 "Grams).")
            if isinstance(calibration, CalibrationGrams):
                if kronecker and calibration.outputs is None:
                    raise ValueError(
                        "These CalibrationGrams hold input Grams only (collected with outputs=False), but "
                        "calibration_weighting='kronecker' needs the output-gradient Grams too: collect them with "
                        "calibration_grams(..., outputs=True), or pass calibration_weighting='whitened'."
                    )
                collected = (calibration.inputs, calibration.outputs, int(calibration.tokens))
            else:  # the memory estimate is that of collecting: statistics passed in are already held
                estimate = gram_memory_bytes(_shapes(targets), outputs=kronecker, max_dim=max_gram_dim)
                logger.warning("calibration: %s Grams of %d modules, at most %.1f MB (float32, before sharing).",
                               "input and output-gradient" if kronecker else "input", len(targets), estimate / 2**20)
                collected = calibration_grams(model, targets, calibration, outputs=kronecker, max_dim=max_gram_dim,
                                              progress=progress)
            grams_in, tokens = collected[0], collected[-1]
            if kronecker:
                grams_out = collected[1]
            info["calibration_tokens"] = tokens
            log_tokens_per_dimension(tokens, _shapes(targets), max_gram_dim)
        tokens = info.get("calibration_tokens")
        sides = _weighting_sides(targets, row_weights, col_weights, grams_in, grams_out, exponent, eps, damping,
                                 tokens=tokens)
        if state is None:  # a useless Fisher state is named by fisher_sides and gives plain SVD, as documented there
            check_empty_sides(sides, grams_in is not None, grams_out is not None, calibration is not None)
        if loss_normalization is None:
            loss_normalization = "none" if (grams_out or row_weights) else "relative"
        if allocation == "global":
            if loss_normalization == "none" and not (grams_out or row_weights):
                logger.warning(
                    "allocation='global' with loss_normalization='none' and no output-side weighting compares raw "
                    "output errors across modules, which are not on the scale of the model's loss (whitening at 80%% "
                    "of SmolLM2's MLPs: perplexity 296.5 vs 57.3 uniform). Use loss_normalization='relative', "
                    "allocation='uniform', or calibration_weighting='kronecker'."
                )
            plan = _global_plan(targets, sides, float(ranks), loss_normalization, rank_multiple, progress)
        else:
            plan = resolve_ranks(targets, ranks, rank_pattern=rank_pattern, multiple=rank_multiple)
            warn_small_int_rank(ranks, targets, plan)
        weighted = any(side.weighted for side in sides.values())
        default_label = ("kronecker" if grams_out else "whitened") if (grams_in or grams_out) else (
            "fwsvd" if weighted else "svd")
        report = CompressionReport(method=report_method or default_label)
        replacements = _factorize_plan(targets, plan, sides, report, allocation, method, dtype, progress)
        for name, new in replacements.items():  # all factors exist: swap them in
            set_submodule(model, name, new)
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
    info.update({"allocation": allocation, "weighting": default_label})
    if grams_in or grams_out:
        info.update({"damping": damping, "gram_fallbacks": fallbacks})
    if allocation == "global":
        info["loss_normalization"] = loss_normalization
    report.info = {**info, **report.info}
    mark_compressed(model, report.ranks, method=report.method, extra=dict(checkpoint_extra or {}) or None)
    return report


def _factorize_plan(targets, plan, sides, report, allocation, method, dtype, progress) -> dict[str, LowRankLinear]:
    """Factor pairs of every planned module (none swapped in yet); the per-module rows go into ``report``."""
    replacements: dict[str, LowRankLinear] = {}
    for name in tqdm(list(plan), desc=f"compress ({report.method})", disable=not progress, unit="module"):
        module, rank = targets[name], plan[name]
        out_f, in_f = module.out_features, module.in_features
        bias = 0 if getattr(module, "bias", None) is None else out_f
        before = out_f * in_f + bias
        if rank is None:
            reason = "kept dense by the global allocation" if allocation == "global" else "rank saves no parameters"
            report.modules.append(ModuleReport(name, (out_f, in_f), None, before, before, skipped=reason))
            continue
        side = sides[name]
        new, err, werr = factorize_linear(module, rank, side.out_factor, side.in_factor, method=method, dtype=dtype,
                                          name=name)
        new.train(module.training)
        replacements[name] = new
        report.modules.append(
            ModuleReport(name, (out_f, in_f), rank, before, factorized_params(out_f, in_f, rank) + bias, err,
                         werr if side.weighted else None)
        )
    return replacements


def _compress_sequential(model, targets, plan, calibration, report, row_weights, col_weights, grams_out, exponent,
                         eps, damping, max_gram_dim, method, dtype, progress):
    """Block by block: each block's input Grams are measured on the outputs of the already-compressed blocks before
    it (one block's Grams in memory at a time). On any failure every replaced module is put back."""
    blocks = split_into_blocks(targets)
    parents = {name.rpartition(".")[0] for name in blocks}
    if len(parents) != 1:
        raise ValueError(
            f"sequential calibration needs the targets in ONE list of repeated blocks; they are in {sorted(parents)}. "
            "Restrict target_modules to one stack (e.g. the decoder) or use sequential=False."
        )
    parent_name = parents.pop()
    stack = model.get_submodule(parent_name)
    indices = sorted(int(name.rpartition(".")[2]) for name in blocks)
    stream = BlockStream().capture(model, stack[indices[0]], calibration, progress=progress)
    originals: dict[str, nn.Module] = {}
    sides: dict = {}
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(indices[0], indices[-1] + 1), desc="sequential blocks", disable=not progress,
                          unit="block"):
            block_name = f"{parent_name}.{index}"
            block = stack[index]
            names = blocks.get(block_name, [])
            if names:
                sub = {n: targets[n] for n in names}
                hooks = GramHooks(sub, share=True, max_dim=max_gram_dim).attach()
                error = None
                try:
                    stream.run(block, hooks=hooks)
                except Exception as exc:  # raised by reduce_grams, on every process under torch.distributed
                    error = exc
                finally:
                    hooks.detach()
                param = next(block.parameters(), None)
                store, _ = reduce_grams(hooks.store, device=param.device if param is not None else None, error=error)
                grams = {n: store[n + GRAM_IN] for n in names if n + GRAM_IN in store}
                block_sides = _weighting_sides(
                    sub, _only(row_weights, names), _only(col_weights, names), grams, _only(grams_out, names),
                    exponent, eps, damping, tokens=stream.tokens,
                )
                sides.update(block_sides)
                replacements = _factorize_plan(sub, {n: plan[n] for n in names}, block_sides, report, "uniform",
                                               method, dtype, progress=False)
                for name, new in replacements.items():
                    originals[name] = targets[name]
                    set_submodule(model, name, new)
                del grams, store, block_sides, hooks
            stream.run(block, advance=True)
    except BaseException:
        for name, module in originals.items():  # all or nothing
            set_submodule(model, name, module)
        raise
    finally:
        model.train(was_training)
    return sides, stream.tokens


def _only(weights, names):
    return {n: weights[n] for n in names if n in weights} if weights else None


@dataclass
class _Side:
    out_factor: torch.Tensor | None = None
    in_factor: torch.Tensor | None = None
    scale: float = 1.0
    fallback: bool = False
    #: the sides ("input", "output") whose Gram was given but is all zero: no data reached them, so they are unweighted
    empty: tuple[str, ...] = ()

    @property
    def weighted(self) -> bool:
        return self.out_factor is not None or self.in_factor is not None


def _weighting_sides(targets, row_weights, col_weights, grams_in, grams_out, exponent, eps, damping, tokens=None):
    """``{name: _Side}``: each side's factor from Fisher weights or a Gram (a shared Gram is factorized once).

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
        out_f, in_f = module.out_features, module.in_features
        side = _Side()
        for which, diag, gram, size in (("out", row_weights, grams_out, out_f), ("in", col_weights, grams_in, in_f)):
            d = _lookup(diag, name, (size,), "row_weights" if which == "out" else "col_weights")
            G = gram.get(name) if gram else None
            if gram is not None and G is None and d is None:  # Grams collected, none for this module: no data
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


def _global_plan(targets, sides, keep, normalization, multiple, progress):
    shapes = _shapes(targets)
    spectra = {}
    for name in tqdm(list(targets), desc="spectra (global allocation)", disable=not progress, unit="module"):
        side = sides[name]
        S = weighted_spectrum(dense_weight(targets[name]), out_factor=side.out_factor, in_factor=side.in_factor,
                              name=name)
        spectra[name] = S * math.sqrt(side.scale)  # back on the raw scale of the Grams: comparable across modules
    return global_ranks(spectra, shapes, keep, normalize=normalization, multiple=multiple).ranks


def factorize_linear(
    module: nn.Module,
    rank: int,
    out_factor: torch.Tensor | None = None,
    in_factor: torch.Tensor | None = None,
    *,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> tuple[LowRankLinear, float, float]:
    """One module through the one factorize path: ``(LowRankLinear, relative error, weighted relative error)``.

    The dense weight (dequantized for bitsandbytes layers) is read once; the factors come from
    :func:`hf_lowrank.ops.fisher.weighted_lowrank`; the new layer has the module's bias, device and (unless
    ``dtype``) floating dtype (float32 for a quantized weight).
    """
    W = dense_weight(module)
    out_dtype = dtype or (W.dtype if W.is_floating_point() and W.dtype != torch.uint8 else torch.float32)
    down, up = weighted_lowrank(W, rank, out_factor=out_factor, in_factor=in_factor, method=method, name=name)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    new = LowRankLinear.from_factors(down.to(out_dtype), up.to(out_dtype), bias, dtype=out_dtype).to(W.device)
    new.conv1d = is_conv1d(module)
    W_hat = new.up.weight.float() @ new.down.weight.float()
    err = relative_error(W.float(), W_hat)
    werr = weighted_relative_error(W.float(), W_hat, out_factor, in_factor)
    return new, err, werr


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



def _shapes(targets: Mapping[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of the target Linears."""
    return {n: (m.out_features, m.in_features) for n, m in targets.items()}
