"""FisherLoRA without a Trainer: the PEFT type, Fisher collection hooks, compression numerics, save/reload, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import TINY_MLP, make_tiny_fisher_lora
from transformers import AutoModelForCausalLM

from hf_lowrank import compress_model, save_as_lora, save_compressed
from hf_lowrank.modules import LowRankLinear, dense_weight
from hf_lowrank.ops.fisher import fwsvd, lora_fisher_to_weights
from hf_lowrank.tuners.fisher_lora import (
    FISHER_STATE_NAME,
    FisherCollector,
    FisherLoRAConfig,
    FisherState,
    FisherStateError,
    compress_peft_model,
    plan_ranks,
    save_compressed_model,
)


def _batches(n, bs=2, seq=12, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (bs, seq), generator=g) for _ in range(n)]


def _collect(pm, n=3, source="lora"):
    collector = FisherCollector(source).attach(pm)
    pm.train()
    for x in _batches(n):
        pm(input_ids=x, labels=x).loss.backward()
    pm.zero_grad(set_to_none=True)
    collector.detach()
    pm.eval()
    return collector


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# --------------------------------------------------------------------------------------------- the PEFT type
def test_vanilla_lora_loads_the_adapter(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    pm = make_tiny_fisher_lora(tiny_llama)
    x = _batches(1)[0]
    ref = _logits(pm.eval(), x)
    pm.save_pretrained(tmp_path / "ad")
    save_as_lora(tmp_path / "lora", tmp_path / "ad")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "compress_rank" not in saved
    vanilla = PeftModel.from_pretrained(fresh, tmp_path / "lora")
    assert type(vanilla.peft_config["default"]) is LoraConfig
    torch.testing.assert_close(_logits(vanilla.eval(), x), ref)
    # to_lora_config(): the same adapter folder with plain peft and an explicit config
    lora_cfg = pm.peft_config["default"].to_lora_config()
    assert type(lora_cfg) is LoraConfig and lora_cfg.r == 4 and lora_cfg.peft_type.value == "LORA"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(compress_rank=4, compress_keep=0.5), "only one"),
        (dict(compress_keep=1.5), r"\(0, 1\]"),
        (dict(compress_rank=0), ">= 1"),
        (dict(fisher_source="adam"), "fisher_source"),
        (dict(fisher_weighting="col"), "two_sided"),
        (dict(fisher_exponent=-1.0), "exponent"),
        (dict(fisher_eps=0.0), "eps"),
        (dict(compress_rank_pattern={"up_proj": 0}), "compress_rank_pattern"),
        (dict(compress_dtype="int8"), "compress_dtype"),
        (dict(use_dora=True), "DoRA"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FisherLoRAConfig(r=4, target_modules=TINY_MLP, **kwargs)


# ---------------------------------------------------------------------------------------------- collection
def test_full_source_squares_each_backward_and_leaves_frozen_weights_alone(tiny_llama):
    pm = make_tiny_fisher_lora(tiny_llama)
    W = pm.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    xs = _batches(2)
    # Reference: grad(W) of each backward, computed on its own.
    W.requires_grad_(True)
    ref = torch.zeros_like(W)
    for x in xs:
        (g,) = torch.autograd.grad(pm(input_ids=x, labels=x).loss, [W])
        ref += g.float() ** 2
    W.requires_grad_(False)
    collector = FisherCollector("full").attach(pm)
    assert W.requires_grad
    for x in xs:
        pm(input_ids=x, labels=x).loss.backward()
        assert W.grad is None  # squared and dropped: never reaches an optimizer or clipping
    collector.detach()
    assert not W.requires_grad
    got = collector.state.tensors["model.layers.0.mlp.up_proj.fisher_W"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-12)
    assert collector.state.micro_batches == 2 and collector.state.samples == 4


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-check", "sync-free"])
def test_non_finite_gradients_are_skipped_and_counted(tiny_llama, sync_free):
    pm = make_tiny_fisher_lora(tiny_llama)
    collector = FisherCollector().attach(pm)
    collector.sync_free = sync_free  # the accelerator path (sync-free masking) runs on the CPU too
    x = _batches(1)[0]
    pm(input_ids=x, labels=x).loss.backward()
    before = {k: v.clone() for k, v in collector.state.tensors.items()}
    assert all(v.any() for v in before.values())
    (pm(input_ids=x, labels=x).loss * float("nan")).backward()
    state = collector.snapshot()
    assert state.skipped == len(before)  # every adapter tensor of the broken micro-batch
    for k, v in state.tensors.items():
        assert torch.equal(v, before[k])
    assert state.micro_batches == 2


def test_collector_refuses_model_without_adapters(tiny_llama):
    with pytest.raises(ValueError, match="no LoRA-adapted Linear"):
        FisherCollector("lora").attach(tiny_llama)


def test_state_save_load_roundtrip(tiny_llama, tmp_path):
    c = _collect(make_tiny_fisher_lora(tiny_llama))
    c.save(tmp_path / FISHER_STATE_NAME, global_step=7)
    loaded = FisherState.load(tmp_path)
    assert loaded.global_step == 7 and loaded.micro_batches == 3 and loaded.samples == 6
    assert sorted(loaded.modules) == sorted(c.state.modules) and loaded.adapter_name == "default"
    for k, v in c.state.tensors.items():
        assert torch.equal(loaded.tensors[k], v)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(FisherStateError, match="unreadable"):
        FisherState.load(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------------------------- compression
def _reference_factors(pm, name, state, weighting, merge=True):
    wrapper = pm.get_base_model().get_submodule(name)
    W = dense_weight(wrapper.base_layer).float()
    if merge:
        W = W + wrapper.get_delta_weight("default").float()
    FA = state.tensors[name + ".fisher_A"]
    FB = state.tensors[name + ".fisher_B"]
    row, col = lora_fisher_to_weights(FA, FB, mode=weighting)
    down, up = fwsvd(W, 8, row_fisher=row, col_fisher=col)
    return up @ down


@pytest.mark.parametrize("weighting, merge", [("row", True), ("two_sided", True), ("row", False)])
def test_compression_matches_reference_fwsvd(tiny_llama, weighting, merge):
    pm = make_tiny_fisher_lora(tiny_llama, fisher_weighting=weighting, merge_before_compress=merge)
    c = _collect(pm)
    x = _batches(1, seed=5)[0]
    before = _logits(pm, x)
    out, report = compress_peft_model(pm, fisher=c, progress=False)
    torch.testing.assert_close(_logits(pm, x), before, rtol=0, atol=0)  # the trained model is untouched
    assert type(pm.get_base_model().model.layers[0].mlp.up_proj).__name__ == "Linear"  # still a LoRA layer
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        module = out.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == 8
        ref = _reference_factors(pm, name, c.state, weighting, merge)
        torch.testing.assert_close(module.up.weight @ module.down.weight, ref, rtol=1e-4, atol=1e-5)
    assert report.method == "fisher_lora" and len(report.modules) == 6
    assert all(m.weighted_rel_error is not None for m in report.modules)
    assert report.info["fisher_weighting"] == weighting and report.info["merge_before_compress"] is merge


def test_fisher_of_ones_equals_plain_svd(tiny_llama):
    pm = make_tiny_fisher_lora(tiny_llama)
    c = _collect(pm, n=1)
    ones = FisherState(source="lora", tensors={k: torch.ones_like(v) for k, v in c.state.tensors.items()})
    x = _batches(1, seed=3)[0]
    svd_model, svd_report = compress_peft_model(pm, fisher_source="none", progress=False)
    one_model, _ = compress_peft_model(pm, fisher=ones, progress=False)
    assert svd_report.method == "svd"
    for name, m in svd_model.named_modules():
        if isinstance(m, LowRankLinear):
            o = one_model.get_submodule(name)
            a, b = o.up.weight @ o.down.weight, m.up.weight @ m.down.weight
            assert torch.linalg.matrix_norm(a - b) <= 1e-4 * torch.linalg.matrix_norm(b)
    torch.testing.assert_close(_logits(one_model, x), _logits(svd_model, x), rtol=1e-3, atol=1e-4)


def test_compressed_model_save_reload_is_exact(tiny_llama, tmp_path):
    pm = make_tiny_fisher_lora(tiny_llama, compress_keep=0.5, compress_rank=None)
    c = _collect(pm)
    out, report = compress_peft_model(pm, fisher=c, progress=False)
    save_compressed(out, tmp_path / "out", report=report, fisher_state=c.state)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded.model.layers[1].mlp.gate_proj, LowRankLinear)
    x = _batches(2, seed=9)[1]
    assert torch.equal(_logits(reloaded.eval(), x), _logits(out, x))
    data = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert data["method"] == "fisher_lora" and data["info"]["micro_batches"] == 3
    m0 = data["modules"][0]
    assert {"name", "rank", "params_before", "params_after", "rel_error", "weighted_rel_error"} <= set(m0)
    assert m0["params_after"] < m0["params_before"]
    assert sorted(FisherState.load(tmp_path / "out").modules) == sorted(c.state.modules)
    # a folder that already holds an adapter is refused (from_pretrained would load the adapter instead)
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="PEFT adapter"):
        save_compressed(out, tmp_path / "adapter")
    with pytest.warns(DeprecationWarning, match="save_compressed"), pytest.raises(ValueError, match="PEFT adapter"):
        save_compressed_model(out, tmp_path / "adapter")  # the old name: a thin wrapper, one release


def test_plan_ranks_keep_rank_and_pattern():
    shapes = {"a.0.up_proj": (128, 64), "a.0.down_proj": (64, 128), "a.1.up_proj": (128, 64)}
    plan = plan_ranks(shapes, keep=0.5, rank_pattern={"down_proj": 3, r"a\.1\..*": 50})
    # keep 0.5 of (128, 64) is rank 21, rounded down to a multiple of 8 (RANK_MULTIPLE); explicit ranks as given
    assert plan["a.0.up_proj"] == 16 and plan["a.0.down_proj"] == 3
    assert plan["a.1.up_proj"] is None  # rank 50 would not save parameters: stays dense
    with pytest.raises(ValueError, match="matches no target module"):
        plan_ranks(shapes, rank=4, rank_pattern={"q_proj": 2})
    with pytest.raises(ValueError, match="Nothing says how much"):
        plan_ranks(shapes)


def test_errors_no_target_rank_out_of_range_and_foreign_fisher(tiny_llama, tiny_llama_config):
    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match="No target modules matched"):
        compress_peft_model(tiny_llama, fisher_source="none", rank=4)
    pm = make_tiny_fisher_lora(tiny_llama, compress_rank=65)
    with pytest.raises(ValueError, match="out of range"):
        compress_peft_model(pm, fisher_source="none", progress=False)
    c = _collect(make_tiny_fisher_lora(LlamaForCausalLM(tiny_llama_config)), n=1)
    cfg = tiny_llama_config.__class__(**{**tiny_llama_config.to_dict(), "intermediate_size": 96})
    other = make_tiny_fisher_lora(LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match="another shape"):
        compress_peft_model(other, fisher=c, progress=False)
    with pytest.raises(ValueError, match="another shape"):
        compress_model(LlamaForCausalLM(cfg), 8, fisher=c.state, progress=False)
    with pytest.raises(ValueError, match="needs the collected Fisher"):
        compress_peft_model(other, progress=False)


@pytest.mark.parametrize("weighting", ["two_sided", "kronecker"])
def test_compress_model_with_fisher_file_matches_peft_path(tiny_llama, tmp_path, weighting):
    """A saved Fisher state applied to the merged model by compress_model(fisher=path) (the CLI's fwsvd path) gives
    the model compress_peft_model gives from the adapter; the default weighting is the richest the state holds."""
    pm = make_tiny_fisher_lora(tiny_llama, fisher_weighting=weighting)
    c = _collect(pm)
    c.save(tmp_path / FISHER_STATE_NAME)
    via_peft, _ = compress_peft_model(pm, fisher=c, rank=8, progress=False)
    merged = pm.merge_and_unload()
    report = compress_model(merged, 8, fisher=tmp_path, progress=False)
    assert report.method == "fisher_lora" and len(report.ranks) == 6
    assert report.info["fisher_weighting"] == weighting and report.info["micro_batches"] == c.state.micro_batches
    x = _batches(1, seed=4)[0]
    torch.testing.assert_close(_logits(merged.eval(), x), _logits(via_peft, x), rtol=1e-4, atol=1e-5)


def test_compress_model_fisher_refuses_a_second_weighting(tiny_llama, tmp_path):
    row_state = _collect(make_tiny_fisher_lora(copy.deepcopy(tiny_llama), fisher_weighting="row")).state
    pm = make_tiny_fisher_lora(tiny_llama, fisher_weighting="kronecker")
    c = _collect(pm)
    merged = pm.merge_and_unload()
    with pytest.raises(ValueError, match="not both"):
        compress_model(merged, 8, fisher=c.state, calibration=[{"input_ids": _batches(1)[0]}], progress=False)
    with pytest.raises(ValueError, match="needs fisher="):
        compress_model(merged, 8, fisher_weighting="row", progress=False)
    with pytest.raises(FisherStateError, match="no Kronecker Grams"):
        compress_model(merged, 8, fisher=row_state, fisher_weighting="kronecker", progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())  # refused before anything changed


# ------------------------------------------------------------------------------------------------- QLoRA
def _qlora_model(tiny_llama, tmp_path, device="cpu"):
    from transformers import BitsAndBytesConfig

    tiny_llama.save_pretrained(tmp_path / "base")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q, device_map=device,
                                                dtype=torch.float32)


def _qlora_roundtrip(tiny_llama, tmp_path, device):
    base = _qlora_model(tiny_llama, tmp_path, device)
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    pm = make_tiny_fisher_lora(base)
    collector = FisherCollector().attach(pm)
    pm.train()
    for x in _batches(2):
        x = x.to(device)
        pm(input_ids=x, labels=x).loss.backward()
    collector.detach()
    pm.eval()
    assert all(v.any() for v in collector.state.tensors.values())
    out, report = compress_peft_model(pm, fisher=collector, dtype="bfloat16", progress=False)
    assert not any(type(m).__name__ == "Linear4bit" for m in out.modules())
    assert all(p.dtype == torch.bfloat16 for p in out.parameters())
    name = "model.layers.0.mlp.up_proj"
    ref = _reference_factors(pm, name, collector.state, "two_sided").to(device)  # the default weighting
    m = out.get_submodule(name)
    got = m.up.weight.float() @ m.down.weight.float()  # bfloat16 factors: compare in relative Frobenius norm
    assert torch.linalg.matrix_norm(got - ref) <= 1e-2 * torch.linalg.matrix_norm(ref)
    save_compressed_model(out, tmp_path / "q", report=report)
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "hf_lowrank"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=device)
    assert reloaded.dtype == torch.bfloat16
    x = _batches(1, seed=2)[0].to(device)
    assert torch.equal(_logits(reloaded.eval(), x), _logits(out, x))


def test_qlora_4bit_base_on_cpu(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    _qlora_roundtrip(tiny_llama, tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_4bit_base_on_gpu(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    _qlora_roundtrip(tiny_llama, tmp_path, "cuda")


def test_classifier_head_merge_and_inplace(tiny_bert_classifier):
    targets = r".*\.layer\.\d+\.(intermediate|output)\.dense"  # the FFN only, as in the seed
    cfg = FisherLoRAConfig(task_type="SEQ_CLS", r=4, target_modules=targets, init_lora_weights=False,
                           compress_rank_pattern={"intermediate.dense": 60})  # 60 saves nothing: kept dense
    pm = get_peft_model(tiny_bert_classifier, cfg)
    head = pm.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight))  # a "trained" head that differs from the original
    pm.eval()
    x = _batches(1, seq=10)[0]
    ref = pm(input_ids=x).logits
    out, report = compress_peft_model(pm, fisher_source="none", progress=False)
    assert {m.skipped for m in report.modules} == {"rank saves no parameters", "no rank given for this module"}
    assert type(out.classifier).__name__ == "Linear" and not hasattr(out, "peft_config")
    torch.testing.assert_close(out(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pm(input_ids=x).logits, ref, rtol=0, atol=0)
    same, _ = compress_peft_model(pm, fisher_source="none", rank=8, inplace=True, progress=False)
    assert same is pm.get_base_model()
    assert isinstance(same.bert.encoder.layer[0].output.dense, LowRankLinear)
    assert type(same.bert.encoder.layer[0].attention.output.dense).__name__ == "Linear"
