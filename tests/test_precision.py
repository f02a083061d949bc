"""The training dtype follows what the CPU runs fast; bf16 on a CPU without native bf16 warns once."""

import platform
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_lowrank import precision


def test_cpu_choice_follows_native_bf16(monkeypatch):
    for native in (False, True):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        kwargs, why = precision.training_dtype_kwargs(use_cpu=True)
        assert kwargs == {"bf16": native, "fp16": False}
        assert torch.backends.cpu.get_cpu_capability() in why
        assert ("without native bf16" in why) is (not native)


def _cpuinfo_flags() -> set[str]:
    """The CPU feature flags the Linux kernel reports: an independent reference for the probe (which asks torch)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").exists(),
    reason="the reference reads x86 feature flags from /proc/cpuinfo",
)
def test_probe_agrees_with_the_kernels_cpu_flags():
    flags = _cpuinfo_flags()
    assert flags, "no flags line in /proc/cpuinfo"
    native = precision.cpu_has_native_bf16()
    if native:  # the probe never claims an instruction set the CPU does not report
        assert "avx512_bf16" in flags or "amx_tile" in flags
    if "avx512_bf16" in flags:  # AMX alone may also need the OS's permission, which the kernel flags do not show
        assert native


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU training only")
def test_slow_bf16_warns_once_and_fast_paths_stay_quiet(monkeypatch):
    monkeypatch.setattr(precision, "_WARNED", False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16=False"):
        assert precision.warn_if_slow_bf16(SimpleNamespace(bf16=True, use_cpu=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.warn_if_slow_bf16(SimpleNamespace(bf16=True, use_cpu=True))  # counted, not repeated
        assert not precision.warn_if_slow_bf16(SimpleNamespace(bf16=False, use_cpu=True))
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
        assert not precision.warn_if_slow_bf16(SimpleNamespace(bf16=True, use_cpu=True))
