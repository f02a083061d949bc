"""compress_model, LowRankLinear and factorized checkpoints: numerics, round trips, bad input."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_lowrank
from hf_lowrank import LowRankLinear, compress_model, load_compressed
from hf_lowrank.errors import CompressedCheckpointError
from hf_lowrank.ops.svd import break_even_rank, tail_energy
from hf_lowrank.targets import find_target_linears


def _ids(vocab=128, shape=(2, 12)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------- LowRankLinear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lowrank_linear_from_dense_is_eckart_young_optimal(dtype):
    lin = nn.Linear(48, 32).to(dtype)
    layer = LowRankLinear.from_dense(lin, 8, method="exact")
    assert layer.down.weight.shape == (8, 48) and layer.up.weight.shape == (32, 8)
    assert layer.down.weight.dtype == dtype
    W = lin.weight.detach().float()
    err = torch.linalg.matrix_norm(W - layer.weight.detach().float()) ** 2
    S = torch.linalg.svdvals(W)
    best = tail_energy(S)[8]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert abs(float(err) - float(best)) <= tol * float(S.square().sum())
    x = torch.randn(3, 48, dtype=dtype)
    ref = (x.float() @ layer.weight.detach().float().T + lin.bias.detach().float())
    assert torch.allclose(layer(x).detach().float(), ref, atol=5e-2 if dtype != torch.float32 else 1e-5)


def test_lowrank_linear_to_dense_and_training():
    layer = LowRankLinear(16, 12, 4)
    dense = layer.to_dense()
    x = torch.randn(5, 16)
    assert torch.allclose(dense(x), layer(x), atol=1e-6)
    layer(x).pow(2).sum().backward()
    assert layer.down.weight.grad is not None and layer.up.weight.grad is not None


@pytest.mark.parametrize("rank", [0, 13, -1, 2.5, True])
def test_lowrank_linear_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(16, 12, rank)


# ----------------------------------------------------------------------------------------------- targets, ranks
def test_default_targets_are_block_linears(tiny_llama, tiny_bert_classifier):
    names = find_target_linears(tiny_llama)
    assert len(names) == 14 and "lm_head" not in names
    assert all(".layers." in n for n in names)
    bert = find_target_linears(tiny_bert_classifier)
    assert "classifier" not in bert and not any("pooler" in n for n in bert)
    assert len(bert) == 12


def test_unknown_target_module_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="Unknown target module 'gate_prj'"):
        compress_model(tiny_llama, 4, target_modules=["gate_prj"], progress=False)
    with pytest.raises(ValueError, match="matches no Linear"):
        compress_model(tiny_llama, 4, target_modules=r".*nothing.*", progress=False)


@pytest.mark.parametrize("ranks, match", [(0, "out of range"), (65, "out of range"), (0.0, r"\(0, 1\]"),
                                          (1.5, r"\(0, 1\]"), ({"model.layers.0.mlp.nope": 3}, "Unknown target module")])
def test_bad_ranks_are_clear_errors(tiny_llama, ranks, match):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        compress_model(tiny_llama, ranks, target_modules=["mlp.up_proj"] if isinstance(ranks, int) else None,
                       progress=False)
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_modules_that_would_not_save_are_skipped(tiny_llama):
    # k_proj is (32, 64): break-even rank 21; rank 24 saves nothing there but up_proj (128, 64) breaks even at 42.
    report = compress_model(tiny_llama, 24, target_modules=["k_proj", "up_proj"], progress=False)
    skipped = {m.name for m in report.modules if m.skipped}
    assert skipped == {f"model.layers.{i}.self_attn.k_proj" for i in range(2)}
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, LowRankLinear)
    assert isinstance(tiny_llama.model.layers[0].self_attn.k_proj, nn.Linear)
    assert break_even_rank(32, 64) == 21


def test_report_counts_parameters_and_errors(tiny_llama):
    report = compress_model(tiny_llama, 0.5, progress=False)
    for m in report.modules:
        out_f, in_f = m.shape
        assert m.params_after == m.rank * (out_f + in_f)
        assert 0 < m.rel_error < 1
    assert 0.4 < report.kept_fraction <= 0.5
    data = report.to_dict()
    assert data["params_after"] == sum(m["params_after"] for m in data["modules"])


def test_rank_map_compresses_only_named_modules(tiny_llama):
    name = "model.layers.1.mlp.down_proj"
    report = compress_model(tiny_llama, {name: 5}, progress=False)
    assert report.ranks == {name: 5}
    assert tiny_llama.get_submodule(name).rank == 5
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, nn.Linear)


# ----------------------------------------------------------------------------------------------- round trips
def _save_and_reload(model: nn.Module, folder: Path, ids: torch.Tensor, auto_class) -> tuple[nn.Module, torch.Tensor]:
    """Save ``model`` to ``folder`` and load it back with ``auto_class`` (an ``AutoModelFor...``); the reloaded model
    must give the same logits on ``ids`` (1e-5). Returns it (in eval mode) and the reference logits."""
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(folder)
    loaded = auto_class.from_pretrained(folder).eval()
    with torch.no_grad():
        assert (loaded(ids).logits - ref).abs().max() < 1e-5
    return loaded, ref


def test_causal_lm_round_trip_is_exact(tiny_llama, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    report = compress_model(tiny_llama, 0.6, progress=False)
    ids = _ids()
    loaded, ref = _save_and_reload(tiny_llama, tmp_path, ids, AutoModelForCausalLM)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "hf_lowrank"
    assert cfg["quantization_config"]["ranks"] == report.ranks
    assert isinstance(loaded.model.layers[0].mlp.gate_proj, LowRankLinear)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base.layers[1].self_attn.q_proj, LowRankLinear)
    verified = load_compressed(tmp_path)
    with torch.no_grad():
        assert (verified(ids).logits - ref).abs().max() < 1e-5


def test_file_shrinks_in_proportion(tiny_llama_config, tmp_path):
    from transformers import LlamaForCausalLM

    tiny_llama_config.vocab_size = 8  # make the Linear layers dominate the file
    dense = LlamaForCausalLM(tiny_llama_config)
    dense.save_pretrained(tmp_path / "dense")
    report = compress_model(dense, 0.5, progress=False)
    dense.save_pretrained(tmp_path / "lr")
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    total_before = sum(p.numel() for p in LlamaForCausalLM(tiny_llama_config).parameters())
    total_after = total_before - report.params_before + report.params_after
    ratio = size(tmp_path / "lr") / size(tmp_path / "dense")
    assert abs(ratio - total_after / total_before) < 0.02


def test_sequence_classifier_round_trip(tiny_bert_classifier, tmp_path):
    from transformers import AutoModelForSequenceClassification

    compress_model(tiny_bert_classifier, 0.5, progress=False)
    loaded, _ = _save_and_reload(tiny_bert_classifier, tmp_path, _ids(shape=(3, 9)), AutoModelForSequenceClassification)
    assert isinstance(loaded.classifier, nn.Linear)


def test_reloaded_model_trains_and_saves_again(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    compress_model(tiny_llama, 0.5, progress=False)
    tiny_llama.save_pretrained(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    before = model.model.layers[0].mlp.up_proj.down.weight.clone()
    ids = _ids(shape=(8, 16))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.down.weight)
    model.save_pretrained(tmp_path / "c2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "c2").eval()
    model.eval()
    with torch.no_grad():
        assert (again(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_decompress_gives_dense_model(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    compress_model(tiny_llama, 0.5, progress=False)
    ids = _ids()
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    hf_lowrank.decompress_model(tiny_llama)
    assert not any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())
    tiny_llama.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits - ref).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------- bad checkpoints
def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CompressedCheckpointError, match="does not exist"):
        load_compressed(tmp_path / "nope")


def _compress_and_save(model: nn.Module, folder: Path) -> Path:
    """Compress ``model`` in place (keep half the parameters) and save it as a factorized checkpoint in ``folder``."""
    compress_model(model, 0.5, progress=False)
    model.save_pretrained(folder)
    return folder


def _tampered_checkpoint(model: nn.Module, folder: Path, edit: Callable[[dict], object]) -> Path:
    """A factorized checkpoint of ``model`` whose ``config.json`` was then changed by ``edit`` (in place, on the
    parsed dict), as a hand-edited or foreign checkpoint would be."""
    _compress_and_save(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_missing_weights_file_is_a_clear_error(tiny_llama, tmp_path):
    _compress_and_save(tiny_llama, tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CompressedCheckpointError, match="no \\*.safetensors"):
        load_compressed(tmp_path)


def test_truncated_weights_file_is_a_clear_error(tiny_llama, tmp_path):
    _compress_and_save(tiny_llama, tmp_path)
    (shard,) = tmp_path.glob("*.safetensors")
    with open(shard, "rb+") as fh:
        fh.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CompressedCheckpointError, match="truncated"):
        load_compressed(tmp_path)


def test_rank_out_of_bounds_in_config_is_refused(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    _tampered_checkpoint(
        tiny_llama, tmp_path, lambda cfg: cfg["quantization_config"]["ranks"].update({"model.layers.0.mlp.up_proj": 999})
    )
    with pytest.raises(CompressedCheckpointError, match="out of bounds"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("tamper", ["int-dtype", "wrong-rank"])
def test_factor_with_wrong_dtype_or_rank_is_refused_naming_the_file(tiny_llama, tmp_path, tamper):
    """A factor stored as integers (transformers would cast it silently) or with a rank other than config.json's
    (transformers stops at a size mismatch without naming the file) is refused before loading."""
    from safetensors.torch import load_file, save_file

    _compress_and_save(tiny_llama, tmp_path)
    (shard,) = tmp_path.glob("*.safetensors")
    tensors = load_file(shard)
    key = "model.layers.0.mlp.down_proj.down.weight"
    if tamper == "int-dtype":
        tensors[key] = (tensors[key] * 100).to(torch.int32)
        match = "stored as I32"
    else:
        tensors[key] = tensors[key][:-1]
        match = "records rank"
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CompressedCheckpointError, match=match) as err:
        load_compressed(tmp_path)
    assert str(shard) in str(err.value) and "model.layers.0.mlp.down_proj" in str(err.value)


def test_newer_format_version_is_refused(tiny_llama, tmp_path):
    _tampered_checkpoint(tiny_llama, tmp_path, lambda cfg: cfg["quantization_config"].update(format_version=99))
    with pytest.raises(CompressedCheckpointError, match="Upgrade hf-lowrank"):
        load_compressed(tmp_path)


def test_stripped_config_is_detected_by_load_compressed(tiny_llama, tmp_path):
    _tampered_checkpoint(tiny_llama, tmp_path, lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(CompressedCheckpointError, match="no hf_lowrank"):
        load_compressed(tmp_path)


# ----------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_round_trip_and_file_size(smollm2, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    model = copy.deepcopy(model)
    ids = tok(["The cat sat on the mat because it was warm."], return_tensors="pt").input_ids
    report = compress_model(model, 0.8, target_modules=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
                            method="randomized", progress=False)
    _save_and_reload(model, tmp_path, ids, AutoModelForCausalLM)
    assert report.kept_fraction <= 0.8


def test_low_rank_linear_fast_path_equals_the_module_path_and_keeps_hooks():
    """Plain factors run as two F.linear calls; a factor with a hook (or a replaced forward) runs as a module, so
    hooks still fire; both give the same outputs and gradients."""
    torch.manual_seed(0)
    layer = LowRankLinear(12, 10, 4)
    x = torch.randn(3, 12, requires_grad=True)
    fast = layer(x)
    fast.sum().backward()
    g_fast, gw_fast = x.grad.clone(), layer.down.weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    seen = []
    handle = layer.down.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    slow = layer(x)
    slow.sum().backward()
    assert seen == [torch.Size([3, 4])]
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(x.grad, g_fast)
    torch.testing.assert_close(layer.down.weight.grad, gw_fast)
    handle.remove()
    calls = []
    original = layer.up.forward
    layer.up.forward = lambda h: calls.append(1) or original(h)  # e.g. accelerate's device hooks
    torch.testing.assert_close(layer(x), fast)
    assert calls == [1]


def _column_major(w: torch.Tensor) -> bool:
    return w.stride() == (1, w.shape[0])


def test_up_factor_is_column_major_after_every_construction_and_reload(tiny_llama, tmp_path):
    """``up.weight`` is stored column-major (decode-step GEMVs stream its rows of ``out`` values): on construction,
    from factors, after a dtype cast and a deepcopy, after ``compress_model`` and after ``from_pretrained`` (which
    assigns new row-major tensors); the values are those of the row-major layout."""
    import copy

    from transformers import AutoModelForCausalLM

    layer = LowRankLinear(12, 10, 4)
    assert _column_major(layer.up.weight) and layer.down.weight.is_contiguous()
    down, up = torch.randn(4, 12), torch.randn(10, 4)
    built = LowRankLinear.from_factors(down, up, torch.randn(10))
    assert _column_major(built.up.weight) and torch.equal(built.up.weight, up)
    assert _column_major(copy.deepcopy(built).up.weight) and _column_major(copy.deepcopy(built).half().up.weight)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(built(x), x @ down.T @ up.T + built.bias, rtol=1e-5, atol=1e-5)
    param = built.up.weight
    assert built.lay_out_for_speed_() is built and built.up.weight is param  # a no-op the second time

    compress_model(tiny_llama, 0.6, progress=False)
    factors = [m for m in tiny_llama.modules() if isinstance(m, LowRankLinear)]
    assert factors and all(_column_major(m.up.weight) for m in factors)
    ids = _ids()
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    tiny_llama.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reloaded = [m for m in loaded.modules() if isinstance(m, LowRankLinear)]
    assert len(reloaded) == len(factors) and all(_column_major(m.up.weight) for m in reloaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)  # same values, same layout, same kernels
