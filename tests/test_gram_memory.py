"""The calibration Gram-memory estimate against the bytes the collected Grams (and their factors) really hold.

``compress_model(..., calibration=batches)`` logs ``gram_memory_bytes`` before collecting ("at most N MB"), so a user
can tell whether the statistics fit before a long run. These tests hold that figure to the tensors actually
allocated on tiny models: input Grams only (whitening) and input plus output-gradient Grams (Kronecker), full and
with ``max_gram_dim`` (a wider side keeps its diagonal), and with the modules fed one tensor (q/k/v, gate/up)
sharing a single input Gram.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

from hf_lowrank import compress_model
from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams, gram_memory_bytes
from hf_lowrank.compression.guards import statistics_memory_bytes
from hf_lowrank.targets import find_target_linears


def _batches(vocab: int = 128, n: int = 2, length: int = 48):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (4, length), generator=generator)} for _ in range(n)]


def _shapes(targets):
    return {n: (m.out_features, m.in_features) for n, m in targets.items()}


def _bytes(tensors) -> tuple[int, int]:
    """``(bytes per key, bytes of the distinct storages)`` of the Gram tensors."""
    tensors = list(tensors)
    per_key = sum(t.numel() * t.element_size() for t in tensors)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return per_key, sum(storages.values())


def _collect(outputs: bool, max_dim: int | None):
    model = make_tiny_llama()
    targets = find_target_linears(model)
    result = calibration_grams(model, targets, _batches(), outputs=outputs, max_dim=max_dim, progress=False)
    grams = list(result[0].values()) + (list(result[1].values()) if outputs else [])
    return model, targets, result, grams


@pytest.mark.parametrize("outputs", [False, True], ids=["whitened", "kronecker"])
@pytest.mark.parametrize("max_dim", [None, 64], ids=["full", "max_gram_dim"])
def test_estimate_is_the_bytes_of_the_grams_before_sharing(outputs, max_dim):
    """Per module and side, the estimate is exactly the float32 bytes collected (``n*n`` full, ``n`` for a side
    wider than ``max_gram_dim``), and it bounds the distinct storages from above ("at most")."""
    _, targets, result, grams = _collect(outputs, max_dim)
    assert len(result[0]) == len(targets) and (not outputs or len(result[1]) == len(targets))
    assert all(g.dtype == torch.float32 for g in grams)
    if max_dim is not None:  # the MLP's 128-wide sides keep their diagonal
        assert any(g.ndim == 1 for g in grams) and any(g.ndim == 2 for g in grams)
    per_key, distinct = _bytes(grams)
    estimate = gram_memory_bytes(_shapes(targets), outputs=outputs, max_dim=max_dim)
    assert estimate == per_key
    assert distinct <= estimate


def test_shared_input_grams_hold_one_storage_per_input():
    """q/k/v read one tensor and gate/up another: per layer the 7 input Grams occupy 4 storages (q/k/v, o, gate/up,
    down), so the distinct bytes are those of one Gram per group: what an estimate that counts sharing would say."""
    model, targets, result, _ = _collect(False, None)
    per_key, distinct = _bytes(result[0].values())
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    layers = model.config.num_hidden_layers
    assert per_key == 4 * layers * (6 * hidden**2 + inter**2)
    assert distinct == 4 * layers * (3 * hidden**2 + inter**2)
    attn = "model.layers.0.self_attn."
    assert result[0][attn + "q_proj"].data_ptr() == result[0][attn + "v_proj"].data_ptr()


def test_logged_estimate_covers_the_statistics_compress_model_holds(monkeypatch):
    """The Grams plus every factor ``compress_model`` derives from them (all alive until the factorization ends) stay
    within the logged estimate."""
    import sys

    from hf_lowrank.ops import fisher

    model, targets, result, grams = _collect(True, None)
    factors = {}
    original = fisher.gram_factor

    def recording(G, **kwargs):
        out = original(G, **kwargs)
        factors[id(G)] = out.L.numel() * out.L.element_size()
        return out

    for module in list(sys.modules.values()):  # wherever the compression path imported it from
        if getattr(module, "__name__", "").startswith("hf_lowrank") and getattr(module, "gram_factor", None) is original:
            monkeypatch.setattr(module, "gram_factor", recording)
    compress_model(model, 0.8, calibration=CalibrationGrams(*result), progress=False)
    held = _bytes(grams)[1] + sum(factors.values())
    assert factors and held <= statistics_memory_bytes(_shapes(targets), outputs=True, max_dim=None)
