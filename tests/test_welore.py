"""WeLoreLRC: allocation, PEFT integration, save/load, merge_and_unload, training, caching."""

from __future__ import annotations

import math
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import CallCounter
from torch import nn

import hf_lowrank.tuners.welore as welore
from hf_lowrank.modules import LowRankLinear
from hf_lowrank.ops.svd import full_svd
from hf_lowrank.tuners.welore import (
    DenseWeightDroppedError,
    SpectraCache,
    WeLoreLinear,
    WeLoreLRCConfig,
    compute_spectra,
    welore_ranks_for_model,
)
from hf_lowrank.tuners.welore import layer as welore_layer
from hf_lowrank.tuners.welore import spectra as welore_spectra

LLAMA_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def _plant_spectra(model: nn.Module, seed: int = 0) -> None:
    """Give the tiny model's block Linears realistic spectra: heavy-tailed (low-rank) attention q/k and MLP gate, flat
    v/o/up/down, as WeLore's Figure 4 shows for LLaMA. Random init alone is nearly flat everywhere."""
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            out_f, in_f = module.weight.shape
            k = min(out_f, in_f)
            U, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g))
            V, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g))
            i = torch.arange(k, dtype=torch.float32)
            heavy = name.endswith(("q_proj", "k_proj", "gate_proj"))
            s = torch.exp(-i / (0.08 * k)) + 0.02 if heavy else 1.0 - 0.5 * i / k
            module.weight.copy_(0.3 * (U * s) @ V.T)


@pytest.fixture
def planted(tiny_llama_config):
    from transformers import LlamaForCausalLM

    def make():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config).float().eval()
        _plant_spectra(model)
        return model

    return make


def _ids(n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def svd_calls(monkeypatch):
    counters = {
        "spectra": CallCounter(welore_spectra.singular_values),
        "factors": CallCounter(welore_layer.fwsvd),
    }
    monkeypatch.setattr(welore_spectra, "singular_values", counters["spectra"])
    monkeypatch.setattr(welore_layer, "fwsvd", counters["factors"])  # the one factorization every WeLore layer uses
    return counters


def _cfg(**kw) -> WeLoreLRCConfig:
    kw.setdefault("progress", False)
    return WeLoreLRCConfig(**kw)


# ---------------------------------------------------------------------------------------------------------------------
# config validation and clear errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.2, 1.5, True, "0.3"])
def test_invalid_reduction_is_refused(bad):
    with pytest.raises(ValueError, match=r"reduction must be a fraction in \(0, 1\)"):
        WeLoreLRCConfig(reduction=bad)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, 2])
def test_invalid_lrc_ratio_is_refused(bad):
    with pytest.raises(ValueError, match=r"lrc_ratio must be in \(0, 1\]"):
        WeLoreLRCConfig(lrc_ratio=bad)


def test_other_invalid_fields():
    with pytest.raises(ValueError, match="nlrc must be 'keep' or 'truncate'"):
        WeLoreLRCConfig(nlrc="drop")
    with pytest.raises(ValueError, match="rank_pattern"):
        WeLoreLRCConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match="svd_method"):
        WeLoreLRCConfig(svd_method="lanczos")
    assert WeLoreLRCConfig(lrc_ratio=1).lrc_ratio == 1
    assert WeLoreLRCConfig().peft_type.value == "WELORE_LRC"


@pytest.mark.parametrize("targets", [["no_such_proj"], r".*\.nothing$"])
def test_targets_matching_nothing_are_refused(planted, targets):
    with pytest.raises(ValueError, match="(Unknown target module|matches no Linear)"):
        get_peft_model(planted(), _cfg(target_modules=targets))


def test_unreachable_reduction_beyond_the_maximum_says_lower_it(planted):
    with pytest.raises(ValueError, match=r"cannot be reached.*most WeLore can remove is .*Lower reduction to at most"):
        welore_ranks_for_model(planted(), 0.99, progress=False)


@pytest.mark.parametrize(
    "reduction, kwargs, expect",
    [
        (0.6, {"lrc_ratio": 0.05}, r"between the reachable reductions ([\d.]+)% \(below\) and ([\d.]+)% \(above\)"),
        (0.01, {}, r"smallest reduction WeLore reaches is ([\d.]+)%.*Raise reduction to at least"),
    ],
    ids=["gap", "below-the-first-step"],
)
def test_unreachable_reduction_names_what_is_reachable(planted, reduction, kwargs, expect):
    """Inside the range the message must not say "lower reduction", and the reductions it names must be reachable."""
    model = planted()
    with pytest.raises(ValueError) as info:
        welore_ranks_for_model(model, reduction, progress=False, **kwargs)
    msg = str(info.value)
    assert "Lower reduction" not in msg, msg
    found = re.search(expect, msg)
    assert found, msg
    for share in found.groups():
        _, alloc = welore_ranks_for_model(model, float(share) / 100, progress=False, **kwargs)
        assert abs(alloc.achieved_reduction - float(share) / 100) <= 0.005


# ---------------------------------------------------------------------------------------------------------------------
# allocation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_lrc_split_follows_lrc_ratio(planted, ratio):
    model = get_peft_model(planted(), _cfg(reduction=0.2, lrc_ratio=ratio))
    alloc = model.welore_allocation
    for name, (out_f, in_f) in alloc.shapes.items():
        is_lrc = alloc.threshold_ranks[name] < ratio * min(out_f, in_f)
        assert (name in alloc.lrc) == is_lrc
        module = model.base_model.model.get_submodule(name)
        if is_lrc:
            assert isinstance(module, WeLoreLinear) and module.welore_role["default"] == "lrc"
            assert module.welore_down["default"].shape == (alloc.ranks[name], in_f)
        else:
            assert type(module) is nn.Linear  # kept exact and frozen
    assert abs(alloc.achieved_reduction - 0.2) <= 0.005
    # heavy-tailed layers are the low-rank components at the paper's ratio
    if ratio == 0.5:
        assert all(n.endswith(("q_proj", "k_proj", "gate_proj")) for n in alloc.lrc)
        assert any(n.endswith("q_proj") for n in alloc.lrc)


def test_rank_pattern_pins_ranks(planted):
    model = get_peft_model(planted(), _cfg(reduction=0.25, rank_pattern={r"layers\.0\.self_attn\.q_proj": 5}))
    alloc = model.welore_allocation
    assert alloc.ranks["model.layers.0.self_attn.q_proj"] == 5
    assert "model.layers.0.self_attn.q_proj" in alloc.pinned
    assert abs(alloc.achieved_reduction - 0.25) <= 0.005


# ---------------------------------------------------------------------------------------------------------------------
# the PEFT model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_welore_factors_go_through_the_one_factorization(method):
    """A WeLore layer's factors are fwsvd's (the package's one path); without Fisher that is bit for bit the plain
    truncated SVD split, with Fisher the weighted one."""
    from hf_lowrank.ops.fisher import fwsvd
    from hf_lowrank.ops.svd import split_factors, truncated_svd

    lin = nn.Linear(48, 40)
    row, col = torch.rand(40) + 0.1, torch.rand(48) + 0.1
    for fisher, expect in (
        ({}, lambda: split_factors(*truncated_svd(lin.weight, 6, method=method))),
        ({"row_fisher": row, "col_fisher": col}, lambda: fwsvd(lin.weight, 6, row_fisher=row, col_fisher=col,
                                                                method=method)),
    ):
        torch.manual_seed(0)  # the randomized range finder draws from the global generator
        got = welore_layer.welore_factors(lin, 6, method=method, **fisher)
        torch.manual_seed(0)
        assert all(torch.equal(g, e) for g, e in zip(got, expect(), strict=True))


def test_lrc_factors_are_the_truncated_svd(planted):
    base = planted()
    dense = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    model = get_peft_model(base, _cfg(reduction=0.3, svd_method="exact"))
    x = torch.randn(3, 5, 64)
    checked = 0
    for name in model.welore_allocation.lrc:
        layer = model.base_model.model.get_submodule(name)
        r = layer.welore_rank["default"]
        U, S, Vh = full_svd(dense[name].double())
        W_r = (U[:, :r] * S[:r]) @ Vh[:r]
        x_in = torch.randn(3, 5, layer.in_features)
        ref = x_in.double() @ W_r.T
        out = layer(x_in).double()
        assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-5
        assert layer.get_base_layer().weight is None  # dense weight dropped (keep_dense=False)
        checked += 1
    assert checked > 0 and x.shape[0] == 3


def test_only_lrc_factors_require_and_receive_gradients(planted):
    model = get_peft_model(planted(), _cfg(reduction=0.3))
    lrc = set(model.welore_allocation.lrc)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for name in lrc:
        expected |= {f"base_model.model.{name}.welore_down.default", f"base_model.model.{name}.welore_up.default"}
    assert trainable == expected and expected
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    nb_trainable, nb_all = model.get_nb_trainable_parameters()
    assert nb_trainable == model.welore_allocation.lrc_params
    # the dense weights of LRCs are gone: the PEFT model is as small as the compressed model
    dense_total = sum(p.numel() for p in planted().parameters())
    alloc = model.welore_allocation
    assert nb_all == dense_total - alloc.params_before + alloc.params_after


def test_save_and_load_are_exact_and_run_no_svd(planted, tmp_path, svd_calls):
    model = get_peft_model(planted(), _cfg(reduction=0.3))
    with torch.no_grad():  # move the factors away from their SVD init, as training would
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    ids = _ids()
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    svd_calls["spectra"].calls = svd_calls["factors"].calls = 0
    loaded = PeftModel.from_pretrained(planted(), tmp_path)
    assert loaded.peft_config["default"].rank_map == model.peft_config["default"].rank_map
    out = loaded(input_ids=ids).logits
    assert torch.equal(out, ref)
    assert svd_calls["spectra"].calls == 0 and svd_calls["factors"].calls == 0
    assert not any(p.requires_grad for p in loaded.parameters())  # from_pretrained defaults to inference mode
    trainable = PeftModel.from_pretrained(planted(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert svd_calls["factors"].calls == 0


def test_reused_config_initialises_lazily_from_svd(planted, tmp_path, svd_calls):
    """A saved config applied with get_peft_model (no weights loaded) must not run on zero factors: the SVD runs at
    the first forward (or save), and gives the same model as a fresh allocation."""
    from peft import PeftConfig

    fresh = get_peft_model(planted(), _cfg(reduction=0.3))
    ids = _ids()
    ref = fresh(input_ids=ids).logits
    fresh.save_pretrained(tmp_path / "a")
    config = PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(config, WeLoreLRCConfig) and config.rank_map
    reused = get_peft_model(planted(), config)
    layer = reused.base_model.model.get_submodule(reused.welore_allocation.lrc[0])
    assert layer._pending and layer.get_base_layer().weight is not None  # dense kept until initialised
    calls = svd_calls["factors"].calls
    assert torch.allclose(reused(input_ids=ids).logits, ref, atol=1e-5)
    assert svd_calls["factors"].calls == calls + len(reused.welore_allocation.lrc)
    assert not layer._pending and layer.get_base_layer().weight is None
    again = get_peft_model(planted(), PeftConfig.from_pretrained(tmp_path / "a"))
    again.save_pretrained(tmp_path / "b")  # saving initialises too
    loaded = PeftModel.from_pretrained(planted(), tmp_path / "b")
    assert torch.allclose(loaded(input_ids=ids).logits, ref, atol=1e-5)


def test_merge_and_unload_then_save_and_from_pretrained(planted, tmp_path):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(planted(), _cfg(reduction=0.3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.01)
    ids = _ids()
    ref = model(input_ids=ids).logits
    lrc = model.welore_allocation.lrc
    merged = model.merge_and_unload()
    assert not any(isinstance(m, WeLoreLinear) for m in merged.modules())
    for name in lrc:
        assert isinstance(merged.get_submodule(name), LowRankLinear)
    assert torch.allclose(merged(input_ids=ids).logits, ref, atol=1e-6)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.method == "welore"
    for name in lrc:
        assert isinstance(reloaded.get_submodule(name), LowRankLinear)
    assert torch.equal(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_truncate_mode_saves_truncated_nlrcs(planted, tmp_path):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(planted(), _cfg(reduction=0.4, nlrc="truncate"))
    alloc = model.welore_allocation
    truncated = [n for n in alloc.nlrc if alloc.ranks[n] < min(alloc.shapes[n])]
    assert truncated and alloc.lrc
    for name in truncated:
        layer = model.base_model.model.get_submodule(name)
        W = layer.welore_weight["default"]
        assert not W.requires_grad
        assert torch.linalg.matrix_rank(W.double(), rtol=1e-6) == alloc.ranks[name]
    assert abs(alloc.achieved_reduction - 0.4) <= 0.005
    ids = _ids()
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(planted(), tmp_path / "adapter")
    assert torch.equal(loaded(input_ids=ids).logits, ref)
    merged = loaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(reloaded(input_ids=ids).logits, ref, atol=1e-6)


def test_dense_weight_kept_or_dropped(planted):
    ids = _ids()
    base_ref = planted()(input_ids=ids).logits
    kept = get_peft_model(planted(), _cfg(reduction=0.3, keep_dense=True))
    compressed = kept(input_ids=ids).logits
    assert not torch.allclose(compressed, base_ref, atol=1e-4)
    with kept.disable_adapter():
        assert torch.equal(kept(input_ids=ids).logits, base_ref)
    kept.merge_adapter()
    assert torch.allclose(kept(input_ids=ids).logits, compressed, atol=1e-5)
    kept.unmerge_adapter()
    assert torch.equal(kept(input_ids=ids).logits, compressed)
    restored = kept.unload()
    assert torch.equal(restored(input_ids=ids).logits, base_ref)

    dropped = get_peft_model(planted(), _cfg(reduction=0.3))
    with pytest.raises(DenseWeightDroppedError, match="keep_dense=True"):
        with dropped.disable_adapter():
            pass
    assert torch.equal(dropped(input_ids=ids).logits, compressed)  # still usable after the refusal
    with pytest.raises(DenseWeightDroppedError, match="merge_and_unload"):
        dropped.unload()


def test_bert_classifier_with_biases_and_a_trained_head(tiny_bert_classifier, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    base = tiny_bert_classifier
    dense = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in base.named_modules()
             if isinstance(m, nn.Linear)}
    head_before = base.classifier.weight.detach().clone()
    config = _cfg(reduction=0.2, task_type="SEQ_CLS", modules_to_save=["classifier"], svd_method="exact")
    model = get_peft_model(base, config)
    alloc = model.welore_allocation
    assert alloc.lrc and abs(alloc.achieved_reduction - 0.2) <= 0.005
    assert all(".encoder.layer." in n for n in alloc.shapes)  # pooler and classifier are not targets
    name = alloc.lrc[0]
    layer = model.base_model.model.get_submodule(name)
    W, b = dense[name]
    U, S, Vh = full_svd(W.double())
    r = alloc.ranks[name]
    x = torch.randn(4, layer.in_features)
    ref = x.double() @ ((U[:, :r] * S[:r]) @ Vh[:r]).T + b.double()
    assert torch.allclose(layer(x).double(), ref, atol=1e-5)  # the bias is kept (frozen) on top of the factors
    assert not layer.get_base_layer().bias.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert all("classifier" in n or ".welore_down." in n or ".welore_up." in n for n in trainable)
    ids = _ids(3, 10)
    labels = torch.tensor([0, 1, 2])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    model.eval()
    ref_logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the fixture's seed: the same base weights, as a fresh from_pretrained would give
    fresh = BertForSequenceClassification(BertConfig(**base.config.to_dict())).float().eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, ref_logits)
    assert not torch.equal(loaded.base_model.model.classifier.modules_to_save["default"].weight, head_before)


def test_second_adapter_is_refused(planted):
    model = get_peft_model(planted(), _cfg(reduction=0.3))
    with pytest.raises(ValueError, match="one adapter per model"):
        model.add_adapter("other", _cfg(reduction=0.2))


# ---------------------------------------------------------------------------------------------------------------------
# spectra cache
# ---------------------------------------------------------------------------------------------------------------------


def test_second_get_peft_model_uses_cached_spectra(planted, svd_calls, tmp_path):
    get_peft_model(planted(), _cfg(reduction=0.3, spectra_cache_dir=str(tmp_path)))
    first = svd_calls["spectra"].calls
    assert first == 14
    get_peft_model(planted(), _cfg(reduction=0.3, spectra_cache_dir=str(tmp_path)))
    assert svd_calls["spectra"].calls == first  # in-memory hit
    assert len(list(tmp_path.glob("*.safetensors"))) == 14
    # a new process would start with an empty memory cache: the files alone give the same spectra
    model = planted()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    cold = SpectraCache(tmp_path)
    cached = compute_spectra(targets, cache=cold, progress=False)
    assert svd_calls["spectra"].calls == first and cold.hits == 14
    for name, module in targets.items():
        assert torch.allclose(cached[name], torch.linalg.svdvals(module.weight.float()), rtol=1e-5, atol=1e-6)
    # a changed weight is a cache miss
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    compute_spectra(targets, cache=cold, progress=False)
    assert svd_calls["spectra"].calls == first + 1


def test_fingerprint_depends_on_content_and_weighting():
    W = torch.randn(8, 6)
    fp = welore.weight_fingerprint(W)
    assert fp == welore.weight_fingerprint(W.clone())
    W2 = W.clone()
    W2[3, 2] += 1e-6
    assert fp != welore.weight_fingerprint(W2)
    assert fp != welore.weight_fingerprint(W, row_weights=torch.ones(8))
    assert fp != welore.weight_fingerprint(W.double())


# ---------------------------------------------------------------------------------------------------------------------
# Fisher-weighted spectra
# ---------------------------------------------------------------------------------------------------------------------


def test_fisher_weighted_welore(planted):
    from hf_lowrank.ops.fisher import fwsvd

    base = planted()
    targets = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    g = torch.Generator().manual_seed(5)
    row_fisher = {n: torch.rand(m.out_features, generator=g) ** 4 for n, m in targets.items()}
    dense = {n: m.weight.detach().clone() for n, m in targets.items()}
    plain = welore_ranks_for_model(planted(), 0.3, progress=False)[1]
    config = _cfg(reduction=0.3, svd_method="exact").with_fisher(row_fisher=row_fisher)
    model = get_peft_model(base, config)
    alloc = model.welore_allocation
    assert alloc.weighted and abs(alloc.achieved_reduction - 0.3) <= 0.005
    assert alloc.ranks != plain.ranks  # the weighting moves rank between layers
    name = alloc.lrc[0]
    layer = model.base_model.model.get_submodule(name)
    down, up = fwsvd(dense[name], alloc.ranks[name], row_fisher=row_fisher[name], method="exact")
    assert torch.allclose(layer.welore_up["default"] @ layer.welore_down["default"], up @ down, atol=1e-5)
    assert "_welore_fisher" not in model.peft_config["default"].to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------------


def test_trainer_updates_only_lrc_factors(planted, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(planted(), _cfg(reduction=0.3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(3))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and changed
    assert all(".welore_down." in n or ".welore_up." in n for n in changed)


SMOLLM2_BLOCKS_0_9 = r"model\.layers\.[0-9]\.(self_attn|mlp)\.\w+"  # 70 of the 210 Linears: keeps the SVDs < 15 s


@pytest.mark.slow
def test_smollm2_reduction_hits_target(smollm2):
    model, tokenizer = smollm2
    ranks, alloc = welore_ranks_for_model(model, 0.3, SMOLLM2_BLOCKS_0_9, progress=False)
    assert abs(alloc.achieved_reduction - 0.3) <= 0.005
    assert len(alloc.shapes) == 70 and alloc.lrc and alloc.nlrc
    assert set(ranks) == set(alloc.lrc)
    for name, (out_f, in_f) in alloc.shapes.items():
        assert (name in alloc.lrc) == (alloc.threshold_ranks[name] < 0.5 * min(out_f, in_f))
    for target in (0.1, 0.2, 0.4):  # spectra are cached: the other targets cost no SVD
        _, other = welore_ranks_for_model(model, target, SMOLLM2_BLOCKS_0_9, progress=False)
        assert abs(other.achieved_reduction - target) <= 0.005
    assert math.isfinite(alloc.threshold) and 0 < alloc.threshold < 1


# ---------------------------------------------------------------------------------------------------------------------
# pictures and the CLI
# ---------------------------------------------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_and_cli(planted, tmp_path):
    from hf_lowrank.cli import main
    from hf_lowrank.demo.plotting import plot_spectra, ranks_from_adapter

    model = get_peft_model(planted(), _cfg(reduction=0.3, nlrc="truncate"))
    model.save_pretrained(tmp_path / "adapter")
    alloc = model.welore_allocation
    ranks, shapes, lrc = ranks_from_adapter(tmp_path / "adapter")
    assert ranks == alloc.ranks and sorted(lrc) == alloc.lrc
    assert all(shapes[n] == alloc.shapes[n] for n in alloc.lrc)
    targets = {n: m for n, m in planted().named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    spectra = compute_spectra(targets, progress=False)
    w, h = _png_size(plot_spectra(spectra, tmp_path / "spectra.png", threshold=alloc.threshold))
    assert w > 300 and h > 200
    with pytest.raises(ValueError, match=".png"):
        plot_spectra(spectra, tmp_path / "spectra.jpg")
    # the hf-lowrank subcommands: from a saved adapter, and from a model folder
    assert main(["plot", "ranks", str(tmp_path / "adapter"), "--out", str(tmp_path / "cli_ranks.png")]) == 0
    planted().save_pretrained(tmp_path / "model")
    assert main(["plot", "spectra", str(tmp_path / "model"), "--out", str(tmp_path / "cli_spectra.png"),
                 "--reduction", "0.3"]) == 0
    assert main(["plot", "ranks", str(tmp_path / "model"), "--out", str(tmp_path / "cli_ranks2.png"),
                 "--reduction", "0.3"]) == 0
    for name in ("cli_ranks.png", "cli_spectra.png", "cli_ranks2.png"):
        assert _png_size(tmp_path / name)[0] > 300


def test_welore_on_an_already_compressed_model_says_so(tiny_llama):
    from hf_lowrank import compress_model

    compress_model(tiny_llama, 0.5, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        get_peft_model(tiny_llama, WeLoreLRCConfig(reduction=0.3, progress=False))
