"""The training dtype follows what the CPU runs fast; bf16 on a CPU without native bf16 warns once."""

import warnings
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


def test_probe_agrees_with_torch():
    expected = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert precision.cpu_has_native_bf16() is expected


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
