"""``CompressionConfig``: validation, JSON round trip, and the same compression whichever way it is spelled."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from tiny_models import TINY_MLP, make_tiny_llama

from hf_lowrank import CompressionConfig, LowRankLinear, compress_model


def _batches(n=3, seq=9, vocab=128, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (rows, seq), generator=g),
             "attention_mask": torch.ones(rows, seq, dtype=torch.long)} for _ in range(n)]


def _factors(model) -> dict[str, torch.Tensor]:
    return {name: torch.cat([m.up.weight.flatten(), m.down.weight.flatten()])
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _assert_same_factors(a, b, bound=1e-6):
    fa, fb = _factors(a), _factors(b)
    assert fa and fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].shape == fb[name].shape, name
        assert (fa[name] - fb[name]).abs().max().item() <= bound, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep=1.5), r"keep is the fraction of parameters kept and must be a float in \(0, 1\].*rank="),
    (dict(keep=0.0), r"\(0, 1\]"),
    (dict(rank=0), r"rank 0 is out of range: it must be an int >= 1"),
    (dict(rank=2.5), "rank 2.5 is out of range"),
    (dict(rank=4, keep=0.5), "not both"),
    (dict(rank_pattern={"(": 4}), r"rank_pattern key '\(' is not a valid regular expression"),
    (dict(rank_pattern={"up_proj": 0}), r"rank_pattern\['up_proj'\] = 0: use an int rank >= 1"),
    (dict(rank_pattern=["up_proj"]), "rank_pattern must be a dict"),
    (dict(target_modules=3), "target_modules must be None, a string"),
    (dict(weighting="fisher"), r"weighting must be one of \('auto', 'whitened', 'kronecker', 'two_sided', 'row'\)"),
    (dict(allocation="greedy"), "allocation must be one of"),
    (dict(rank=4, allocation="global"), r"allocation='global' spreads one parameter budget.*keep=0\.8.*rank=4"),
    (dict(keep=0.5, rank_pattern={"up_proj": 4}, allocation="global"), "no rank_pattern"),
    (dict(loss_normalization="per_module"), "loss_normalization must be one of"),
    (dict(damping=-1.0), "damping must be a finite number >= 0"),
    (dict(damping=float("nan")), "damping must be a finite number"),
    (dict(max_gram_dim=0), "max_gram_dim must be None"),
    (dict(sequential="yes"), "sequential must be True or False"),
    (dict(keep=0.5, sequential=True, allocation="global"), "sequential=True .* allocation='uniform'"),
    (dict(rank_multiple=0), "rank_multiple must be an int >= 1"),
    (dict(svd_method="qr"), "svd_method must be one of"),
    (dict(fisher_exponent=-0.5), "fisher_exponent must be a finite number >= 0"),
    (dict(fisher_eps=0.0), "fisher_eps must be a finite number > 0"),
    (dict(dtype="int8"), "dtype must be a floating torch dtype or its name"),
    (dict(dtype=torch.int8), "dtype must be a floating torch dtype"),
])
def test_bad_fields_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**kwargs)


def test_fields_are_normalised():
    cfg = CompressionConfig(keep=1, rank_pattern={"up_proj": 8}, target_modules=("up_proj", "down_proj"),
                            weighting=None, allocation=None, dtype=torch.bfloat16)
    assert cfg.keep == 1.0 and isinstance(cfg.keep, float)
    assert cfg.target_modules == ["up_proj", "down_proj"]
    assert (cfg.weighting, cfg.allocation, cfg.loss_normalization) == ("auto", "auto", "auto")
    assert cfg.dtype == "bfloat16" and cfg.torch_dtype is torch.bfloat16
    assert cfg.has_target and not CompressionConfig().has_target


def test_json_round_trip():
    cfg = CompressionConfig(keep=0.6, rank_pattern={r"layers\.1\.mlp\.up_proj": 4, "down_proj": 0.5},
                            target_modules=["up_proj", "down_proj"], weighting="whitened", allocation="uniform",
                            loss_normalization="relative", damping=1e-3, max_gram_dim=96, sequential=True,
                            rank_multiple=4, svd_method="exact", fisher_exponent=1.0, fisher_eps=1e-5,
                            dtype=torch.float16)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["dtype"] == "float16"
    again = CompressionConfig.from_dict(data)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert CompressionConfig.from_dict(CompressionConfig().to_dict()) == CompressionConfig()
    with pytest.raises(ValueError, match=r"Unknown CompressionConfig field\(s\) \['factor_bitz'\]"):
        CompressionConfig.from_dict({**data, "factor_bitz": 4})


def test_config_and_keyword_forms_give_the_same_factors():
    base = make_tiny_llama(seed=0)
    batches = _batches()
    cfg = CompressionConfig(keep=0.5, weighting="whitened", allocation="uniform", svd_method="exact", rank_multiple=4)
    by_config = copy.deepcopy(base)
    report = compress_model(by_config, cfg, calibration=batches, progress=False)
    by_keywords = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new names do not warn
        other = compress_model(by_keywords, 0.5, calibration=batches, weighting="whitened", allocation="uniform",
                               svd_method="exact", rank_multiple=4, progress=False)
    assert report.ranks == other.ranks and report.method == other.method == "whitened"
    _assert_same_factors(by_config, by_keywords)
    # a config with keyword overrides, and the deprecated names: the same compression, each old name warned about
    overridden = copy.deepcopy(base)
    compress_model(overridden, CompressionConfig(keep=0.5, weighting="kronecker"), calibration=batches,
                   weighting="whitened", allocation="uniform", svd_method="exact", rank_multiple=4, progress=False)
    _assert_same_factors(by_config, overridden)
    old = copy.deepcopy(base)
    with pytest.warns(DeprecationWarning) as caught:
        compress_model(old, ranks=0.5, calibration=batches, calibration_weighting="whitened", allocation="uniform",
                       method="exact", rank_multiple=4, progress=False)
    said = " ".join(str(w.message) for w in caught)
    for old_name, new_name in (("ranks", "second argument"), ("calibration_weighting", "weighting="),
                               ("method", "svd_method=")):
        assert f"compress_model({old_name}=...) is deprecated" in said and new_name in said
    _assert_same_factors(by_config, old)


def test_compress_model_refuses_what_the_data_cannot_give():
    model = make_tiny_llama(seed=0)
    with pytest.raises(ValueError, match=r"weighting='two_sided' \(the diagonal Fisher\) needs fisher="):
        compress_model(model, 0.5, calibration=_batches(n=1), weighting="two_sided", progress=False)
    with pytest.raises(ValueError, match="weighting='whitened' needs data to weigh by"):
        compress_model(model, 0.5, weighting="whitened", progress=False)
    with pytest.raises(ValueError, match="the keep once"):
        compress_model(model, 0.5, keep=0.6, progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['alocation'\]"):
        compress_model(model, 0.5, alocation="uniform", progress=False)
    with pytest.raises(ValueError, match="second argument is a CompressionConfig"):
        compress_model(model, "0.5", progress=False)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        compress_model(model, 0.5, calibration=_batches(n=1), weighting="whitened", calibration_weighting="kronecker",
                       progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


# ------------------------------------------------------------------------------ FisherLoRAConfig and the callback
def _fisher_lora_config(**kwargs):
    from hf_lowrank import FisherLoRAConfig

    return FisherLoRAConfig(r=4, lora_alpha=8, target_modules=TINY_MLP, init_lora_weights=False, fisher_source="none",
                            task_type="CAUSAL_LM", **kwargs)


def test_fisher_lora_compression_sub_config_survives_save_and_load(tmp_path):
    from peft import PeftModel, get_peft_model

    from hf_lowrank.tuners.fisher_lora import compress_peft_model

    base = make_tiny_llama(seed=0)
    compression = CompressionConfig(keep=0.5, svd_method="exact", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the sub-config is the current way: no warning
        cfg = _fisher_lora_config(compression=compression)
        torch.manual_seed(0)
        get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / "adapter")
        saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert saved["compression"] == compression.to_dict()
        assert saved["compress_keep"] == 0.5  # mirrored, for readers of the former fields
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert loaded.peft_config["default"].compression == compression
    with pytest.warns(DeprecationWarning, match=r"compress_keep=.*compress_svd_method=.*compression=CompressionConfig"):
        old_cfg = _fisher_lora_config(compress_keep=0.5, compress_svd_method="exact", compress_dtype="float32")
    assert old_cfg.compression == compression and old_cfg.has_compression_target
    old = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter", config=old_cfg)
    new_model, new_report = compress_peft_model(loaded, progress=False)
    old_model, old_report = compress_peft_model(old, progress=False)
    assert new_report.ranks == old_report.ranks and len(new_report.ranks) == 6
    _assert_same_factors(new_model, old_model)
    with pytest.raises(ValueError, match=r"compress_keep=0\.5 disagrees with compression\.keep=0\.6"):
        _fisher_lora_config(compress_keep=0.5, compression=CompressionConfig(keep=0.6))
    with pytest.raises(ValueError, match="compression must be a hf_lowrank.CompressionConfig"):
        _fisher_lora_config(compression=0.5)


def test_compress_on_save_callback_takes_a_config(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_lowrank import CompressOnSaveCallback

    config = CompressionConfig(keep=0.5, svd_method="exact", rank_pattern={"down_proj": 8})
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], disable_tqdm=True)
    model = make_tiny_llama(seed=0)
    reference = copy.deepcopy(model)
    expected = compress_model(reference, config, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        callback = CompressOnSaveCallback(config=config)
    callback.on_train_end(args, TrainerState(global_step=1), TrainerControl(), model=model)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # the training model is left alone
    report = callback.last_report
    assert report.ranks == expected.ranks and {r for n, r in report.ranks.items() if "down_proj" in n} == {8}
    errors = {m.name: m.rel_error for m in expected.modules}
    assert all(abs(m.rel_error - errors[m.name]) <= 1e-6 for m in report.modules if m.rank)
    assert (tmp_path / "compressed" / "compression_report.json").is_file()
    with pytest.warns(DeprecationWarning, match=r"method='svd'\) is deprecated"):
        old = CompressOnSaveCallback("svd", rank=4)
    assert old.fisher is None and old.method == "compress"
