"""``save_as_lora``: the one exporter to a vanilla PEFT LoRA adapter, in peft's argument order (path first).

The SPSFT, residual and FisherLoRA-folder routes are checked against stock peft in their own test files
(test_spsft.py, test_residual.py, test_fisher_lora.py, test_paths_matrix.py); here: the in-memory FisherLoRA and
LoRA models, the refusals, and the three deprecated exporters that now delegate to it.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from testing_common import make_finetuned_copy, make_tiny_fisher_lora

import hf_lowrank
from hf_lowrank import SPSFTConfig, WeLoreLRCConfig, save_as_lora
from hf_lowrank.compression.ere import encode_residual, export_residual_as_lora
from hf_lowrank.tuners.fisher_lora import export_lora_adapter
from hf_lowrank.tuners.spsft import export_spsft_as_lora


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


def _nonzero_b(pm):
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


@pytest.mark.parametrize("kind", ["fisher_lora", "lora"])
def test_an_in_memory_fisher_lora_or_lora_model_loads_with_stock_peft(tiny_llama, tmp_path, kind):
    fresh = copy.deepcopy(tiny_llama)
    if kind == "fisher_lora":
        pm = make_tiny_fisher_lora(tiny_llama)
    else:
        pm = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _nonzero_b(pm)
    x = torch.randint(0, 128, (2, 10))
    ref = _logits(pm, x)
    out = save_as_lora(tmp_path / "lora", pm)
    assert out == tmp_path / "lora"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "compress_rank" not in cfg
    vanilla = PeftModel.from_pretrained(fresh, out)
    assert type(vanilla.peft_config["default"]) is LoraConfig
    torch.testing.assert_close(_logits(vanilla, x), ref)


def test_a_named_adapter_is_exported(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    pm = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="mine")
    _nonzero_b(pm)
    x = torch.randint(0, 128, (2, 10))
    ref = _logits(pm, x)
    save_as_lora(tmp_path / "lora", pm, "mine")
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(fresh, tmp_path / "lora"), x), ref)
    with pytest.raises(ValueError, match="no adapter 'default'"):
        save_as_lora(tmp_path / "x", pm)


def test_refusals_name_the_problem_and_the_fix(tiny_llama, tmp_path):
    welore = get_peft_model(copy.deepcopy(tiny_llama), WeLoreLRCConfig(reduction=0.3, progress=False))
    with pytest.raises(ValueError, match="merge_and_unload.*save_compressed"):
        save_as_lora(tmp_path / "w", welore)
    spsft = get_peft_model(copy.deepcopy(tiny_llama), SPSFTConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="base_model is for an ERE residual only"):
        save_as_lora(tmp_path / "s", spsft, base_model=tiny_llama)
    with pytest.raises(TypeError, match="get_peft_model"):
        save_as_lora(tmp_path / "m", tiny_llama)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an ERE residual folder"):
        save_as_lora(tmp_path / "e", tmp_path / "empty")
    assert not (tmp_path / "w").exists() and not (tmp_path / "s").exists()


def _warns_naming_save_as_lora(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("save_as_lora" in m for m in messages), messages
    return out


def test_the_three_old_exporters_warn_and_write_what_save_as_lora_writes(tiny_llama, tmp_path):
    # SPSFT
    spsft = get_peft_model(copy.deepcopy(tiny_llama), SPSFTConfig(r=4, target_modules=["q_proj"]))
    _warns_naming_save_as_lora(lambda: export_spsft_as_lora(spsft, tmp_path / "old_spsft"))
    save_as_lora(tmp_path / "new_spsft", spsft)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "old_spsft" / name).read_bytes() == (tmp_path / "new_spsft" / name).read_bytes()
    # FisherLoRA folder
    fl = make_tiny_fisher_lora(copy.deepcopy(tiny_llama))
    fl.save_pretrained(tmp_path / "ad")
    _warns_naming_save_as_lora(lambda: export_lora_adapter(tmp_path / "ad", tmp_path / "old_fl"))
    assert json.loads((tmp_path / "old_fl" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # residual
    encode_residual(tiny_llama, make_finetuned_copy(tiny_llama), rank=8, path=tmp_path / "r", progress=False)
    _warns_naming_save_as_lora(
        lambda: export_residual_as_lora(tmp_path / "r", tmp_path / "old_r", base_model=tiny_llama, progress=False)
    )
    save_as_lora(tmp_path / "new_r", tmp_path / "r", base_model=tiny_llama)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "old_r" / name).read_bytes() == (tmp_path / "new_r" / name).read_bytes()


def test_save_as_lora_is_a_top_level_name():
    assert "save_as_lora" in hf_lowrank.__all__ and hf_lowrank.save_as_lora is save_as_lora
