"""The global allocation with a byte budget over quantized factors (``budget_unit="bytes"``): the budget is met in
stored bytes, the rounding noise steers the ranks, the checkpoints reload exactly."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from test_quantized_factors import _RELOAD, REPO
from tiny_models import make_tiny_llama

from hf_lowrank import CompressionConfig, find_target_linears
from hf_lowrank.compression.compress import compress_model
from hf_lowrank.modules import LowRankLinear
from hf_lowrank.ops.fisher import weighted_lowrank
from hf_lowrank.ops.global_allocation import global_ranks
from hf_lowrank.ops.quant_lowrank import factor_bytes, quantize_factor_pair
from hf_lowrank.quantized_modules import QuantizedLowRankLinear


def _batches(n=4):
    return [{"input_ids": torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(i))}
            for i in range(n)]


def _stored_bytes(model, names) -> int:
    """Codes and scales of every quantized factor pair, bf16 bytes of every target left dense (the budget's units)."""
    total = 0
    for name in names:
        m = model.get_submodule(name)
        total += int(m.nbytes()) if isinstance(m, QuantizedLowRankLinear) else 2 * m.weight.numel()
    return total


@pytest.mark.parametrize("keep", [0.2, 0.3, 0.5])
def test_byte_budget_is_met_in_stored_bytes(keep):
    model = make_tiny_llama(0)
    targets = find_target_linears(model)
    names = list(targets)
    bf16 = 2 * sum(m.weight.numel() for m in targets.values())
    report = compress_model(model, keep, calibration=_batches(), weighting="kronecker", factor_bits=4, group_size=16,
                            progress=False)
    assert report.info["allocation"] == "global" and report.info["budget_unit"] == "bytes"
    used = _stored_bytes(model, names)
    # never above the budget; below it by less than the largest step (8 ranks of the widest module) or one module
    # kept dense instead of factorized
    step = max(factor_bytes(m.out_features, m.in_features, 8, 4, 16) for m in targets.values())
    assert used <= keep * bf16
    assert used >= keep * bf16 - 2 * step, (used / bf16, keep)
    assert all(isinstance(model.get_submodule(n), (QuantizedLowRankLinear, torch.nn.Linear)) for n in names)
    # the same keep as a parameter budget spends far more bytes on the dense modules it keeps: what the unit fixes
    params = copy.deepcopy(make_tiny_llama(0))
    compress_model(params, keep, calibration=_batches(), weighting="kronecker", factor_bits=4, group_size=16,
                   budget_unit="parameters", progress=False)
    factored = [n for n in names if isinstance(params.get_submodule(n), LowRankLinear)]
    params_kept = sum(params.get_submodule(n).rank * sum(targets[n].weight.shape) for n in factored) + sum(
        targets[n].weight.numel() for n in names if n not in factored)
    assert params_kept <= keep * bf16 / 2 + 1e-6


def test_byte_unit_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="budget_unit='bytes'.*factor_bits"):
        CompressionConfig(keep=0.3, budget_unit="bytes")
    with pytest.raises(ValueError, match="budget_unit='bytes'"):
        CompressionConfig(keep=0.3, factor_bits=4, allocation="uniform", budget_unit="bytes")
    with pytest.raises(ValueError, match="budget_unit must be one of"):
        CompressionConfig(keep=0.3, factor_bits=4, budget_unit="bits")
    with pytest.raises(ValueError, match="needs the global allocation"):  # auto picks uniform without output Grams
        compress_model(make_tiny_llama(0), 0.3, calibration=_batches(2), weighting="whitened", factor_bits=4,
                       budget_unit="bytes", progress=False)
    assert CompressionConfig(keep=0.3, factor_bits=4).budget_unit_for("global") == "bytes"
    assert CompressionConfig(keep=0.3, factor_bits=4).budget_unit_for("uniform") == "parameters"
    assert CompressionConfig(keep=0.3).budget_unit_for("global") == "parameters"


def test_byte_costs_and_dense_price():
    """Each rank costs its codes and scales, a dense module its bf16 bytes; 4-bit factors stay cheaper than the bf16
    weight up to full rank (past the parameter break-even)."""
    shapes = {"a": (32, 48), "b": (40, 40)}
    torch.manual_seed(0)
    spectra = {n: torch.rand(min(s)).sort(descending=True).values + 0.1 for n, s in shapes.items()}
    alloc = global_ranks(spectra, shapes, 0.3, bits=4, group_size=16)
    assert alloc.unit == "bytes" and alloc.budget == pytest.approx(0.3 * 2 * (32 * 48 + 40 * 40))
    assert alloc.used == sum(factor_bytes(*shapes[n], r, 4, 16) for n, r in alloc.ranks.items())
    assert alloc.used <= alloc.budget
    # full rank in both modules costs less than either dense weight: that budget buys full ranks, no dense module
    full_bytes = factor_bytes(32, 48, 32, 4, 16) + factor_bytes(40, 40, 40, 4, 16)
    keep_full = full_bytes / (2 * (32 * 48 + 40 * 40))
    assert factor_bytes(32, 48, 32, 4, 16) < 2 * 32 * 48 and keep_full < 0.75
    full = global_ranks(spectra, shapes, keep_full, bits=4, group_size=16)
    assert full.ranks == {"a": 32, "b": 40} and full.used == full_bytes
    # a module whose rounding noise exceeds its kept energy is worth its dense bf16 bytes when they fit
    dense = global_ranks(spectra, shapes, 0.9, bits=4, group_size=16, noise={"a": 2.0, "b": 0.0})
    assert dense.ranks["a"] is None and dense.used == 2 * 32 * 48 + factor_bytes(40, 40, 40, 4, 16)
    with pytest.raises(ValueError, match="noise"):
        global_ranks(spectra, shapes, 0.3, bits=4, noise={"c": 0.1})
    with pytest.raises(ValueError, match="bits"):
        global_ranks(spectra, shapes, 0.3, bits=1)


def _orthogonal(n, g, spike):
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    if spike:  # one large entry per column: round-to-nearest spends its range on it and flattens the rest
        A = A / n ** 0.5 + spike * torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    return torch.linalg.qr(A)[0]


def _quantized_loss(W, rank, bits, group_size):
    down, up = weighted_lowrank(W, rank)
    q = quantize_factor_pair(down, up, bits, group_size=group_size, W=W)
    return float((W - q.up_hat.double() @ q.down_hat.double()).square().sum())


@pytest.mark.parametrize("seed", range(3))
def test_rounding_noise_moves_bytes_to_the_module_that_quantizes_well(seed):
    """Two modules with the same spectrum; one's singular vectors have an outlier each, so its 2-bit factors are
    noisy. Blind to the noise (a parameter budget, or bytes without it), the allocation splits evenly; with each
    module's noise measured at the blind ranks, the bytes go to the clean module and the summed error AFTER rounding
    drops by at least 5%."""
    g = torch.Generator().manual_seed(seed)
    n, bits, group, keep = 64, 2, 64, 0.25
    S = torch.exp(-0.04 * torch.arange(n, dtype=torch.float64))
    Ws = {"clean": _orthogonal(n, g, 0) @ torch.diag(S) @ _orthogonal(n, g, 0).T,
          "spiky": _orthogonal(n, g, 4.0) @ torch.diag(S) @ _orthogonal(n, g, 4.0).T}
    spectra = {k: torch.linalg.svdvals(W) for k, W in Ws.items()}
    shapes = {k: (n, n) for k in Ws}
    blind = global_ranks(spectra, shapes, keep, bits=bits, group_size=group)
    assert abs(blind.ranks["clean"] - blind.ranks["spiky"]) <= 1
    by_params = global_ranks(spectra, shapes, 0.5).ranks
    assert abs(by_params["clean"] - by_params["spiky"]) <= 1
    noise = {}
    for name, rank in blind.ranks.items():
        sq = spectra[name].square()
        e2 = float(sq[rank:].sum() / sq.sum())
        noise[name] = (_quantized_loss(Ws[name], rank, bits, group) / float(sq.sum()) - e2) / (1 - e2)
    assert noise["spiky"] > 2 * noise["clean"] > 0
    aware = global_ranks(spectra, shapes, keep, bits=bits, group_size=group, noise=noise)
    assert aware.ranks["clean"] > aware.ranks["spiky"] and aware.used <= aware.budget
    loss_blind = sum(_quantized_loss(Ws[k], r, bits, group) for k, r in blind.ranks.items())
    loss_aware = sum(_quantized_loss(Ws[k], r, bits, group) for k, r in aware.ranks.items())
    assert loss_aware < 0.95 * loss_blind


def test_byte_allocated_checkpoint_reloads_exactly_in_a_fresh_process(tmp_path):
    """Quantized factor pairs and the modules the byte allocation kept dense, saved and reloaded bit for bit."""
    model = make_tiny_llama(0)
    report = compress_model(model, 0.5, calibration=_batches(), weighting="kronecker", factor_bits=4, group_size=16,
                            progress=False)
    kinds = {type(model.get_submodule(r.name)).__name__ for r in report.modules}
    assert kinds == {"QuantizedLowRankLinear", "Linear"}, kinds  # both kinds in one checkpoint
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    model.save_pretrained(tmp_path / "bytes")
    with torch.no_grad():
        expected = model.eval()(ids).logits
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "ids.pt"), str(tmp_path / "bytes")], check=True,
                   env=env, timeout=300, capture_output=True)
    got = torch.load(tmp_path / "ids.pt.out")[str(tmp_path / "bytes")]
    assert got["kinds"] == ["QuantizedLowRankLinear"]
    assert torch.equal(got["logits"], expected)
