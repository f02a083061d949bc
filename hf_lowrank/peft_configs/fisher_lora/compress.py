"""Compression of a (Fisher)LoRA-adapted model with Fisher-weighted SVD (saving the result: :mod:`.save`).

:func:`compress_peft_model` turns a trained ``PeftModel`` into a plain transformers model whose adapted Linear
layers are ``LowRankLinear`` factor pairs (a factorized checkpoint, see ``hf_lowrank.compression.checkpoint``).
By default it works on a COPY that shares every untouched tensor with the trained model, so the trainer's model (and
its adapter) stays usable and the extra memory is that of the new factors plus one dense weight at a time.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from ...compression.compress import (
    ALLOCATIONS,
    CompressionReport,
    ModuleReport,
    factorize_linear,
    set_submodule,
)
from ...compression.ranks import plan_ranks
from ...fisher_state import FisherState, resolve_fisher
from ...modules import dense_weight, is_quantized
from ...ops.fisher import weighted_spectrum
from ...ops.rank_allocation import global_ranks
from ...ops.svd import RANK_MULTIPLE, factorized_params
from .config import (
    DEFAULT_ALLOCATION,
    FISHER_WEIGHTINGS,
    NO_CONFIG_DEFAULTS,
    FisherLoRAConfig,
)
from .save import export_lora_adapter, save_compressed_model
from .sides import _check_adapter_rank, _fisher_side, _warn_degenerate_fisher
from .unload import (
    _cast_params,
    _dense_linear,
    _drop_bnb_quantization,
    _effective_weight,
    _finish_unload,
    _float_dtype,
    shared_weight_copy,
)
from .walk import lora_linear_modules, model_fingerprint, unwrap_model

__all__ = [
    "compress_peft_model",
    "shared_weight_copy",
    "export_lora_adapter",
    "plan_ranks",
    "resolve_fisher",
    "save_compressed_model",
]

logger = logging.getLogger(__name__)

_REPORT_METHOD = {"lora": "fisher_lora", "full": "fwsvd", "none": "svd"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

    def pick(value, attr):  # the argument, else the adapter's resolved config, else the config's defaults
        if value is not None:
            return value
        return getattr(cfg, attr) if cfg is not None else NO_CONFIG_DEFAULTS[attr]

    if fisher_source is None and cfg is None:
        fisher_source = "lora" if fisher is not None else "none"
    source = pick(fisher_source, "fisher_source")
    weighting = pick(weighting, "fisher_weighting")
    exponent = float(pick(exponent, "fisher_exponent"))
    eps = float(pick(eps, "fisher_eps"))
    merge = bool(pick(merge, "merge_before_compress"))
    svd_method = pick(svd_method, "compress_svd_method")
    if allocation is None and (rank is not None or rank_pattern):
        allocation = DEFAULT_ALLOCATION  # an explicit rank (or pattern) overrides the config's budget and allocation
    allocation = pick(allocation, "compress_allocation")
    damping = float(pick(damping, "compress_damping"))
    loss_normalization = pick(loss_normalization, "compress_loss_normalization")
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
    if weighting not in FISHER_WEIGHTINGS:
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
    non_finite: list[str] = []
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
            non_finite = _warn_degenerate_fisher(state, plan, weighting)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    base = unwrap_model(base)
    work = base if inplace else shared_weight_copy(base)
    quantized = any(is_quantized(m) for m in work.modules())
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
        plan = global_ranks(spectra, shapes, float(keep), normalize=loss_normalization, multiple=RANK_MULTIPLE).ranks
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
            if is_quantized(module):
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
        **({"non_finite_fisher": non_finite} if non_finite else {}),
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
