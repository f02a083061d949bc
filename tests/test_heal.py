"""The healing recipe (examples/heal.py): compress, LoRA on the factor Linears, merge; the checkpoint keeps its format.

The recipe's ``heal`` is imported from the example itself, so the test checks the code users run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama
from transformers import AutoModelForCausalLM

from hf_lowrank import LowRankLinear, compress_model

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heal.py"


def _heal_module():
    spec = importlib.util.spec_from_file_location("heal_example", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compressed():
    model = make_tiny_llama()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128, (4, 32), generator=g)} for _ in range(4)]
    report = compress_model(model, 0.6, calibration=batches, progress=False)
    return model, report


@pytest.mark.parametrize("targets", ["factors", "full"])
def test_healed_model_keeps_ranks_and_reloads_exactly(tmp_path, targets):
    heal = _heal_module()
    model, report = _compressed()
    before = {n: (m.down.weight.clone(), m.up.weight.clone()) for n, m in model.named_modules()
              if isinstance(m, LowRankLinear)}
    chunks = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(2))
    probe = chunks[:2]
    with torch.no_grad():
        loss_before = model(input_ids=chunks, labels=chunks).loss.item()
    healed, history = heal.heal(model, chunks, steps=6, batch_size=4, lr=1e-2, targets=targets,
                                evaluate=lambda m: {}, eval_at=[6], log=None)
    assert history[-1]["step"] == 6
    layers = {n: m for n, m in healed.named_modules() if isinstance(m, LowRankLinear)}
    assert set(layers) == set(before) == set(report.ranks)
    assert all(layers[n].rank == report.ranks[n] for n in layers)  # the heal changes values, never ranks
    assert all(type(m.up) is torch.nn.Linear and type(m.down) is torch.nn.Linear for m in layers.values())
    assert any(not torch.equal(layers[n].up.weight, before[n][1]) for n in layers)
    with torch.no_grad():
        assert healed(input_ids=chunks, labels=chunks).loss.item() < loss_before  # it trained on these chunks

    healed.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {n for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)} == set(layers)
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, healed(probe).logits)


def test_heal_refuses_a_dense_model():
    heal = _heal_module()
    with pytest.raises(ValueError, match="compress_model"):
        heal.heal(make_tiny_llama(), torch.zeros(2, 8, dtype=torch.long), steps=1, log=None)
