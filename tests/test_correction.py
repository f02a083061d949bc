"""quantization_correction: the fitted correction is the optimal weighted low-rank fit of the quantization error,
it lowers that error, the adapter it writes loads with stock peft on a bitsandbytes 4-bit base in a process that
never imports hf_lowrank and runs the corrected model there, and bad input is refused."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import make_tiny_llama

import hf_lowrank
from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams
from hf_lowrank.compression.correction import quantized_weight
from hf_lowrank.ops.fisher import DEFAULT_DAMPING, gram_factor, gram_shrinkage

bnb = pytest.importorskip("bitsandbytes")


def _nf4(double_quant: bool = False):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=double_quant)


def _batches(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def grams(model):
    targets = hf_lowrank.targets.find_target_linears(model)
    g_in, g_out, tokens = calibration_grams(model, targets, _batches(), outputs=True, progress=False)
    return CalibrationGrams(g_in, g_out, tokens)


def _factor(G, tokens):
    return gram_factor(G, damping=DEFAULT_DAMPING, shrinkage=gram_shrinkage(G.shape[0], tokens)).L


@pytest.mark.parametrize("quantization", ["nf4", 3])
def test_correction_is_the_optimal_weighted_fit(model, grams, quantization):
    """For each module, ||L_out^T (R - B A) L_in|| equals the optimal rank-r tail of the weighted residual's spectrum
    (Eckart-Young), computed here from the Grams independently, and is below the uncorrected error."""
    q = _nf4() if quantization == "nf4" else quantization
    report = hf_lowrank.quantization_correction(model, q, 4, calibration=grams, group_size=32, progress=False)
    assert report.weighting == "kronecker" and len(report.modules) == 14
    for row in report.modules:
        W = model.get_submodule(row.name).weight.detach().double()
        R = W - quantized_weight(W.float(), q, group_size=32).double()
        L_out, L_in = _factor(grams.outputs[row.name], grams.tokens), _factor(grams.inputs[row.name], grams.tokens)
        A, B = (t.double() for t in report.factors[row.name])
        achieved = (L_out.T @ (R - B @ A) @ L_in).norm()
        S = torch.linalg.svdvals(L_out.T @ R @ L_in)
        optimal = S[4:].norm()
        assert abs(achieved - optimal) <= 1e-4 * S.norm(), row.name
        assert achieved < (L_out.T @ R @ L_in).norm()
        assert row.weighted_error_after < row.weighted_error_before
        # the reported weighted error is that of the corrected weight against W
        assert abs(row.weighted_error_after - float(achieved / (L_out.T @ W @ L_in).norm())) < 1e-4


def test_grams_on_the_quantized_model(model):
    """grams_on='quantized' collects the Grams on a quantized copy (the model passed is left dense) and still lowers
    each module's weighted error."""
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    report = hf_lowrank.quantization_correction(model, 3, 4, calibration=_batches(), grams_on="quantized",
                                                group_size=32, progress=False)
    assert report.info["grams_on"] == "quantized"
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    assert all(row.weighted_error_after < row.weighted_error_before for row in report.modules)


def test_data_free_correction_is_loftq(model):
    """weighting='none' is LoftQ's one-iteration initialisation: peft's own SVD split of the same residual."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    report = hf_lowrank.quantization_correction(model, _nf4(), 6, calibration=None, weighting="none",
                                                progress=False)
    for row in report.modules[:4]:
        W = model.get_submodule(row.name).weight.detach()
        out = _low_rank_decomposition(W - quantized_weight(W, _nf4()), reduced_rank=6)
        A, B = report.factors[row.name]
        reference = out["L"] @ out["R"]
        assert ((B @ A - reference).norm() / reference.norm()).item() < 1e-4
        assert row.error_after < row.error_before


_CHILD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import PeftModel
    base, adapter, ids_path, out_path = sys.argv[1:5]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=True)
    quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, device_map="cpu",
                                                     dtype=torch.float32)
    model = PeftModel.from_pretrained(quantized, adapter).eval()
    ids = torch.load(ids_path)
    with torch.no_grad():
        corrected = model(ids, use_cache=False).logits
        with model.disable_adapter():
            base_only = model(ids, use_cache=False).logits
    torch.save({"corrected": corrected, "base_only": base_only}, out_path)
    assert "hf_lowrank" not in sys.modules, "the child imported hf_lowrank"
    print("stock peft:", type(model).__name__, type(quantized.model.layers[0].mlp.up_proj.base_layer).__name__)
""")


def test_adapter_loads_with_stock_peft_on_a_4bit_base(model, tmp_path):
    """The adapter on a bitsandbytes NF4 base, loaded in a fresh process without hf_lowrank, gives the logits of the
    in-process corrected model (dense weights replaced by Q(W) + B A)."""
    base = tmp_path / "base"
    model.save_pretrained(base)
    report = hf_lowrank.quantization_correction(base, _nf4(double_quant=True), 8, calibration=_batches(),
                                                path=tmp_path / "adapter", progress=False)
    assert report.output_dir == tmp_path / "adapter"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(report.factors)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(tmp_path / "adapter"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stock peft: PeftModelForCausalLM Linear4bit" in done.stdout
    saved = torch.load(tmp_path / "out.pt")
    child, child_base = saved["corrected"], saved["base_only"]

    corrected = copy.deepcopy(model)
    hf_lowrank.compression.correction.fake_quantize(corrected, _nf4(double_quant=True), correction=report)
    quantized = copy.deepcopy(model)
    hf_lowrank.compression.correction.fake_quantize(quantized, _nf4(double_quant=True))
    with torch.no_grad():
        expected = corrected(ids, use_cache=False).logits
        uncorrected = quantized(ids, use_cache=False).logits
    # bitsandbytes' own kernel sets the floor: on CPUs with AVX512-BF16 its fused NF4 GEMM rounds activations to
    # bf16, elsewhere it computes in float32. Its error is measured on the bare base (adapter disabled) against the
    # same Q(W) in float32, and the corrected logits must agree as closely as the kernel allows.
    kernel_noise = ((child_base - uncorrected).norm() / uncorrected.norm()).item()
    bound = 1e-4 + 2 * kernel_noise
    gap = ((child - expected).norm() / expected.norm()).item()
    effect = ((uncorrected - expected).norm() / expected.norm()).item()
    # the adapter's own contribution as stock peft computes it (adapter on minus off) is ours
    delta_gap = (((child - child_base) - (expected - uncorrected)).norm() / (expected - uncorrected).norm()).item()
    assert gap < bound, (gap, kernel_noise)
    assert delta_gap < 1e-3 + 20 * kernel_noise, (delta_gap, kernel_noise)
    # the bound discriminates: the correction moves the logits far more than that
    assert effect > 5 * bound, (effect, bound)


def test_bad_input_is_refused(model, tmp_path):
    correct = hf_lowrank.quantization_correction
    with pytest.raises(ValueError, match="calibration="):
        correct(model, _nf4(), 4, calibration=None)
    with pytest.raises(ValueError, match="not below the smaller dimension"):
        correct(model, _nf4(), 64, calibration=None, weighting="none")
    with pytest.raises(ValueError, match="positive int"):
        correct(model, _nf4(), 0, calibration=None, weighting="none")
    with pytest.raises(ValueError, match="bit width from 2 to 8"):
        correct(model, 1, 4, calibration=None, weighting="none")
    from transformers import BitsAndBytesConfig

    with pytest.raises(ValueError, match="8-bit"):
        correct(model, BitsAndBytesConfig(load_in_8bit=True), 4, calibration=None, weighting="none")
    with pytest.raises(ValueError, match="BitsAndBytesConfig"):
        correct(model, "nf4", 4, calibration=None, weighting="none")
    with pytest.raises(ValueError, match="weighting"):
        correct(model, _nf4(), 4, calibration=_batches(), weighting="fisher")
    with pytest.raises(ValueError, match="data-free"):
        correct(model, _nf4(), 4, calibration=_batches(), weighting="none")
    with pytest.raises(ValueError, match="llm_int8_skip_modules"):
        correct(model, BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["down_proj"]), 4,
                calibration=None, weighting="none")
    model.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=_nf4(),
                                                     device_map="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="already quantized"):
        correct(quantized, _nf4(), 4, calibration=None, weighting="none")
    compressed = copy.deepcopy(model)
    hf_lowrank.compress_model(compressed, {"model.layers.0.mlp.up_proj": 8}, progress=False)
    with pytest.raises(ValueError, match="already quantized or compressed|LowRankLinear"):
        correct(compressed, _nf4(), 4, calibration=None, weighting="none")


def test_gram_only_weighting_needs_no_fisher_exponent():
    # Gram sides never read the diagonal Fisher's exponent / eps: callers with Grams only pass neither
    from hf_lowrank.compression.pipeline import weighting_sides

    lin = torch.nn.Linear(6, 4)
    x = torch.randn(32, 6, dtype=torch.float64)
    sides = weighting_sides({"m": lin}, None, None, {"m": x.T @ x}, None, 1e-4)
    L = sides["m"].in_factor
    assert L is not None and L.shape == (6, 6) and torch.isfinite(L).all()
