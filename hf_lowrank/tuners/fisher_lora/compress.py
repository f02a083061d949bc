"""Compression of a (Fisher)LoRA-adapted model with Fisher-weighted SVD (saving the result: :mod:`.save`).

:func:`compress_peft_model` turns a trained ``PeftModel`` into a plain transformers model whose adapted Linear
layers are ``LowRankLinear`` factor pairs (a factorized checkpoint, see ``hf_lowrank.compression.checkpoint``).
By default it works on a COPY that shares every untouched tensor with the trained model, so the trainer's model (and
its adapter) stays usable and the extra memory is that of the new factors plus the merged weights ``W + s B A``
(none without ``merge``). It is a thin layer over :func:`hf_lowrank.compress_model`: each adapted layer is handed to
that one pipeline as a plain Linear holding its effective weight, and what is left of peft is removed afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ...compression.compress import CompressionReport, ModuleReport, compress_model, set_submodule
from ...compression.config import CompressionConfig
from ...compression.pipeline import restore_modules, swap_modules
from ...compression.ranks import plan_ranks
from ...fisher.sides import _check_adapter_rank
from ...fisher.state import FisherState, resolve_fisher
from ...fisher.walk import lora_linear_modules, model_fingerprint, unwrap_model
from ...modules import dense_weight, is_quantized
from .config import (
    DEFAULT_ALLOCATION,
    FISHER_WEIGHTINGS,
    NO_CONFIG_DEFAULTS,
    FisherLoRAConfig,
    default_allocation,
)
from .save import export_lora_adapter, save_compressed_model
from .unload import (
    _cast_params,
    _dense_linear,
    _drop_bnb_quantization,
    _effective_weight,
    _finish_unload,
    _float_dtype,
    _linear_view,
    _settle_dense,
    shared_weight_copy,
)

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
    compression: CompressionConfig | None = None,
    calibration=None,
) -> tuple[nn.Module, CompressionReport]:
    """Compress every LoRA-adapted Linear of ``peft_model`` by (Fisher-weighted) truncated SVD.

    :func:`hf_lowrank.compress_model` on a LoRA ``PeftModel`` calls this with ``inplace=True``; call it directly for a
    compressed copy (the ``PeftModel`` stays trainable) or the per-argument overrides below.

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
            ``compression.dtype``, else the model's floating dtype.
        svd_method: ``"auto"``, ``"exact"`` or ``"randomized"``.
        adapter_name: adapter to use (default: the active one).
        inplace: False (default): compress a copy that shares untouched tensors with ``peft_model``, which stays
            intact and trainable. True: replace layers inside ``peft_model``'s base model (no copy at all; the
            PeftModel must not be used afterwards).
        progress: show a progress bar.
        compression: a :class:`~hf_lowrank.CompressionConfig` used instead of the adapter config's
            ``compression`` (the arguments above still override single fields).
        calibration: calibration batches (or :class:`~hf_lowrank.calibration.grams.CalibrationGrams`) that weigh the
            factorization of the effective weights as :func:`~hf_lowrank.compress_model` does (``compression``'s
            weighting); instead of a Fisher (``fisher_source`` is then ``"none"``).

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

    if calibration is not None:
        if fisher is not None or fisher_source not in (None, "none"):
            raise ValueError("Pass calibration= or fisher= (a Fisher source), not both: each gives the weighting.")
        fisher_source = "none"
    if fisher_source is None and cfg is None:
        fisher_source = "lora" if fisher is not None else "none"
    source = pick(fisher_source, "fisher_source")
    if weighting is None and compression is not None and compression.weighting in FISHER_WEIGHTINGS:
        weighting = compression.weighting  # a Fisher weighting asked for by the config given here
    weighting = pick(weighting, "fisher_weighting")
    if compression is not None and calibration is not None:  # its "auto"s resolved by compress_model, as for any model
        base = compression
    elif compression is not None:  # given here: its "auto"s resolved as the adapter config resolves its own
        if compression.weighting != "auto" and weighting != compression.weighting:
            raise ValueError(f"compression.weighting={compression.weighting!r} but weighting={weighting!r}: pass "
                             "one weighting (the Fisher's).")
        base = dataclasses.replace(
            compression,
            allocation=default_allocation(weighting, compression.keep, compression.rank_pattern)
            if compression.allocation == "auto" else compression.allocation,
            loss_normalization="none" if compression.loss_normalization == "auto" else compression.loss_normalization,
        )
    elif cfg is not None:
        base = cfg.resolved_compression()
    else:
        base = CompressionConfig(allocation=DEFAULT_ALLOCATION, loss_normalization="none")
    exponent = float(exponent if exponent is not None else base.fisher_exponent)
    eps = float(eps if eps is not None else base.fisher_eps)
    merge = bool(pick(merge, "merge_before_compress"))
    svd_method = svd_method or base.svd_method
    if allocation is None and (rank is not None or rank_pattern):
        allocation = DEFAULT_ALLOCATION  # an explicit rank (or pattern) overrides the config's budget and allocation
    allocation = allocation or base.allocation
    damping = float(damping if damping is not None else base.damping)
    loss_normalization = loss_normalization or base.loss_normalization
    if rank is None and keep is None and rank_pattern is None:
        rank, keep, rank_pattern = base.rank, base.keep, base.rank_pattern
    dtype = dtype if dtype is not None else base.dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)} or a torch.dtype, got {dtype!r}.")
        dtype = _DTYPES[dtype]
    if source not in _REPORT_METHOD:
        raise ValueError(f"fisher_source must be 'lora', 'full' or 'none', got {source!r}.")
    if weighting not in FISHER_WEIGHTINGS:
        raise ValueError(f"weighting must be 'row', 'two_sided' or 'kronecker', got {weighting!r}.")
    if allocation not in ("uniform", "global") and not (allocation == "auto" and calibration is not None):
        raise ValueError(f"allocation must be 'uniform' or 'global', got {allocation!r}.")

    shapes = {n: (m.out_features, m.in_features) for n, m in modules.items()}
    adapter_rank = int(next(iter(modules.values())).r[adapter])
    fingerprint = model_fingerprint(peft_model, modules, adapter) if source == "lora" else None
    del modules  # hold no reference to the layers: with inplace=True each dense weight is freed once replaced
    if allocation == "global" and (keep is None or rank is not None or rank_pattern):
        raise ValueError(
            "allocation='global' spreads one budget over all adapted modules: give keep= (compress_keep) alone, "
            "without a rank or a rank pattern."
        )
    if rank is None and keep is None and not rank_pattern:
        plan_ranks(shapes)  # raises "Nothing says how much to compress"

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
        state.check_shapes(shapes)  # before the fingerprint: "another shape" says more than "another model"
        if source == "lora":
            _check_adapter_rank(state, shapes, adapter_rank)
            state.check_fingerprint(fingerprint, what="the model being compressed")
        if state.is_empty:
            warnings.warn(
                "The collected Fisher is empty (no gradient reached the adapters): compression falls back to plain "
                "SVD. Train with FisherCollectorCallback attached (LowRankTrainer attaches it).",
                stacklevel=2,
            )
    planned = base  # the CompressionConfig resolved above
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    base = unwrap_model(base)
    work = base if inplace else shared_weight_copy(base)
    out_dtype = dtype or _float_dtype(work)
    # the base config's other fields (max_gram_dim, factor_bits, ...) carry over; the targets are the adapted Linears
    config = dataclasses.replace(
        planned, rank=rank, keep=keep, rank_pattern=rank_pattern, target_modules=list(shapes),
        weighting=weighting if state is not None else (planned.weighting if calibration is not None else "auto"),
        allocation=allocation, loss_normalization=loss_normalization, damping=damping, svd_method=svd_method,
        fisher_exponent=exponent, fisher_eps=eps, dtype=out_dtype,
    )

    quantized = any(is_quantized(m) for m in work.modules())
    if quantized:
        _drop_bnb_quantization(work)  # every bitsandbytes layer is dequantized below; the checkpoint is a low-rank one
    # The weight source: each adapted layer becomes a plain Linear holding its effective weight (W + s B A, or W;
    # dequantized), so that the one pipeline (compress_model) factorizes it; put back on any failure.
    originals: dict[str, nn.Module] = {}
    try:
        stand_ins = {name: _linear_view(work.get_submodule(name).get_base_layer(),
                                        _effective_weight(work.get_submodule(name), adapter, merge, name))
                     for name in shapes}
        originals = swap_modules(work, stand_ins)
        with warnings.catch_warnings():  # `rank` is unambiguous here, unlike compress_model's int-or-float argument
            warnings.filterwarnings("ignore", message=r"ranks=\d+ is an absolute rank", category=UserWarning)
            report = compress_model(
                work, config, fisher=state, calibration=calibration, progress=progress,
                report_method=_REPORT_METHOD[source] if calibration is None else None,
                checkpoint_extra={"fisher_source": source, "fisher_weighting": weighting if source != "none" else None,
                                  "merged": merge},
            )
    except BaseException:
        restore_modules(work, originals)
        raise
    _settle_dense(work, stand_ins, originals, quantized=quantized, dtype=dtype, out_dtype=out_dtype)
    del originals, stand_ins
    listed = {m.name for m in report.modules}
    for name, (out_f, in_f) in shapes.items():
        if name not in listed:
            before = out_f * in_f + (out_f if getattr(work.get_submodule(name), "bias", None) is not None else 0)
            report.modules.append(ModuleReport(name, (out_f, in_f), None, before, before,
                                               skipped="no rank given for this module"))
    for name in report.ranks:
        work.get_submodule(name).requires_grad_(False)

    _finish_unload(work, adapter, inplace=inplace, merge=merge)
    if quantized:
        for qname, module in list(work.named_modules()):
            if is_quantized(module):
                bias = module.bias.detach() if module.bias is not None else None
                set_submodule(work, qname, _dense_linear(dense_weight(module), bias, out_dtype))
    if dtype is not None or quantized:
        _cast_params(work, out_dtype)
        if getattr(work, "config", None) is not None:
            work.config.dtype = out_dtype
    work.eval()

    report.info.update({
        "fisher_source": source,
        "fisher_weighting": weighting if source != "none" else None,
        "fisher_exponent": exponent,
        "fisher_eps": eps,
        "allocation": report.info.get("allocation", allocation),
        "merge_before_compress": merge,
        "adapter_name": adapter,
        "adapter_rank": adapter_rank,
        "dtype": str(out_dtype).removeprefix("torch."),
    })
    return work, report
