"""Trust, round 2: all-or-nothing FisherLoRA / WeLore, Fisher states that say what they belong to, numpy ranks,
and the hostile-suite findings pinned as explicit cases."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftConfig, get_peft_model
from tiny_models import make_tiny_llama, write_safetensors_header

import hf_lowrank
from hf_lowrank.compression.checkpoint import CompressedCheckpointError, LowRankConfig
from hf_lowrank.compression.compress import resolve_ranks
from hf_lowrank.modules import LowRankLinear
from hf_lowrank.ops.svd import SVDError
from hf_lowrank.peft_configs.fisher_lora import (
    FisherCollector,
    FisherLoRAConfig,
    FisherState,
    FisherStateError,
    compress_peft_model,
)
from hf_lowrank.peft_configs.welore import WeLoreLayer, WeLoreLRCConfig
from hf_lowrank.peft_configs.welore import layer as welore_layer

MLP = ["gate_proj", "up_proj", "down_proj"]
LATE = "model.layers.1.mlp.down_proj"  # the last of the tiny Llama's 14 block Linears
IDS = torch.arange(24).reshape(2, 12)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)


def _peft(model, **kw):
    torch.manual_seed(1)
    defaults = dict(r=4, lora_alpha=8, target_modules=MLP, init_lora_weights=False, compress_rank=8)
    defaults.update(kw)
    return get_peft_model(model, FisherLoRAConfig(**defaults))


def _collect(pm, n=2):
    collector = FisherCollector("lora").attach(pm)
    pm.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randint(0, 128, (2, 12), generator=g)
        pm(input_ids=x, labels=x).loss.backward()
    pm.zero_grad(set_to_none=True)
    collector.detach()
    pm.eval()
    return collector


# ------------------------------------------------------------------------------------------- 1: all or nothing
def test_compress_peft_model_inplace_is_all_or_nothing():
    pm = _peft(make_tiny_llama(seed=0))
    base = pm.get_base_model()
    with torch.no_grad():
        base.get_submodule(LATE).base_layer.weight[3, 5] = float("nan")
    before = _snapshot(pm)
    with pytest.raises(SVDError, match=LATE.replace(".", r"\.")):
        compress_peft_model(pm, fisher_source="none", inplace=True, progress=False)
    _assert_same_state(pm, before)
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
    before = _snapshot(model)
    monkeypatch.setattr(welore_layer, "fwsvd", nan_in_last)
    with pytest.raises(SVDError, match=last.replace(".", r"\.")):
        get_peft_model(model, WeLoreLRCConfig(reduction=0.3, progress=False))
    assert len(seen) > 2 and seen[-1] == last  # it failed late, after other layers had their factors
    assert not any(isinstance(m, WeLoreLayer) for m in model.modules())
    _assert_same_state(model, before)
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
    before = _snapshot(reused)
    with pytest.raises(SVDError):
        reused.merge_and_unload()
    assert [n for n, m in reused.named_modules() if isinstance(m, WeLoreLayer)] == [n for n, _ in layers]
    assert all(m._pending and m.get_base_layer().weight is not None for _, m in layers)
    _assert_same_state(reused, before)
    with pytest.raises(SVDError):
        reused(input_ids=IDS)
    assert all(m._pending and m.get_base_layer().weight is not None for _, m in layers)
    _assert_same_state(reused, before)
    assert getattr(model.config, "quantization_config", None) is None


def test_welore_merge_and_unload_still_compresses():
    pm = get_peft_model(_planted(), WeLoreLRCConfig(reduction=0.3, progress=False))
    ref = pm(input_ids=IDS).logits
    merged = pm.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, WeLoreLayer) for m in merged.modules())
    assert any(isinstance(m, LowRankLinear) for m in merged.modules())
    torch.testing.assert_close(merged(IDS).logits, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- 2: silent Fisher
@pytest.mark.parametrize("fill", [float("nan"), 0.0])
def test_useless_fisher_warns_that_it_is_plain_svd(fill):
    pm = _peft(make_tiny_llama(seed=0))
    c = _collect(pm, n=1)
    state = c.state.clone()
    name = "model.layers.1.mlp.up_proj"
    for key in list(state.tensors):
        if fill != fill or key.startswith(name + "."):  # NaN: every module; zero: one module
            state.tensors[key] = torch.full_like(state.tensors[key], fill)
    with pytest.warns(UserWarning, match="plain SVD") as record:
        compress_peft_model(pm, fisher=state, progress=False)
    text = " ".join(str(w.message) for w in record)
    assert name in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy state: no warning
        compress_peft_model(pm, fisher=c.state, progress=False)


def test_fisher_of_another_adapter_rank_is_refused():
    c = _collect(_peft(make_tiny_llama(seed=0), r=4))
    other = _peft(make_tiny_llama(seed=0), r=8)
    with pytest.raises(FisherStateError, match="r=4.*r=8"):
        compress_peft_model(other, fisher=c.state, progress=False)
    old = c.state.clone()
    old.fingerprint = None  # a state saved before fingerprints: the F_A shapes still tell
    with pytest.raises(FisherStateError, match="adapter rank"):
        compress_peft_model(other, fisher=old, progress=False)


def test_fisher_of_another_model_of_the_same_shapes_is_refused(tmp_path):
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    a.config._name_or_path, b.config._name_or_path = "org/model-a", "org/model-b"
    c = _collect(_peft(a))
    c.save(tmp_path / "fisher.safetensors")
    loaded = FisherState.load(tmp_path / "fisher.safetensors")
    assert loaded.fingerprint["adapter_rank"] == 4 and loaded.fingerprint["name_or_path"] == "org/model-a"
    pm_b = _peft(b)
    with pytest.raises(FisherStateError, match="another model of the same shapes"):
        compress_peft_model(pm_b, fisher=loaded, progress=False)
    collector = FisherCollector("lora").attach(pm_b)
    with pytest.raises(FisherStateError, match="another model of the same shapes"):
        collector.load_state(tmp_path / "fisher.safetensors")
    collector.detach()
    # the same model, another dtype (bf16 training, fp32 compression): accepted
    same = make_tiny_llama(seed=0)
    same.config._name_or_path = "/local/copy/model-a"
    compress_peft_model(_peft(same), fisher=loaded, progress=False)


def test_old_fisher_state_without_fingerprint_still_loads(tmp_path):
    from safetensors.torch import save_file

    pm = _peft(make_tiny_llama(seed=0))
    c = _collect(pm)
    meta = {k: v for k, v in c.state.to_metadata().items() if k != "fingerprint"}
    save_file({k: v.contiguous() for k, v in c.state.tensors.items()}, str(tmp_path / "old.safetensors"), meta)
    old = FisherState.load(tmp_path / "old.safetensors")
    assert old.fingerprint is None
    model, report = compress_peft_model(pm, fisher=old, progress=False)
    assert report.method == "fisher_lora"
    fresh = FisherCollector("lora").attach(pm)
    fresh.load_state(old)
    fresh.detach()


def test_kronecker_state_keeps_its_grams_and_fingerprint(tmp_path):
    pm = _peft(make_tiny_llama(seed=0), fisher_weighting="kronecker")
    c = _collect(pm)
    assert any(k.endswith(".gram_in") for k in c.state.tensors)
    c.save(tmp_path / "k.safetensors")
    loaded = FisherState.load(tmp_path / "k.safetensors")
    assert loaded.fingerprint and set(loaded.tensors) == set(c.state.tensors)
    _, report = compress_peft_model(pm, fisher=loaded, progress=False)
    assert report.info["fisher_weighting"] == "kronecker"


# ------------------------------------------------------------------------------------------- 3: clear messages
def test_numpy_integer_ranks_are_ranks():
    model = make_tiny_llama(seed=0)
    targets = hf_lowrank.find_target_linears(model)
    assert set(resolve_ranks(targets, np.int64(4)).values()) == {4}
    name = next(iter(targets))
    assert resolve_ranks(targets, {name: np.int32(4)}) == {name: 4}
    report = hf_lowrank.compress_model(model, np.int64(4), progress=False)
    assert set(report.ranks.values()) == {4}
    assert all(type(r) is int for r in model.config.quantization_config.ranks.values())
    assert LowRankConfig(ranks={name: np.int64(4)}).ranks == {name: 4}
    json.dumps(LowRankConfig(ranks={name: np.int64(4)}).to_dict())


def test_numpy_integer_welore_ranks(tmp_path):
    cfg = WeLoreLRCConfig(rank_pattern={"q_proj": np.int64(4)}, progress=False)
    assert cfg.rank_pattern == {"q_proj": 4} and type(cfg.rank_pattern["q_proj"]) is int
    pm = get_peft_model(_planted(), cfg)
    rank_map = {k: np.int64(v) for k, v in pm.peft_config["default"].rank_map.items()}
    lrc = list(pm.peft_config["default"].lrc_modules)
    reused = WeLoreLRCConfig(rank_map=rank_map, lrc_modules=lrc, progress=False)
    assert all(type(v) is int for v in reused.rank_map.values())
    again = get_peft_model(_planted(), reused)
    again.save_pretrained(tmp_path)  # adapter_config.json serialises
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_map"]


def test_welore_on_an_already_compressed_model_says_so():
    model = make_tiny_llama(seed=0)
    hf_lowrank.compress_model(model, 0.5, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        get_peft_model(model, WeLoreLRCConfig(reduction=0.3, progress=False))


# ------------------------------------------------------------------------------------------- 4: hostile findings
def _header(path: Path) -> dict:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_dense_weight_relabelled_as_integer_is_refused(tmp_path, dtype):
    """Found by HF_LOWRANK_HOSTILE_EXAMPLES=1000 (test_tampered_checkpoint_is_refused_or_loads_the_saved_model):
    an F32 dense weight whose header says I32 (same size) loaded, cast to float: a different model, no error."""
    model = make_tiny_llama(seed=0)
    hf_lowrank.compress_model(model, 0.5, progress=False)
    hf_lowrank.save_compressed(model, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model.safetensors"
    header = _header(shard)
    assert header["model.embed_tokens.weight"]["dtype"] == "F32"
    header["model.embed_tokens.weight"]["dtype"] = dtype
    write_safetensors_header(shard, header)
    with pytest.raises(CompressedCheckpointError, match="model.embed_tokens.weight.*not a float type"):
        hf_lowrank.load_compressed(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt")
