"""The PEFT contract, as one matrix in the spirit of peft's ``PeftCommonTester``: (FisherLoRA, WeLoreLRC with and
without its dense weights, SPSFT) x (tiny Llama, Qwen2 with biased q/k/v, Phi3 with fused qkv_proj/gate_up_proj, T5
encoder-decoder, RoBERTa classifier with its two-layer head, BERT classifier, GPT-2 with its ``Conv1D`` layers), one
test per check:

- ``test_training_changes_only_adapter_params``: a few optimizer steps change the adapter (and ``modules_to_save``)
  parameters only; every base weight is bit-identical to the model before ``get_peft_model``;
- ``test_save_and_from_pretrained_are_exact``: ``save_pretrained`` -> ``PeftModel.from_pretrained`` on a fresh base;
- ``test_load_adapter_adds_a_second_adapter``: ``load_adapter`` of the same folder as a second adapter;
- ``test_peft_config_from_pretrained_keeps_every_field``: ``PeftConfig.from_pretrained`` gives the same ``to_dict()``;
- ``test_merge_equals_unmerged``: ``merge_adapter`` / ``unmerge_adapter`` / ``merge_and_unload`` keep the outputs;
- ``test_disable_adapter_is_the_base_model``: ``with model.disable_adapter():`` runs the base model;
- ``test_merged_model_saves_and_reloads``: ``merge_and_unload`` -> ``save_pretrained`` -> ``AutoModel*.from_pretrained``;
- ``test_add_set_delete_adapter``: a second adapter, ``set_adapter``, ``disable_adapter`` with two loaded,
  ``delete_adapter`` of the inactive, the active, an unknown and the last adapter (WeLore refuses a second one);
- ``test_two_adapters_save_and_reload``: both adapters through ``save_pretrained`` / ``load_adapter``;
- ``test_merge_and_unload_in_half_precision``: float16 and bfloat16 models, merged vs unmerged outputs;
- ``test_unload_gives_the_base_model_back``: ``unload()`` without merging;
- ``test_generate_with_adapter_equals_after_merge``: greedy ``generate`` (generative kinds);
- ``test_gradient_checkpointing_gives_the_same_loss_and_grads``: re-entrant and not;
- ``test_modules_to_save``: an extra trained-and-saved norm layer per architecture;
- ``test_merge_twice_and_safe_merge``: a second merge is a no-op, ``safe_merge`` refuses a NaN adapter;
- ``test_inputs_embeds_equal_input_ids``: ``inputs_embeds`` through the adapter;
- ``test_lora_conversion``: the exporter to a vanilla LoRA folder, and peft's ``convert_to_lora``;
- ``test_adapter_name_and_low_cpu_mem_usage``, ``test_get_base_model_state_dict``, ``test_mixed_adapter_batches``;
- ``test_rank_pattern_means_the_same_on_lora_and_plain_models`` and
  ``test_non_finite_fisher_grams_mean_the_same_on_lora_and_plain_models``: the two compression entry points agree,
  per architecture.

The save test also checks peft's safetensors layout (``_test_save_pretrained``).

Each adapter is trained a few steps first (an untrained LoRA is the base model, which would make several checks
vacuous), and every check asserts the adapter did move the outputs away from the base.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    convert_to_lora,
    get_base_model_state_dict,
    get_peft_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import make_tiny_model

from hf_lowrank import FisherLoRAConfig, SPSFTConfig, WeLoreLRCConfig, compress_model, save_as_lora
from hf_lowrank.trainer.callbacks import compress_on_save
from hf_lowrank.tuners.fisher_lora import FisherCollector, compress_peft_model
from hf_lowrank.tuners.welore import DenseWeightDroppedError

KINDS = ["llama", "qwen2", "phi3", "t5", "roberta_cls", "bert_cls", "gpt2", "gpt2_cls"]
TASKS = {
    "llama": "CAUSAL_LM",
    "qwen2": "CAUSAL_LM",
    "phi3": "CAUSAL_LM",
    "t5": "SEQ_2_SEQ_LM",
    "roberta_cls": "SEQ_CLS",
    "bert_cls": "SEQ_CLS",
    "gpt2": "CAUSAL_LM",
    "gpt2_cls": "SEQ_CLS",
}
AUTO_CLASSES = {
    "CAUSAL_LM": transformers.AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
    "SEQ_CLS": transformers.AutoModelForSequenceClassification,
}
METHODS = {
    # LoRA on every Linear but the head; a few non-default fields so that the config round trip means something.
    "fisher_lora": lambda task: FisherLoRAConfig(
        r=4, lora_alpha=8, target_modules="all-linear", task_type=task, compress_keep=0.5, fisher_weighting="row",
        merge_before_compress=False, compress_rank_pattern={"down_proj": 0.25},
    ),
    # keep_dense: disable_adapter() (and the bit-identical base check) need the dense weights WeLore otherwise drops.
    "welore": lambda task: WeLoreLRCConfig(reduction=0.3, task_type=task, keep_dense=True, progress=False),
    "spsft": lambda task: SPSFTConfig(r=4, task_type=task),
    # WeLore's default: the dense weights of the replaced layers are dropped (the PEFT model IS the compressed model)
    "welore_dropped": lambda task: WeLoreLRCConfig(reduction=0.3, task_type=task, progress=False),
}
NON_DEFAULT = {
    # Fields away from their defaults (and ones that change what get_peft_model builds), for the config round trip.
    "fisher_lora": lambda task: FisherLoRAConfig(
        r=2, lora_alpha=3, lora_dropout=0.1, target_modules="all-linear", task_type=task, compress_rank=8,
        fisher_source="full", fisher_weighting="two_sided", fisher_exponent=1.0, compress_dtype="bfloat16",
        init_lora_weights=False,
    ),
    "welore": lambda task: WeLoreLRCConfig(
        reduction=0.2, lrc_ratio=0.9, svd_method="exact", spectra_cache_dir="", task_type=task, progress=False,
        keep_dense=True,
    ),
    "welore_dropped": lambda task: WeLoreLRCConfig(
        reduction=0.4, lrc_ratio=1.0, svd_method="randomized", task_type=task, progress=False,
    ),
    "spsft": lambda task: SPSFTConfig(ratio=0.25, importance="taylor", init_weights=False, task_type=task),
}
OWN_PARAMS = {"fisher_lora": ".lora_", "welore": ".welore_", "welore_dropped": ".welore_", "spsft": ".spsft_"}
"""What each method's own trainable parameters are called: the adapter must train, not just a classifier head."""
STEPS = 3
RTOL = 1e-5  # float32 after a merge: the bits may differ with the order of the sums, the values may not

CELLS = [pytest.param(kind, method, id=f"{kind}-{method}") for kind in KINDS for method in sorted(METHODS)]


def _inputs(kind: str, *, labels: bool = False, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 10), generator=g)
    batch = {"input_ids": ids}
    if kind == "t5":
        decoder_ids = torch.randint(3, 128, (2, 6), generator=g)
        batch = {"input_ids": ids, "labels": decoder_ids} if labels else {**batch, "decoder_input_ids": decoder_ids}
    elif labels:
        batch["labels"] = torch.tensor([0, 2]) if kind.endswith("_cls") else ids
    return batch


def _out(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(kind)).logits


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return float((a - b).norm()) <= rtol * float(b.norm()) + 1e-7


def _trained(kind: str, method: str):
    """(base outputs, the PEFT model after ``STEPS`` AdamW steps on every trainable parameter, in eval mode)."""
    base = make_tiny_model(kind)
    base_out = _out(base, kind)
    model = get_peft_model(base, METHODS[method](TASKS[kind]))
    _train(model, kind, [p for p in model.parameters() if p.requires_grad])
    assert not _close(_out(model, kind), base_out, 1e-3)  # the adapter does change the outputs
    return base_out, model


def _train(model, kind: str, params, eps: float = 1e-8) -> None:
    """``STEPS`` AdamW steps on ``params`` (each on its own batch), leaving ``model`` in eval mode."""
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2, eps=eps)
    for step in range(STEPS):
        model(**_inputs(kind, labels=True, seed=100 + step)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _base_name(peft_name: str) -> str:
    """The name a PEFT model's parameter has in the base model: peft keeps the original layer as ``base_layer`` (and
    the original of a ``modules_to_save`` copy as ``original_module``)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


@pytest.mark.parametrize("kind, method", CELLS)
def test_training_changes_only_adapter_params(kind, method):
    """What changes under the optimizer is the adapter (and peft's ``modules_to_save`` copy of a classifier head);
    the base weights stay bit-identical to the model before ``get_peft_model``.

    Per method: FisherLoRA trains ``lora_A`` / ``lora_B`` on frozen base layers (peft's LoRA). SPSFT trains the
    selected rows ``spsft_weight`` next to the frozen base weight; the row indices are a buffer and do not move.
    WeLore replaces low-rank-compressible (LRC) weights by trainable factors ``welore_down`` / ``welore_up`` BY
    DESIGN: the factors are new tensors, so they are compared to their state right after ``get_peft_model``; the
    dense weights it keeps (``keep_dense=True``) and every other base weight must still be the original bits."""
    original = {n: t.detach().clone() for n, t in make_tiny_model(kind).state_dict().items()}
    model = get_peft_model(make_tiny_model(kind), METHODS[method](TASKS[kind]))
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and any(OWN_PARAMS[method] in n for n in trainable)
    assert all(OWN_PARAMS[method] in n or ".modules_to_save." in n for n in trainable), sorted(trainable)[:3]

    _train(model, kind, model.parameters())  # all of them: the frozen ones must stay put on their own
    after = model.state_dict()
    changed = {n for n, t in after.items() if not torch.equal(t, before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:3]
    assert any(OWN_PARAMS[method] in n for n in changed)  # the method's own parameters trained, not just a head
    compared = set()
    for name, tensor in after.items():
        key = _base_name(name)
        if name not in trainable and key in original:
            assert torch.equal(tensor, original[key]), name
            compared.add(key)
    # every base tensor is still there, bit for bit (a tied lm_head shows once in state_dict either way), but the
    # dense weights WeLore drops by default (keep_dense=False): exactly those of its low-rank components are gone
    dropped = {f"{n}.weight" for n in model.welore_allocation.lrc} if method == "welore_dropped" else set()
    assert compared == set(original) - dropped, sorted(set(original) - dropped - compared)[:3]
    assert all(model.base_model.model.get_submodule(n[: -len(".weight")]).get_base_layer().weight is None
               for n in dropped)


@pytest.mark.parametrize("kind, method", CELLS)
def test_save_and_from_pretrained_are_exact(tmp_path, kind, method):
    """The saved adapter on a fresh base (same seed: the same base weights) gives the very same outputs."""
    _, model = _trained(kind, method)
    out = _out(model, kind)
    model.save_pretrained(tmp_path)
    # peft's _test_save_pretrained: safetensors by default, holding exactly the adapter's state dict
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    saved, state = load_file(tmp_path / "adapter_model.safetensors"), get_peft_model_state_dict(model)
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in state)
    reloaded = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path).eval()
    assert type(reloaded.peft_config["default"]) is type(model.peft_config["default"])
    assert torch.equal(_out(reloaded, kind), out)
    assert not any(p.requires_grad for p in reloaded.parameters())  # from_pretrained defaults to inference
    trainable = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("kind, method", CELLS)
def test_load_adapter_adds_a_second_adapter(tmp_path, kind, method):
    """``PeftModel.load_adapter`` puts the saved adapter next to the one loaded first (peft's multi-adapter path: the
    model it loads into is already wrapped, a classifier head sits in a ``modules_to_save`` wrapper). WeLore refuses
    a second adapter by design: its factors replace the weights instead of adding to them."""
    _, model = _trained(kind, method)
    out = _out(model, kind)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path)
    if method.startswith("welore"):
        with pytest.raises(ValueError, match="one adapter per model"):
            reloaded.load_adapter(tmp_path, adapter_name="second")
        return
    reloaded.load_adapter(tmp_path, adapter_name="second")
    reloaded.set_adapter("second")
    assert torch.equal(_out(reloaded.eval(), kind), out)
    reloaded.set_adapter("default")
    assert torch.equal(_out(reloaded, kind), out)


@pytest.mark.parametrize("variant", ["contract", "non_default"])
@pytest.mark.parametrize("kind, method", CELLS)
def test_peft_config_from_pretrained_keeps_every_field(tmp_path, kind, method, variant):
    """Every field of the config the model carries (WeLore's included: the allocation it filled in, rank_map ...)
    comes back from adapter_config.json, as the same type."""
    make_config = (METHODS if variant == "contract" else NON_DEFAULT)[method]
    model = get_peft_model(make_tiny_model(kind), make_config(TASKS[kind]))
    config = model.peft_config["default"]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == config.peft_type.value
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.peft_type is config.peft_type
    # peft's save_pretrained writes inference_mode=True for every adapter type (vanilla LoRA too): not a field lost
    want, got = dict(config.to_dict(), inference_mode=True), loaded.to_dict()
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key in want:
        assert got[key] == want[key], (key, got[key], want[key])
    # and through JSON once more: a reloaded config saves to the same file
    loaded.save_pretrained(tmp_path / "again")
    assert _as_saved(tmp_path / "again") == _as_saved(tmp_path)


def _as_saved(folder):
    """adapter_config.json with peft's set-valued fields (a set is written as a list in hash order, which differs
    between processes and between two saves of one config) read back as sets."""
    data = json.loads((folder / "adapter_config.json").read_text())
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(data.get(key), list):
            data[key] = set(data[key])
    return data


@pytest.mark.parametrize("kind, method", CELLS)
def test_merge_equals_unmerged(kind, method):
    _, model = _trained(kind, method)
    out = _out(model, kind)
    model.merge_adapter()
    assert _close(_out(model, kind), out)
    model.unmerge_adapter()
    assert _close(_out(model, kind), out)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert _close(_out(merged, kind), out)


@pytest.mark.parametrize("kind, method", CELLS)
def test_disable_adapter_is_the_base_model(kind, method):
    """Bit for bit: inside ``disable_adapter()`` the base layers (and the original head) run as they were. WeLore
    without ``keep_dense`` has dropped the dense weights and refuses, as its config documents."""
    base_out, model = _trained(kind, method)
    out = _out(model, kind)
    if method == "welore_dropped":  # documented: without the dense weights there is no base model to run
        with pytest.raises(DenseWeightDroppedError, match="keep_dense=True"):
            with model.disable_adapter():
                pass
        assert torch.equal(_out(model, kind), out)  # still usable after the refusal
        return
    with model.disable_adapter():
        assert torch.equal(_out(model, kind), base_out)
    assert torch.equal(_out(model, kind), out)  # and the adapter is back on leaving the context


@pytest.mark.parametrize("kind, method", CELLS)
def test_merged_model_saves_and_reloads(tmp_path, kind, method):
    """merge_and_unload -> save_pretrained -> AutoModelFor<task>.from_pretrained gives the merged outputs (WeLore's
    factorized layers come back through the checkpoint format hf_lowrank registers)."""
    _, model = _trained(kind, method)
    merged = model.merge_and_unload()
    out = _out(merged, kind)
    merged.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    loaded = AUTO_CLASSES[TASKS[kind]].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(merged)
    assert torch.equal(_out(loaded, kind), out)


# ------------------------------------------------------------------ peft's PeftCommonTester checks, continued

GENERATIVE = [k for k in KINDS if TASKS[k] != "SEQ_CLS"]
GEN_CELLS = [pytest.param(kind, method, id=f"{kind}-{method}") for kind in GENERATIVE for method in sorted(METHODS)]
SECOND = {
    # a second adapter that is not the identity at creation (peft's multi-adapter tests use init_lora_weights=False)
    "fisher_lora": lambda task: FisherLoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task,
                                                 init_lora_weights=False),
    "spsft": lambda task: SPSFTConfig(r=4, task_type=task, init_weights=False),
}
MULTI_CELLS = [c for c in CELLS if c.values[1] in SECOND]
"""The methods that hold several adapters (WeLore refuses a second one: ``test_add_set_delete_adapter``)."""
HALF_ULPS = 8
"""The merged half-precision model against the unmerged one, peft's ``torch.allclose`` style with ``atol = rtol =
HALF_ULPS * eps`` of the dtype (float16 2**-10, bfloat16 2**-7): the merged weight is rounded once to the dtype where
the unmerged adapter rounds its own output instead, and a logit sums a few hundred such products over two layers."""


def _adapter_names_in(model) -> set[str]:
    """Every adapter name any tuner layer or ``modules_to_save`` wrapper of ``model`` still holds state for."""
    names = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in (*module.adapter_layer_names, *module.other_param_names):
                names |= set(getattr(module, attr))
        if isinstance(module, ModulesToSaveWrapper):
            names |= set(module.modules_to_save)
    return names


@pytest.mark.parametrize("kind, method", CELLS)
def test_add_set_delete_adapter(kind, method):
    """peft's ``add_adapter`` / ``set_adapter`` / ``delete_adapter`` (active, inactive, unknown, the last one):
    each adapter computes its own outputs, ``disable_adapter()`` runs the base model with two adapters loaded, and a
    deleted adapter leaves no state in any layer. WeLore refuses the second adapter and leaves the model as it was."""
    base_out, model = _trained(kind, method)
    out = _out(model, kind)
    if method.startswith("welore"):
        with pytest.raises(ValueError, match="one adapter per model"):
            model.add_adapter("other", METHODS[method](TASKS[kind]))
        assert list(model.peft_config) == ["default"] and _adapter_names_in(model) == {"default"}
        assert torch.equal(_out(model, kind), out)
        return
    model.add_adapter("other", SECOND[method](TASKS[kind]))
    assert model.active_adapters == ["default"] and torch.equal(_out(model, kind), out)
    model.set_adapter("other")
    other = _out(model, kind)
    assert not _close(other, out, 1e-3) and not _close(other, base_out, 1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable), sorted(trainable)[:3]
    with model.disable_adapter():
        assert torch.equal(_out(model, kind), base_out)
    assert torch.equal(_out(model, kind), other)
    model.set_adapter("default")
    assert torch.equal(_out(model, kind), out)

    model.delete_adapter("other")  # inactive
    assert list(model.peft_config) == ["default"] and _adapter_names_in(model) == {"default"}
    assert model.active_adapters == ["default"] and torch.equal(_out(model, kind), out)
    model.add_adapter("other", SECOND[method](TASKS[kind]))
    model.set_adapter("other")
    model.delete_adapter("other")  # active: the one left becomes active
    assert model.active_adapters == ["default"] and torch.equal(_out(model, kind), out)
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("unknown")
    model.delete_adapter("default")  # the last one: the base model runs
    assert model.active_adapters == [] and not _adapter_names_in(model)
    with torch.no_grad():
        assert torch.equal(model.base_model(**_inputs(kind)).logits, base_out)


@pytest.mark.parametrize("kind, method", MULTI_CELLS)
def test_two_adapters_save_and_reload(tmp_path, kind, method):
    """``save_pretrained`` of a model with two adapters writes the second under its name (peft's layout);
    ``from_pretrained`` + ``load_adapter`` of the two folders give each adapter's outputs again, bit for bit."""
    _, model = _trained(kind, method)
    out = _out(model, kind)
    model.add_adapter("other", SECOND[method](TASKS[kind]))
    model.set_adapter("other")
    other = _out(model, kind)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "other" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path).eval()
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(_out(reloaded, kind), out)
    reloaded.set_adapter("other")
    assert torch.equal(_out(reloaded, kind), other)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind, method", CELLS)
def test_merge_and_unload_in_half_precision(kind, method, dtype):
    """peft's ``_test_merge_layers_fp16``, with the outputs compared: a base model in float16 / bfloat16, the adapter
    trained on it, ``merge_and_unload`` gives the unmerged outputs within :data:`HALF_ULPS` and keeps every base
    weight in the model's dtype (a merge must not upcast the model it returns)."""
    base = make_tiny_model(kind).to(dtype)
    base_out = _out(base, kind)
    model = get_peft_model(base, METHODS[method](TASKS[kind]))
    # AdamW's default eps=1e-8 is zero in float16: a float16 head copy (modules_to_save) would get 0/0 updates
    _train(model, kind, [p for p in model.parameters() if p.requires_grad], eps=1e-4)
    out = _out(model, kind)
    assert out.dtype == dtype and torch.isfinite(out).all() and not _close(out, base_out, 1e-2)
    merged = model.merge_and_unload()
    merged_out = _out(merged, kind)
    atol = rtol = HALF_ULPS * torch.finfo(dtype).eps
    assert merged_out.dtype == dtype
    assert torch.allclose(merged_out.float(), out.float(), atol=atol, rtol=rtol), float((merged_out - out).abs().max())
    wrong = {n: p.dtype for n, p in merged.named_parameters() if p.dtype != dtype}
    assert not wrong, sorted(wrong.items())[:3]


@pytest.mark.parametrize("kind, method", CELLS)
def test_unload_gives_the_base_model_back(kind, method):
    """peft's ``_test_unload_adapter``: ``unload()`` drops the adapter without merging it: no tuner layer or wrapper
    left, the base model's state-dict keys and its outputs bit for bit. As in peft, a ``modules_to_save`` copy (the
    classifier heads) stays the trained one, so the reference is the base model with those heads' trained weights.
    WeLore without its dense weights refuses (nothing to unload to) and stays usable."""
    _, model = _trained(kind, method)
    reference = make_tiny_model(kind)
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            reference.get_submodule(name).load_state_dict(module.modules_to_save["default"].state_dict())
    base_out = _out(reference, kind)
    out = _out(model, kind)
    assert not _close(out, base_out, 1e-3)
    keys = set(make_tiny_model(kind).state_dict())
    if method == "welore_dropped":
        with pytest.raises(DenseWeightDroppedError, match="keep_dense=True"):
            model.unload()
        assert torch.equal(_out(model, kind), out)
        return
    plain = model.unload()
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in plain.modules())
    assert set(plain.state_dict()) == keys
    assert torch.equal(_out(plain, kind), base_out)


def _generate(model, kind: str):
    """Greedy decoding of 5 new tokens, with the scores of each step."""
    ids = _inputs(kind)["input_ids"]
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=0, return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("kind, method", GEN_CELLS)
def test_generate_with_adapter_equals_after_merge(kind, method):
    """peft's ``_test_generate`` and ``_test_disable_adapter`` (which compares the scores of ``generate``): greedy
    decoding through the adapter gives other scores than the base model, the same tokens and scores (within float32
    merge rounding) after ``merge_and_unload``, and the base model's under ``disable_adapter()``."""
    base_gen = _generate(make_tiny_model(kind), kind)
    _, model = _trained(kind, method)
    gen = _generate(model, kind)
    assert not _close(gen.scores[0], base_gen.scores[0], 1e-3)
    if method != "welore_dropped":  # no dense weights, no base model (test_disable_adapter_is_the_base_model)
        with model.disable_adapter():
            off = _generate(model, kind)
        assert torch.equal(off.sequences, base_gen.sequences)
        assert all(_close(a, b) for a, b in zip(off.scores, base_gen.scores))  # prefill shapes differ: not bits
    merged = _generate(model.merge_and_unload(), kind)
    assert torch.equal(merged.sequences, gen.sequences)
    assert all(_close(a, b) for a, b in zip(merged.scores, gen.scores))


def _loss_and_grads(model, kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward in train mode (dropout with a fixed seed); the loss and every trainable gradient."""
    model.train()
    torch.manual_seed(11)
    loss = model(**_inputs(kind, labels=True, seed=3)).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("kind, method", CELLS)
def test_gradient_checkpointing_gives_the_same_loss_and_grads(kind, method):
    """peft's ``_test_training_gradient_checkpointing``, with the values compared: after
    ``model.gradient_checkpointing_enable()`` (re-entrant and not) the loss and every adapter gradient are the ones
    without it (float32, recomputation in another order: within ``RTOL``), and no frozen weight gets a gradient."""
    _, model = _trained(kind, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    loss, grads = _loss_and_grads(model, kind)
    assert set(grads) == trainable and any(float(g.abs().sum()) > 0 for g in grads.values())
    for reentrant in (True, False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.base_model.model.is_gradient_checkpointing
        ckpt_loss, ckpt_grads = _loss_and_grads(model, kind)
        model.gradient_checkpointing_disable()
        assert _close(ckpt_loss, loss), (reentrant, float(ckpt_loss), float(loss))
        assert set(ckpt_grads) == trainable, (reentrant, sorted(trainable - set(ckpt_grads))[:3])
        bad = [n for n in grads if not _close(ckpt_grads[n], grads[n], 1e-4)]
        assert not bad, (reentrant, bad[:3])


MODULES_TO_SAVE = {
    "llama": "model.norm", "qwen2": "model.norm", "phi3": "model.norm", "t5": "encoder.final_layer_norm",
    "roberta_cls": "roberta.embeddings.LayerNorm", "bert_cls": "bert.embeddings.LayerNorm",
    "gpt2": "transformer.ln_f", "gpt2_cls": "transformer.ln_f",
}
"""A norm layer per architecture for ``modules_to_save`` (full names: peft matches the end of a module's name)."""


@pytest.mark.parametrize("kind, method", CELLS)
def test_modules_to_save(tmp_path, kind, method):
    """``modules_to_save=[a norm layer]``: peft wraps it, trains a copy next to the untouched original, saves the copy
    with the adapter (from_pretrained gives the outputs back exactly), ``disable_adapter()`` runs the original and
    ``merge_and_unload`` puts the trained copy in place."""
    name = MODULES_TO_SAVE[kind]
    base = make_tiny_model(kind)
    original = base.get_submodule(name).weight.detach().clone()
    base_out = _out(base, kind)
    config = METHODS[method](TASKS[kind])
    config.modules_to_save = [*(config.modules_to_save or []), name]
    model = get_peft_model(base, config)
    _train(model, kind, [p for p in model.parameters() if p.requires_grad])
    wrapper = model.base_model.model.get_submodule(name)
    assert isinstance(wrapper, ModulesToSaveWrapper)
    trained = wrapper.modules_to_save["default"].weight.detach().clone()
    assert torch.equal(wrapper.original_module.weight, original) and not torch.equal(trained, original)
    out = _out(model, kind)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(f"{name}.weight") and torch.equal(v, trained) for k, v in saved.items()), sorted(saved)[:5]
    reloaded = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path).eval()
    assert torch.equal(_out(reloaded, kind), out)
    if method != "welore_dropped":
        with model.disable_adapter():
            assert torch.equal(_out(model, kind), base_out)
    merged = model.merge_and_unload()
    assert type(merged.get_submodule(name)) is type(wrapper.original_module)
    assert torch.equal(merged.get_submodule(name).weight, trained)
    assert _close(_out(merged, kind), out)


@pytest.mark.parametrize("kind, method", CELLS)
def test_merge_twice_and_safe_merge(kind, method):
    """peft's ``_test_merge_layers_is_idempotent`` and ``_test_merge_layers_nan``: a second ``merge_adapter`` warns
    and changes nothing; ``merge_and_unload(safe_merge=True)`` gives the unmerged outputs, and refuses an adapter
    with a NaN weight before anything is merged."""
    _, model = _trained(kind, method)
    out = _out(model, kind)
    model.merge_adapter()
    merged_out = _out(model, kind)
    assert _close(merged_out, out)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert torch.equal(_out(model, kind), merged_out)
    model.unmerge_adapter()
    own = [p for n, p in model.named_parameters() if OWN_PARAMS[method] in n and p.requires_grad]
    with torch.no_grad():
        own[0].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        model.merge_and_unload(safe_merge=True)
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules())  # nothing was unloaded
    with torch.no_grad():
        own[0].view(-1)[0] = 0.0
    fixed = _out(model, kind)
    assert _close(_out(model.merge_and_unload(safe_merge=True), kind), fixed)


@pytest.mark.parametrize("kind, method", CELLS)
def test_inputs_embeds_equal_input_ids(kind, method):
    """peft's ``_test_passing_input_embeds_works``, with the outputs compared: the embedded tokens give the logits of
    the token ids through the adapter."""
    _, model = _trained(kind, method)
    batch = _inputs(kind)
    ids = batch.pop("input_ids")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        assert _close(model(inputs_embeds=embeds, **batch).logits, _out(model, kind))


@pytest.mark.parametrize("kind, method", CELLS)
def test_lora_conversion(tmp_path, kind, method):
    """peft's ``_test_lora_conversion`` through this library's exporter (``save_as_lora``): the adapter written as a
    vanilla LoRA folder, loaded by peft alone on a fresh base, gives the adapter's outputs (exact conversions: within ``RTOL``),
    and peft's own ``convert_to_lora`` at the adapter's rank agrees. WeLore is not a delta on the base weight (its
    factors replace the weight): both refuse with an error that says so."""
    _, model = _trained(kind, method)
    out = _out(model, kind)
    if method.startswith("welore"):
        assert not model.supports_lora_conversion()
        with pytest.raises(TypeError, match="do not support LoRA conversion"):
            convert_to_lora(model, rank=4)
        with pytest.raises(ValueError, match="WeLore"):
            save_as_lora(tmp_path / "lora", model)
        return
    save_as_lora(tmp_path / "lora", model)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path / "lora").eval()
    assert type(lora.peft_config["default"]) is LoraConfig
    assert _close(_out(lora, kind), out)
    assert model.supports_lora_conversion()
    # peft limitation: convert_to_lora names a modules_to_save parameter "<module>.<last name segment>", so the
    # two Linears of RobertaClassificationHead (classifier.dense, classifier.out_proj) collapse into one key and
    # set_peft_model_state_dict misses classifier.dense.weight. The exporter above has no such problem.
    config, state = convert_to_lora(model, rank=4)
    if kind == "roberta_cls":
        with pytest.raises(KeyError, match="classifier.dense.weight"):
            set_peft_model_state_dict(get_peft_model(make_tiny_model(kind), config), state)
        return
    peft_lora = get_peft_model(make_tiny_model(kind), config).eval()
    result = set_peft_model_state_dict(peft_lora, state)
    assert not result.unexpected_keys
    assert _close(_out(peft_lora, kind), out, 1e-4)


MLP_IN = {
    "llama": "up_proj", "qwen2": "up_proj", "phi3": "gate_up_proj", "t5": "wi", "roberta_cls": "intermediate.dense",
    "bert_cls": "intermediate.dense", "gpt2": "c_fc", "gpt2_cls": "c_fc",
}
"""Each architecture's MLP input projection, as a ``rank_pattern`` key (peft's end-of-name pattern)."""


@pytest.mark.parametrize("kind", KINDS)
def test_rank_pattern_means_the_same_on_lora_and_plain_models(tmp_path, kind):
    """The ``rank_pattern`` divergence of the two compression entry points, per architecture (``test_one_pipeline``
    has the tiny Llama and the NaN-Gram one): ``compress_on_save`` with ``rank_pattern={<MLP input>: 8}`` compresses
    the same modules to rank 8 on a FisherLoRA model and on the plain model (it once read the keys as exact module
    names on the plain path)."""
    base = make_tiny_model(kind)
    plain = make_tiny_model(kind)
    pm = get_peft_model(base, FisherLoRAConfig(r=4, target_modules="all-linear", task_type=TASKS[kind]))
    pattern = {MLP_IN[kind]: 8}
    _, lora_report = compress_on_save(pm, tmp_path / "lora", fisher_source="none", rank_pattern=pattern,
                                      progress=False)
    _, plain_report = compress_on_save(plain, tmp_path / "plain", rank_pattern=pattern, progress=False)
    leaf = MLP_IN[kind]
    assert plain_report.ranks and all(n.endswith("." + leaf) for n in plain_report.ranks)
    assert set(plain_report.ranks.values()) == {8} and plain_report.ranks == lora_report.ranks


@pytest.mark.parametrize("kind, method", CELLS)
def test_adapter_name_and_low_cpu_mem_usage(tmp_path, kind, method):
    """peft's ``_test_adapter_name`` and ``_test_load_model_low_cpu_mem_usage``: an adapter created under another
    name carries it in its parameters and saves to its own subfolder; ``from_pretrained(..., low_cpu_mem_usage=True)``
    (the adapter built on the meta device, the checkpoint assigned into it) gives the outputs bit for bit, with no
    parameter left on the meta device."""
    base = make_tiny_model(kind)
    model = get_peft_model(base, METHODS[method](TASKS[kind]), adapter_name="test-adapter")
    assert any("test-adapter" in n for n, p in model.named_parameters() if p.requires_grad)
    _train(model, kind, [p for p in model.parameters() if p.requires_grad])
    out = _out(model, kind)
    model.save_pretrained(tmp_path)
    folder = tmp_path / "test-adapter"
    assert (folder / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(make_tiny_model(kind), folder, adapter_name="test-adapter",
                                         low_cpu_mem_usage=True).eval()
    assert {p.device.type for p in reloaded.parameters()} == {"cpu"}
    assert torch.equal(_out(reloaded, kind), out)


@pytest.mark.parametrize("kind, method", CELLS)
def test_get_base_model_state_dict(kind, method):
    """peft's ``_test_get_base_model_state_dict``: the base model's keys and values from a PEFT model, and
    ``set_base_model_state_dict`` puts them back after the base weights were perturbed. WeLore keeps only the dense
    weights it did not drop (``keep_dense=False``: exactly those of its low-rank components are missing)."""
    original = {k: v.clone() for k, v in make_tiny_model(kind).state_dict().items()}
    model = get_peft_model(make_tiny_model(kind), METHODS[method](TASKS[kind]))
    dropped = {f"{n}.weight" for n in model.welore_allocation.lrc} if method == "welore_dropped" else set()
    extracted = get_base_model_state_dict(model)
    assert set(extracted) == set(original) - dropped, sorted(set(extracted) ^ (set(original) - dropped))[:3]
    assert all(torch.equal(extracted[k], original[k]) for k in extracted)
    with torch.no_grad():
        for p in model.get_base_model().parameters():
            if not p.requires_grad:
                p.add_(0.1)
    result = set_base_model_state_dict(model, {k: original[k] for k in extracted}, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, (result.missing_keys[:3], result.unexpected_keys[:3])
    assert all(torch.equal(v, original[k]) for k, v in get_base_model_state_dict(model).items())


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_fisher_grams_mean_the_same_on_lora_and_plain_models(kind):
    """The NaN-Gram divergence of the two compression entry points, per architecture (``test_one_pipeline`` has the
    tiny Llama): a Kronecker Fisher state collected through FisherLoRA with a NaN in one module's input Gram is
    zeroed and named by ``compress_peft_model`` and by ``compress_model(plain, fisher=state)`` alike, with the same
    ranks (``compress_model`` once refused the state that the LoRA path accepted)."""
    plain = make_tiny_model(kind)
    pm = get_peft_model(make_tiny_model(kind), FisherLoRAConfig(r=4, target_modules=[MLP_IN[kind]],
                                                                 task_type=TASKS[kind], init_lora_weights=False,
                                                                 fisher_weighting="kronecker"))
    collector = FisherCollector("lora").attach(pm)
    _train(pm, kind, [p for p in pm.parameters() if p.requires_grad])
    collector.detach()
    state = collector.snapshot()
    name = sorted(k.removesuffix(".gram_in") for k in state.tensors if k.endswith(".gram_in"))[0]
    state.tensors[name + ".gram_in"][0, 0] = float("nan")
    with pytest.warns(UserWarning, match=rf"NaN/inf Fisher entries, treated as zero.*{re.escape(name)}"):
        _, lora_report = compress_peft_model(pm, fisher=state, weighting="kronecker", rank=8, merge=False,
                                             progress=False)
    with pytest.warns(UserWarning, match=rf"NaN/inf Fisher entries, treated as zero.*{re.escape(name)}"):
        plain_report = compress_model(plain, {MLP_IN[kind]: 8}, fisher=state, fisher_weighting="kronecker",
                                      progress=False)
    for report in (lora_report, plain_report):
        assert report.info["non_finite_fisher"] == [name]
    assert plain_report.ranks == lora_report.ranks and set(plain_report.ranks.values()) == {8}


@pytest.mark.parametrize("kind, method", CELLS)
def test_mixed_adapter_batches(kind, method):
    """peft's ``_test_mixed_adapter_batches``: FisherLoRA's LoRA layers run each row of a batch with the adapter
    ``adapter_names`` names for it (``"__base__"``: none). SPSFT and WeLore refuse ``adapter_names`` with an error
    that names the fix (peft drops the argument before the base model, so their layers once ignored it silently)."""
    base_out, model = _trained(kind, method)
    batch = _inputs(kind)
    if method != "fisher_lora":
        with pytest.raises(ValueError, match="does not support mixed adapter batches"):
            model(**batch, adapter_names=["default", "__base__"])
        return
    out = _out(model, kind)
    model.add_adapter("other", SECOND[method](TASKS[kind]))
    model.set_adapter("other")
    other = _out(model, kind)
    if kind == "roberta_cls":  # peft limitation: its modules_to_save head (RobertaClassificationHead) is no Linear
        with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules"):
            model(**batch, adapter_names=["default", "other"])
        return
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["default", "other"]).logits
        mixed_base = model(**batch, adapter_names=["__base__", "default"]).logits
    assert _close(mixed[0], out[0]) and _close(mixed[1], other[1])
    assert _close(mixed_base[0], base_out[0]) and _close(mixed_base[1], out[1])
