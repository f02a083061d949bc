"""All or nothing: a compression or a WeLore initialisation that fails in a late layer leaves the model exactly as it
was (no layer swapped, no weight dropped, no quantization_config), whether it fails at get_peft_model, at a deferred
merge or at the first forward."""

from __future__ import annotations

import pytest
import torch
from peft import PeftConfig, get_peft_model
from testing_common import assert_same_state, make_tiny_llama, mlp_fisher_lora, snapshot_state

from hf_lowrank.modules import LowRankLinear
from hf_lowrank.ops.svd import SVDError
from hf_lowrank.tuners.fisher_lora import compress_peft_model
from hf_lowrank.tuners.welore import WeLoreLayer, WeLoreLRCConfig
from hf_lowrank.tuners.welore import layer as welore_layer

LATE = "model.layers.1.mlp.down_proj"  # the last of the tiny Llama's 14 block Linears
IDS = torch.arange(24).reshape(2, 12)


def test_compress_peft_model_inplace_is_all_or_nothing():
    pm = mlp_fisher_lora(make_tiny_llama(seed=0))
    base = pm.get_base_model()
    with torch.no_grad():
        base.get_submodule(LATE).base_layer.weight[3, 5] = float("nan")
    before = snapshot_state(pm)
    with pytest.raises(SVDError, match=LATE.replace(".", r"\.")):
        compress_peft_model(pm, fisher_source="none", inplace=True, progress=False)
    assert_same_state(pm, before)
    assert getattr(base.config, "quantization_config", None) is None
    assert not any(isinstance(m, LowRankLinear) for m in base.modules())


def _planted():
    from test_welore import _plant_spectra

    model = make_tiny_llama(seed=0)
    _plant_spectra(model)
    return model


def test_welore_get_peft_model_is_all_or_nothing(monkeypatch):
    """A factor SVD that fails in the last layer (its weight seen with a NaN) leaves the model as it was."""
    real = welore_layer.fwsvd
    seen = []

    def nan_in_last(W, rank, *args, name=None, **kwargs):
        seen.append(name)
        if name == last:
            W = W.clone()
            W[0, 0] = float("nan")
        return real(W, rank, *args, name=name, **kwargs)

    model = _planted()
    probe = get_peft_model(_planted(), WeLoreLRCConfig(reduction=0.3, progress=False))
    last = [n for n, m in probe.named_modules() if isinstance(m, WeLoreLayer)][-1].removeprefix("base_model.model.")
    before = snapshot_state(model)
    monkeypatch.setattr(welore_layer, "fwsvd", nan_in_last)
    with pytest.raises(SVDError, match=last.replace(".", r"\.")):
        get_peft_model(model, WeLoreLRCConfig(reduction=0.3, progress=False))
    assert len(seen) > 2 and seen[-1] == last  # it failed late, after other layers had their factors
    assert not any(isinstance(m, WeLoreLayer) for m in model.modules())
    assert_same_state(model, before)
    assert getattr(model.config, "quantization_config", None) is None
    model(IDS)  # still runs, dense


def test_welore_deferred_merge_and_forward_are_all_or_nothing(tmp_path):
    """A rank map reused without weights initialises lazily: a NaN in a late layer must not leave earlier layers
    initialised with their dense weights dropped, whether the failure comes at merge_and_unload or at forward."""
    fresh = get_peft_model(_planted(), WeLoreLRCConfig(reduction=0.3, progress=False))
    fresh.save_pretrained(tmp_path / "a")
    model = _planted()
    reused = get_peft_model(model, PeftConfig.from_pretrained(tmp_path / "a"))
    layers = [(n, m) for n, m in reused.named_modules() if isinstance(m, WeLoreLayer)]
    with torch.no_grad():
        layers[-1][1].get_base_layer().weight[0, 0] = float("nan")
    before = snapshot_state(reused)
    with pytest.raises(SVDError):
        reused.merge_and_unload()
    assert [n for n, m in reused.named_modules() if isinstance(m, WeLoreLayer)] == [n for n, _ in layers]
    assert all(m._pending and m.get_base_layer().weight is not None for _, m in layers)
    assert_same_state(reused, before)
    with pytest.raises(SVDError):
        reused(input_ids=IDS)
    assert all(m._pending and m.get_base_layer().weight is not None for _, m in layers)
    assert_same_state(reused, before)
    assert getattr(model.config, "quantization_config", None) is None


def test_welore_merge_and_unload_still_compresses():
    pm = get_peft_model(_planted(), WeLoreLRCConfig(reduction=0.3, progress=False))
    ref = pm(input_ids=IDS).logits
    merged = pm.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, WeLoreLayer) for m in merged.modules())
    assert any(isinstance(m, LowRankLinear) for m in merged.modules())
    torch.testing.assert_close(merged(IDS).logits, ref, rtol=1e-5, atol=1e-6)
