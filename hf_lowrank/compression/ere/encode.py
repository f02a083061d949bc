"""Encoding: spectra, ERE rank allocation, factors, quantization (scheme in :mod:`hf_lowrank.compression.ere`)."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..._deprecation import renamed_keywords
from ...io import read_safetensors_header
from ...ops.quant import QuantizedTensor, dequantize_rtn, quantize_rtn, stiefel_project
from ...ops.rank_allocation import ere_ranks
from ...ops.svd import singular_values, truncated_svd
from ...targets import all_linear_names, is_all_linear, module_matches, resolve_name
from .fingerprint import _base_prefix, base_fingerprint
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MIN_DIM,
    UNQUANTIZED_BITS,
    EREResidual,
    _check_bits,
    _check_group_size,
    _check_rank,
    _compute_dtype,
    _dtype_name,
    _module_of,
    _params_bytes,
)
from .report import ResidualEntry, ResidualReport

__all__ = ["encode_residual", "save_residual_on_save"]

logger = logging.getLogger(__name__)


def _checkpoint_keys(model: nn.Module) -> set[str] | None:
    """Keys of the safetensors checkpoint ``model`` was loaded from (header only), or None when unknown."""
    path = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(model, "name_or_path", None)
    if not path or not Path(str(path)).is_dir():
        return None
    folder = Path(str(path))
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
        single = folder / "model.safetensors"
        if single.is_file():
            return set(read_safetensors_header(single)[0])
    except (OSError, ValueError, KeyError):
        return None
    return None


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without duplicates: ``(canonical tensors, {alias name: canonical name})`` (tied weights)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if t.numel() and t.device.type != "meta":
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        tensors[name] = t
    return tensors, aliases


def _quant_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Bytes of ``quantize_rtn`` on a ``(rows, cols)`` matrix (codes plus fp16 scale and offset per group)."""
    if bits in UNQUANTIZED_BITS:
        return rows * cols * bits // 8
    return -(-rows * cols * bits // 8) + rows * -(-cols // group_size) * 4


def _encode_lowrank(
    R: torch.Tensor, rank: int, bits: int, group_size: int, refit: bool, name: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Factor, quantize and (optionally) refit one residual; returns the stored tensors and the decoded residual."""
    cdtype = R.dtype
    U, S, Vh = truncated_svd(R, rank, name=name)
    U, S, Vh = U.to(cdtype), S.to(cdtype), Vh.to(cdtype)
    stored: dict[str, torch.Tensor] = {}
    if bits in UNQUANTIZED_BITS:
        fdtype = torch.float16 if bits == 16 else torch.float32
        Ut_s, Vh_s = U.T.contiguous().to(fdtype), Vh.contiguous().to(fdtype)
        stored[f"{name}:Ut"], stored[f"{name}:Vh"] = Ut_s.cpu(), Vh_s.cpu()
        U_hat, Vh_hat = Ut_s.to(cdtype).T, Vh_s.to(cdtype)
    else:
        qU = quantize_rtn(U.T.contiguous(), bits, group_size=group_size)
        qV = quantize_rtn(Vh.contiguous(), bits, group_size=group_size)
        stored.update({k: v.cpu() for k, v in qU.to_dict(f"{name}:Ut.").items()})
        stored.update({k: v.cpu() for k, v in qV.to_dict(f"{name}:Vh.").items()})
        U_hat = stiefel_project(dequantize_rtn(qU, cdtype).T).to(cdtype)
        Vh_hat = stiefel_project(dequantize_rtn(qV, cdtype).T).to(cdtype).T
        if refit:
            # least-squares singular values for the factors the decoder will use (orthonormal columns)
            S = ((U_hat.T @ R) * Vh_hat).sum(dim=1)
    s_dtype = torch.float32 if bits == 32 else torch.float16
    if s_dtype == torch.float16 and float(S.abs().max()) >= 6.0e4:
        s_dtype = torch.float32  # outside the fp16 range
    S_s = S.to(s_dtype)
    stored[f"{name}:S"] = S_s.cpu()
    R_hat = (U_hat * S_s.to(cdtype)) @ Vh_hat
    return stored, R_hat


def _encode_rows(values: torch.Tensor, bits: int, group_size: int, prefix: str) -> dict[str, torch.Tensor]:
    if bits in UNQUANTIZED_BITS:
        return {prefix: values.to(torch.float16 if bits == 16 else torch.float32).cpu()}
    q = quantize_rtn(values.contiguous(), bits, group_size=group_size)
    return {k: v.cpu() for k, v in q.to_dict(prefix + ".").items()}


@renamed_keywords(out="path")
@torch.no_grad()
def encode_residual(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    rank: int = 32,
    bits: int = 4,
    alpha: float = 0.5,
    target_modules: str | Sequence[str] | None = None,
    *,
    group_size: int = 64,
    fit_range: tuple[float, float] | None = None,
    refit: bool = False,
    store_exact: Sequence[str] | None = None,
    embeddings: str = "auto",
    progress: bool = True,
    path: str | os.PathLike | None = None,
) -> EREResidual:
    """Encode ``finetuned_model`` as an ERE residual over ``base_model`` (scheme in :mod:`hf_lowrank.compression.ere`).

    Args:
        base_model: the model the fine-tune started from. Either the same architecture as the fine-tuned model
            or its backbone (e.g. ``AutoModel`` for a ``...ForSequenceClassification``): names are matched across a
            ``base_model_prefix``. If it was loaded ``from_pretrained`` from a local folder, tensors that are not in
            that checkpoint (a randomly initialized head) count as having no base counterpart.
        finetuned_model: the fully fine-tuned model (not modified).
        rank: prior rank ``r_avg``; the budget is ``M = r_avg * sum(out + in)`` over the low-rank tensors.
        bits: 2..8 (RTN-quantized ``U``, ``V``), 16 (fp16 factors) or 32 (fp32 factors).
        alpha: blend weight of the prior rank in ``[0, 1]`` (1: the same rank everywhere, 0: pure allocation).
        target_modules: module names/suffixes (list), a regex (str) or peft's ``"all-linear"`` (see
            :mod:`hf_lowrank.targets`) whose 2-D weights are low-rank encoded; changed 2-D weights of other modules
            are stored exactly. None: every 2-D weight.
        group_size: entries per quantization scale (along each singular vector).
        fit_range: optional ``(lo, hi)`` fractions of the spectrum for the tail-energy fit (see ``ere_ranks``).
        refit: refit the singular values to the quantized, projected factors (encoder-side; same format;
            off by default, see :mod:`hf_lowrank.compression.ere`).
        store_exact: tensor or module names/suffixes to store exactly whatever their shape.
        embeddings: how embedding residuals are stored: ``"auto"`` (row-sparse or rank-``rank``, whichever takes
            fewer bytes), ``"sparse"`` or ``"lowrank"``.
        progress: show tqdm bars.
        path: when given, the residual folder is written there (see :meth:`EREResidual.save`).

    Returns:
        :class:`EREResidual` (``.report`` is a :class:`ResidualReport`).
    """
    started = time.perf_counter()
    rank, bits, group_size = _check_rank(rank), _check_bits(bits), _check_group_size(group_size)
    if embeddings not in ("auto", "sparse", "lowrank"):
        raise ValueError(f"embeddings must be 'auto', 'sparse' or 'lowrank', got {embeddings!r}.")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be in [0, 1] (the paper uses 0.5), got {alpha!r}.")
    if not isinstance(base_model, nn.Module) or not isinstance(finetuned_model, nn.Module):
        raise ValueError("encode_residual needs two torch modules: (base_model, finetuned_model).")

    ft, aliases = _unique_state(finetuned_model)
    base_sd = base_model.state_dict()
    ft_prefix, b_prefix = _base_prefix(finetuned_model), _base_prefix(base_model)
    ckpt = _checkpoint_keys(base_model)
    not_in_ckpt: set[str] = set()
    if ckpt is not None:
        missing = {k for k in base_sd if resolve_name(k, ckpt, (b_prefix, ft_prefix)) is None}
        if len(missing) <= 0.5 * len(base_sd):
            not_in_ckpt = missing
        else:
            logger.warning("base checkpoint key names do not match the model's; not using them to spot new heads")
    modules = dict(finetuned_model.named_modules())
    targets = all_linear_names(finetuned_model) if is_all_linear(target_modules) else target_modules
    quantized = bits not in UNQUANTIZED_BITS

    spec: dict[str, dict[str, Any]] = {}
    base_ref: dict[str, torch.Tensor] = {}
    lowrank: list[str] = []
    embeds: list[str] = []
    exact: set[str] = set()
    for name, t in ft.items():
        mod_name, _ = _module_of(name)
        module = modules.get(mod_name)
        entry: dict[str, Any] = {
            "shape": list(t.shape),
            "dtype": _dtype_name(t.dtype),
            "module": mod_name,
            "module_type": type(module).__name__ if module is not None else None,
        }
        spec[name] = entry
        bname = resolve_name(name, base_sd, (ft_prefix, b_prefix))
        b = base_sd.get(bname) if bname is not None else None
        if b is None or tuple(b.shape) != tuple(t.shape) or bname in not_in_ckpt or b.device.type == "meta":
            entry["kind"] = "exact"
            exact.add(name)
            continue
        entry["base_name"] = bname
        entry["base_dtype"] = _dtype_name(b.dtype)
        base_ref[name] = b
        same = torch.equal(t, b.to(device=t.device, dtype=t.dtype)) if t.dtype == b.dtype else False
        if not same and not (t.is_floating_point() and b.is_floating_point()):
            entry["kind"] = "exact"
            exact.add(name)
        elif same:
            entry["kind"] = "base"
        elif module_matches(name, store_exact) or module_matches(mod_name, store_exact) or t.ndim != 2 \
                or min(t.shape) < MIN_DIM:
            entry["kind"] = "exact"
            exact.add(name)
        elif isinstance(module, nn.Embedding):
            entry["kind"] = "embedding"
            embeds.append(name)
        elif targets is not None and not module_matches(mod_name, targets):
            entry["kind"] = "exact"
            exact.add(name)
        else:
            entry["kind"] = "lowrank"
            lowrank.append(name)
    # a module whose small tensor changed keeps all its small tensors (so it can be exported as a whole module)
    small_mods = {spec[n]["module"] for n in exact if len(spec[n]["shape"]) != 2 or min(spec[n]["shape"]) < MIN_DIM}
    for name, entry in spec.items():
        if entry["kind"] == "base" and entry["module"] in small_mods and ft[name].is_floating_point():
            shp = entry["shape"]
            if len(shp) != 2 or min(shp) < MIN_DIM:
                entry["kind"] = "exact"
                exact.add(name)
    # tensors that no longer need the base are not part of its fingerprint
    for name in exact:
        base_ref.pop(name, None)

    def residual(name: str) -> torch.Tensor:
        t = ft[name]
        cd = _compute_dtype(t.dtype, base_ref[name].dtype)
        return t.to(cd) - base_ref[name].to(device=t.device, dtype=cd)

    # 1. spectra and allocation
    shapes = {n: tuple(ft[n].shape) for n in lowrank}
    spectra: dict[str, torch.Tensor] = {}
    for name in tqdm(lowrank, desc="ERE spectra", unit="tensor", disable=not progress):
        spectra[name] = singular_values(residual(name), name=name, gram=True).cpu()
    ranks: dict[str, int] = {}
    budget, alloc = 0.0, None
    if lowrank:
        alloc = ere_ranks(spectra, shapes, rank, alpha=alpha, fit_range=fit_range)
        ranks = dict(alloc.blended)  # budget-aware blend with the prior rank, never above the budget
        budget = float(alloc.budget)

    # 2. factors, quantization, errors
    tensors: dict[str, torch.Tensor] = {}
    entries: list[ResidualEntry] = []
    todo = lowrank + embeds + sorted(exact)
    bar = tqdm(todo, desc="ERE encode", unit="tensor", disable=not progress)
    for name in bar:
        entry = spec[name]
        t = ft[name]
        if name in exact:
            tensors[f"{name}:exact"] = t.detach().cpu().contiguous().clone()
            entries.append(
                ResidualEntry(
                    name,
                    "exact",
                    tuple(t.shape),
                    nbytes=t.numel() * t.element_size(),
                    rel_error=0.0,
                    weight_rel_error=0.0,
                )
            )
            continue
        R = residual(name)
        r_norm = float(torch.linalg.norm(R))
        w_norm = float(torch.linalg.norm(t.to(R.dtype))) or 1.0
        if name in embeds:
            rows = (R != 0).any(dim=1).nonzero().flatten()
            n_rows, (v_dim, d_dim) = rows.numel(), R.shape
            r_e = min(rank, v_dim, d_dim)
            sparse_bytes = n_rows * 8 + _quant_bytes(n_rows, d_dim, bits, group_size)
            low_bytes = (
                _quant_bytes(r_e, v_dim, bits, group_size) + _quant_bytes(r_e, d_dim, bits, group_size) + 2 * r_e
            )
            if embeddings == "sparse" or (embeddings == "auto" and sparse_bytes <= low_bytes):
                entry["kind"] = "sparse"
                entry["rank"] = int(n_rows)
                entry["quantized"] = quantized
                part = {f"{name}:rows": rows.cpu().to(torch.int64)}
                part.update(_encode_rows(R[rows], bits, group_size, f"{name}:values"))
                R_hat = torch.zeros_like(R)
                if quantized:
                    vals = dequantize_rtn(QuantizedTensor.from_dict(part, prefix=f"{name}:values."), R.dtype)
                else:
                    vals = part[f"{name}:values"].to(R.dtype)
                R_hat[rows] = vals.to(R.device)
            else:
                entry["kind"] = "lowrank"
                ranks[name] = r_e
        if entry["kind"] == "lowrank":
            r = ranks[name]
            entry["rank"] = int(r)
            entry["quantized"] = quantized
            if r == 0:
                part, R_hat = {}, torch.zeros_like(R)
            else:
                part, R_hat = _encode_lowrank(R, r, bits, group_size, refit, name)
        err = float(torch.linalg.norm(R - R_hat.to(R.device)))
        tensors.update(part)
        entries.append(
            ResidualEntry(
                name,
                entry["kind"],
                tuple(t.shape),
                rank=entry.get("rank"),
                nbytes=_params_bytes(part.values()),
                rel_error=err / r_norm if r_norm else 0.0,
                weight_rel_error=err / w_norm,
            )
        )
    for name, entry in spec.items():
        if entry["kind"] == "base":
            entries.append(ResidualEntry(name, "base", tuple(entry["shape"])))
    for alias, target in aliases.items():
        a_mod = _module_of(alias)[0]
        a_type = type(modules[a_mod]).__name__ if a_mod in modules else None
        spec[alias] = {"kind": "alias", "of": target, "module": a_mod, "module_type": a_type}
        entries.append(ResidualEntry(alias, "alias", tuple(ft[target].shape)))

    used = sum(ranks.get(n, 0) * sum(shapes[n]) for n in lowrank)
    order = {n: i for i, n in enumerate(spec)}
    config = getattr(finetuned_model, "config", None)
    ft_dtypes = [t.dtype for t in ft.values() if t.is_floating_point()]
    fp = base_fingerprint(base_ref)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": "ere",
        "created_by": _version(),
        "bits": bits,
        "group_size": group_size,
        "quantization": "rtn-affine-v1" if quantized else ("fp16" if bits == 16 else "fp32"),
        "stiefel_projection": quantized,
        "prior_rank": rank,
        "alpha": float(alpha),
        "refit_singular_values": bool(refit and quantized),
        "fit_range": list(fit_range) if fit_range is not None else None,
        "target_modules": target_modules
        if (target_modules is None or isinstance(target_modules, str))
        else list(target_modules),
        "embeddings": embeddings,
        "budget": budget,
        "used": used,
        "architecture": type(finetuned_model).__name__,
        "base_model_prefix": ft_prefix,
        "dtype": _dtype_name(max(set(ft_dtypes), key=ft_dtypes.count)) if ft_dtypes else None,
        "finetuned_bytes": _params_bytes(ft.values()),
        "base": {
            "name_or_path": _name_or_path(base_model),
            "architecture": type(base_model).__name__,
            "dtype": _dtype_name(next(iter(base_ref.values())).dtype) if base_ref else None,
            "fingerprint": fp,
        },
        "tensors": spec,
    }
    if alloc is not None:
        manifest["allocation"] = {"lambda": alloc.lam, "fit": {n: list(v) for n, v in alloc.fit.items()}}
    report = ResidualReport(
        entries=sorted(entries, key=lambda e: order[e.name]),
        bits=bits,
        group_size=group_size,
        alpha=float(alpha),
        prior_rank=rank,
        budget=budget,
        used=used,
        stored_bytes=_params_bytes(tensors.values()),
        finetuned_bytes=manifest["finetuned_bytes"],
    )
    cfg = copy.deepcopy(config) if config is not None and hasattr(config, "to_json_string") else None
    res = EREResidual(tensors, manifest, config=cfg, report=report)
    if path is not None:
        res.save(path)  # sets report.stored_bytes to the file size
    else:
        report.stored_bytes = len(res.serialize())
    report.seconds = time.perf_counter() - started
    return res


def _version() -> str:
    try:
        from ... import __version__

        return f"hf_lowrank {__version__}"
    except ImportError:  # pragma: no cover
        return "hf_lowrank"


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(model, "name_or_path", None)
    return str(value) if value else None


@renamed_keywords(output_dir="path")
def save_residual_on_save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model: nn.Module | str | os.PathLike | None = None,
    tokenizer: Any = None,
    **kwargs,
) -> ResidualReport:
    """Save a fully fine-tuned model as an ERE residual (the compress-on-save hook).

    Args:
        model: the fine-tuned model (unwrapped; not modified).
        path: folder to write (residual files are written atomically, the manifest last; other files already
            there are left alone).
        base_model: the base as a model, or a folder / Hub id to load it from. None: the model's own
            ``config.name_or_path`` (what ``from_pretrained`` recorded), loaded on the CPU with the model's class
            and dtype. Pass the model (or keep one around) when saving often, to avoid reloading it each time.
        tokenizer: optional tokenizer saved beside the residual.
        **kwargs: passed to :func:`encode_residual` (``rank``, ``bits``, ``alpha``, ``target_modules``,
            ``group_size``, ``progress``, ...).

    Returns:
        The :class:`ResidualReport` of the saved residual.
    """
    if base_model is None:
        base_model = _name_or_path(model)
        if not base_model:
            raise ValueError(
                "save_residual_on_save needs the base model: the fine-tuned model records no name_or_path. Pass "
                "base_model=<the base model or its folder> (e.g. CompressOnSaveCallback(method='ere', "
                "base_model=...))."
            )
    if not isinstance(base_model, nn.Module):
        first = next(iter(model.parameters()))
        cls = type(model)
        if not hasattr(cls, "from_pretrained"):
            raise ValueError(f"cannot load a base for a {cls.__name__}; pass base_model as a model.")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            base_model = cls.from_pretrained(str(base_model), dtype=first.dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        base_model.eval()
    res = encode_residual(base_model, model, path=path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return res.report
