"""``torch.export`` of a reloaded factorized checkpoint (the way to ExecuTorch and other ahead-of-time runtimes).

A tiny Llama with per-module ranks, some modules left dense, saved and reloaded through ``from_pretrained``, is
exported with ``use_cache=False``; the exported program must give the eager logits within 1e-6 (measured: identical)
on the input it was traced with and on another input of another length (the sequence length is declared dynamic).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

import hf_lowrank
from hf_lowrank.modules import LowRankLinear


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    model = make_tiny_llama(seed=3)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ranks = {name: 5 + (7 * i) % 17 for i, name in enumerate(names) if i % 3 != 2}
    hf_lowrank.compress_model(model, ranks, progress=False)
    folder = tmp_path_factory.mktemp("export") / "compressed"
    hf_lowrank.save_compressed(model, folder)
    model = hf_lowrank.load_compressed(folder, dtype=torch.float32).eval()
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(ranks)
    return model


def test_torch_export_gives_eager_logits(reloaded):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))
    seq = torch.export.Dim("seq", min=2, max=64)
    with torch.no_grad():
        program = torch.export.export(
            reloaded, args=(ids,), kwargs={"use_cache": False}, dynamic_shapes=({1: seq}, None)
        )
        exported = program.module()
        for x in (ids, other):
            eager = reloaded(x, use_cache=False).logits
            got = exported(x, use_cache=False).logits
            assert got.shape == eager.shape
            err = (got - eager).abs().max().item()
            assert err <= 1e-6, f"exported logits differ from eager ones by {err}"
    # the factors are in the program as two matmuls, not folded back into one dense weight
    params = dict(program.named_parameters())
    assert "model.layers.0.self_attn.q_proj.down.weight" in params
    assert "model.layers.0.self_attn.q_proj.weight" not in params
