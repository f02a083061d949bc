"""The hf-lowrank command line: compress -> inspect on a saved tiny model."""

from __future__ import annotations

import json

import torch

from hf_lowrank import load_compressed
from hf_lowrank.cli import main


def test_compress_and_inspect(tiny_llama, tmp_path, capsys):
    tiny_llama.save_pretrained(tmp_path / "dense")
    assert main(["compress", str(tmp_path / "dense"), "--keep", "0.5", "--out", str(tmp_path / "c")]) == 0
    model = load_compressed(tmp_path / "c").eval()
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["factorized_modules"] == 14 and 0.4 < info["kept_fraction"] <= 0.5
    assert all(m["rel_error"] is not None for m in info["modules"])
    assert main(["inspect", str(tmp_path / "dense")]) == 1  # a dense folder is named as such, not misread
