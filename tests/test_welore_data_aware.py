"""Data-aware WeLore: the threshold on whitened spectra (singular values of W L_in, L_in the Cholesky factor of the
calibration input Gram) and the whitened LRC factors, against independent computations; the saved adapter records
the variant and loads without calibration; the CLI path."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from tiny_models import CallCounter, make_tiny_llama
from torch import nn

import hf_lowrank.calibration.grams as statistics
import hf_lowrank.ops.fisher as ops_fisher
from hf_lowrank.ops.welore_allocation import welore_ranks
from hf_lowrank.targets import find_target_linears
from hf_lowrank.tuners.welore import (
    SpectraCache,
    WeLoreLRCConfig,
    WhitenedFactorsNeedCalibrationError,
    calibration_whitening,
    compute_spectra,
    welore_ranks_for_model,
)
from hf_lowrank.tuners.welore import layer as welore_layer
from hf_lowrank.tuners.welore import spectra as welore_spectra


def _batches(n: int = 4, batch: int = 4, length: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """256 tokens (more than the widest input, 128): every Gram is full rank, so damping 0 is well defined."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (batch, length), generator=g),
             "attention_mask": torch.ones(batch, length, dtype=torch.long)} for _ in range(n)]


@torch.no_grad()
def _activations(model: nn.Module, targets: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """``{name: (tokens, in) inputs}`` of each target, read by forward pre-hooks of our own (no package code)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in targets.items()]
    try:
        for b in batches:
            model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def _cfg(**kw) -> WeLoreLRCConfig:
    kw.setdefault("progress", False)
    return WeLoreLRCConfig(**kw)


# ------------------------------------------------------------------------------------------------ spectra, allocation
def test_whitened_spectra_are_the_singular_values_of_w_times_the_cholesky_factor_of_the_gram():
    model = make_tiny_llama()
    targets = find_target_linears(model)
    batches = _batches()
    X = _activations(model, targets, batches)
    factors, tokens = calibration_whitening(model, targets, calibration=batches, damping=0.0, progress=False)
    assert tokens == 256 and set(factors) == set(targets)
    spectra = compute_spectra(targets, in_factors=factors, cache=SpectraCache(), progress=False)
    reference = {}
    for name, module in targets.items():
        G = X[name].T @ X[name]
        S_ref = torch.linalg.svdvals(module.weight.detach().double() @ torch.linalg.cholesky(G))
        reference[name] = S_ref
        # gram_factor divides the Gram by its mean diagonal: the spectrum is S_ref / sqrt(mean diag G)
        got = spectra[name].double() * G.diagonal().mean().sqrt()
        assert float((got - S_ref).abs().max() / S_ref[0]) < 1e-5, name
    plain = compute_spectra(targets, cache=SpectraCache(), progress=False)
    assert any(float((plain[n] - spectra[n]).norm() / plain[n].norm()) > 0.1 for n in targets)  # whitening matters
    # the allocation is WeLore's rule on those spectra, the raw ones included: min-max normalisation cancels the
    # Gram's scale, so no per-module normalisation is needed
    ranks, alloc = welore_ranks_for_model(model, 0.3, calibration=batches, damping=0.0, progress=False)
    expect = welore_ranks(reference, 0.3)
    assert alloc.whitened and alloc.calibration_tokens == 256
    assert alloc.ranks == expect.ranks and alloc.lrc == expect.lrc
    assert ranks == {n: expect.ranks[n] for n in expect.lrc}
    assert alloc.ranks != welore_ranks_for_model(model, 0.3, progress=False)[1].ranks
    # Grams given beforehand (scaled per module: the scale cancels) give the same allocation
    grams, _ = statistics.calibration_grams(model, targets, batches, progress=False)
    scaled = {n: G * (3.0 + i) for i, (n, G) in enumerate(grams.items())}
    assert welore_ranks_for_model(model, 0.3, grams_in=scaled, damping=0.0, progress=False)[1].ranks == alloc.ranks


def test_whitened_spectra_are_cached_by_weight_and_factor():
    model = make_tiny_llama()
    targets = find_target_linears(model)
    factors, _ = calibration_whitening(model, targets, calibration=_batches(), progress=False)
    cache = SpectraCache()
    first = compute_spectra(targets, in_factors=factors, cache=cache, progress=False)
    plain = compute_spectra(targets, cache=cache, progress=False)
    assert cache.misses == 2 * len(targets) and cache.hits == 0  # whitened and plain spectra are different keys
    again = compute_spectra(targets, in_factors=factors, cache=cache, progress=False)
    assert cache.hits == len(targets) and all(torch.equal(first[n], again[n]) for n in targets)
    other, _ = calibration_whitening(model, targets, calibration=_batches(seed=7), progress=False)
    compute_spectra(targets, in_factors=other, cache=cache, progress=False)
    assert cache.misses == 3 * len(targets)  # other calibration data, other keys
    assert not all(torch.equal(first[n], plain[n]) for n in targets)
    with pytest.raises(ValueError, match="one weighting"):
        compute_spectra(targets, in_factors=factors, row_fisher={n: torch.ones(m.out_features)
                                                                 for n, m in targets.items()}, progress=False)


# ------------------------------------------------------------------------------------------------ what it must buy
@torch.no_grad()
def _subspace_model() -> nn.Module:
    """A tiny Llama whose attention and MLP inputs live in 16 of the 64 hidden directions (the norms' weights are
    zero elsewhere): what those modules do with the other 48 never reaches the output, which only the calibration
    data can tell."""
    model = make_tiny_llama()
    for block in model.model.layers:
        block.input_layernorm.weight[16:] = 0
        block.post_attention_layernorm.weight[16:] = 0
    return model


@torch.no_grad()
def _logit_error(model, dense, batches) -> float:
    num = den = 0.0
    for b in batches:
        ref = dense(**b).logits
        num += float((model(**b).logits - ref).square().sum())
        den += float(ref.square().sum())
    return (num / den) ** 0.5


def test_data_aware_welore_beats_data_free_on_the_calibration_inputs_at_no_more_parameters():
    batches = _batches()
    dense = _subspace_model()
    free = get_peft_model(_subspace_model(), _cfg(reduction=0.3))
    budget = free.welore_allocation.params_after
    grams, _ = statistics.calibration_grams(dense, find_target_linears(dense), batches, progress=False)
    # the data-aware reduction with the most parameters that stay within the data-free budget
    candidates = []
    for r in [x / 100 for x in range(30, 96)]:
        try:
            a = welore_ranks_for_model(dense, r, grams_in=grams, progress=False)[1]
        except ValueError:
            continue
        if a.params_after <= budget:
            candidates.append((a.params_after, r))
    assert candidates
    reduction = max(candidates)[1]
    aware = get_peft_model(_subspace_model(), _cfg(reduction=reduction, svd_method="exact").with_calibration(batches))
    assert aware.welore_allocation.whitened and aware.welore_allocation.params_after <= budget
    err_free, err_aware = _logit_error(free, dense, batches), _logit_error(aware, dense, batches)
    assert err_aware < 0.25 * err_free, (err_aware, err_free)
    # and on other text of the same kind, not only on the calibration batches
    held_out = _batches(seed=11)
    assert _logit_error(aware, dense, held_out) < 0.25 * _logit_error(free, dense, held_out)


def test_lrc_factors_are_the_whitened_truncation_the_allocation_was_made_for():
    """Each LRC's weight is the rank-r minimiser of ||(W - W_hat) L|| (independently: truncated SVD of W L, times
    L^-1, L from torch's Cholesky of the damped normalised Gram), and its output error on the calibration inputs is
    never above the plain truncated SVD's at the same rank."""
    batches = _batches()
    base = make_tiny_llama()
    targets = find_target_linears(base)
    dense = {n: m.weight.detach().double().clone() for n, m in targets.items()}
    X = _activations(base, targets, batches)
    model = get_peft_model(base, _cfg(reduction=0.3, svd_method="exact").with_calibration(batches))
    alloc = model.welore_allocation
    assert alloc.lrc
    for name in alloc.lrc:
        layer = model.base_model.model.get_submodule(name)
        r, W = alloc.ranks[name], dense[name]
        G = X[name].T @ X[name]
        L = torch.linalg.cholesky(G / G.diagonal().mean() + 1e-4 * torch.eye(G.shape[0], dtype=G.dtype))
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        want = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(L)
        got = layer.effective_weight().double()
        assert float((got - want).norm() / want.norm()) < 1e-4, name
        U0, S0, Vh0 = torch.linalg.svd(W, full_matrices=False)
        plain = (U0[:, :r] * S0[:r]) @ Vh0[:r]
        out = float(((W - got) @ X[name].T).norm())
        assert out <= float(((W - plain) @ X[name].T).norm()) * (1 + 1e-6), name


# ------------------------------------------------------------------------------------------------ config, save, load
def test_saved_adapter_records_the_variant_and_loads_without_calibration(tmp_path, monkeypatch):
    batches = _batches()
    model = get_peft_model(make_tiny_llama(), _cfg(reduction=0.3).with_calibration(batches))
    ids = batches[0]["input_ids"]
    with torch.no_grad():  # move the factors away from their initialisation, as training would
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["spectra"] == "whitened" and saved["calibration_tokens"] == 256 and saved["damping"] == 1e-4
    assert saved["rank_map"] == model.welore_allocation.ranks
    config = PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(config, WeLoreLRCConfig) and config.spectra == "whitened" and config.calibration_tokens == 256
    assert WeLoreLRCConfig(**{k: v for k, v in config.to_dict().items() if k != "peft_type"}).spectra == "whitened"

    def no_calibration(*args, **kwargs):
        raise AssertionError("loading a saved adapter must not run calibration")

    counters = {"svdvals": CallCounter(welore_spectra.singular_values), "factors": CallCounter(welore_layer.weighted_lowrank),
                "spectrum": CallCounter(ops_fisher.weighted_spectrum)}
    monkeypatch.setattr(statistics, "calibration_grams", no_calibration)
    monkeypatch.setattr(welore_spectra, "singular_values", counters["svdvals"])
    monkeypatch.setattr(welore_layer, "weighted_lowrank", counters["factors"])
    monkeypatch.setattr(ops_fisher, "weighted_spectrum", counters["spectrum"])
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    assert torch.equal(loaded(input_ids=ids).logits, ref)
    assert loaded.welore_allocation.whitened and loaded.welore_allocation.calibration_tokens == 256
    assert all(c.calls == 0 for c in counters.values())
    # a reused config without weights cannot fall back to plain SVD factors: it says what to do
    reused = get_peft_model(make_tiny_llama(), PeftConfig.from_pretrained(tmp_path / "a"))
    with pytest.raises(WhitenedFactorsNeedCalibrationError, match="with_calibration"):
        reused(input_ids=ids)
    monkeypatch.undo()
    # ... and with the calibration again, it initialises to the fresh model's whitened factors
    fresh = get_peft_model(make_tiny_llama(), _cfg(reduction=0.3).with_calibration(batches))
    again = get_peft_model(make_tiny_llama(), PeftConfig.from_pretrained(tmp_path / "a").with_calibration(batches))
    assert torch.allclose(again(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-5)
    # the compressed model records it too
    merged = fresh.merge_and_unload()
    extra = merged.config.quantization_config.extra
    assert extra["spectra"] == "whitened" and extra["calibration_tokens"] == 256


def test_data_free_default_is_unchanged_and_records_no_calibration(tmp_path):
    model = get_peft_model(make_tiny_llama(), _cfg(reduction=0.3))
    config = model.peft_config["default"]
    assert config.spectra == "weights" and config.calibration_tokens is None
    assert not model.welore_allocation.whitened
    ranks, alloc = welore_ranks_for_model(make_tiny_llama(), 0.3, progress=False)
    assert config.rank_map == alloc.ranks
    assert "spectra" not in model.merge_and_unload().config.quantization_config.extra


def test_invalid_data_aware_configs_are_refused():
    with pytest.raises(ValueError, match="spectra must be 'weights'"):
        WeLoreLRCConfig(spectra="activations")
    with pytest.raises(ValueError, match="damping must be"):
        WeLoreLRCConfig(damping=-1.0)
    with pytest.raises(ValueError, match="with_calibration"):
        get_peft_model(make_tiny_llama(), _cfg(spectra="whitened"))
    with pytest.raises(ValueError, match="one of the two"):
        _cfg().with_calibration()
    with pytest.raises(ValueError, match="iterable of batches"):
        _cfg().with_calibration(_batches()[0])
    targets = find_target_linears(make_tiny_llama())
    config = _cfg().with_calibration(_batches()).with_fisher(
        row_fisher={n: torch.ones(m.out_features) for n, m in targets.items()})
    with pytest.raises(ValueError, match="one weighting"):
        get_peft_model(make_tiny_llama(), config)
    with pytest.raises(ValueError, match="one of the two"):
        welore_ranks_for_model(make_tiny_llama(), 0.3, calibration=_batches(), grams_in={}, progress=False)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_compress_welore_with_calibration_is_data_aware(tiny_llama, tmp_path, capsys):
    from test_cli import _char_tokenizer

    from hf_lowrank import calibration_batches, load_compressed
    from hf_lowrank.cli import main

    tiny_llama.save_pretrained(tmp_path / "dense")
    tok = _char_tokenizer()
    tok.save_pretrained(tmp_path / "dense")
    texts = ["a cat is an animal.", "red is a colour.", "an oak is a tree.", "rain is water falling from clouds.",
             "a violin is a string instrument.", "salt is a mineral."] * 4
    (tmp_path / "calib.txt").write_text("\n".join(texts))
    out = tmp_path / "c"
    args = ["compress", str(tmp_path / "dense"), "--method", "welore", "--reduction", "0.3"]
    assert main([*args, "--calibration", str(tmp_path / "calib.txt"), "--out", str(out)]) == 0
    assert "whitened spectra" in capsys.readouterr().out
    report = json.loads((out / "compression_report.json").read_text())
    assert report["method"] == "welore" and report["info"]["weighting"] == "whitened"
    welore = report["info"]["welore"]
    assert welore["spectra"] == "whitened" and welore["calibration_tokens"] > 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["method"] == "welore" and qconfig["extra"]["spectra"] == "whitened"
    # the same ranks and factors as the Python API on the same batches
    batches = calibration_batches(tok, texts, max_length=256)
    targets = find_target_linears(tiny_llama)
    grams, _ = statistics.calibration_grams(tiny_llama, targets, batches, progress=False)
    ranks, alloc = welore_ranks_for_model(tiny_llama, 0.3, grams_in=grams, progress=False)
    assert qconfig["ranks"] == ranks
    assert ranks != welore_ranks_for_model(tiny_llama, 0.3, progress=False)[0]
    compressed = load_compressed(out)
    for name in alloc.lrc:
        m = compressed.get_submodule(name)
        factor = ops_fisher.gram_factor(grams[name]).L
        down, up = ops_fisher.weighted_lowrank(targets[name].weight, ranks[name], in_factor=factor)
        assert torch.allclose(m.up.weight @ m.down.weight, up @ down, atol=1e-4), name
    assert main([*args, "--calibration", str(tmp_path / "calib.txt"), "--calibration-weighting", "kronecker",
                 "--out", str(tmp_path / "k")]) == 2
    assert "whitened" in capsys.readouterr().err and not (tmp_path / "k").exists()
