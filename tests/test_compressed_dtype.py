"""``.half()`` / ``.float()`` on a compressed model cast its factors like ``.to(dtype)`` does.

transformers refuses both for a model that reports ``is_quantized`` (its weights are quantized codes); a low-rank
factor pair is two ordinary floating-point weights, so a compressed model reports ``is_quantized = False``.
"""

from __future__ import annotations

import torch
from tiny_models import make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_lowrank import load_compressed
from hf_lowrank.compression.compress import compress_model
from hf_lowrank.modules import LowRankLinear


def _check_half_float(model):
    ids = torch.arange(3, 27).reshape(2, 12)
    with torch.no_grad():
        want = model(ids).logits
        reference = model.to(torch.float16)(ids).logits.float()
        model.float()
        half = model.half()
        assert half is model
        assert all(p.dtype == torch.float16 for p in model.parameters())
        torch.testing.assert_close(model(ids).logits.float(), reference, rtol=0, atol=0)
        model.float()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-3, atol=1e-2)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())


def test_half_and_float_on_a_compressed_and_on_a_reloaded_model(tmp_path):
    model = make_tiny_llama()
    compress_model(model, 0.5, progress=False)
    _check_half_float(model)
    model.save_pretrained(tmp_path / "c")
    _check_half_float(load_compressed(tmp_path / "c").eval())
    _check_half_float(AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval())
