"""Compressing a model never changes another model built from the same config object.

transformers models keep the config object they are built from (``Model(cfg)`` twice, ``from_config(cfg)``, the
base model ``model.model`` inside a task model); compression records its rank map in the config, so the model being
compressed must write into a config of its own.
"""

from __future__ import annotations

import torch
from tiny_models import TINY_LLAMA, TINY_ROBERTA, make_tiny_llama_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_lowrank import load_compressed
from hf_lowrank.compression.compress import compress_model
from hf_lowrank.tuners.welore import WeLoreLRCConfig


def _ids() -> torch.Tensor:
    return torch.arange(3, 19).reshape(2, 8)


def test_two_classifiers_from_one_config_object(tmp_path):
    cfg = RobertaConfig(**TINY_ROBERTA)
    torch.manual_seed(0)
    compressed = RobertaForSequenceClassification(cfg).eval()
    torch.manual_seed(1)
    other = RobertaForSequenceClassification(cfg).eval()
    assert other.config is cfg  # the premise: transformers keeps the object it was given

    compress_model(compressed, 0.5, progress=False)

    assert compressed.config.quantization_config.ranks
    assert compressed.roberta.config is compressed.config  # the base model follows the task model's copy
    assert getattr(other.config, "quantization_config", None) is None
    assert getattr(cfg, "quantization_config", None) is None
    assert other.roberta.config is cfg and getattr(other, "hf_quantizer", None) is None

    # the untouched model saves a dense checkpoint that reloads exactly, and the compressed one a factorized one
    other.save_pretrained(tmp_path / "other")
    compressed.save_pretrained(tmp_path / "compressed")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "other").eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, other(_ids()).logits)
        back = load_compressed(tmp_path / "compressed", AutoModelForSequenceClassification).eval()
        assert torch.allclose(back(_ids()).logits, compressed(_ids()).logits, rtol=1e-5, atol=1e-6)


def test_from_config_then_compress_leaves_the_config_object_alone(tmp_path):
    cfg = make_tiny_llama_config()
    torch.manual_seed(0)
    first = AutoModelForCausalLM.from_config(cfg).eval()
    torch.manual_seed(1)
    second = LlamaForCausalLM(cfg).eval()
    compress_model(first, 0.5, progress=False)
    assert getattr(cfg, "quantization_config", None) is None
    assert getattr(second.config, "quantization_config", None) is None
    assert first.model.config is first.config
    second.save_pretrained(tmp_path / "second")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "second").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, second(_ids()).logits)


def test_welore_merge_leaves_a_sibling_model_alone():
    from peft import get_peft_model

    cfg = make_tiny_llama_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    sibling = LlamaForCausalLM(cfg).eval()
    peft_model = get_peft_model(model, WeLoreLRCConfig(reduction=0.3, target_modules=["up_proj", "down_proj"]))
    merged = peft_model.merge_and_unload()
    assert merged.config.quantization_config.method == "welore"
    assert getattr(sibling.config, "quantization_config", None) is None
    assert getattr(cfg, "quantization_config", None) is None


def test_a_composite_model_keeps_its_sub_configs_consistent():
    """Llava's parts hold the sub-configs (``config.text_config``, ``config.vision_config``): after the copy they
    hold the copy's, so the model still agrees with itself, and the original config objects are untouched."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    cfg = LlavaConfig(text_config=LlamaConfig(**TINY_LLAMA), vision_config=vision, image_token_index=5)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    originals = {id(cfg), id(cfg.text_config), id(cfg.vision_config)}
    compress_model(model, 0.5, progress=False)
    assert getattr(cfg, "quantization_config", None) is None and model.config.quantization_config.ranks
    for name, module in model.named_modules():
        assert id(module.__dict__.get("config")) not in originals, name
    assert model.model.language_model.config is model.config.text_config
    assert model.model.vision_tower.config is model.config.vision_config
    assert model.model.language_model.layers[0].self_attn.config is model.config.text_config
