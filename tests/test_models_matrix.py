"""The PEFT contract, as one matrix: (WeLoreLRC, SPSFT) x (tiny Llama, Qwen2, Phi3 with fused qkv_proj/gate_up_proj,
T5, RoBERTa classifier with its two-layer head, BERT classifier).

Per cell: get_peft_model -> one training step -> only adapter (and modules_to_save) parameters changed; the saved
adapter reloads onto a fresh base with the same outputs; merged == unmerged outputs; disable_adapter == base;
merge_and_unload -> save_pretrained -> from_pretrained gives the same outputs.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from tiny_models import make_tiny_model

from hf_lowrank import SPSFTConfig, WeLoreLRCConfig

KINDS = ["llama", "qwen2", "phi3", "t5", "roberta_cls", "bert_cls"]
TASKS = {
    "llama": "CAUSAL_LM",
    "qwen2": "CAUSAL_LM",
    "phi3": "CAUSAL_LM",
    "t5": "SEQ_2_SEQ_LM",
    "roberta_cls": "SEQ_CLS",
    "bert_cls": "SEQ_CLS",
}
METHODS = {
    # keep_dense: disable_adapter() needs the dense weights WeLore otherwise drops.
    "welore": lambda task: WeLoreLRCConfig(reduction=0.3, task_type=task, keep_dense=True, progress=False),
    "spsft": lambda task: SPSFTConfig(r=4, task_type=task),
}
RTOL = 1e-5  # float32 after a reload or a merge: the bits may differ with the BLAS, the values may not


def _inputs(kind: str, *, labels: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (2, 10), generator=g)
    batch = {"input_ids": ids}
    if kind == "t5":
        batch["decoder_input_ids"] = torch.randint(3, 128, (2, 6), generator=g)
        if labels:
            batch = {"input_ids": ids, "labels": batch["decoder_input_ids"]}
    elif labels:
        batch["labels"] = torch.tensor([0, 2]) if kind.endswith("_cls") else ids
    return batch


def _out(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(kind)).logits


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return float((a - b).norm()) <= rtol * float(b.norm()) + 1e-7


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", KINDS)
def test_peft_contract(tmp_path, kind, method):
    base = make_tiny_model(kind)
    base_out = _out(base, kind)
    model = get_peft_model(base, METHODS[method](TASKS[kind]))
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable

    # one training step changes the adapter (and modules_to_save) only
    model.train()
    opt = torch.optim.SGD([named[n] for n in trainable], lr=0.05)
    model(**_inputs(kind, labels=True)).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:3]
    assert any(method in n for n in changed)  # the method's own parameters trained, not just a head
    out = _out(model, kind)

    # disabled adapter == base (exactly: the base layers run as they were)
    with model.disable_adapter():
        assert _close(_out(model, kind), base_out, 1e-6)

    # save / load the adapter onto a fresh base
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path / "adapter").eval()
    assert _close(_out(reloaded, kind), out)

    # merged == unmerged
    model.merge_adapter()
    assert _close(_out(model, kind), out)
    model.unmerge_adapter()
    assert _close(_out(model, kind), out)

    # merge_and_unload -> save_pretrained -> from_pretrained
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert _close(_out(merged, kind), out)
    merged.save_pretrained(tmp_path / "merged")
    cls = getattr(transformers, merged.config.architectures[0])
    loaded = cls.from_pretrained(tmp_path / "merged").eval()
    assert _close(_out(loaded, kind), out)
