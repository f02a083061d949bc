"""Compression of a (Fisher)LoRA-adapted model with Fisher-weighted SVD, and saving the result.

:func:`compress_peft_model` turns a trained ``PeftModel`` into a plain transformers model whose adapted Linear
layers are ``LowRankLinear`` factor pairs (a factorized checkpoint, see ``hf_lowrank.compression.checkpoint``).
By default it works on a COPY that shares every untouched tensor with the trained model, so the trainer's model (and
its adapter) stays usable and the extra memory is that of the new factors plus one dense weight at a time.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from ...compression.compress import (
    ALLOCATIONS,
    CompressionReport,
    ModuleReport,
    compress_model,
    factorize_linear,
    resolve_ranks,
    set_submodule,
)
from ...io import atomic_directory, atomic_write_json, read_json
from ...modules import dense_weight
from ...ops.fisher import DEFAULT_DAMPING, fisher_weights, gram_factor, weighted_spectrum
from ...ops.rank_allocation import global_ranks
from ...ops.svd import factorized_params, rank_for_keep
from .config import FISHER_FIELDS, FisherLoRAConfig
from .fisher import (
    FISHER_STATE_NAME,
    FisherCollector,
    FisherState,
    FisherStateError,
    lora_linear_modules,
    model_fingerprint,
)

__all__ = [
    "compress_peft_model",
    "shared_weight_copy",
    "compress_with_fisher",
    "export_lora_adapter",
    "plan_ranks",
    "resolve_fisher",
    "save_compressed_model",
]

logger = logging.getLogger(__name__)

_REPORT_METHOD = {"lora": "fisher_lora", "full": "fwsvd", "none": "svd"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_fisher(fisher) -> FisherState | None:
    """Accept a ``FisherState``, a ``FisherCollector``, a ``FisherCollectorCallback``, a file or folder path."""
    if fisher is None or isinstance(fisher, FisherState):
        return fisher
    if isinstance(fisher, FisherCollector):
        return fisher.reduced_state()
    collector = getattr(fisher, "collector", None)
    if isinstance(collector, FisherCollector):
        return collector.reduced_state()
    if isinstance(fisher, (str, os.PathLike)):
        return FisherState.load(fisher)
    raise TypeError(
        f"fisher must be a FisherCollectorCallback, FisherCollector, FisherState or a path to "
        f"'{FISHER_STATE_NAME}', got {type(fisher).__name__}."
    )


def _key_matches(key: str, name: str) -> bool:
    if name == key or name.endswith("." + key):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def plan_ranks(
    shapes: Mapping[str, tuple[int, int]],
    *,
    rank: int | None = None,
    keep: float | None = None,
    rank_pattern: Mapping[str, int | float] | None = None,
) -> dict[str, int | None]:
    """Rank of each module from a global rank or keep fraction and per-module overrides.

    Args:
        shapes: ``{name: (out, in)}`` of the candidate modules.
        rank: one rank for every module; exclusive with ``keep``.
        keep: fraction of each module's parameters kept, in ``(0, 1]``.
        rank_pattern: ``{key: rank or keep}``; a key matches a name equal to it, ending with ``"." + key``, or
            fully matching it as a regex; the first matching key wins.

    Returns:
        ``{name: rank}`` for the modules to compress, ``None`` where that rank would not save parameters (the module
        stays dense). Modules neither matched by a pattern nor covered by ``rank`` / ``keep`` are absent.

    Raises:
        ValueError: no target at all, both rank and keep, a pattern key that matches no module, a rank out of range.
    """
    pattern = dict(rank_pattern or {})
    if rank is not None and keep is not None:
        raise ValueError(f"Give a rank ({rank!r}) or a keep fraction ({keep!r}), not both.")
    if rank is None and keep is None and not pattern:
        raise ValueError(
            "Nothing says how much to compress: set compress_rank or compress_keep in FisherLoRAConfig (or pass "
            "rank= / keep= / rank_pattern=)."
        )
    if not shapes:
        raise ValueError("No target modules matched: the model has no adapted Linear layer to compress.")
    for key in pattern:
        if not any(_key_matches(key, n) for n in shapes):
            raise ValueError(
                f"compress_rank_pattern key {key!r} matches no target module (targets end with e.g. "
                f"{sorted({n.rsplit('.', 1)[-1] for n in shapes})[:6]}). Fix the key or remove it."
            )
    wanted: dict[str, int] = {}
    for name, (out_f, in_f) in shapes.items():
        value = next((v for k, v in pattern.items() if _key_matches(k, name)), None)
        if value is None:
            value = rank if rank is not None else keep
        if value is None:
            continue
        if isinstance(value, float):
            if not 0 < value <= 1:
                raise ValueError(f"Keep fraction {value!r} for module '{name}' must be in (0, 1].")
            value = rank_for_keep(out_f, in_f, value)
        wanted[name] = value
    fake = {n: SimpleNamespace(out_features=shapes[n][0], in_features=shapes[n][1]) for n in wanted}
    return resolve_ranks(fake, wanted)


def shared_weight_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers ARE the original tensors (no weight memory).

    Replacing modules of the copy (e.g. by compression) leaves the original untouched; changing a shared tensor in
    place would change both. Instance-level ``forward`` overrides (trainer wrappers) are dropped from the copy.
    """
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as exc:  # deepcopy fails on exotic attributes (locks, handles)
        raise RuntimeError(
            f"Could not make a weight-sharing copy of the model for compression ({exc}). Pass inplace=True to "
            "compress the model itself (the adapter model is then consumed)."
        ) from exc
    # Trainers patch `forward` on the instance (accelerate's autocast wrapper, trl's fused-loss forward); such a
    # wrapper closes over the ORIGINAL model's forward, so the copy would silently run the original. Use the class's.
    for module in clone.modules():
        module.__dict__.pop("forward", None)
    return clone


def _float_dtype(model: nn.Module) -> torch.dtype:
    for name, p in model.named_parameters():
        if p.is_floating_point() and "lora_" not in name:
            return p.dtype
    return torch.float32


def _cast_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters to ``dtype`` by REPLACING them (shared tensors of the original stay untouched)."""
    new_of: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in new_of:
                new_of[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            module._parameters[pname] = new_of[id(p)]


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


def _is_quantized_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and w is not None and (
        getattr(w, "quant_state", None) is not None or (w.dtype == torch.int8 and getattr(w, "SCB", None) is not None)
    )


def _drop_bnb_quantization(model: nn.Module) -> None:
    """Forget a bitsandbytes quantization config on a model whose layers were all dequantized."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None) if config is not None else None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is None or str(getattr(method, "value", method)) != "bitsandbytes":
        return
    del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass


@torch.no_grad()
def compress_peft_model(
    peft_model: nn.Module,
    *,
    fisher=None,
    rank: int | None = None,
    keep: float | None = None,
    rank_pattern: Mapping[str, int | float] | None = None,
    fisher_source: str | None = None,
    weighting: str | None = None,
    exponent: float | None = None,
    eps: float | None = None,
    allocation: str | None = None,
    damping: float | None = None,
    loss_normalization: str | None = None,
    merge: bool | None = None,
    dtype: torch.dtype | str | None = None,
    svd_method: str | None = None,
    adapter_name: str | None = None,
    inplace: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, CompressionReport]:
    """Compress every LoRA-adapted Linear of ``peft_model`` by (Fisher-weighted) truncated SVD.

    Per adapted module: ``W_eff = W + s B A`` (``merge``; else ``W``; a 4-bit ``W`` is dequantized), row / column
    Fisher from the collected state (``weighting``), then ``LowRankLinear`` factors from
    :func:`hf_lowrank.ops.fisher.fwsvd`. Other LoRA layers are merged (or dropped), ``modules_to_save`` copies are
    kept, remaining bitsandbytes layers are dequantized. Every argument left ``None`` comes from the adapter's
    :class:`FisherLoRAConfig` (a vanilla ``LoraConfig`` adapter works too, with the arguments given here).

    Args:
        peft_model: a ``PeftModel`` (or a model with LoRA layers injected).
        fisher: ``FisherCollectorCallback`` / ``FisherCollector`` / ``FisherState`` / path; required unless the
            source is ``"none"``.
        rank, keep, rank_pattern: compression target (see :func:`plan_ranks`); default from the config.
        fisher_source: ``"lora"``, ``"full"`` or ``"none"`` (plain SVD).
        weighting: ``"two_sided"``, ``"row"`` or ``"kronecker"`` (the state's input and output-gradient Grams).
        allocation: ``"uniform"`` or ``"global"`` (one budget, ``keep`` of all adapted modules' parameters).
        damping: Gram damping for ``"kronecker"``.
        loss_normalization: with ``"global"``: ``"none"`` or ``"relative"``.
        exponent, eps: Fisher weighting, ``D = (F / mean(F) + eps) ** exponent``.
        merge: merge the LoRA delta before compressing (VRAM-unlimited pipeline) or not (VRAM-limited).
        dtype: dtype of the returned model (``torch.dtype`` or ``"bfloat16"`` ...); default the config's
            ``compress_dtype``, else the model's floating dtype.
        svd_method: ``"auto"``, ``"exact"`` or ``"randomized"``.
        adapter_name: adapter to use (default: the active one).
        inplace: False (default): compress a copy that shares untouched tensors with ``peft_model``, which stays
            intact and trainable. True: replace layers inside ``peft_model``'s base model (no copy at all; the
            PeftModel must not be used afterwards).
        progress: show a progress bar.

    Returns:
        ``(model, report)``: the compressed transformers model (``save_pretrained`` writes a factorized checkpoint
        that ``AutoModelFor*.from_pretrained`` reloads once ``hf_lowrank`` is imported) and a
        :class:`~hf_lowrank.CompressionReport` whose ``info`` attribute records the Fisher settings and counters.

    Raises:
        ValueError: no adapted Linear, no compression target, rank out of range, missing Fisher, Fisher of another
            shape, unsupported adapter features.
    """
    modules, adapter = lora_linear_modules(peft_model, adapter_name)
    if not modules:
        raise ValueError(
            "No target modules matched: the model carries no LoRA adapter on a Linear layer"
            + (f" named '{adapter_name}'" if adapter_name else "")
            + ". Wrap it with get_peft_model(model, FisherLoRAConfig(target_modules=[...])) and train it first."
        )
    peft_config = getattr(peft_model, "peft_config", {}).get(adapter) if hasattr(peft_model, "peft_config") else None
    cfg = peft_config if isinstance(peft_config, FisherLoRAConfig) else None

    def pick(value, attr, default):
        if value is not None:
            return value
        return getattr(cfg, attr) if cfg is not None else default

    source = pick(fisher_source, "fisher_source", "lora" if fisher is not None else "none")
    weighting = pick(weighting, "fisher_weighting", "two_sided")
    exponent = float(pick(exponent, "fisher_exponent", 0.5))
    eps = float(pick(eps, "fisher_eps", 1e-6))
    merge = bool(pick(merge, "merge_before_compress", True))
    svd_method = pick(svd_method, "compress_svd_method", "auto")
    if allocation is None and (rank is not None or rank_pattern):
        allocation = "uniform"  # an explicit rank (or pattern) overrides the config's budget and its allocation
    allocation = pick(allocation, "compress_allocation", "uniform")
    damping = float(pick(damping, "compress_damping", DEFAULT_DAMPING))
    loss_normalization = pick(loss_normalization, "compress_loss_normalization", "none")
    if rank is None and keep is None and rank_pattern is None and cfg is not None:
        rank, keep, rank_pattern = cfg.compress_rank, cfg.compress_keep, cfg.compress_rank_pattern
    if dtype is None and cfg is not None and cfg.compress_dtype is not None:
        dtype = cfg.compress_dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)} or a torch.dtype, got {dtype!r}.")
        dtype = _DTYPES[dtype]
    if source not in _REPORT_METHOD:
        raise ValueError(f"fisher_source must be 'lora', 'full' or 'none', got {source!r}.")
    if weighting not in ("row", "two_sided", "kronecker"):
        raise ValueError(f"weighting must be 'row', 'two_sided' or 'kronecker', got {weighting!r}.")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")

    shapes = {n: (m.out_features, m.in_features) for n, m in modules.items()}
    adapter_rank = int(next(iter(modules.values())).r[adapter])
    fingerprint = model_fingerprint(peft_model, modules, adapter) if source == "lora" else None
    del modules  # hold no reference to the layers: with inplace=True each dense weight is freed once replaced
    if allocation == "global" and (keep is None or rank is not None or rank_pattern):
        raise ValueError(
            "allocation='global' spreads one budget over all adapted modules: give keep= (compress_keep) alone, "
            "without a rank or a rank pattern."
        )
    plan = plan_ranks(shapes, rank=rank, keep=keep, rank_pattern=rank_pattern)

    state: FisherState | None = None
    if source != "none":
        state = resolve_fisher(fisher)
        if state is None:
            raise ValueError(
                f"fisher_source='{source}' needs the collected Fisher: pass fisher=<the FisherCollectorCallback> (or "
                "its saved fisher_state.safetensors), or use fisher_source='none' for plain SVD."
            )
        if state.source != source:
            raise ValueError(
                f"The Fisher state was collected with source '{state.source}' but fisher_source='{source}' was asked "
                f"for; collect it with source='{source}' or set fisher_source='{state.source}'."
            )
        state.check_shapes({n: shapes[n] for n in plan})
        if source == "lora":
            _check_adapter_rank(state, plan, adapter_rank)
            state.check_fingerprint(fingerprint, what="the model being compressed")
        if state.is_empty:
            warnings.warn(
                "The collected Fisher is empty (no gradient reached the adapters): compression falls back to plain "
                "SVD. Train with FisherCollectorCallback attached (LowRankTrainer attaches it).",
                stacklevel=2,
            )
        else:
            _warn_degenerate_fisher(state, plan, weighting)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    from .fisher import unwrap_model

    base = unwrap_model(base)
    work = base if inplace else shared_weight_copy(base)
    quantized = any(_is_quantized_linear(m) for m in work.modules())
    out_dtype = dtype or _float_dtype(work)

    report = CompressionReport(method=_REPORT_METHOD[source])
    names = list(shapes)
    sides = {n: _fisher_side(state, n, weighting, exponent, eps, damping) for n in names} if state else {}
    fallbacks = sorted(n for n, side in sides.items() if side[3])
    if allocation == "global":
        spectra = {}
        for name in tqdm(names, desc="spectra (global allocation)", disable=not progress, unit="module"):
            out_factor, in_factor, scale, _ = sides.get(name, (None, None, 1.0, False))
            spectra[name] = weighted_spectrum(
                _effective_weight(work.get_submodule(name), adapter, merge, name), out_factor=out_factor,
                in_factor=in_factor, name=name,
            ) * math.sqrt(scale)
        plan = global_ranks(spectra, shapes, float(keep), normalize=loss_normalization).ranks
    # Every replacement is computed before any module is swapped (all or nothing, as in compress_model): a failure
    # (an SVDError on a NaN weight, a bad Gram) leaves the model, with inplace=True the PeftModel itself, untouched.
    # The cost: the new factors of all modules exist at once, next to the dense weights they replace.
    replacements: dict[str, nn.Module] = {}
    for name in tqdm(names, desc=f"compress ({report.method})", disable=not progress, unit="module"):
        wrapper = work.get_submodule(name)
        base_layer = wrapper.get_base_layer()
        W_eff = _effective_weight(wrapper, adapter, merge, name)
        bias = base_layer.bias.detach() if getattr(base_layer, "bias", None) is not None else None
        out_f, in_f = W_eff.shape
        before = out_f * in_f + (out_f if bias is not None else 0)
        r = plan.get(name)
        if r is None:
            reason = "rank saves no parameters" if name in plan else "no rank given for this module"
            if allocation == "global":
                reason = "kept dense by the global allocation"
            unchanged = W_eff.data_ptr() == base_layer.weight.data_ptr()
            keep_layer = unchanged and not quantized and (dtype is None or W_eff.dtype == out_dtype)
            replacements[name] = base_layer if keep_layer else _dense_linear(W_eff, bias, out_dtype)
            report.modules.append(ModuleReport(name, (out_f, in_f), None, before, before, skipped=reason))
            continue
        out_factor, in_factor, _, _ = sides.get(name, (None, None, 1.0, False))
        holder = SimpleNamespace(weight=W_eff, bias=bias, out_features=out_f, in_features=in_f)
        new, err, werr = factorize_linear(holder, r, out_factor, in_factor, method=svd_method, dtype=out_dtype,
                                          name=name)
        new.requires_grad_(False)
        replacements[name] = new
        report.modules.append(
            ModuleReport(name, (out_f, in_f), r, before, factorized_params(out_f, in_f, r) + (out_f if bias is not None
                         else 0), err, werr if name in sides else None)
        )
        del W_eff, wrapper, base_layer, holder
    for name, new in replacements.items():  # all factors exist: swap them in
        set_submodule(work, name, new)
    del replacements

    _finish_unload(work, adapter, inplace=inplace, merge=merge)
    if quantized:
        for qname, module in list(work.named_modules()):
            if _is_quantized_linear(module):
                bias = module.bias.detach() if module.bias is not None else None
                set_submodule(work, qname, _dense_linear(dense_weight(module), bias, out_dtype))
        _drop_bnb_quantization(work)
    if dtype is not None or quantized:
        _cast_params(work, out_dtype)
        if getattr(work, "config", None) is not None:
            work.config.dtype = out_dtype
    work.eval()

    info = {
        "fisher_source": source,
        "fisher_weighting": weighting if source != "none" else None,
        "fisher_exponent": exponent,
        "fisher_eps": eps,
        "allocation": allocation,
        **({"damping": damping, "gram_fallbacks": fallbacks} if weighting == "kronecker" and state else {}),
        **({"loss_normalization": loss_normalization} if allocation == "global" else {}),
        "merge_before_compress": merge,
        "adapter_name": adapter,
        "adapter_rank": adapter_rank,
        "dtype": str(out_dtype).removeprefix("torch."),
    }
    if state is not None:
        info.update({k: v for k, v in state.summary().items() if k != "fisher_source"})
    report.info = info
    from ...compression.checkpoint import mark_compressed

    mark_compressed(
        work, report.ranks, method=report.method,
        extra={"fisher_source": source, "fisher_weighting": info["fisher_weighting"], "merged": merge},
    )
    return work, report


def _check_adapter_rank(state: FisherState, names, adapter_rank: int) -> None:
    """A LoRA Fisher has the adapter's rank in its shapes: ``F_A`` is ``(r, in)``, checked even without metadata."""
    for name in names:
        a = state.module_fisher(name).get("A")
        if a is not None and a.ndim == 2 and a.shape[0] != adapter_rank:
            raise FisherStateError(
                f"The Fisher of '{name}' was collected with LoRA adapter rank r={a.shape[0]} (F_A {tuple(a.shape)}) "
                f"but the adapter being compressed has r={adapter_rank}: the Fisher of the LoRA factors belongs to "
                "the adapter it was collected with. Collect it again with this adapter."
            )


_WEIGHTING_KINDS = {"kronecker": ("Gin", "Gout"), "row": ("A", "B", "W"), "two_sided": ("A", "B", "W")}


def _warn_degenerate_fisher(state: FisherState, names, weighting: str) -> None:
    """Warn when a module's Fisher carries no information (all zero or non-finite): it gets plain SVD."""
    dead, broken = [], []
    for name in names:
        parts = [t for k, t in state.module_fisher(name).items() if k in _WEIGHTING_KINDS[weighting]]
        if not parts:
            continue
        finite = [torch.isfinite(t) for t in parts]
        if not all(bool(f.all()) for f in finite):
            broken.append(name)
        if not any(bool((t.masked_fill(~f, 0) != 0).any()) for t, f in zip(parts, finite)):
            dead.append(name)
    if not dead and not broken:
        return
    lines = []
    if dead:
        every = " (every module)" if len(dead) == len(list(names)) else ""
        lines.append(
            f"the Fisher of {len(dead)} module(s){every} is all zero or non-finite, so their compression falls back "
            f"to plain SVD although it is labelled Fisher-weighted: {', '.join(dead[:8])}"
            + (", ..." if len(dead) > 8 else "")
        )
    if broken:
        lines.append(
            f"{len(broken)} module(s) have NaN/inf Fisher entries, treated as zero: {', '.join(broken[:8])}"
            + (", ..." if len(broken) > 8 else "")
        )
    warnings.warn(
        "Fisher state: " + "; ".join(lines) + ". The state is corrupt or no usable gradient reached these modules; "
        "collect the Fisher again (check the loss for NaN), or compress with fisher_source='none'.",
        UserWarning,
        stacklevel=3,
    )


def _effective_weight(wrapper: nn.Module, adapter: str, merge: bool, name: str) -> torch.Tensor:
    """``W + s B A`` (``merge``) or ``W`` of a LoRA layer, dequantized when its base is 4/8-bit."""
    W = dense_weight(wrapper.get_base_layer())
    if merge and not getattr(wrapper, "merged", False):
        delta = wrapper.get_delta_weight(adapter)  # in the base layer's layout: (in, out) for a Conv1D
        if getattr(wrapper, "fan_in_fan_out", False):
            delta = delta.T
        return W.float() + delta.float().to(W.device)
    if not merge and getattr(wrapper, "merged", False):
        raise ValueError(
            f"Module '{name}' has its adapter merged into the base weight, so the original W is gone; "
            "unmerge it (model.unmerge_adapter()) before compressing with merge_before_compress=False."
        )
    return W


def _fisher_side(state: FisherState, name: str, weighting: str, exponent: float, eps: float, damping: float):
    """``(out_factor, in_factor, scale, fell_back)`` of module ``name`` from the collected state."""
    if weighting == "kronecker":
        # non-finite entries are treated as zero, as for the diagonal Fisher (and warned about with it)
        G_in, G_out = (torch.where(torch.isfinite(G), G, torch.zeros_like(G)) for G in state.grams(name))
        f_in, f_out = gram_factor(G_in, damping=damping, name=name), gram_factor(G_out, damping=damping, name=name)
        return f_out.L, f_in.L, f_in.scale * f_out.scale, "eigh" in (f_in.fallback, f_out.fallback)
    row, col = state.row_col(name, weighting)
    rw = fisher_weights(row, exponent=exponent, eps=eps) if row is not None else None
    cw = fisher_weights(col, exponent=exponent, eps=eps) if col is not None else None
    return rw, cw, 1.0, False


def _finish_unload(work: nn.Module, adapter: str, *, inplace: bool, merge: bool) -> None:
    """Remove what is left of peft from ``work``: other LoRA layers, ``modules_to_save`` wrappers, peft attributes."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    for name, module in list(work.named_modules()):
        if not name:
            continue
        try:
            current = work.get_submodule(name)
        except AttributeError:
            continue  # inside a module replaced earlier in this loop
        if current is not module:
            continue
        if isinstance(module, BaseTunerLayer):
            base_layer = module.get_base_layer()
            lora_a = getattr(module, "lora_A", {})
            if merge and adapter in lora_a and not getattr(module, "merged", False) and hasattr(base_layer, "weight"):
                # A non-Linear LoRA layer (e.g. an embedding): merge its delta into a new weight tensor.
                merged = copy.copy(base_layer)
                merged._parameters = dict(base_layer._parameters)
                delta = module.get_delta_weight(adapter).to(base_layer.weight.dtype)
                merged.weight = nn.Parameter(base_layer.weight.detach() + delta, requires_grad=False)
                set_submodule(work, name, merged)
            else:
                set_submodule(work, name, base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            set_submodule(work, name, module.unload_and_optionally_merge_module(False, False, None))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            if not inplace:
                raise ValueError(
                    f"Module '{name}' is a {type(module).__name__} (trainable_token_indices); compressing a copy "
                    "cannot merge it without changing the trained model. Pass inplace=True."
                )
            set_submodule(work, name, module.unload_and_optionally_merge_module(True, False, None))
    for attr in ("peft_config",):
        if attr in work.__dict__:
            del work.__dict__[attr]
    if getattr(work, "_hf_peft_config_loaded", False):
        work._hf_peft_config_loaded = False


@torch.no_grad()
def compress_with_fisher(
    model: nn.Module,
    fisher,
    ranks: int | float | Mapping[str, int],
    *,
    weighting: str = "two_sided",
    target_modules=None,
    exponent: float = 0.5,
    eps: float = 1e-6,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> CompressionReport:
    """FWSVD of a plain transformers model (no adapter) with a collected Fisher state, in place.

    For a model trained with full gradients (``FisherCollectorCallback(source="full")``), a model whose LoRA adapter
    was merged, or a fine-tuned model and the Fisher of a LoRA trained on it (VRAM-limited pipeline). Module names
    in the state must be the model's (they are, for a state from a ``PeftModel`` of the same base).

    Args:
        model: the model to compress (modified in place).
        fisher: ``FisherState``, collector, callback or path.
        ranks: ``int`` rank, ``float`` keep fraction, or ``{name: rank}``.
        weighting: ``"two_sided"`` (default) or ``"row"``.
        target_modules: as for :func:`hf_lowrank.compress_model`; default: every module that has Fisher.
        exponent, eps, method, dtype, progress: as for :func:`hf_lowrank.compress_model`.

    Returns:
        The :class:`~hf_lowrank.CompressionReport` (``info`` records the Fisher counters).

    Raises:
        ValueError: Fisher missing for a target, or of another shape.
    """
    state = resolve_fisher(fisher)
    if state is None:
        raise ValueError("compress_with_fisher needs a Fisher state; for plain SVD use hf_lowrank.compress_model.")
    from ...compression.compress import find_target_linears

    if target_modules is None and not isinstance(ranks, Mapping):
        names = dict(model.named_modules())
        missing = [n for n in state.modules if n not in names]
        if missing:
            raise ValueError(
                f"The Fisher state names {len(missing)} module(s) this model does not have (e.g. '{missing[0]}'): it "
                "was collected on another model. Collect it on this model, or pass target_modules."
            )
        target_modules = state.modules
        if not target_modules:
            raise ValueError("No target modules matched: the Fisher state is empty of modules.")
    if isinstance(ranks, Mapping) and target_modules is None:
        targets = find_target_linears(model, list(ranks))
    else:
        targets = find_target_linears(model, target_modules)
    state.check_shapes({n: (m.out_features, m.in_features) for n, m in targets.items()})
    rows, cols = state.weights(weighting, names=list(targets))
    report = compress_model(
        model, ranks, row_weights=rows, col_weights=cols or None, target_modules=list(targets), method=method,
        exponent=exponent, eps=eps, dtype=dtype, report_method="fwsvd" if state.source == "full" else "fisher_lora",
        progress=progress,
    )
    report.info = {"fisher_weighting": weighting, "fisher_exponent": exponent, "fisher_eps": eps, **state.summary()}
    return report


def save_compressed_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    report: CompressionReport | None = None,
    fisher_state: FisherState | None = None,
) -> Path:
    """Write a compressed model, its tokenizer, ``compression_report.json`` and the Fisher state, atomically.

    The folder is built beside ``output_dir`` and swapped in only when everything is written (see
    :func:`hf_lowrank.io.atomic_directory`). A folder that holds a PEFT adapter at its top level is refused: the
    adapter files would be carried over and ``from_pretrained`` would load the adapter instead of the model.

    Returns:
        The output folder.
    """
    output_dir = Path(output_dir)
    if (output_dir / "adapter_config.json").exists():
        raise ValueError(
            f"'{output_dir}' already holds a PEFT adapter (adapter_config.json); saving a compressed model there would "
            "mix the two. Save to another folder, or remove the adapter files first."
        )
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            data = report.to_dict()
            if report.info:  # a FisherLoRA report: the Fisher facts go under "fisher"
                data["fisher"] = data.pop("info")
            atomic_write_json(Path(tmp) / "compression_report.json", data)
        if fisher_state is not None:
            fisher_state.save(Path(tmp) / FISHER_STATE_NAME)
        from ...model_card import write_model_card_for

        write_model_card_for(model, tmp, report)
    return output_dir


def export_lora_adapter(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a saved FisherLoRA adapter folder as a vanilla LoRA adapter (loadable without hf-lowrank).

    ``adapter_config.json`` is rewritten with ``peft_type: "LORA"`` and without the FisherLoRA fields; the weights
    file is copied unchanged (the tensor names and shapes are LoRA's).

    Returns:
        The destination folder.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    config = read_json(src / "adapter_config.json", what="adapter config")
    if config.get("peft_type") not in ("FISHER_LORA", "LORA"):
        raise ValueError(f"'{src}' holds a {config.get('peft_type')} adapter, not a FisherLoRA one.")
    config = {k: v for k, v in config.items() if k not in FISHER_FIELDS}
    config["peft_type"] = "LORA"
    weights = [p for p in src.iterdir() if p.name.startswith("adapter_model.")]
    if not weights:
        raise ValueError(f"'{src}' has no adapter_model.* weights file; save the adapter with save_pretrained first.")
    with atomic_directory(dst) as tmp:
        for p in weights:
            shutil.copy2(p, Path(tmp) / p.name)
        atomic_write_json(Path(tmp) / "adapter_config.json", config)
    return dst
