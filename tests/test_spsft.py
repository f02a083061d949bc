"""SPSFT as a PEFT method: numerics against the dense reference W + M W_f, memory contract, PEFT round trips,
LoRA export, data-driven importance against full-gradient references, 4-bit base, Trainer."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import hf_lowrank.tuners.spsft as spsft
from hf_lowrank import save_as_lora
from hf_lowrank.ops.importance import quantile_mean_taylor_importance, top_rows
from hf_lowrank.tuners.spsft import (
    QuantizedMergeError,
    SPSFTConfig,
    spsft_importance,
)


# ---------------------------------------------------------------------------------------------------------- helpers
class TwoLinear(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.lin0 = nn.Linear(16, 24, dtype=dtype)
        self.lin1 = nn.Linear(24, 8, bias=False, dtype=dtype)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def spsft_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, spsft.Linear)}


def dense_reference(model_factory, peft_model, adapter="default", requires_grad=False):
    """A fresh base model whose target weights are replaced by W + M W_f (optionally as trainable leaves)."""
    ref = model_factory()
    for name, layer in spsft_layers(peft_model).items():
        key = name.removeprefix("base_model.model.")
        lin = ref.get_submodule(key)
        w_f, idx = layer.spsft_weight[adapter].detach(), layer.spsft_indices[adapter]
        with torch.no_grad():
            w_hat = layer.get_base_layer().weight.detach().clone()
            w_hat[idx] += w_f
            lin.weight.copy_(w_hat)
        lin.weight.requires_grad_(requires_grad)
    return ref


def tiny_llama_factory(config, dtype=torch.float64):
    from transformers import LlamaForCausalLM

    def make():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(dtype).eval()

    return make


def lm_batches(n=3, batch=2, seq=12, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


# ---------------------------------------------------------------------------------------------------------- config
def test_config_validation_errors_name_the_fix():
    assert SPSFTConfig().r == 8 and SPSFTConfig().ratio is None
    assert SPSFTConfig(ratio=0.25).r is None
    with pytest.raises(ValueError, match="only one"):
        SPSFTConfig(r=4, ratio=0.1)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            SPSFTConfig(ratio=bad)
    with pytest.raises(ValueError, match="positive integer"):
        SPSFTConfig(r=0)
    with pytest.raises(ValueError, match="Unknown SPSFT importance 'fisher'.*l2, taylor, qm_taylor"):
        SPSFTConfig(importance="fisher")
    with pytest.raises(ValueError, match="layers_to_transform"):
        SPSFTConfig(layers_pattern="layers")
    assert SPSFTConfig().peft_type.value == "SPSFT"


def test_r_above_out_features_is_a_clear_error(tiny_llama):
    # k_proj / v_proj of the tiny llama have 32 output rows
    with pytest.raises(ValueError, match=r"r=40 exceeds out_features=32 in module '.*k_proj'.*ratio"):
        get_peft_model(tiny_llama, SPSFTConfig(r=40))


def test_ratio_gives_rows_per_module(tiny_llama):
    model = get_peft_model(tiny_llama, SPSFTConfig(ratio=0.25))
    for name, layer in spsft_layers(model).items():
        assert layer.spsft_weight["default"].shape == (round(0.25 * layer.out_features), layer.in_features), name


def test_default_targets_all_linear_but_the_head(tiny_llama):
    model = get_peft_model(tiny_llama, SPSFTConfig(r=4))
    names = spsft_layers(model)
    assert len(names) == 2 * 7
    assert not any("lm_head" in n for n in names)
    model.print_trainable_parameters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".spsft_weight." in n for n in trainable)


def test_layers_to_transform_with_all_linear(tiny_llama):
    model = get_peft_model(tiny_llama, SPSFTConfig(r=4, layers_to_transform=[1]))
    names = list(spsft_layers(model))
    assert len(names) == 7 and all(".layers.1." in n for n in names)


# ---------------------------------------------------------------------------------------------------------- numerics
def test_rows_selected_by_l2_norm():
    torch.manual_seed(0)
    base = TwoLinear()
    w0 = base.lin0.weight.detach().clone()
    model = get_peft_model(base, SPSFTConfig(r=5, target_modules=["lin0", "lin1"]))
    idx = spsft_layers(model)["base_model.model.lin0"].spsft_indices["default"]
    assert idx.tolist() == top_rows(w0.norm(dim=1), 5).tolist()


@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16)])
def test_forward_and_grads_equal_dense_reference(shape):
    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), SPSFTConfig(r=5, target_modules=["lin0", "lin1"], init_weights=False))
    layers = spsft_layers(model)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(*shape[:-1], 8, dtype=torch.float64)

    def factory():
        torch.manual_seed(0)
        return TwoLinear()

    ref = dense_reference(factory, model, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = model(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)

    F.mse_loss(out, target).backward()
    F.mse_loss(out_ref, target).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for name, layer in layers.items():
        w_f = layer.spsft_weight["default"]
        idx = layer.spsft_indices["default"]
        dense_grad = ref.get_submodule(name.removeprefix("base_model.model.")).weight.grad
        assert w_f.grad.shape == w_f.shape  # (r, in): never an (out, in) gradient
        torch.testing.assert_close(w_f.grad, dense_grad[idx], rtol=1e-10, atol=1e-12)
        assert layer.get_base_layer().weight.grad is None


def test_backward_saves_only_x_beyond_the_frozen_base():
    """The SPSFT layer keeps nothing for backward except x (W_f and the index buffer are the module's own tensors).
    LoRA with dropout keeps its dropout copy, mask and A x on top."""

    def saved_activation_bytes(layer, x):
        own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
        storages = {}
        for t in saved:
            st = t.untyped_storage()
            if st.data_ptr() not in own:
                storages[st.data_ptr()] = st.nbytes()
        return storages

    torch.manual_seed(0)
    x = torch.randn(4, 10, 64, requires_grad=True)
    base = nn.Linear(64, 48).requires_grad_(False)
    assert saved_activation_bytes(base, x) == {}  # a frozen Linear keeps only its weight

    sp = get_peft_model(nn.Sequential(nn.Linear(64, 48)), SPSFTConfig(r=16, target_modules=["0"]))
    sp_saved = saved_activation_bytes(sp.base_model.model[0], x)
    assert sp_saved == {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()}

    lora = get_peft_model(nn.Sequential(nn.Linear(64, 48)), LoraConfig(r=8, lora_dropout=0.1, target_modules=["0"]))
    lora_saved = saved_activation_bytes(lora.base_model.model[0], x)
    assert sum(lora_saved.values()) > sum(sp_saved.values())


def test_merge_unmerge_disable_and_merge_and_unload(tiny_llama_config):
    make = tiny_llama_factory(tiny_llama_config)
    model = get_peft_model(make(), SPSFTConfig(r=6, init_weights=False))
    ids = torch.randint(0, 128, (2, 10))
    base_out = make()(ids).logits
    out = model(ids).logits
    assert (out - base_out).abs().max() > 1e-3  # the random rows do change the output
    torch.testing.assert_close(out, dense_reference(make, model)(ids).logits, rtol=1e-10, atol=1e-10)

    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-10, atol=1e-10)
    model.unmerge_adapter()
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-10, atol=1e-10)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base_out, rtol=1e-10, atol=1e-10)
    merged = model.merge_and_unload()
    assert not spsft_layers(merged)
    torch.testing.assert_close(merged(ids).logits, out, rtol=1e-10, atol=1e-10)


def test_zero_init_is_the_base_model(tiny_llama_config):
    make = tiny_llama_factory(tiny_llama_config, torch.float32)
    model = get_peft_model(make(), SPSFTConfig(r=4))
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(model(ids).logits, make()(ids).logits, rtol=0, atol=0)


def test_bf16_base_trains_float32_rows(tiny_llama_config):
    model = get_peft_model(tiny_llama_factory(tiny_llama_config, torch.bfloat16)(), SPSFTConfig(r=4))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert layer.spsft_weight["default"].dtype == torch.float32  # peft's autocast_adapter_dtype
    ids = torch.randint(0, 128, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grad = layer.spsft_weight["default"].grad
    assert grad is not None and grad.dtype == torch.float32 and bool(grad.abs().sum() > 0)


# ---------------------------------------------------------------------------------------------------------- round trips
def test_save_load_exact_and_adapter_file_holds_only_rows_and_indices(tiny_llama_config, tmp_path):
    make = tiny_llama_factory(tiny_llama_config, torch.float32)
    model = get_peft_model(make(), SPSFTConfig(r=6, init_weights=False))
    ids = torch.randint(0, 128, (2, 10))
    out = model(ids).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layers = spsft_layers(model)
    assert len(tensors) == 2 * len(layers)
    for key, value in tensors.items():
        assert key.endswith((".spsft_weight", ".spsft_indices")), key
        if key.endswith(".spsft_indices"):
            assert value.dtype == torch.int64 and value.shape == (6,)
        else:
            assert value.shape[0] == 6
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SPSFT"

    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(make(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        torch.testing.assert_close(loaded(ids).logits, out, rtol=0, atol=0)
        for name, layer in spsft_layers(loaded).items():
            torch.testing.assert_close(layer.spsft_indices["default"], layers[name].spsft_indices["default"])


def test_two_adapters_switch_save_and_delete(tiny_llama_config, tmp_path):
    make = tiny_llama_factory(tiny_llama_config, torch.float32)
    model = get_peft_model(make(), SPSFTConfig(r=4, init_weights=False))
    model.add_adapter("other", SPSFTConfig(r=6, init_weights=False, target_modules=["down_proj"]))
    ids = torch.randint(0, 128, (2, 10))
    out_default = model(ids).logits
    model.set_adapter("other")
    out_other = model(ids).logits
    assert (out_default - out_other).abs().max() > 1e-4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".spsft_weight.other") for n in trainable)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(loaded(ids).logits, out_other, rtol=0, atol=0)
    model.set_adapter("default")
    model.delete_adapter("other")
    torch.testing.assert_close(model(ids).logits, out_default, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"r": 6}, {"ratio": 0.2}])
def test_lora_export_loads_in_vanilla_peft_identically(tiny_llama_config, tmp_path, kwargs):
    make = tiny_llama_factory(tiny_llama_config, torch.float32)
    model = get_peft_model(make(), SPSFTConfig(init_weights=False, **kwargs))
    ids = torch.randint(0, 128, (2, 10))
    out = model(ids).logits
    save_as_lora(tmp_path / "lora", model)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_dropout"] == 0.0
    if "ratio" in kwargs:
        assert cfg["rank_pattern"], "ratio gives different ranks per module"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".lora.tmp")]
    lora = PeftModel.from_pretrained(make(), tmp_path / "lora")
    assert type(lora.base_model).__name__ == "LoraModel"
    torch.testing.assert_close(lora(ids).logits, out, rtol=1e-5, atol=1e-5)
    lora_layer = lora.base_model.model.model.layers[0].mlp.down_proj
    assert lora_layer.scaling["default"] == 1.0


def test_lora_export_keeps_modules_to_save(tiny_bert_classifier, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = tiny_bert_classifier.config

    def make():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig.from_dict(cfg.to_dict())).eval()

    model = get_peft_model(make(), SPSFTConfig(r=4, task_type="SEQ_CLS", init_weights=False)).eval()
    with torch.no_grad():  # a trained head
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    ids = torch.randint(0, 128, (3, 9))
    out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "spsft")
    save_as_lora(tmp_path / "lora", model)
    torch.testing.assert_close(PeftModel.from_pretrained(make(), tmp_path / "spsft").eval()(input_ids=ids).logits, out)
    lora = PeftModel.from_pretrained(make(), tmp_path / "lora").eval()
    torch.testing.assert_close(lora(input_ids=ids).logits, out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- importance
def test_taylor_importance_matches_full_gradient_reference(tiny_llama_config):
    make = tiny_llama_factory(tiny_llama_config)
    batches = lm_batches()
    ref = make()
    for p in ref.parameters():
        p.requires_grad_(False)
    linears = {n: m for n, m in ref.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
    for m in linears.values():
        m.weight.requires_grad_(True)
    for b in batches:
        ref(**b).loss.backward()  # gradients summed over the calibration batches
    expected = {n: (m.weight.detach() * m.weight.grad).sum(1).abs() for n, m in linears.items()}

    model = get_peft_model(make(), SPSFTConfig(r=5, importance="taylor"))
    model.train()
    model.gradient_checkpointing_enable()  # recomputed forwards must not count twice
    scores = spsft_importance(model, batches, num_batches=3, progress=False)
    for name, layer in spsft_layers(model).items():
        key = name.removeprefix("base_model.model.")
        torch.testing.assert_close(scores[name].double(), expected[key], rtol=1e-4, atol=1e-9)
        assert layer.spsft_indices["default"].tolist() == top_rows(expected[key], 5).tolist()
        assert layer.spsft_weight["default"].grad is None
    assert model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.grad is None


def test_qm_taylor_matches_per_class_reference_and_needs_labels(tiny_bert_classifier):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = tiny_bert_classifier.config

    def make():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig.from_dict(cfg.to_dict())).double().eval()

    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 128, (4, 9), generator=g)
        batches.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 1])}
        )

    ref = make()
    ref.requires_grad_(False)
    target = "bert.encoder.layer.0.intermediate.dense"
    lin = ref.get_submodule(target)
    lin.weight.requires_grad_(True)
    ids = torch.cat([b["input_ids"] for b in batches])
    y = torch.cat([b["labels"] for b in batches])
    class_grads = []
    for c in range(3):
        (grad,) = torch.autograd.grad(F.cross_entropy(ref(input_ids=ids[y == c]).logits, y[y == c]), [lin.weight])
        class_grads.append(grad)
    expected = quantile_mean_taylor_importance(lin.weight.detach(), class_grads)

    model = get_peft_model(make(), SPSFTConfig(r=8, importance="qm_taylor", task_type="SEQ_CLS"))
    scores = spsft_importance(model, batches, progress=False)
    torch.testing.assert_close(scores[f"base_model.model.{target}"], expected, rtol=1e-4, atol=1e-10)
    chosen = spsft_layers(model)[f"base_model.model.{target}"].spsft_indices["default"]
    assert chosen.tolist() == top_rows(expected, 8).tolist()

    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match="qm_taylor needs one class label per example"):
        spsft_importance(model, no_labels, progress=False)


def test_qm_taylor_rejects_token_labels(tiny_llama_config):
    model = get_peft_model(tiny_llama_factory(tiny_llama_config)(), SPSFTConfig(r=4, importance="qm_taylor"))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        spsft_importance(model, lm_batches(1), progress=False)


def test_taylor_without_loss_and_reselect_after_training_are_errors(tiny_llama_config):
    model = get_peft_model(tiny_llama_factory(tiny_llama_config)(), SPSFTConfig(r=4, importance="taylor"))
    with pytest.raises(ValueError, match="labels"):
        spsft_importance(model, [{"input_ids": torch.randint(0, 128, (2, 8))}], progress=False)
    with torch.no_grad():
        next(iter(spsft_layers(model).values())).spsft_weight["default"].add_(1.0)
    with pytest.raises(ValueError, match="before training"):
        spsft_importance(model, lm_batches(1), progress=False)


# ---------------------------------------------------------------------------------------------------------- 4-bit base
@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ]
)
def nf4_llama(tiny_llama_config, tmp_path, request):
    pytest.importorskip("bitsandbytes")
    device = request.param
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config).save_pretrained(tmp_path / "dense")

    def make():
        return LlamaForCausalLM.from_pretrained(
            tmp_path / "dense",
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
            device_map=device,
        )

    return make


def test_4bit_base_forward_grads_and_merge_policy(nf4_llama):
    model = get_peft_model(nf4_llama(), SPSFTConfig(r=4, init_weights=False))
    model.train()  # eval-mode CPU inference may switch bitsandbytes to a bf16 kernel; compare in float32
    layers = spsft_layers(model)
    layer = layers["base_model.model.model.layers.0.mlp.gate_proj"]
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    w_hat = layer.base_weight_for_scoring()
    w_hat[layer.spsft_indices["default"]] += layer.spsft_weight["default"].detach()
    device = w_hat.device
    x = torch.randn(3, 5, 64, device=device)
    torch.testing.assert_close(layer(x), x @ w_hat.T, rtol=1e-5, atol=1e-5)

    w_ref = w_hat.clone().requires_grad_(True)
    layer(x).square().sum().backward()
    (x @ w_ref.T).square().sum().backward()
    torch.testing.assert_close(
        layer.spsft_weight["default"].grad, w_ref.grad[layer.spsft_indices["default"]], rtol=1e-4, atol=1e-4
    )

    ids = torch.randint(0, 128, (2, 10), device=device)
    out = model(ids).logits
    with pytest.raises(QuantizedMergeError, match="dequantize=True"):
        model.merge_adapter()
    with pytest.raises(QuantizedMergeError):
        model.merge_and_unload()
    merged = model.merge_and_unload(dequantize=True)
    assert type(merged.model.layers[0].mlp.gate_proj) is nn.Linear
    torch.testing.assert_close(merged(ids).logits, out, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------- training
def test_trainer_updates_only_w_f(tiny_llama_config, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama_factory(tiny_llama_config, torch.float32)(), SPSFTConfig(r=4))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = [{k: v[i] for k, v in b.items()} for b in lm_batches(4, batch=2, seq=16) for i in range(2)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = spsft.SPSFTImportanceCallback(num_batches=1, progress=False)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert model.peft_config["default"].importance == "l2"  # the callback recomputes l2: data-free, same rows
    assert callback.scores is not None
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".spsft_weight." in k for k in changed)
    assert len(changed) == len(spsft_layers(model))
