"""Data-aware low-rank correction of a quantized model, written as a plain peft LoRA adapter.

A 4-bit model loses accuracy because each weight ``W`` is replaced by its quantized value ``Q(W)``. A rank-``r``
correction ``B A`` added to every quantized Linear recovers part of it; LQER (Zhang et al., 2024, arXiv:2402.02446),
QERA (Zhang et al., 2024, arXiv:2410.06040) and EoRA (Liu et al., 2024, arXiv:2410.21271) fit it to calibration
data, LoftQ (Li et al., 2023, arXiv:2310.08659) data-free, as the truncated SVD of the residual ``W - Q(W)``. Here
the correction of each module is the rank-``r`` minimiser of the weighted output error
``||L_out^T (W - Q(W) - B A) L_in||_F``, the same weighted factorization that :func:`~hf_lowrank.compress_model`
uses (:func:`hf_lowrank.ops.fisher.weighted_lowrank`), with the Kronecker-factored Fisher of the calibration data
(input and output-gradient Grams; Martens and Grosse, 2015, arXiv:1503.05671) or the input Grams alone (whitening,
SVD-LLM: Wang et al., 2024, arXiv:2403.07378). Without weights it is LoftQ's one-iteration initialisation.

The correction is written as a standard LoRA adapter (``lora_A = A``, ``lora_B = B``, ``lora_alpha = r``, so its
scale is 1), so that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base,
quantization_config=bnb), adapter)`` in any process, with stock peft and no hf-lowrank, runs the corrected model;
the same adapter is a QLoRA initialisation to fine-tune from.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .._deprecation import renamed_keywords
from ..calibration.grams import CalibrationGrams
from ..calibration.inputs import check_model_ready, is_causal_lm
from ..distributed import unwrap_wrappers
from ..io import atomic_directory, atomic_save_safetensors, atomic_write_json
from ..modules import LowRankLinear, dense_weight, is_conv1d
from ..ops.fisher import DEFAULT_DAMPING, weighted_lowrank, weighted_relative_error
from ..ops.quant import dequantize_rtn, quantize_rtn
from ..ops.svd import relative_error
from ..targets import find_target_linears
from .guards import check_empty_sides
from .pipeline import calibration_statistics, weighting_sides

logger = logging.getLogger(__name__)

__all__ = ["CorrectionReport", "ModuleCorrection", "fake_quantize", "quantization_correction", "quantized_weight"]

WEIGHTINGS = ("kronecker", "whitened", "none")
GRAMS_ON = ("dense", "quantized")
BNB_BLOCKSIZE = 64
"""The block size of bitsandbytes' 4-bit weights as transformers loads them (``Params4bit``'s default: transformers'
``BitsAndBytesConfig`` has no field for it)."""


@dataclass
class ModuleCorrection:
    """One corrected module: its shape and the relative errors of ``Q(W)`` and ``Q(W) + B A`` against ``W``, plain
    (Frobenius) and weighted (the output error the fit minimises; ``None`` when unweighted)."""

    name: str
    shape: tuple[int, int]
    rank: int
    error_before: float
    error_after: float
    weighted_error_before: float | None = None
    weighted_error_after: float | None = None


@dataclass
class CorrectionReport:
    """What :func:`quantization_correction` fitted (and wrote).

    Attributes:
        output_dir: the adapter folder, or ``None`` when none was asked for.
        quantization: a description of ``Q`` (``{"kind": "bitsandbytes", ...}`` or ``{"kind": "rtn", ...}``).
        rank: the correction's rank.
        weighting: ``"kronecker"``, ``"whitened"`` or ``"none"``.
        modules: one :class:`ModuleCorrection` per corrected module.
        factors: ``{name: (A (r, in), B (out, r))}``, float32: the correction is ``B @ A``.
        info: calibration tokens, where the Grams were collected, modules whose side no data reached.
    """

    output_dir: Path | None
    quantization: dict
    rank: int
    weighting: str
    modules: list[ModuleCorrection] = field(default_factory=list)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready figures: the mean errors before and after, per module rows."""
        rows = [vars(m) | {"shape": list(m.shape)} for m in self.modules]

        def mean(key):
            values = [r[key] for r in rows if r[key] is not None]
            return sum(values) / len(values) if values else None

        return {"output_dir": str(self.output_dir) if self.output_dir else None, "quantization": self.quantization,
                "rank": self.rank, "weighting": self.weighting, **self.info,
                "mean_error_before": mean("error_before"), "mean_error_after": mean("error_after"),
                "mean_weighted_error_before": mean("weighted_error_before"),
                "mean_weighted_error_after": mean("weighted_error_after"), "modules": rows}


def _spec(quantization, group_size: int) -> dict:
    """Check ``quantization`` and describe it (the description is what :func:`quantized_weight` computes); a
    description passes through."""
    if isinstance(quantization, dict) and quantization.get("kind") in ("rtn", "bitsandbytes"):
        return quantization
    if isinstance(quantization, bool) or quantization is None:
        raise ValueError(_bad_quantization(quantization))
    if isinstance(quantization, int):
        if not 2 <= quantization <= 8:
            raise ValueError(f"An int quantization is a bit width from 2 to 8 (group-wise round-to-nearest), got "
                             f"{quantization}.")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
        return {"kind": "rtn", "bits": quantization, "group_size": group_size, "scheme": "asymmetric, fp16 scales"}
    try:
        from transformers import BitsAndBytesConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        BitsAndBytesConfig = ()
    if not isinstance(quantization, BitsAndBytesConfig):
        raise ValueError(_bad_quantization(quantization))
    if not quantization.load_in_4bit:
        raise ValueError(
            "quantization_correction supports bitsandbytes 4-bit (BitsAndBytesConfig(load_in_4bit=True, "
            "bnb_4bit_quant_type='nf4')): 8-bit LLM.int8() splits outlier features at run time, so its error is "
            "not a fixed W - Q(W) to correct."
        )
    quant_type = quantization.bnb_4bit_quant_type
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    return {"kind": "bitsandbytes", "quant_type": quant_type, "blocksize": BNB_BLOCKSIZE,
            "double_quant": bool(quantization.bnb_4bit_use_double_quant),
            "skip_modules": list(quantization.llm_int8_skip_modules or [])}


def _bad_quantization(value) -> str:
    return (f"quantization must be a transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4') "
            f"or an int bit width (2 to 8, group-wise round-to-nearest), got {value!r}.")


@torch.no_grad()
def quantized_weight(W: torch.Tensor, quantization, *, group_size: int = 128) -> torch.Tensor:
    """``Q(W)``, dequantized, float32, on ``W``'s device.

    For a ``BitsAndBytesConfig`` it is bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` of ``W`` in its dtype
    (the bytes a 4-bit base loaded in that dtype holds: block size 64, the config's quant type and double
    quantization); for an int, :func:`hf_lowrank.ops.quant.quantize_rtn` per group of ``group_size`` inputs.
    """
    spec = _spec(quantization, group_size)
    if spec["kind"] == "rtn":
        return dequantize_rtn(quantize_rtn(W.detach(), spec["bits"], group_size=spec["group_size"]), torch.float32)
    import bitsandbytes.functional as bnbf

    w = W.detach().contiguous().cpu()
    packed, state = bnbf.quantize_4bit(w, blocksize=spec["blocksize"], compress_statistics=spec["double_quant"],
                                       quant_type=spec["quant_type"])
    return bnbf.dequantize_4bit(packed, state).float().to(W.device)


def _check_model(model: nn.Module) -> None:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError("quantization_correction takes the dense base model, not a PeftModel: pass "
                         "peft_model.get_base_model() after merging (merge_and_unload()), or the base's path.")
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    if quantized or getattr(model, "is_quantized", False) or qconfig is not None:
        what = f"e.g. '{quantized[0]}' is {type(model.get_submodule(quantized[0])).__name__}" if quantized else \
            f"its config holds a quantization_config ({getattr(qconfig, 'quant_method', qconfig)})"
        raise ValueError(
            f"The model is already quantized or compressed ({what}): the correction is fitted to W - Q(W) and needs "
            "the dense weights W. Load the dense model (without quantization_config) and pass it, or its path."
        )
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise ValueError("The model holds LowRankLinear factor layers (hf-lowrank compressed): bitsandbytes cannot "
                         "load such a checkpoint. Pass the dense model.")


def _load(model_or_path):
    if isinstance(model_or_path, nn.Module):
        return unwrap_wrappers(model_or_path), getattr(getattr(model_or_path, "config", None), "_name_or_path", None)
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ValueError(f"model_or_path must be a model or a folder path, got {type(model_or_path).__name__}.")
    from transformers import AutoModelForCausalLM

    # the checkpoint's dtype: what from_pretrained(path, quantization_config=...) quantizes by default
    return AutoModelForCausalLM.from_pretrained(model_or_path, dtype="auto"), str(model_or_path)


def _targets(model, target_modules, spec, rank):
    targets = find_target_linears(model, target_modules)
    for name, module in targets.items():
        if is_conv1d(module):
            raise ValueError(f"'{name}' is a transformers Conv1D (GPT-2 style); quantization_correction supports "
                             "nn.Linear targets only. Restrict target_modules.")
        skipped = [s for s in spec.get("skip_modules", []) if name == s or name.endswith("." + s)]
        if skipped:
            raise ValueError(f"'{name}' is in llm_int8_skip_modules ({skipped[0]!r}): bitsandbytes leaves it dense, "
                             "so it has no quantization error. Remove it from target_modules.")
        if rank >= min(module.out_features, module.in_features):
            raise ValueError(
                f"rank {rank} is not below the smaller dimension of '{name}' ({module.out_features} x "
                f"{module.in_features}): a correction of full rank is the dense weight. Pass a smaller rank.")
    return targets


def fake_quantize(model: nn.Module, quantization, *, target_modules: str | Sequence[str] | None = None,
                  group_size: int = 128, correction: CorrectionReport | None = None) -> dict[str, nn.Module]:
    """Replace the target weights of ``model`` in place by ``Q(W)`` (plus ``B @ A`` of ``correction``), in the
    model's dtype: the quantized (and corrected) model in ordinary Linears, to measure what a quantization does, or
    to run the int bit widths that no stock loader stores. Returns the modules changed.

    For a ``BitsAndBytesConfig`` the weights are those a 4-bit base holds (dequantized), so a model passed through
    this function computes what ``PeftModel.from_pretrained(bnb_base, adapter)`` computes, up to the 4-bit kernels'
    arithmetic. With ``correction``, its modules are the targets (``target_modules`` is not needed).
    """
    spec = _spec(quantization, group_size)
    if correction is not None:
        modules = dict(model.named_modules())
        missing = [n for n in correction.factors if n not in modules]
        if missing:
            raise ValueError(f"The correction names modules this model does not have (e.g. '{missing[0]}').")
        targets = {n: modules[n] for n in correction.factors}
    else:
        targets = find_target_linears(model, target_modules)
    with torch.no_grad():
        for name, module in targets.items():
            W = dense_weight(module)
            Q = quantized_weight(W, spec)
            if correction is not None:
                A, B = correction.factors[name]
                Q = Q + B.to(Q.device) @ A.to(Q.device)
            module.weight.data.copy_(Q.to(W.dtype))
    return targets


def _sides(model, targets, calibration, weighting, grams_on, spec, damping, max_gram_dim, progress, info):
    """The weighting side factors of every target (``{}`` for ``weighting="none"``)."""
    if weighting == "none":
        return {}
    kronecker = weighting == "kronecker"
    given = isinstance(calibration, CalibrationGrams)
    source, source_targets = model, targets
    if grams_on == "quantized" and not given:  # the activations and gradients the quantized model sees
        source = copy.deepcopy(model)
        source_targets = find_target_linears(source, list(targets))
        fake_quantize(source, spec, target_modules=list(targets))
    grams_in, grams_out, tokens = calibration_statistics(source, source_targets, calibration, kronecker=kronecker,
                                                         max_gram_dim=max_gram_dim, progress=progress)
    info["grams_on"] = "given" if given else grams_on
    info["calibration_tokens"] = tokens
    sides = weighting_sides(targets, None, None, grams_in, grams_out, damping, tokens=tokens)
    check_empty_sides(sides, True, kronecker, not given)
    empty = {n: list(s.empty) for n, s in sides.items() if s.empty}
    if empty:
        info["unweighted_sides"] = empty
        logger.warning("No calibration data reached %d module(s) on some side; those sides are unweighted: %s",
                       len(empty), ", ".join(list(empty)[:6]))
    return sides


@renamed_keywords(output_dir="path")
@torch.no_grad()
def quantization_correction(
    model_or_path: nn.Module | str | os.PathLike,
    quantization,
    rank: int,
    *,
    calibration: Iterable[Mapping[str, torch.Tensor]] | CalibrationGrams | None,
    path: str | os.PathLike | None = None,
    weighting: str = "auto",
    target_modules: str | Sequence[str] | None = None,
    group_size: int = 128,
    grams_on: str = "dense",
    damping: float = DEFAULT_DAMPING,
    max_gram_dim: int | None = None,
    progress: bool = True,
) -> CorrectionReport:
    """Fit the rank-``rank`` correction of each target's quantization error ``W - Q(W)`` to calibration data and
    write it as a plain peft LoRA adapter.

    Each module's correction ``B A`` minimises ``||L_out^T (W - Q(W) - B A) L_in||_F``
    (:func:`hf_lowrank.ops.fisher.weighted_lowrank`), ``L`` the Cholesky factors of the calibration Grams, each
    shrunk toward its diagonal by ``d / (d + tokens)`` as in :func:`~hf_lowrank.compress_model`.

    Args:
        model_or_path: the DENSE model (not quantized; left unchanged), or its folder (loaded in its checkpoint's
            dtype). ``Q`` is computed from the weights in the dtype they have here: load the 4-bit base from
            weights of that dtype for the adapter to correct exactly the error it was fitted to.
        quantization: ``transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" | "fp4",
            bnb_4bit_use_double_quant=...)``: ``Q`` is bitsandbytes' own 4-bit round trip, bit for bit what
            ``from_pretrained(base, quantization_config=...)`` holds. Or an int bit width (2 to 8): group-wise
            round-to-nearest (:func:`hf_lowrank.ops.quant.quantize_rtn`, ``group_size`` inputs a group), a
            fake-quantized measurement: no stock loader stores it, so run it with :func:`fake_quantize` on the dense
            model and load the adapter on that (``PeftModel.from_pretrained(fake_quantized, adapter)``).
        rank: the correction's rank, ``1 <= rank < min(out, in)`` of every target.
        calibration: batches (dicts with ``input_ids``, optionally ``attention_mask``; a ``DataLoader`` works), or a
            :class:`~hf_lowrank.calibration.grams.CalibrationGrams` collected earlier. ``None`` only with
            ``weighting="none"``.
        path: the adapter folder to write (atomically: safetensors weights and ``adapter_config.json``);
            ``None`` writes nothing.
        weighting: ``"kronecker"`` (input and output-gradient Grams: a forward and backward pass per batch, the
            weights frozen), ``"whitened"`` (input Grams, forwards only), ``"none"`` (plain SVD of the residual,
            data-free: LoftQ's one-iteration initialisation) or ``"auto"``: ``"kronecker"`` for a causal language
            model, else ``"whitened"``.
        target_modules: the modules to correct (:func:`~hf_lowrank.find_target_linears`; default every Linear in
            the repeated blocks, the ones bitsandbytes quantizes but the output head).
        group_size: with an int ``quantization``, the round-to-nearest group size.
        grams_on: ``"dense"`` (default, the Grams of the dense model) or ``"quantized"`` (of the model with its
            targets quantized, the activations the corrected model will see).
        damping: Gram damping (``G / mean(diag G) + damping I``).
        max_gram_dim: Grams of wider sides keep their diagonal only.
        progress: show progress bars.

    Returns:
        A :class:`CorrectionReport`: the adapter folder, the per-module errors before and after, the factors.

    Raises:
        ValueError: a quantized, compressed or peft model; an unsupported quantization; a rank not below a
            target's smaller dimension; no calibration for a data-aware weighting; a target bitsandbytes skips.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int (e.g. 16), got {rank!r}.")
    if weighting not in (*WEIGHTINGS, "auto"):
        raise ValueError(f"weighting must be one of {('auto', *WEIGHTINGS)}, got {weighting!r}.")
    if grams_on not in GRAMS_ON:
        raise ValueError(f"grams_on must be one of {GRAMS_ON}, got {grams_on!r}.")
    spec = _spec(quantization, group_size)
    model, source = _load(model_or_path)
    _check_model(model)
    check_model_ready(model)
    if weighting == "auto":
        weighting = "kronecker" if is_causal_lm(model) else "whitened"
    if calibration is None and weighting != "none":
        raise ValueError(
            f"weighting={weighting!r} fits the correction to calibration data: pass calibration= (batches of "
            "input_ids, e.g. hf_lowrank.calibration_batches(tokenizer, texts)), or weighting='none' for "
            "the data-free correction (plain SVD of W - Q(W), LoftQ's).")
    if calibration is not None and weighting == "none":
        raise ValueError("weighting='none' is the data-free correction: it uses no calibration; pass "
                         "calibration=None, or weighting='kronecker' / 'whitened' to use the data.")
    targets = _targets(model, target_modules, spec, rank)
    info: dict = {"targets": len(targets)}
    sides = _sides(model, targets, calibration, weighting, grams_on, spec, damping, max_gram_dim, progress, info)
    report = CorrectionReport(None, spec, rank, weighting, info=info)
    for name in tqdm(list(targets), desc=f"correction ({weighting})", unit="module", disable=not progress):
        weight = dense_weight(targets[name])
        Q = quantized_weight(weight, spec)  # from the weight in its own dtype, as bitsandbytes quantizes it
        W = weight.float()
        side = sides.get(name)
        out_factor, in_factor = (side.out_factor, side.in_factor) if side is not None else (None, None)
        A, B = weighted_lowrank(W - Q, rank, out_factor=out_factor, in_factor=in_factor, name=name)
        A, B = A.float().cpu().contiguous(), B.float().cpu().contiguous()
        corrected = Q + B.to(Q.device) @ A.to(Q.device)
        weighted = side is not None and side.weighted
        report.modules.append(ModuleCorrection(
            name, tuple(W.shape), rank, relative_error(W, Q), relative_error(W, corrected),
            weighted_relative_error(W, Q, out_factor, in_factor) if weighted else None,
            weighted_relative_error(W, corrected, out_factor, in_factor) if weighted else None))
        report.factors[name] = (A, B)
    if path is not None:
        report.output_dir = write_adapter(report, path, model=model, base_name_or_path=source)
    return report


@renamed_keywords(output_dir="path")
def write_adapter(report: CorrectionReport, path: str | os.PathLike, *, model: nn.Module | None = None,
                  base_name_or_path: str | None = None) -> Path:
    """Write ``report``'s factors as a standard peft LoRA adapter folder (atomically): ``lora_A = A``,
    ``lora_B = B``, ``r = lora_alpha = rank`` (scale 1), ``target_modules`` the exact module names, no dropout, no
    bias. ``correction.json`` beside it records the quantization it was fitted to and the per-module errors."""
    from peft import LoraConfig

    task_type = "CAUSAL_LM" if model is not None and is_causal_lm(model) else None
    config = LoraConfig(r=report.rank, lora_alpha=report.rank, lora_dropout=0.0, bias="none",
                        target_modules=sorted(report.factors), task_type=task_type,
                        base_model_name_or_path=base_name_or_path)
    config_dict = config.to_dict()
    config_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config_dict.items()}
    config_dict["peft_type"] = str(getattr(config.peft_type, "value", config.peft_type))
    state = {}
    for name, (A, B) in report.factors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = A
        state[f"base_model.model.{name}.lora_B.weight"] = B
    path = Path(path)
    with atomic_directory(path) as tmp:
        atomic_save_safetensors(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", config_dict)
        atomic_write_json(tmp / "correction.json", {k: v for k, v in report.summary().items() if k != "output_dir"})
    return path
