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
- ``test_merged_model_saves_and_reloads``: ``merge_and_unload`` -> ``save_pretrained`` -> ``AutoModel*.from_pretrained``.

Each adapter is trained a few steps first (an untrained LoRA is the base model, which would make several checks
vacuous), and every check asserts the adapter did move the outputs away from the base.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from tiny_models import make_tiny_model

from hf_lowrank import FisherLoRAConfig, SPSFTConfig, WeLoreLRCConfig
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


def _train(model, kind: str, params) -> None:
    """``STEPS`` AdamW steps on ``params`` (each on its own batch), leaving ``model`` in eval mode."""
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
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
