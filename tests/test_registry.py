"""The private upstream API hf-lowrank relies on must fail loudly if peft, transformers or bitsandbytes change it: the
PEFT-type registration (``tuners/_registry.py``) and every shim in ``hf_lowrank/_compat.py``, the only two
modules that touch it. The config round trip of every registered type (PeftConfig.from_pretrained) is in
test_peft_contract.py."""

from __future__ import annotations

import importlib
import inspect

import peft
import pytest
import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from torch import nn

import hf_lowrank
from hf_lowrank import _compat
from hf_lowrank.modules import dense_weight, is_quantized
from hf_lowrank.tuners._registry import SUPPORTED_PEFT_VERSIONS, ensure_peft_type, register_method

CONFIGS = {
    "FISHER_LORA": (hf_lowrank.FisherLoRAConfig, hf_lowrank.tuners.fisher_lora.FisherLoRAModel),
    "WELORE_LRC": (hf_lowrank.WeLoreLRCConfig, hf_lowrank.tuners.welore.WeLoreLRCModel),
    "SPSFT": (hf_lowrank.SPSFTConfig, hf_lowrank.tuners.spsft.SPSFTModel),
}


def test_peft_version_is_supported():
    assert ".".join(peft.__version__.split(".")[:2]) in SUPPORTED_PEFT_VERSIONS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_members_behave_like_builtin_ones(name):
    member = PeftType[name]
    assert member.value == name and PeftType(name) is member and member == name and hash(member) == hash(name)
    assert name in PeftType._member_names_ and getattr(PeftType, name) is member
    config_cls, model_cls = CONFIGS[name]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls


def test_registration_is_idempotent():
    before = len(PeftType.__members__)
    assert ensure_peft_type("SPSFT") is PeftType.SPSFT
    register_method(name="spsft", config_cls=hf_lowrank.SPSFTConfig, model_cls=hf_lowrank.tuners.spsft.SPSFTModel,
                    prefix="spsft_")
    assert len(PeftType.__members__) == before


# ---- hf_lowrank._compat: every private upstream symbol the package relies on, as it relies on it ----------------


@pytest.mark.parametrize("package", sorted(_compat.CHECKED_VERSIONS))
def test_installed_upstream_versions_are_the_checked_ones(package):
    assert _compat.installed_minor(package) in _compat.CHECKED_VERSIONS[package]


def test_buffer_dict_is_peft_s_and_saves_int64_buffers():
    from peft.tuners._buffer_dict import BufferDict

    assert _compat.BufferDict is BufferDict
    holder = nn.Module()
    holder.idx = _compat.BufferDict({}, persistent=True)
    holder.idx["default"] = torch.tensor([3, 1], dtype=torch.int64)
    state = holder.state_dict()
    assert list(state) == ["idx.default"] and state["idx.default"].dtype == torch.int64


def _nf4(in_features=64, out_features=32):
    import bitsandbytes as bnb

    dense = nn.Linear(in_features, out_features)
    q = bnb.nn.Linear4bit(in_features, out_features, quant_type="nf4", compute_dtype=torch.float32)
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")


def test_get_in_out_features():
    assert _compat.get_in_out_features(nn.Linear(3, 5)) == (3, 5)
    assert _compat.get_in_out_features(_nf4(64, 32)) == (64, 32)
    with pytest.warns(UserWarning, match="Unsupported layer type"):
        assert _compat.get_in_out_features(nn.ReLU()) == (None, None)


def _spsft_layer(base: nn.Module):
    from hf_lowrank.tuners.spsft.layer import Linear

    return Linear(base, "default", hf_lowrank.SPSFTConfig(r=2), r=2)


def test_base_tuner_layer_helpers_and_state():
    layer = _spsft_layer(nn.Linear(4, 3).double())
    x = torch.randn(2, 4)
    assert _compat.cast_input_dtype(layer, x, torch.float64).dtype == torch.float64
    layer.spsft_weight["default"].data = layer.spsft_weight["default"].data.float()
    _compat.move_adapter_to_device_of_base_layer(layer, "default")
    assert layer.spsft_weight["default"].dtype == torch.float64
    # What WeLore / SPSFT layers set in __init__, as peft's own tuners do, and what peft's properties read.
    assert layer._disable_adapters is False and layer.disable_adapters is False
    layer._disable_adapters = True
    assert layer.disable_adapters is True
    assert layer.active_adapters == ["default"]
    layer._active_adapter = "other"
    assert layer.active_adapter == "other" and layer.active_adapters == ["other"]
    for name in ("_cast_input_dtype", "_move_adapter_to_device_of_base_layer"):
        assert callable(getattr(BaseTunerLayer, name))
    with pytest.raises(_compat.UpstreamChangedError, match="_cast_input_dtype"):
        _compat.cast_input_dtype(nn.Linear(2, 2), x, torch.float32)


def test_base_tuner_unload_calls_the_layer_hook():
    """WeLore and SPSFT layers rely on peft's BaseTuner unloading asking each layer what to put in its place."""
    from peft.tuners.tuners_utils import BaseTuner

    assert "unload_and_optionally_merge_module" in inspect.getsource(BaseTuner._unload_and_optionally_merge)
    assert callable(BaseTuner._replace_module)


def test_model_from_config_and_tied_weights_keys():
    from tiny_models import make_tiny_llama_config
    from transformers import LlamaForCausalLM

    config = make_tiny_llama_config()
    config.tie_word_embeddings = True
    model = _compat.model_from_config(LlamaForCausalLM, config, dtype=torch.float64)
    assert type(model) is LlamaForCausalLM and next(model.parameters()).dtype == torch.float64
    assert "lm_head.weight" in _compat.tied_weights_keys(model)
    with pytest.raises(_compat.UpstreamChangedError, match="_from_config"):
        _compat.model_from_config(nn.Linear, config)


def test_transformers_reads_the_private_flags_set_here():
    from transformers import PreTrainedModel

    source = inspect.getsource(importlib.import_module("transformers.modeling_utils"))
    for attr in ("_keys_to_ignore_on_load_unexpected", "_hf_peft_config_loaded"):
        assert attr in source
    assert "_keys_to_ignore_on_load_unexpected" in vars(PreTrainedModel)
    model = nn.Module()
    model._keys_to_ignore_on_load_unexpected = ["a"]
    _compat.add_keys_to_ignore_on_load_unexpected(model, {"b"})
    assert model._keys_to_ignore_on_load_unexpected == {"a", "b"}
    model._hf_peft_config_loaded = True
    _compat.clear_peft_config_loaded(model)
    assert model._hf_peft_config_loaded is False


def test_remove_parallel_forward_undoes_transformers_tp_hook(tiny_llama):
    """transformers' ``apply_tensor_parallelism`` hooks a module by replacing its ``forward`` and setting
    ``_is_hooked``, which ``remove_parallel_forward`` undoes (a style that shards nothing needs no process group)."""
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    apply_tensor_parallelism(tiny_llama, None, {"model.layers.0.mlp.down_proj": "replicate"})
    module = tiny_llama.model.layers[0].mlp.down_proj
    assert module._is_hooked and "forward" in vars(module)
    assert _compat.remove_parallel_forward(module) is True
    assert "forward" not in vars(module) and not module._is_hooked
    assert _compat.remove_parallel_forward(module) is False  # nothing left to remove
    hooked_otherwise = nn.Linear(2, 2)
    hooked_otherwise._is_hooked = True
    with pytest.raises(_compat.UpstreamChangedError, match="install_forward"):
        _compat.remove_parallel_forward(hooked_otherwise)


def test_config_name_or_path_is_public():
    from transformers import PretrainedConfig

    config = PretrainedConfig(name_or_path="some/model")
    assert config.name_or_path == "some/model"


def test_unpack_bnb_cpu_weight_undoes_the_cpu_packing():
    import bitsandbytes.functional as bnbF

    q = _nf4()
    ref = bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state).clone()
    qweight = q.weight.data.clone()
    assert callable(bnbF._convert_weight_packed_for_cpu_inverse)
    # What Linear4bit.forward does on an AVX512-BF16 CPU in eval mode.
    q.weight.data, q.weight.quant_state = bnbF._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu
    W = dense_weight(q)  # unpacks first
    assert torch.equal(q.weight.data, qweight) and not q.weight.quant_state.packing_format_for_cpu
    assert W.shape == (32, 64) and torch.allclose(W, ref, atol=1e-2 * float(ref.abs().max()))
    _compat.unpack_bnb_cpu_weight(nn.Linear(2, 2))  # no-op on anything else


def test_dense_weight_is_peft_s_dequantization():
    from peft.utils.integrations import dequantize_module_weight

    q = _nf4()
    assert is_quantized(q) and not is_quantized(nn.Linear(2, 2))
    W = dense_weight(q)
    assert W.shape == (32, 64) and W.is_floating_point()
    assert torch.equal(W, dequantize_module_weight(q).reshape(32, 64))
    lin = nn.Linear(4, 3)
    assert dense_weight(lin).data_ptr() == lin.weight.data_ptr() and not dense_weight(lin).requires_grad
