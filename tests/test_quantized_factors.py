"""Quantized factors: the codes against a float reference, the refit of ``up``, the layer, and the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_llama

import hf_lowrank
from hf_lowrank.compression.checkpoint import (
    CompressedCheckpointError,
    check_compressed_checkpoint,
    decompress_model,
    load_compressed,
    mark_compressed,
)
from hf_lowrank.compression.compress import compress_model
from hf_lowrank.modules import LowRankLinear, set_submodule
from hf_lowrank.ops.fisher import weighted_lowrank, weighted_relative_error
from hf_lowrank.ops.quant_lowrank import factor_bytes, quantize_factor_pair, refit_up
from hf_lowrank.quantized_modules import (
    QuantizedLowRankLinear,
    dequantize_factors,
    quantize_lowrank,
)

REPO = Path(__file__).resolve().parents[1]


def _per_element(scales: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    return scales.double().repeat_interleave(group_size, dim=-1)[..., :n]


def _weighted_problem(seed: int, out_f: int = 48, in_f: int = 40):
    """A weight with a decaying spectrum and correlated, anisotropic input and output Gram factors."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, 8, generator=g, dtype=torch.float64) @ torch.randn(8, in_f, generator=g,
                                                                               dtype=torch.float64)
    W += 0.1 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    X = torch.randn(400, in_f, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, in_f, dtype=torch.float64)
    X = X @ torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    L_in = torch.linalg.cholesky(X.T @ X / 400 + 1e-3 * torch.eye(in_f, dtype=torch.float64))
    Y = torch.randn(300, out_f, generator=g, dtype=torch.float64)
    L_out = torch.linalg.cholesky(Y.T @ Y / 300 + 1e-3 * torch.eye(out_f, dtype=torch.float64))
    return W, L_in, L_out


@pytest.mark.parametrize("bits,group_size", [(4, 16), (8, 64), (3, 7)])
@pytest.mark.parametrize("scheme", ["naive", "refit"])
def test_codes_within_half_a_step_of_what_they_encode(bits, group_size, scheme):
    W, L_in, _ = _weighted_problem(0)
    down, up = weighted_lowrank(W, 12, in_factor=L_in)
    q = quantize_factor_pair(down, up, bits, group_size=group_size, scheme=scheme, W=W, in_factor=L_in)
    encoded_up = refit_up(W, q.down_hat, L_in) if scheme == "refit" else up
    for hat, ref, codes in ((q.down_hat, down, q.down), (q.up_hat, encoded_up, q.up)):
        assert codes.scales.dtype == torch.float16 and tuple(codes.scales.shape[:-1]) == (ref.shape[0],)
        half_step = _per_element(codes.scales, ref.shape[1], group_size) / 2
        err = (hat.double() - ref.double()).abs()
        assert bool((err <= half_step * (1 + 1e-5) + 1e-7).all()), float((err - half_step).max())
    assert q.nbytes() == factor_bytes(W.shape[0], W.shape[1], 12, bits, group_size)
    if bits == 8:  # 255 levels: the pair stays within a few percent of the float pair
        assert weighted_relative_error(up @ down, q.up_hat @ q.down_hat, None, L_in) < 0.05


def test_refit_is_the_weighted_least_squares_up_and_never_worse_than_naive():
    for seed in range(4):
        W, L_in, L_out = _weighted_problem(seed)
        down, up = weighted_lowrank(W, 10, out_factor=L_out, in_factor=L_in)
        for bits in (3, 4):
            naive = quantize_factor_pair(down, up, bits, group_size=16, scheme="naive")
            refit = quantize_factor_pair(down, up, bits, group_size=16, scheme="refit", W=W, in_factor=L_in)
            D = naive.down_hat.double()  # both schemes round down identically
            assert torch.equal(naive.down_hat, refit.down_hat)
            G = L_in @ L_in.T
            reference = W @ G @ D.T @ torch.linalg.inv(D @ G @ D.T)  # the closed form, explicit inverse
            U = refit_up(W, D, L_in)
            assert torch.allclose(U, reference, rtol=1e-6, atol=1e-8 * float(reference.abs().max()))
            # before rounding up: the refit is the minimiser, so no worse than the original up on the same down
            assert weighted_relative_error(W, U @ D, L_out, L_in) <= weighted_relative_error(W, up @ D, L_out, L_in)
            err_naive = weighted_relative_error(W, naive.up_hat @ naive.down_hat, L_out, L_in)
            err_refit = weighted_relative_error(W, refit.up_hat @ refit.down_hat, L_out, L_in)
            assert err_refit <= err_naive, (seed, bits, err_refit, err_naive)
    # a diagonal input weighting and no weighting go through the same solve
    W, _, _ = _weighted_problem(7)
    d = torch.rand(W.shape[1], dtype=torch.float64) + 0.5
    D = torch.randn(6, W.shape[1], dtype=torch.float64)
    assert torch.allclose(refit_up(W, D, d), refit_up(W, D, torch.diag(d)), rtol=1e-8, atol=1e-10)
    assert torch.allclose(refit_up(W, D), W @ D.T @ torch.linalg.inv(D @ D.T), rtol=1e-8, atol=1e-10)


def test_layer_computes_the_dequantized_pair_and_casts_keep_the_codes():
    torch.manual_seed(0)
    dense = torch.nn.Linear(40, 24)
    layer = LowRankLinear.from_dense(dense, 8)
    q = quantize_lowrank(layer, 4, group_size=16)
    assert isinstance(q, LowRankLinear) and q.rank == 8 and q.compute_dtype == torch.float32
    ref = quantize_factor_pair(layer.down.weight, layer.up.weight, 4, group_size=16, W=None)
    x = torch.randn(3, 5, 40)
    expected = x.double() @ ref.down_hat.double().T @ ref.up_hat.double().T + dense.bias.double()
    assert torch.allclose(q(x).double(), expected, atol=1e-5)
    assert torch.allclose(q.weight, ref.up_hat @ ref.down_hat, atol=1e-6)
    assert torch.allclose(q.to_dense().weight, ref.up_hat @ ref.down_hat, atol=1e-6)
    assert set(q.state_dict()) == {f"{f}.{k}" for f in ("down", "up") for k in ("packed", "scales", "offsets")} | {
        "up.bias"}
    scales = q.down.scales.clone()
    q.to(torch.bfloat16)  # the model dtype changes; the stored codes do not
    assert q.compute_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert q.down.scales.dtype == torch.float16 and torch.equal(q.down.scales, scales)
    assert q(x.bfloat16()).dtype == torch.bfloat16 and q(x).dtype == torch.float32
    q.float()
    assert torch.allclose(q.weight, ref.up_hat @ ref.down_hat, atol=1e-6)
    assert q.nbytes() == factor_bytes(24, 40, 8, 4, 16) + 24 * 4


def _quantized_tiny(bits=4, group_size=16, seed=0):
    model = make_tiny_llama(seed)
    compress_model(model, 0.5, factor_bits=bits, group_size=group_size, progress=False)
    return model


def test_compress_model_with_factor_bits_end_to_end():
    """The one pipeline: calibration Grams weigh the factors and the refit, the codes go into the layers, the report
    counts bytes, the config records the quantization."""
    model = make_tiny_llama(0)
    reference = make_tiny_llama(0)
    batches = [{"input_ids": torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    report = compress_model(model, 0.5, calibration=batches, allocation="uniform", factor_bits=4, group_size=16,
                            progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert layers and all(isinstance(m, QuantizedLowRankLinear) and m.bits == 4 for m in layers.values())
    assert model.config.quantization_config.factor_quantization["bits"] == 4
    for row in report.modules:
        assert row.bytes_after == layers[row.name].nbytes() < row.bytes_before
        assert 0 < row.weighted_rel_error < 1  # measured on the dequantized pair
    assert report.bytes_after == sum(m.nbytes() for m in layers.values())
    assert report.to_dict()["bytes_after"] == report.bytes_after
    float_report = compress_model(reference, 0.5, calibration=batches, allocation="uniform", progress=False)
    for row, float_row in zip(report.modules, float_report.modules):  # the same factorization, then 4-bit codes
        assert row.rank == float_row.rank and row.weighted_rel_error >= float_row.weighted_rel_error * 0.999
        q, f = layers[row.name].weight, reference.get_submodule(row.name).weight
        assert float((q - f).norm() / f.norm()) < 0.25
    with pytest.raises(ValueError, match="factor_bits"):
        compress_model(make_tiny_llama(0), 0.5, factor_bits=9)
    with pytest.raises(ValueError, match="group_size"):
        compress_model(make_tiny_llama(0), 0.5, factor_bits=4, group_size=0)


_RELOAD = textwrap.dedent(
    """
    import sys, torch
    import hf_lowrank
    from transformers import AutoModelForCausalLM
    ids, out = torch.load(sys.argv[1]), {}
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, hf_lowrank.LowRankLinear)})
        with torch.no_grad():
            out[folder] = {"logits": model(ids).logits, "kinds": kinds}
    torch.save(out, sys.argv[1] + ".out")
    """
)


def test_save_reload_in_a_fresh_process_gives_identical_logits(tmp_path):
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    cases = {"quantized": _quantized_tiny(), "float": make_tiny_llama(0)}
    compress_model(cases["float"], 0.5, progress=False)  # an unquantized checkpoint still loads as before
    expected = {}
    for kind, model in cases.items():
        model.save_pretrained(tmp_path / kind)
        with torch.no_grad():
            expected[kind] = model.eval()(ids).logits
    config = {k: json.loads((tmp_path / k / "config.json").read_text())["quantization_config"] for k in cases}
    assert config["quantized"]["format_version"] == 2
    assert config["quantized"]["factor_quantization"] == {"bits": 4, "group_size": 16, "scheme": "refit",
                                                          "format": "rtn-affine-v1"}
    assert config["float"]["format_version"] == 1 and "factor_quantization" not in config["float"]
    subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "ids.pt"), *(str(tmp_path / k) for k in cases)],
                   check=True, env=env, timeout=300, capture_output=True)
    reloaded = torch.load(tmp_path / "ids.pt.out")
    for kind in cases:
        got = reloaded[str(tmp_path / kind)]
        assert got["kinds"] == (["QuantizedLowRankLinear"] if kind == "quantized" else ["LowRankLinear"])
        assert torch.equal(got["logits"], expected[kind]), kind
    # and in this process, through load_compressed
    model = load_compressed(tmp_path / "quantized")
    assert torch.equal(model(ids).logits, expected["quantized"])
    assert hf_lowrank.__file__.startswith(str(REPO))


def test_corrupt_or_edited_codes_are_refused(tmp_path):
    model = _quantized_tiny()
    model.save_pretrained(tmp_path / "good")
    check_compressed_checkpoint(tmp_path / "good")
    key = "model.layers.0.mlp.down_proj.up.packed"

    def variant(name, edit_tensors=None, edit_quant=None):
        folder = tmp_path / name
        folder.mkdir()
        tensors = load_file(tmp_path / "good" / "model.safetensors")
        if edit_tensors:
            edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((tmp_path / "good" / "config.json").read_text())
        if edit_quant:
            edit_quant(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    truncated = variant("truncated", lambda t: t.__setitem__(key, t[key][:-3].clone()))
    with pytest.raises(CompressedCheckpointError, match=r"down_proj\.up\.packed.*truncated or edited"):
        check_compressed_checkpoint(truncated)
    with pytest.raises(CompressedCheckpointError, match="truncated or edited"):
        load_compressed(truncated)
    widened = variant("widened", lambda t: t.__setitem__(key, t[key].to(torch.int16)))
    with pytest.raises(CompressedCheckpointError, match="U8"):
        check_compressed_checkpoint(widened)
    scales = variant("scales", lambda t: t.pop("model.layers.1.self_attn.q_proj.down.scales"))
    with pytest.raises(CompressedCheckpointError, match=r"q_proj\.down\.scales"):
        check_compressed_checkpoint(scales)
    bits = variant("bits", edit_quant=lambda q: q["factor_quantization"].update(bits=9))
    with pytest.raises(CompressedCheckpointError, match="bits must be an integer"):
        check_compressed_checkpoint(bits)
    old = variant("old_version", edit_quant=lambda q: q.update(format_version=1))
    with pytest.raises(CompressedCheckpointError, match="format version 2"):
        check_compressed_checkpoint(old)
    float_config = variant("no_fq", edit_quant=lambda q: q.pop("factor_quantization"))
    with pytest.raises(CompressedCheckpointError, match="hold no"):
        check_compressed_checkpoint(float_config)
    raw = (tmp_path / "good" / "model.safetensors").read_bytes()  # a download cut short
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    (cut / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    with pytest.raises(CompressedCheckpointError):
        check_compressed_checkpoint(cut)


def test_mixed_factors_refused_and_dequantize_or_decompress_keep_the_values():
    model = _quantized_tiny()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
    name = "model.layers.0.mlp.up_proj"
    float_layer = model.get_submodule(name).to_lowrank()
    set_submodule(model, name, float_layer)
    with pytest.raises(ValueError, match="mixes float factors"):
        mark_compressed(model, {})
    dequantize_factors(model)
    assert not any(isinstance(m, QuantizedLowRankLinear) for m in model.modules())
    assert model.config.quantization_config.factor_quantization is None
    assert model.config.quantization_config.format_version == 1
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
    dense = decompress_model(_quantized_tiny())
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, ref, atol=1e-4)


def test_gptq_rounding_is_rtn_without_correlations_and_helps_with_them():
    W, L_in, L_out = _weighted_problem(3)
    down, up = weighted_lowrank(W, 10, out_factor=L_out, in_factor=L_in)
    from hf_lowrank.ops.quant import quantize_rtn
    from hf_lowrank.ops.quant_lowrank import gptq_round

    plain = quantize_rtn(down, 4, group_size=16)
    alone = gptq_round(down, torch.eye(down.shape[1], dtype=torch.float64), 4, 16)  # nothing to push errors onto
    assert torch.equal(alone.packed, plain.packed) and torch.equal(alone.scales, plain.scales)
    for bits in (3, 4):
        refit = quantize_factor_pair(down, up, bits, group_size=16, scheme="refit", W=W, in_factor=L_in)
        gptq = quantize_factor_pair(down, up, bits, group_size=16, scheme="gptq", W=W, in_factor=L_in)
        err = {k: weighted_relative_error(W, q.up_hat @ q.down_hat, L_out, L_in) for k, q in
               (("refit", refit), ("gptq", gptq))}
        assert err["gptq"] < err["refit"], (bits, err)
