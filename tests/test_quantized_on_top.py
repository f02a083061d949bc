"""A factorized checkpoint asked to load with bitsandbytes on top: a clear refusal that says what to do instead,
and the dense path it names works."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

import hf_lowrank
from hf_lowrank import decompress_model, load_compressed
from hf_lowrank.errors import CompressedCheckpointError

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def folder(tmp_path):
    model = make_tiny_llama(seed=0)
    hf_lowrank.compress_model(model, {"model.layers.0.mlp.up_proj": 8, "model.layers.1.self_attn.q_proj": 6},
                              progress=False)
    hf_lowrank.save_compressed(model, tmp_path / "compressed")
    return tmp_path / "compressed"


def _bnb4():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def test_load_compressed_with_bitsandbytes_says_what_to_do(folder):
    with pytest.raises(CompressedCheckpointError, match="BitsAndBytesConfig") as info:
        load_compressed(folder, quantization_config=_bnb4())
    message = str(info.value)
    assert "without quantization_config" in message and "decompress_model(model)" in message


def test_plain_from_pretrained_is_refused_by_transformers(folder):
    """transformers refuses before hf-lowrank code runs (its config merge): its own message, no silent load."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="quantized with LowRankConfig but you are passing a BitsAndBytesConfig"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=_bnb4())


def test_the_named_dense_path_quantizes(folder, tmp_path):
    """What the message says to do: decompress, save, load the dense folder with bitsandbytes 4-bit."""
    from transformers import AutoModelForCausalLM

    model = load_compressed(folder, dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    decompress_model(model).save_pretrained(tmp_path / "dense")
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=_bnb4(),
                                                     device_map="cpu", dtype=torch.float32)
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        logits = quantized(ids, use_cache=False).logits
    rel = ((logits - reference).norm() / reference.norm()).item()
    assert rel < 0.2, f"4-bit logits of the decompressed model are {rel:.3f} away (relative) from the compressed ones"
