"""A factorized checkpoint never loads as random weights in a process that did not import hf_lowrank.

Stock transformers skips the unknown ``hf_lowrank`` quantization_config with a warning and builds the dense model;
the checkpoint's guard tensors then make it raise (size mismatch) instead of returning random projections.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors import safe_open
from tiny_models import make_tiny_llama, make_tiny_roberta_classifier
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_lowrank import load_compressed
from hf_lowrank.compression.checkpoint import STOCK_GUARD_KEY
from hf_lowrank.compression.compress import compress_model

_STOCK = textwrap.dedent(
    """
    import sys
    import transformers
    for path, name in zip(sys.argv[1::2], sys.argv[2::2]):
        try:
            getattr(transformers, name).from_pretrained(path)
        except Exception as exc:
            print(path, "RAISED", type(exc).__name__)
        else:
            print(path, "LOADED")
    print("HF_LOWRANK_IMPORTED", "hf_lowrank" in sys.modules)
    """
)


def _run_stock(*pairs) -> subprocess.CompletedProcess:
    """Load ``(folder, class name)`` pairs in one fresh interpreter that never imports hf_lowrank."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(x) for pair in pairs for x in pair]
    return subprocess.run([sys.executable, "-c", _STOCK, *args], capture_output=True, text=True, env=env, timeout=300)


def test_stock_transformers_refuses_a_factorized_checkpoint(tmp_path):
    models = {
        "llama": (make_tiny_llama(), AutoModelForCausalLM),
        "roberta_cls": (make_tiny_roberta_classifier(), AutoModelForSequenceClassification),
    }
    for kind, (model, _) in models.items():
        compress_model(model, 0.5)
        model.save_pretrained(tmp_path / kind)
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "hf_lowrank"
        with safe_open(tmp_path / kind / "model.safetensors", "pt") as f:
            assert STOCK_GUARD_KEY in set(f.keys())
    make_tiny_llama().save_pretrained(tmp_path / "dense")  # the guard is written for factorized models only

    pairs = [(tmp_path / kind, auto.__name__) for kind, (_, auto) in models.items()]
    proc = _run_stock(*pairs, (tmp_path / "dense", "AutoModelForCausalLM"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "HF_LOWRANK_IMPORTED False" in out  # the subprocess really is stock transformers
    for kind in models:
        assert f"{tmp_path / kind} RAISED RuntimeError" in out, out + proc.stderr[-2000:]
    assert f"{tmp_path / 'dense'} LOADED" in out, out + proc.stderr[-2000:]
    assert "import_hf_lowrank_before_from_pretrained" in proc.stderr  # the load report says what to do

    # With hf_lowrank imported the same folders load exactly, with no report about the guard tensors.
    ids = torch.arange(2, 14).reshape(1, 12)
    for kind, (model, auto) in models.items():
        loaded = load_compressed(tmp_path / kind, auto).eval()
        plain, info = auto.from_pretrained(tmp_path / kind, output_loading_info=True)
        assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            want = model(ids).logits
            assert torch.allclose(loaded(ids).logits, want, rtol=1e-5, atol=1e-6)
            assert torch.allclose(plain.eval()(ids).logits, want, rtol=1e-5, atol=1e-6)
