"""One compression pipeline: the same inputs mean the same thing through every entry point.

``compress_model`` (a plain model), ``compress_peft_model`` (a LoRA model) and ``compress_on_save`` (the trainer
callback, which dispatches to one or the other) once disagreed on a Fisher state with NaN Grams (one refused it, the
other zeroed the entries silently) and on ``rank_pattern`` (peft's pattern keys on the LoRA path, exact module names on
the plain one). Each cell here runs both paths on the same input.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import make_tiny_fisher_lora, make_tiny_llama

from hf_lowrank import CompressionConfig, compress_model
from hf_lowrank.trainer.callbacks import compress_on_save
from hf_lowrank.tuners.fisher_lora import FisherCollector, compress_peft_model

UP0 = "model.layers.0.mlp.up_proj"


def _kronecker_state(pm):
    collector = FisherCollector("lora").attach(pm)
    pm.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randint(0, 128, (2, 12), generator=g)
        pm(input_ids=x, labels=x).loss.backward()
    pm.zero_grad(set_to_none=True)
    collector.detach()
    pm.eval()
    return collector.snapshot()


def _with_nan_gram(state, name):
    bad = copy.deepcopy(state)
    G = bad.tensors[name + ".gram_in"]
    G[0, 0] = float("nan")
    return bad


def test_non_finite_fisher_grams_are_zeroed_and_named_on_both_paths():
    """Before: compress_model(fisher=state) raised in gram_factor ("inf or NaN") on the state that
    compress_peft_model accepted after zeroing the entries without naming them in the report."""
    base = make_tiny_llama(seed=0)
    plain = copy.deepcopy(base)
    pm = make_tiny_fisher_lora(base, fisher_weighting="kronecker")
    state = _kronecker_state(pm)
    assert state.has_grams()
    bad = _with_nan_gram(state, UP0)
    with pytest.warns(UserWarning, match=rf"NaN/inf Fisher entries, treated as zero.*{UP0}"):
        _, peft_report = compress_peft_model(pm, fisher=bad, weighting="kronecker", rank=8, merge=False,
                                                progress=False)
    with pytest.warns(UserWarning, match=rf"NaN/inf Fisher entries, treated as zero.*{UP0}"):
        plain_report = compress_model(plain, 8, fisher=bad, fisher_weighting="kronecker", progress=False)
    for report in (peft_report, plain_report):
        assert report.info["non_finite_fisher"] == [UP0]
        assert all(m.rel_error is not None and 0 <= m.rel_error < 1 for m in report.modules if m.rank)
    # the same factors: the two entry points weight module UP0 with the same (zeroed) Gram
    assert plain_report.ranks == peft_report.ranks
    row = {m.name: m for m in plain_report.modules}[UP0]
    peft_row = {m.name: m for m in peft_report.modules}[UP0]
    assert abs(row.weighted_rel_error - peft_row.weighted_rel_error) < 1e-4


def test_rank_pattern_has_peft_meaning_on_a_plain_model(tmp_path):
    """Before: compress_on_save forwarded rank_pattern={"up_proj": 8} to compress_model as exact module names, so a
    plain model raised "not target Linear layers" where a LoRA model compressed every up_proj to rank 8."""
    base = make_tiny_llama(seed=0)
    plain = copy.deepcopy(base)
    pm = make_tiny_fisher_lora(base, fisher_source="none")
    _, peft_report = compress_on_save(pm, tmp_path / "lora", fisher_source="none", rank_pattern={"up_proj": 8},
                                      progress=False)
    _, plain_report = compress_on_save(plain, tmp_path / "plain", rank_pattern={"up_proj": 8}, progress=False)
    ups = {n: r for n, r in plain_report.ranks.items()}
    assert ups and all(n.endswith(".up_proj") for n in ups) and set(ups.values()) == {8}
    assert peft_report.ranks == plain_report.ranks
    saved = json.loads((tmp_path / "plain" / "compression_report.json").read_text())
    assert {m["name"] for m in saved["modules"] if m["rank"]} == set(ups)


def test_rank_pattern_overrides_a_rank_alike_on_both_paths(tmp_path):
    """A rank with a pattern: the pattern's modules take its rank, the others the rank (the plain path dropped the
    rank before)."""
    base = make_tiny_llama(seed=0)
    plain = copy.deepcopy(base)
    pm = make_tiny_fisher_lora(base, fisher_source="none")
    pattern = {r"layers\.1\.mlp\.(up|down)_proj": 4}
    _, peft_report = compress_on_save(pm, tmp_path / "lora", fisher_source="none", rank=8, rank_pattern=pattern,
                                      progress=False)
    _, plain_report = compress_on_save(plain, tmp_path / "plain", rank=8, rank_pattern=pattern, progress=False,
                                       target_modules=sorted(peft_report.ranks))
    assert plain_report.ranks == peft_report.ranks
    assert plain_report.ranks["model.layers.1.mlp.up_proj"] == 4 and plain_report.ranks[UP0] == 8
    with pytest.raises(ValueError, match="rank_pattern key 'q_prj' matches no target module"):
        compress_model(copy.deepcopy(plain), {"q_prj": 4}, progress=False)


def _lora_model(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return pm.eval()


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


def test_compress_model_takes_a_lora_peft_model_as_compress_peft_model_does():
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    pm = _lora_model()
    reference, ref_report = compress_peft_model(copy.deepcopy(pm), keep=0.5, progress=False)
    report = compress_model(pm, 0.5, progress=False)
    compressed = pm.get_base_model()
    assert report.ranks == ref_report.ranks and set(report.ranks) == {
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj")}
    assert not any("lora" in n for n, _ in compressed.named_modules())
    torch.testing.assert_close(_logits(compressed, x), _logits(reference, x), atol=1e-5, rtol=1e-4)


def test_compress_model_with_calibration_on_a_lora_model_is_the_merged_models_compression():
    # the weight source of a LoRA model is W + s B A: compressing it equals compressing the merged model, calibration
    # Grams included (both collected on the same effective weights)
    g = torch.Generator().manual_seed(4)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(4)]
    x = torch.randint(0, 128, (2, 12), generator=g)
    pm = _lora_model()
    merged = copy.deepcopy(pm).merge_and_unload()
    ref_report = compress_model(merged, CompressionConfig(keep=0.5, target_modules=["up_proj", "down_proj"]),
                                calibration=batches, progress=False)
    report = compress_model(pm, 0.5, calibration=batches, progress=False)
    assert report.ranks == ref_report.ranks and report.method == ref_report.method == "kronecker"
    torch.testing.assert_close(_logits(pm.get_base_model(), x), _logits(merged, x), atol=1e-4, rtol=1e-3)


def test_compress_model_on_a_lora_model_refuses_grams_given_by_hand():
    with pytest.raises(ValueError, match="effective weights W \\+ s B A"):
        compress_model(_lora_model(), 0.5, grams_in={}, progress=False)


def test_compress_model_on_a_fisher_lora_model_with_a_fisher_and_a_config_weighting():
    # the demo's diagonal row: a Kronecker-trained FisherLoRA adapter compressed with the two-sided Fisher
    pm = make_tiny_fisher_lora(make_tiny_llama(), fisher_weighting="kronecker", compress_rank=None)
    state = _kronecker_state(pm)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    reference, ref_report = compress_peft_model(copy.deepcopy(pm), fisher=state, keep=0.5, weighting="row",
                                                allocation="uniform", progress=False)
    report = compress_model(pm, CompressionConfig(keep=0.5, weighting="row", allocation="uniform"), fisher=state,
                            progress=False)
    assert report.ranks == ref_report.ranks and report.info["fisher_weighting"] == "row"
    torch.testing.assert_close(_logits(pm.get_base_model(), x), _logits(reference, x), atol=1e-5, rtol=1e-4)
