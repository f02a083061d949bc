"""Sequence classifiers keep their trained head through merge_and_unload, save_pretrained / from_pretrained and the
ERE LoRA export. The RoBERTa head is two Linear layers (``classifier.dense`` + ``classifier.out_proj``) that peft
wraps whole in a ``ModulesToSaveWrapper`` for ``task_type="SEQ_CLS"``."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from tiny_models import make_tiny_roberta_classifier
from transformers import AutoModelForSequenceClassification
from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

from hf_lowrank import SPSFTConfig, WeLoreLRCConfig, save_as_lora
from hf_lowrank.compression.ere import decode_residual, encode_residual


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(2, 128, (4, 12), generator=g), torch.tensor([0, 1, 2, 1])


def _train_step(model, lr: float = 0.05) -> None:
    ids, labels = _batch()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_batch()[0]).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CONFIGS = {
    "welore": lambda: WeLoreLRCConfig(reduction=0.3, task_type="SEQ_CLS", progress=False),
    "spsft": lambda: SPSFTConfig(r=4, task_type="SEQ_CLS"),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merge_and_unload_keeps_the_trained_classifier_head(tmp_path, method):
    base = make_tiny_roberta_classifier()
    head_before = base.classifier.out_proj.weight.detach().clone()
    model = get_peft_model(base, CONFIGS[method]())
    assert isinstance(model.base_model.model.classifier, ModulesToSaveWrapper)
    _train_step(model)
    trained_head = model.base_model.model.classifier.modules_to_save["default"].out_proj.weight.detach().clone()
    assert not torch.equal(trained_head, head_before)  # the head did train
    ref = _logits(model)

    merged = model.merge_and_unload()
    assert type(merged.classifier) is RobertaClassificationHead
    assert torch.equal(merged.classifier.out_proj.weight, trained_head)  # the trained copy, not the original
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
    assert _rel(_logits(merged), ref) < 1e-5

    merged.save_pretrained(tmp_path / "merged")
    keys = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert keys["architectures"] == ["RobertaForSequenceClassification"]
    from safetensors import safe_open

    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "classifier.out_proj.weight" in names
    assert not any("modules_to_save" in n or "original_module" in n for n in names)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(loaded.classifier.out_proj.weight, trained_head)
    assert _rel(_logits(loaded), ref) < 1e-5


def test_welore_unload_gives_dense_layers_and_the_trained_head_like_peft():
    """``unload()`` (no merge) restores the dense WeLore layers and, as peft does for LoRA, keeps the trained copy of
    a modules_to_save head; a wrong adapter name is refused before anything is replaced."""
    base = make_tiny_roberta_classifier()
    dense_before = {n: p.detach().clone() for n, p in base.named_parameters() if not n.startswith("classifier")}
    model = get_peft_model(base, WeLoreLRCConfig(reduction=0.3, task_type="SEQ_CLS", keep_dense=True, progress=False))
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.merge_and_unload(adapter_names=["nope"])
    _train_step(model)
    trained_head = model.base_model.model.classifier.modules_to_save["default"].out_proj.weight.detach().clone()
    dense = model.unload()
    assert type(dense.classifier) is RobertaClassificationHead
    assert torch.equal(dense.classifier.out_proj.weight, trained_head)
    assert all(type(m).__name__ != "WeLoreLinear" for m in dense.modules())
    after = dict(dense.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in dense_before.items())


@torch.no_grad()
def test_ere_export_of_a_roberta_classifier_loads_in_vanilla_peft(tmp_path):
    base = make_tiny_roberta_classifier()
    base.save_pretrained(tmp_path / "base")
    ft = make_tiny_roberta_classifier()
    g = torch.Generator().manual_seed(5)
    for name, p in ft.named_parameters():  # a "full fine-tune": every 2-D weight moves (rank 4), the head most
        if p.ndim == 2 and "embeddings" not in name:
            scale = 0.3 if name.startswith("classifier") else 0.02
            p += scale * torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g) / 4
    res_dir = tmp_path / "r"
    encode_residual(base, ft, rank=32, bits=8, path=res_dir, progress=False)
    decoded = decode_residual(base, res_dir, progress=False).eval()
    save_as_lora(tmp_path / "lora", res_dir, base_model=base)

    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS"
    assert not any(t.startswith("classifier") for t in cfg["target_modules"])
    assert "classifier" in cfg["modules_to_save"]
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "lora").eval()
    got, want, ref = _logits(peft_model), _logits(decoded), _logits(ft)
    assert _rel(got, want) < 1e-5  # the adapter is the decoded residual
    assert _rel(got, ref) < 0.02  # within the ERE quantization fidelity
    assert _rel(_logits(base), ref) > 0.2  # the fine-tune did change the outputs
