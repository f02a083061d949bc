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


def _live_statistics_peak(monkeypatch, model, **kwargs) -> tuple[int, int]:
    """``(peak, Gram bytes)``: the most bytes of calibration Grams and Gram factors alive at once while
    ``compress_model(model, 0.8, calibration=batches, **kwargs)`` runs (sampled after every Gram factorization and
    before every module's factorization), and the bytes of the distinct Grams it collected."""
    import sys
    import weakref

    from hf_lowrank.compression import pipeline
    from hf_lowrank.ops import fisher

    live: list[weakref.ref] = []
    gram_bytes, peak = [0], [0]

    def sample():
        tensors = {id(t): t for t in (r() for r in live) if t is not None}
        peak[0] = max(peak[0], _bytes(tensors.values())[1] if tensors else 0)

    collect, factor, factorize = pipeline.calibration_grams, fisher.gram_factor, pipeline.factorize

    def collecting(*args, **kw):
        result = collect(*args, **kw)
        grams = [g for part in result[:-1] for g in part.values()]
        live.extend(weakref.ref(g) for g in grams)
        gram_bytes[0] = _bytes(grams)[1]
        return result

    def factoring(G, **kw):
        out = factor(G, **kw)
        live.append(weakref.ref(out.L))
        sample()
        return out

    def factorizing(*args, **kw):
        sample()
        return factorize(*args, **kw)

    monkeypatch.setattr(pipeline, "calibration_grams", collecting)
    monkeypatch.setattr(pipeline, "factorize", factorizing)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("hf_lowrank") and getattr(module, "gram_factor", None) is factor:
            monkeypatch.setattr(module, "gram_factor", factoring)
    compress_model(model, 0.8, calibration=_batches(), progress=False, **kwargs)
    return peak[0], gram_bytes[0]


def test_collected_grams_are_freed_as_they_are_factorized(monkeypatch):
    """Grams ``compress_model`` collects itself are freed as soon as their factors are made: the Grams and factors
    alive at once stay within the logged estimate and below the Grams plus all their factors that the old path
    held."""
    model = make_tiny_llama()
    targets = find_target_linears(model)
    peak, grams = _live_statistics_peak(monkeypatch, model)
    estimate = statistics_memory_bytes(_shapes(targets), outputs=True, max_dim=None)
    assert grams > 0 and peak <= estimate
    assert peak < 3 * grams  # every Gram plus its float64 factor: what stays alive without the release



def _factors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".down." in n or ".up." in n}


def test_gram_device_cpu_accumulates_there_and_changes_nothing_else(monkeypatch):
    """``gram_device="cpu"`` reaches the Gram hooks (the accumulators are created on the CPU whatever the model's
    device) and gives the same factors as the default."""
    from hf_lowrank.calibration.grams import GramHooks
    from hf_lowrank.compression import pipeline

    devices, stores = [], []
    collect, store = pipeline.calibration_grams, GramHooks._store

    def collecting(*args, **kw):
        devices.append(kw.get("device"))
        return collect(*args, **kw)

    def storing(self, key, prod):
        store(self, key, prod)
        stores.append((self.device, self.store[key].device))

    monkeypatch.setattr(pipeline, "calibration_grams", collecting)
    monkeypatch.setattr(GramHooks, "_store", storing)
    reference, on_cpu = make_tiny_llama(), make_tiny_llama()
    compress_model(reference, 0.8, calibration=_batches(), progress=False)
    assert devices == [None]
    stores.clear()
    compress_model(on_cpu, 0.8, calibration=_batches(), progress=False, gram_device="cpu")
    assert devices == [None, "cpu"]
    assert stores and all(d == "cpu" and acc == torch.device("cpu") for d, acc in stores)
    for name, value in _factors(reference).items():
        torch.testing.assert_close(_factors(on_cpu)[name], value, rtol=0, atol=0)


def test_max_gram_dim_hidden_size_is_the_models_hidden_size():
    """``max_gram_dim="hidden_size"`` (FisherLoRA's ``kronecker_max_dim`` value) resolves to the config's hidden
    size: the same factors as that int, and the MLP's wider sides diagonal (other factors than full Grams)."""
    models = {key: make_tiny_llama() for key in ("hidden_size", "int", "full")}
    hidden = models["int"].config.hidden_size
    for key, max_dim in (("hidden_size", "hidden_size"), ("int", hidden), ("full", None)):
        compress_model(models[key], 0.8, calibration=_batches(), progress=False, max_gram_dim=max_dim)
    by_name, as_int, full = (_factors(models[k]) for k in ("hidden_size", "int", "full"))
    for name, value in as_int.items():
        torch.testing.assert_close(by_name[name], value, rtol=0, atol=0)
    assert by_name.keys() == as_int.keys()
    mlp = [n for n in full if "mlp" in n]
    assert mlp and any(n not in as_int or not torch.equal(full[n], as_int[n]) for n in mlp)


def test_default_max_gram_dim_keeps_sides_up_to_4096_full(monkeypatch, caplog):
    """The default ``max_gram_dim`` is 4096 (the width up to which the statistics stay affordable at 7B): it reaches
    the Gram collection, and the log says which sides keep their diagonal (none on the tiny model)."""
    from hf_lowrank.compression import CompressionConfig, pipeline

    seen = []
    collect = pipeline.calibration_grams

    def collecting(*args, **kw):
        seen.append(kw.get("max_dim"))
        return collect(*args, **kw)

    monkeypatch.setattr(pipeline, "calibration_grams", collecting)
    assert CompressionConfig().max_gram_dim == 4096
    with caplog.at_level("WARNING", logger="hf_lowrank"):
        compress_model(make_tiny_llama(), 0.8, calibration=_batches(), progress=False)
        compress_model(make_tiny_llama(), 0.8, calibration=_batches(), progress=False, max_gram_dim=100)
    assert seen == [4096, 100]
    logged = [r.getMessage() for r in caplog.records if "float32 Grams" in r.getMessage()]
    assert "every Gram full (max_gram_dim=4096" in logged[0]
    assert "sides [128] wide keep their diagonal only (max_gram_dim=100" in logged[1]
