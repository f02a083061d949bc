"""GPT-2-style ``Conv1D`` layers (weight stored ``(in, out)``) compress, round-trip and take FisherLoRA like Linears."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.pytorch_utils import Conv1D

import hf_lowrank
from hf_lowrank import FisherLoRAConfig, LowRankLinear, LowRankTrainer, compress_peft_model, find_target_linears
from hf_lowrank.modules import dense_weight, linear_shape
from hf_lowrank.peft_configs.fisher_lora import lora_linear_modules

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


def test_welore_refuses_conv1d_up_front_and_its_ranks_compress_gpt2(tmp_path):
    """WeLoreLRC's PEFT layers are Linear-only: get_peft_model names Conv1D and the way that works, before any SVD;
    that way (WeLore's ranks, then compress_model) compresses GPT-2 and reloads exactly."""
    from hf_lowrank import WeLoreLRCConfig, compress_model, load_compressed, welore_ranks_for_model

    model = _tiny_gpt2()
    with pytest.raises(TypeError, match=r"Conv1D.*compress_model"):
        get_peft_model(model, WeLoreLRCConfig(reduction=0.3))
    assert not any(n.startswith("base_model") for n, _ in model.named_modules())  # nothing was injected
    ranks, allocation = welore_ranks_for_model(model, 0.3, progress=False)
    assert ranks and allocation.achieved_reduction > 0
    compress_model(model, ranks, progress=False)
    model.save_pretrained(tmp_path / "c")
    x = _tokens()
    torch.testing.assert_close(_logits(load_compressed(tmp_path / "c"), x), _logits(model, x), rtol=0, atol=0)
