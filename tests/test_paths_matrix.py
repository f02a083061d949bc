"""Every compression path x every tiny architecture of the PEFT contract matrix (Llama, Qwen2 with biased q/k/v, Phi3
with fused projections, T5, GPT-2 with ``Conv1D``, RoBERTa with its two-layer classifier head, BERT), ending in a
reload by the stock ``from_pretrained`` (or vanilla ``PeftModel.from_pretrained``):

- ``compress_model`` -> ``save_compressed`` -> ``AutoModel*.from_pretrained``: bit-identical outputs; then
  ``decompress_model`` -> ``save_pretrained``: a stock checkpoint of the same function;
- FisherLoRA trained by ``LowRankTrainer`` -> ``save_model`` (compress on save) -> ``from_pretrained``: bit-identical
  to ``compress_peft_model`` of the trained adapter, and a classifier keeps its trained head;
- SPSFT trained -> ``save_as_lora`` -> vanilla peft ``LoraConfig`` adapter: the SPSFT model's outputs;
- ERE of a full fine-tune -> ``decode_residual`` (within the quantization fidelity) and ``save_as_lora``
  -> vanilla ``PeftModel.from_pretrained``: the decoded model's outputs.

(WeLore merge, SPSFT merge and PEFT save/load on the same models: ``test_peft_contract.py``.)
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_peft_contract import AUTO_CLASSES, KINDS, TASKS, _close, _inputs, _out
from tiny_models import make_tiny_model
from transformers import TrainingArguments

import hf_lowrank
from hf_lowrank import FisherLoRAConfig, LowRankLinear, LowRankTrainer, SPSFTConfig, save_as_lora
from hf_lowrank.compression.ere import decode_residual, encode_residual
from hf_lowrank.tuners.fisher_lora import compress_peft_model

CELLS = [pytest.param(kind, id=kind) for kind in KINDS]


def _reload(kind: str, folder):
    return AUTO_CLASSES[TASKS[kind]].from_pretrained(folder).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class _Batches(torch.utils.data.Dataset):
    """Four training examples of the kind's task (labels included), one per item."""

    def __init__(self, kind: str):
        self.items = []
        for seed in range(4):
            batch = _inputs(kind, labels=True, seed=200 + seed)
            self.items.append({k: v[0] for k, v in batch.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("kind", CELLS)
def test_compress_model_reloads_exactly_and_decompresses_to_a_stock_checkpoint(tmp_path, kind):
    model = make_tiny_model(kind)
    dense = _out(model, kind)
    report = hf_lowrank.compress_model(model, 0.5, progress=False)
    assert report.ranks and any(isinstance(m, LowRankLinear) for m in model.modules())
    compressed = _out(model, kind)
    assert _rel(compressed, dense) > 1e-4  # rank ratio 0.5 is not lossless
    hf_lowrank.save_compressed(model, tmp_path / "c", report=report)
    reloaded = _reload(kind, tmp_path / "c")
    assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == len(report.ranks)
    assert torch.equal(_out(reloaded, kind), compressed)

    hf_lowrank.decompress_model(reloaded).save_pretrained(tmp_path / "d")
    stock = _reload(kind, tmp_path / "d")
    assert not any(isinstance(m, LowRankLinear) for m in stock.modules())
    assert "quantization_config" not in stock.config.to_dict()
    assert _close(_out(stock, kind), compressed, 1e-5)


@pytest.mark.parametrize("kind", CELLS)
def test_fisher_lora_compress_on_save_reloads_exactly_with_the_trained_head(tmp_path, kind):
    torch.manual_seed(0)
    config = FisherLoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=TASKS[kind],
                              init_lora_weights=False, compress_keep=0.5)
    model = get_peft_model(make_tiny_model(kind), config)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = LowRankTrainer(model=model, args=args, train_dataset=_Batches(kind))
    trainer.train()
    assert trainer.fisher_callback.state.micro_batches == 2
    trainer.save_model(str(tmp_path / "out"))
    reloaded = _reload(kind, tmp_path / "out")
    expected, report = compress_peft_model(trainer.model, fisher=trainer.fisher_callback, progress=False)
    assert report.ranks and sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == len(report.ranks)
    assert torch.equal(_out(reloaded, kind), _out(expected.eval(), kind))
    if kind.endswith("_cls"):  # the head is trained (modules_to_save) and kept, not re-initialised
        wrapper = "score" if kind == "gpt2_cls" else "classifier"  # GPT-2's head is a bias-free Linear "score"
        trained = trainer.model.base_model.model.get_submodule(wrapper).modules_to_save["default"]
        if kind == "roberta_cls":
            head, trained_weight = "classifier.out_proj.weight", trained.out_proj.weight
        else:
            head, trained_weight = f"{wrapper}.weight", trained.weight
        assert torch.equal(reloaded.get_parameter(head), trained_weight)
        assert not torch.equal(trained_weight, make_tiny_model(kind).get_parameter(head))


@pytest.mark.parametrize("kind", CELLS)
def test_spsft_lora_export_loads_in_vanilla_peft(tmp_path, kind):
    model = get_peft_model(make_tiny_model(kind), SPSFTConfig(r=4, task_type=TASKS[kind]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        model(**_inputs(kind, labels=True, seed=300 + step)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = _out(model, kind)
    assert _rel(trained, _out(make_tiny_model(kind), kind)) > 1e-4
    save_as_lora(tmp_path / "lora", model)
    loaded = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path / "lora").eval()
    assert _close(_out(loaded, kind), trained, 1e-5)


@pytest.mark.parametrize("kind", CELLS)
@torch.no_grad()
def test_ere_decodes_a_full_fine_tune_and_its_lora_export_loads_in_vanilla_peft(tmp_path, kind):
    base = make_tiny_model(kind)
    ft = make_tiny_model(kind)
    g = torch.Generator().manual_seed(5)
    for name, p in ft.named_parameters():  # a "full fine-tune": every block/head matrix moves by a rank-4 delta
        if p.ndim == 2 and not any(e in name for e in ("embed", "shared", "wte", "wpe", "relative_attention")):
            scale = 0.3 if name.startswith(("classifier", "score")) else 0.02
            p += scale * torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g) / 4
    reference = _out(ft, kind)
    assert _rel(_out(base, kind), reference) > 0.01  # the fine-tune did change the outputs
    encode_residual(base, ft, rank=32, bits=8, path=tmp_path / "r", progress=False)
    decoded = decode_residual(base, tmp_path / "r", progress=False).eval()
    got = _out(decoded, kind)
    assert _rel(got, reference) < 0.02  # within the ERE quantization fidelity
    save_as_lora(tmp_path / "lora", tmp_path / "r", base_model=base)
    peft_model = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path / "lora").eval()
    assert _close(_out(peft_model, kind), got, 1e-5)
