"""Which training dtype the device runs fast: bf16 where it is native, fp32 on CPUs without bf16 instructions.

trl's ``SFTConfig`` defaults to ``bf16=True``. On a CPU without native bf16 (e.g. an AMD EPYC or Intel core with
AVX2 only, no AVX512-BF16 / AMX) torch then runs its reference bf16 GEMM (``cpublas gemm_transa_<BFloat16>``), many
times slower than fp32. :func:`training_dtype_kwargs` gives the ``bf16=`` / ``fp16=`` arguments to pass to
``TrainingArguments`` / ``SFTConfig`` and says why; :func:`warn_if_slow_bf16` is what ``LowRankSFTTrainer`` calls.

The CPU feature probes are private torch functions (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``);
they are looked up defensively, and a torch without them is treated as having no native bf16 (fp32 is then chosen:
slower at worst by the bf16 speed-up, never by the reference kernels' factor).
"""

from __future__ import annotations

import logging
import warnings

import torch

__all__ = ["cpu_has_native_bf16", "training_dtype_kwargs", "warn_if_slow_bf16"]

logger = logging.getLogger(__name__)
_WARNED = False


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions torch uses (AVX512-BF16 or AMX on x86; on Arm: none probed)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for probe in probes:
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and bool(fn()):
                return True
        except Exception:  # a probe that fails means "unknown": treat as not native
            continue
    return False


def training_dtype_kwargs(use_cpu: bool | None = None) -> tuple[dict, str]:
    """``({"bf16": ..., "fp16": False}, reason)`` for ``TrainingArguments`` / ``SFTConfig`` on this machine.

    Args:
        use_cpu: whether training runs on the CPU (default: when CUDA is not available).

    Returns:
        The keyword arguments and a one-line reason (to print).
    """
    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()
    if not use_cpu:
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return {"bf16": bf16, "fp16": False}, f"CUDA: {'bf16 (native)' if bf16 else 'fp32 (no bf16 on this GPU)'}"
    capability = torch.backends.cpu.get_cpu_capability()
    if cpu_has_native_bf16():
        return {"bf16": True, "fp16": False}, f"CPU {capability} with native bf16: bf16"
    return {"bf16": False, "fp16": False}, (
        f"CPU {capability} without native bf16 (no AVX512-BF16/AMX): fp32 (bf16 would run torch's much slower "
        "reference kernels)"
    )


def warn_if_slow_bf16(args) -> bool:
    """Warn once when ``args`` (TrainingArguments) trains in bf16 on a CPU without native bf16. Returns whether it did."""
    global _WARNED
    use_cpu = bool(getattr(args, "use_cpu", False)) or not torch.cuda.is_available()
    if not (getattr(args, "bf16", False) and use_cpu) or cpu_has_native_bf16():
        return False
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"Training in bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): torch runs "
            "its reference bf16 kernels, much slower than fp32. Pass bf16=False to SFTConfig / "
            "TrainingArguments (hf_lowrank.precision.training_dtype_kwargs() picks the fast dtype).",
            stacklevel=3,
        )
    return True
