"""GPT-2-style ``Conv1D`` layers (weight stored ``(in, out)``) compress, round-trip and take FisherLoRA, WeLoreLRC and
SPSFT like Linears.

The reference for the PEFT methods is the same GPT-2 with every ``Conv1D`` replaced by the ``nn.Linear`` of weight
``W.T`` (:func:`_linearised`): the same function, the layout the methods were written for. Ranks, row choices and
importances must be the very same there, and the outputs the same to float32 rounding. The PEFT contract (training,
save / reload, merge, disable, merged checkpoints) runs on GPT-2 in ``test_peft_contract.py``.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.pytorch_utils import Conv1D

import hf_lowrank
from hf_lowrank import (
    FisherLoRAConfig,
    LowRankLinear,
    LowRankTrainer,
    SPSFTConfig,
    WeLoreLRCConfig,
    compress_model,
    load_compressed,
    save_as_lora,
)
from hf_lowrank.modules import dense_weight, linear_shape
from hf_lowrank.ops.importance import l2_importance, top_rows
from hf_lowrank.targets import find_target_linears
from hf_lowrank.tuners.fisher_lora import compress_peft_model, lora_linear_modules
from hf_lowrank.tuners.spsft import spsft_importance, spsft_to_lora
from hf_lowrank.tuners.spsft.layer import Linear as SPSFTLinear
from hf_lowrank.tuners.welore import WeLoreLayer, welore_ranks_for_model

CONV1D = ["c_attn", "c_proj", "c_fc"]


def _tiny_gpt2(seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(config).float().eval()


def _tokens(seed=0, bs=2, seq=12):
    return torch.randint(0, 128, (bs, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_dense_weight_and_shape_of_conv1d():
    conv = Conv1D(48, 16)  # nf=48 outputs, nx=16 inputs; weight (16, 48)
    W = dense_weight(conv)
    assert linear_shape(conv) == (48, 16) and W.shape == (48, 16)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(F.linear(x, W, conv.bias), conv(x))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # full-rank factors compute the same function
    layer = LowRankLinear.from_factors(Vh, U * S, conv.bias.detach())
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)


def test_find_targets_compress_save_reload_exact(tmp_path):
    model = _tiny_gpt2()
    targets = find_target_linears(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in targets}) == ["c_attn", "c_fc", "c_proj"]
    assert len(targets) == 8 and all(isinstance(m, Conv1D) for m in targets.values())
    x = _tokens(seed=1)
    before = _logits(model, x)
    report = hf_lowrank.compress_model(model, 0.5, progress=False)
    assert len(report.ranks) == 8
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, LowRankLinear) and (attn.out_features, attn.in_features) == (192, 64)
    after = _logits(model, x)
    assert not torch.equal(after, before)
    hf_lowrank.save_compressed(model, tmp_path / "gpt2", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert isinstance(reloaded.transformer.h[1].mlp.c_proj, LowRankLinear)
    assert torch.equal(_logits(reloaded, x), after)
    loaded = hf_lowrank.load_compressed(tmp_path / "gpt2").eval()
    assert torch.equal(_logits(loaded, x), after)


def test_compress_gives_the_truncated_svd_of_the_conv1d_function():
    model = _tiny_gpt2(seed=3)
    x = _tokens(seed=2)
    before = _logits(model, x)
    ranks = {n: min(linear_shape(m)) // 4 for n, m in find_target_linears(model).items()}
    exact = {}
    for name, module in find_target_linears(model).items():
        U, S, Vh = torch.linalg.svd(dense_weight(module).double(), full_matrices=False)
        r = ranks[name]
        exact[name] = (U[:, :r] * S[:r] @ Vh[:r]).float()
    hf_lowrank.compress_model(model, ranks, progress=False)
    for name, ref in exact.items():
        m = model.get_submodule(name)
        torch.testing.assert_close(m.up.weight @ m.down.weight, ref, rtol=1e-4, atol=1e-5)
    assert _logits(model, x).shape == before.shape


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        self.data = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(123))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def test_fisher_lora_trains_and_compresses_gpt2(tmp_path):
    base = _tiny_gpt2(seed=5)
    torch.manual_seed(1)
    config = FisherLoRAConfig(r=4, lora_alpha=8, target_modules=CONV1D, init_lora_weights=False, compress_keep=0.5)
    pm = get_peft_model(base, config)
    modules, _ = lora_linear_modules(pm)
    assert len(modules) == 8
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = LowRankTrainer(model=pm, args=args, train_dataset=_Tokens())
    trainer.train()
    state = trainer.fisher_callback.state
    assert state.micro_batches == 2 and state.tensors
    pm.eval()
    x = _tokens(seed=4)
    trained = _logits(pm, x)
    # full rank (64 = min(out, in) everywhere) saves no parameters: every layer stays dense as W + BA, which must be
    # the Conv1D's own function (peft's delta is in the Conv1D's (in, out) layout)
    dense, dense_report = compress_peft_model(pm, fisher=state, rank=64, progress=False)
    assert not dense_report.ranks
    torch.testing.assert_close(_logits(dense, x), trained, rtol=1e-4, atol=1e-5)
    out, report = compress_peft_model(pm, fisher=state, progress=False)
    assert len(report.ranks) == 8 and isinstance(out.transformer.h[0].attn.c_attn, LowRankLinear)
    compressed = _logits(out, x)
    hf_lowrank.save_compressed(out, tmp_path / "fl", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fl").eval()
    assert torch.equal(_logits(reloaded, x), compressed)


def test_decompressed_gpt2_saves_the_stock_conv1d_layout(tmp_path):
    """decompress_model of a compressed GPT-2 (fresh or reloaded) gives Conv1D layers back: the saved folder loads in
    stock transformers with the compressed model's function."""
    model = _tiny_gpt2()
    x = _tokens(seed=2)
    hf_lowrank.compress_model(model, 0.5, progress=False)
    compressed = _logits(model, x)
    hf_lowrank.save_compressed(model, tmp_path / "c")
    for source in (model, hf_lowrank.load_compressed(tmp_path / "c").eval()):
        dense = hf_lowrank.decompress_model(source)
        assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
        assert isinstance(dense.transformer.h[0].attn.c_attn, Conv1D)
        out = tmp_path / f"dense{id(source)}"
        dense.save_pretrained(out)
        stock = AutoModelForCausalLM.from_pretrained(out).eval()
        assert isinstance(stock.transformer.h[1].mlp.c_fc, Conv1D)
        torch.testing.assert_close(_logits(stock, x), compressed, rtol=1e-4, atol=1e-5)


def _linearised(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """A copy of ``model`` with every ``Conv1D`` replaced by the ``nn.Linear`` of weight ``W.T`` (same function)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            out_features, in_features = linear_shape(module)
            lin = nn.Linear(in_features, out_features)
            with torch.no_grad():
                lin.weight.copy_(module.weight.T)
                lin.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _train_steps(model, steps=2, lr=1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        x = _tokens(seed=50 + step)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _calibration(n=3):
    return [{"input_ids": _tokens(seed=20 + i), "attention_mask": torch.ones(2, 12, dtype=torch.long)} for i in range(n)]


def _base_key(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


# ---------------------------------------------------------------------------------------------------------- WeLore
# nlrc='truncate' with lrc_ratio=0.7: both roles on the tiny GPT-2 (its random weights have flat spectra)
@pytest.mark.parametrize("nlrc, lrc_ratio", [("keep", 0.5), ("truncate", 0.7)])
def test_welore_on_gpt2_has_the_ranks_and_function_of_the_linear_model(nlrc, lrc_ratio):
    """WeLore's allocation reads the ``(out, in)`` view of a Conv1D: get_peft_model on GPT-2 gives the ranks and roles
    of welore_ranks_for_model and of the same model with Linears, the same factors and the same outputs (both
    roles: with nlrc='truncate' the N-LRCs are truncated copies)."""
    model = _tiny_gpt2()
    x = _tokens(seed=1)
    ranks, allocation = welore_ranks_for_model(model, 0.3, nlrc=nlrc, lrc_ratio=lrc_ratio, progress=False)
    config = dict(reduction=0.3, nlrc=nlrc, lrc_ratio=lrc_ratio, svd_method="exact", progress=False)
    twin = get_peft_model(_linearised(model), WeLoreLRCConfig(**config))
    pm = get_peft_model(model, WeLoreLRCConfig(**config))
    got, ref = pm.welore_allocation, twin.welore_allocation
    assert {n: got.ranks[n] for n in got.lrc} == ranks and got.ranks == allocation.ranks == ref.ranks
    assert got.lrc == allocation.lrc == ref.lrc and got.nlrc == ref.nlrc and got.lrc
    assert got.shapes == ref.shapes and got.shapes["transformer.h.0.attn.c_attn"] == (192, 64)
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, WeLoreLayer)}
    roles = {m.welore_role["default"] for m in layers.values()}
    assert roles == ({"lrc", "nlrc"} if nlrc == "truncate" else {"lrc"})
    for name, layer in layers.items():
        reference = twin.get_submodule(name)
        assert (layer.out_features, layer.in_features) == (reference.out_features, reference.in_features)
        torch.testing.assert_close(layer.effective_weight(), reference.effective_weight(), rtol=1e-5, atol=1e-6)
        assert layer.get_base_layer().weight is None  # keep_dense=False: the dense Conv1D weight is dropped
        assert torch.equal(layer.weight, layer.effective_weight().T)  # the stand-in weight keeps the Conv1D layout
    assert _rel(_logits(pm, x), _logits(twin, x)) < 1e-5


def test_welore_fisher_weighting_on_gpt2_is_the_linear_models():
    """with_fisher on GPT-2: (out,) row / (in,) column Fisher weight the (out, in) view, so ranks and factors are the
    Linear model's under the same Fisher (and differ from the unweighted ones)."""
    model = _tiny_gpt2(seed=8)
    g = torch.Generator().manual_seed(0)
    shapes = {n: linear_shape(m) for n, m in find_target_linears(model).items()}
    row = {n: torch.rand(o, generator=g) ** 4 for n, (o, _) in shapes.items()}
    col = {n: torch.rand(i, generator=g) ** 4 for n, (_, i) in shapes.items()}
    config = dict(reduction=0.3, svd_method="exact", progress=False)
    twin = get_peft_model(_linearised(model), WeLoreLRCConfig(**config).with_fisher(row, col))
    pm = get_peft_model(model, WeLoreLRCConfig(**config).with_fisher(row, col))
    plain = get_peft_model(_tiny_gpt2(seed=8), WeLoreLRCConfig(**config))
    assert pm.welore_allocation.ranks == twin.welore_allocation.ranks
    assert pm.welore_allocation.ranks != plain.welore_allocation.ranks
    for name, layer in pm.named_modules():
        if isinstance(layer, WeLoreLayer):
            torch.testing.assert_close(layer.effective_weight(), twin.get_submodule(name).effective_weight(),
                                       rtol=1e-5, atol=1e-6)


def test_welore_gpt2_merges_into_the_conv1d_layout_with_keep_dense():
    """keep_dense=True: merge writes the effective weight as the Conv1D's (in, out) weight, get_delta_weight is in
    that layout (base.weight + delta is the merge), unmerge and disable_adapter give the base back exactly."""
    model = _tiny_gpt2(seed=2)
    x = _tokens(seed=3)
    base_out = _logits(model, x)
    pm = get_peft_model(model, WeLoreLRCConfig(reduction=0.3, keep_dense=True, progress=False))
    _train_steps(pm)
    out = _logits(pm, x)
    assert _rel(out, base_out) > 1e-3
    name = pm.welore_allocation.lrc[0]
    layer = pm.base_model.model.get_submodule(name)
    conv = layer.get_base_layer()
    dense = conv.weight.detach().clone()
    delta = layer.get_delta_weight("default")
    assert isinstance(conv, Conv1D) and delta.shape == dense.shape == (64, linear_shape(conv)[0])
    pm.merge_adapter()
    torch.testing.assert_close(conv.weight, layer.effective_weight().T)
    torch.testing.assert_close(conv.weight, dense + delta, rtol=1e-5, atol=1e-6)
    assert _rel(_logits(pm, x), out) < 1e-5
    pm.unmerge_adapter()
    assert torch.equal(conv.weight, dense)
    with pm.disable_adapter():
        assert torch.equal(_logits(pm, x), base_out)
    assert torch.equal(_logits(pm, x), out)


@pytest.mark.parametrize("keep_dense", [False, True])
def test_welore_merged_gpt2_is_a_compressed_checkpoint_that_decompresses_to_stock_conv1d(tmp_path, keep_dense):
    """merge_and_unload of a trained WeLore GPT-2 (with truncated N-LRCs): LowRankLinear layers marked conv1d and
    Conv1D N-LRCs; save_pretrained -> AutoModelForCausalLM.from_pretrained is exact, and decompress_model of either
    gives the Conv1D layout stock transformers loads, with the merged function."""
    pm = get_peft_model(_tiny_gpt2(seed=4), WeLoreLRCConfig(reduction=0.3, nlrc="truncate", lrc_ratio=0.7,
                                                            keep_dense=keep_dense, progress=False))
    _train_steps(pm)
    x = _tokens(seed=5)
    out = _logits(pm, x)
    alloc = pm.welore_allocation
    truncated = {n for n in alloc.nlrc if alloc.ranks[n] < min(alloc.shapes[n])}
    assert alloc.lrc and truncated
    merged = pm.merge_and_unload()
    assert _rel(_logits(merged, x), out) < 1e-5
    for name in alloc.lrc:
        assert isinstance(merged.get_submodule(name), LowRankLinear) and merged.get_submodule(name).conv1d
    for name in truncated:
        module = merged.get_submodule(name)
        assert isinstance(module, Conv1D) and module.weight.shape == (linear_shape(module)[1], linear_shape(module)[0])
    assert not any(isinstance(m, nn.Linear) and not isinstance(m, LowRankLinear) for n, m in merged.named_modules()
                   if n.startswith("transformer.h.") and ".down" not in n and ".up" not in n)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(_logits(reloaded, x), _logits(merged, x))
    assert all(reloaded.get_submodule(n).conv1d for n in alloc.lrc)
    for source in (merged, reloaded):
        dense = hf_lowrank.decompress_model(source)
        assert all(isinstance(m, Conv1D) for m in find_target_linears(dense).values())
        folder = tmp_path / f"dense{id(source)}"
        dense.save_pretrained(folder)
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
        stock = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert _rel(_logits(stock, x), out) < 1e-5


def test_welore_ranks_for_model_compress_gpt2_and_reload_exactly(tmp_path):
    """WeLore's ranks also work through compress_model (no PEFT): the compressed GPT-2 reloads exactly."""
    model = _tiny_gpt2()
    ranks, allocation = welore_ranks_for_model(model, 0.3, progress=False)
    assert ranks and allocation.achieved_reduction > 0
    compress_model(model, ranks, progress=False)
    model.save_pretrained(tmp_path / "c")
    x = _tokens()
    torch.testing.assert_close(_logits(load_compressed(tmp_path / "c"), x), _logits(model, x), rtol=0, atol=0)


def test_welore_data_aware_on_gpt2_matches_the_linear_model_and_reloads(tmp_path):
    """with_calibration on GPT-2: the whitened allocation equals welore_ranks_for_model(calibration=) and the Linear
    model's, the whitened factors give the Linear model's outputs, and the trained adapter reloads exactly (its
    saved config carries no calibration: the weights come from the checkpoint)."""
    model = _tiny_gpt2(seed=6)
    x = _tokens(seed=7)
    batches = _calibration()
    ranks, allocation = welore_ranks_for_model(model, 0.3, calibration=batches, progress=False)
    assert allocation.whitened
    twin = get_peft_model(_linearised(model), WeLoreLRCConfig(reduction=0.3, svd_method="exact", progress=False)
                          .with_calibration(batches))
    pm = get_peft_model(model, WeLoreLRCConfig(reduction=0.3, svd_method="exact", progress=False)
                        .with_calibration(batches))
    got = pm.welore_allocation
    assert got.whitened and got.ranks == allocation.ranks == twin.welore_allocation.ranks
    assert {n: got.ranks[n] for n in got.lrc} == ranks and got.lrc == twin.welore_allocation.lrc
    assert _rel(_logits(pm, x), _logits(twin, x)) < 1e-5
    data_free = get_peft_model(_tiny_gpt2(seed=6), WeLoreLRCConfig(reduction=0.3, svd_method="exact", progress=False))
    assert _rel(_logits(pm, x), _logits(data_free, x)) > 1e-4  # the whitening did change the factors
    _train_steps(pm)
    out = _logits(pm, x)
    pm.save_pretrained(tmp_path / "a")
    assert PeftConfig.from_pretrained(tmp_path / "a").spectra == "whitened"
    reloaded = PeftModel.from_pretrained(_tiny_gpt2(seed=6), tmp_path / "a").eval()
    assert torch.equal(_logits(reloaded, x), out)
    merged = reloaded.merge_and_unload()
    assert _rel(_logits(merged, x), out) < 1e-5 and merged.get_submodule(got.lrc[0]).conv1d


# ---------------------------------------------------------------------------------------------------------- SPSFT
def _spsft_pair(seed=0, **config):
    """(SPSFT GPT-2, SPSFT on the same model with Linears); the twin gets the GPT-2's rows and W_f."""
    model = _tiny_gpt2(seed=seed)
    twin = get_peft_model(_linearised(model), SPSFTConfig(**config))
    pm = get_peft_model(model, SPSFTConfig(**config))
    return pm, twin


def _spsft_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SPSFTLinear)}


def test_spsft_on_gpt2_picks_the_rows_of_the_linear_model_and_computes_its_function():
    """Rows are output units: l2 on the (out, in) view, the rows the Linear model picks; with the same W_f the
    outputs and the W_f gradients are the Linear model's."""
    pm, twin = _spsft_pair(r=4, init_weights=False)
    layers, ref_layers = _spsft_layers(pm), _spsft_layers(twin)
    assert sorted(layers) == sorted(ref_layers) and len(layers) == 8
    for name, layer in layers.items():
        conv = layer.get_base_layer()
        assert isinstance(conv, Conv1D) and (layer.out_features, layer.in_features) == linear_shape(conv)
        idx = layer.spsft_indices["default"]
        assert idx.tolist() == top_rows(l2_importance(dense_weight(conv).float()), 4).tolist()
        assert idx.tolist() == ref_layers[name].spsft_indices["default"].tolist()
        with torch.no_grad():
            ref_layers[name].spsft_weight["default"].copy_(layer.spsft_weight["default"])
    x = _tokens(seed=8)  # in eval mode (no dropout): the gradients still flow
    loss = pm(input_ids=x, labels=x).loss
    ref_loss = twin(input_ids=x, labels=x).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.spsft_weight["default"].grad, ref_layers[name].spsft_weight["default"].grad,
                                   rtol=1e-4, atol=1e-6)


def test_spsft_taylor_on_gpt2_matches_the_full_gradient_reference():
    """Taylor scores of a Conv1D: |sum_in W * dL/dW| per output unit (the Conv1D's columns), from a full-gradient
    run of the dense GPT-2; the re-selected rows are their top-r."""
    batches = [dict(b, labels=b["input_ids"].clone()) for b in _calibration()]
    ref = _tiny_gpt2(seed=9)
    for p in ref.parameters():
        p.requires_grad_(False)
    convs = find_target_linears(ref)
    for m in convs.values():
        m.weight.requires_grad_(True)
    for b in batches:
        ref(**b).loss.backward()
    expected = {n: (m.weight.detach() * m.weight.grad).sum(0).abs().double() for n, m in convs.items()}
    pm = get_peft_model(_tiny_gpt2(seed=9), SPSFTConfig(r=5, importance="taylor"))
    scores = spsft_importance(pm, batches, progress=False)
    assert len(scores) == 8
    for name, layer in _spsft_layers(pm).items():
        key = _base_key(name)
        torch.testing.assert_close(scores[name].double(), expected[key], rtol=1e-4, atol=1e-9)
        assert layer.spsft_indices["default"].tolist() == top_rows(expected[key], 5).tolist()


def test_spsft_gpt2_merges_into_the_conv1d_columns_and_stays_stock(tmp_path):
    """merge adds W_f to the columns idx of the (in, out) weight (get_delta_weight is in that layout), unmerge takes
    it out again; merge_and_unload gives plain Conv1D layers that stock transformers loads with the same outputs."""
    pm, _ = _spsft_pair(seed=10, r=4)
    _train_steps(pm)
    x = _tokens(seed=11)
    out = _logits(pm, x)
    name, layer = next(iter(_spsft_layers(pm).items()))
    conv = layer.get_base_layer()
    dense = conv.weight.detach().clone()
    idx, w_f = layer.spsft_indices["default"], layer.spsft_weight["default"].detach()
    expected = dense.clone()
    expected[:, idx] += w_f.T
    delta = layer.get_delta_weight("default")
    assert delta.shape == dense.shape
    torch.testing.assert_close(dense + delta, expected)
    pm.merge_adapter(safe_merge=True)
    torch.testing.assert_close(conv.weight, expected)
    assert _rel(_logits(pm, x), out) < 1e-5
    pm.unmerge_adapter()
    torch.testing.assert_close(conv.weight, dense, rtol=0, atol=1e-6)
    merged_copy = layer.dequantized_merged_linear()
    assert isinstance(merged_copy, Conv1D)
    torch.testing.assert_close(merged_copy.weight, expected)
    merged = pm.merge_and_unload()
    assert all(isinstance(m, Conv1D) for m in find_target_linears(merged).values())
    assert _rel(_logits(merged, x), out) < 1e-5
    merged.save_pretrained(tmp_path / "m")
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(stock.transformer.h[0].attn.c_attn, Conv1D)
    assert torch.equal(_logits(stock, x), _logits(merged, x))


@pytest.mark.parametrize("kwargs", [{"r": 4}, {"ratio": 0.1}])
def test_spsft_gpt2_exports_as_a_fan_in_fan_out_lora(tmp_path, kwargs):
    """save_as_lora of SPSFT on GPT-2: a LoRA with fan_in_fan_out=True (peft's setting for Conv1D, so peft loads it
    without flipping it), the same outputs in vanilla peft, and peft's own merge of it gives them too."""
    pm, _ = _spsft_pair(seed=12, init_weights=False, **kwargs)
    x = _tokens(seed=13)
    out = _logits(pm, x)
    lora_config, _ = spsft_to_lora(pm)
    assert lora_config.fan_in_fan_out is True
    save_as_lora(tmp_path / "lora", pm)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = PeftModel.from_pretrained(_tiny_gpt2(seed=12), tmp_path / "lora").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert type(lora.base_model).__name__ == "LoraModel"
    torch.testing.assert_close(_logits(lora, x), out, rtol=1e-5, atol=1e-5)
    assert _rel(_logits(lora.merge_and_unload(), x), out) < 1e-5
