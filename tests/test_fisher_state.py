"""The Fisher state: it says what it belongs to (adapter rank, model), an old file without that still loads, a
Kronecker state keeps its Grams, a useless one warns that compression falls back to plain SVD, and it is part of each
checkpoint before ``save_total_limit`` rotation deletes the previous one."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers.trainer as hf_trainer
from peft import get_peft_model
from testing_common import collect_lora_fisher, make_tiny_llama, mlp_fisher_lora
from transformers import LlamaForCausalLM, TrainingArguments

from hf_lowrank.trainer import LowRankTrainer
from hf_lowrank.tuners.fisher_lora import (
    FISHER_STATE_NAME,
    FisherCollector,
    FisherLoRAConfig,
    FisherState,
    FisherStateError,
    compress_peft_model,
)


class _Killed(BaseException):
    """Stands for a SIGKILL: not an Exception, so nothing in the Trainer catches it."""


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12, vocab=128):
        self.data = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(123))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _trainer(config, out, **kw):
    torch.manual_seed(0)
    lora = FisherLoRAConfig(r=4, target_modules=["up_proj"], compress_rank=8)
    model = get_peft_model(LlamaForCausalLM(config), lora)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=2, save_strategy="steps", save_steps=1,
        save_total_limit=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kw,
    )
    return LowRankTrainer(model=model, args=args, train_dataset=_Tokens())


def test_kill_after_rotation_keeps_fisher_in_the_only_checkpoint(tiny_llama_config, tmp_path, monkeypatch):
    real = hf_trainer.rotate_checkpoints

    def rotate_then_die(*args, **kwargs):
        real(*args, **kwargs)
        if (tmp_path / "run" / "checkpoint-2").is_dir():
            raise _Killed  # killed after the rotation, before the on_save event

    monkeypatch.setattr(hf_trainer, "rotate_checkpoints", rotate_then_die)
    with pytest.raises(_Killed):
        _trainer(tiny_llama_config, tmp_path / "run").train()
    left = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-"))
    assert left == ["checkpoint-2"]  # the rotation deleted checkpoint-1 with its Fisher file
    saved = FisherState.load(tmp_path / "run" / "checkpoint-2" / FISHER_STATE_NAME)
    assert saved.global_step == 2 and saved.micro_batches == 2
    monkeypatch.setattr(hf_trainer, "rotate_checkpoints", real)
    resumed = _trainer(tiny_llama_config, tmp_path / "run", ignore_data_skip=True)
    resumed.args.max_steps = 3
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))  # strict: needs the Fisher state
    assert resumed.fisher_callback.state.micro_batches == 3


@pytest.mark.parametrize("fill", [float("nan"), 0.0])
def test_useless_fisher_warns_that_it_is_plain_svd(fill):
    pm = mlp_fisher_lora(make_tiny_llama(seed=0))
    c = collect_lora_fisher(pm, n=1)
    state = c.state.clone()
    name = "model.layers.1.mlp.up_proj"
    for key in list(state.tensors):
        if fill != fill or key.startswith(name + "."):  # NaN: every module; zero: one module
            state.tensors[key] = torch.full_like(state.tensors[key], fill)
    with pytest.warns(UserWarning, match="plain SVD") as record:
        compress_peft_model(pm, fisher=state, progress=False)
    text = " ".join(str(w.message) for w in record)
    assert name in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy state: no warning
        compress_peft_model(pm, fisher=c.state, progress=False)


def test_fisher_of_another_adapter_rank_is_refused():
    c = collect_lora_fisher(mlp_fisher_lora(make_tiny_llama(seed=0), r=4))
    other = mlp_fisher_lora(make_tiny_llama(seed=0), r=8)
    with pytest.raises(FisherStateError, match="r=4.*r=8"):
        compress_peft_model(other, fisher=c.state, progress=False)
    old = c.state.clone()
    old.fingerprint = None  # a state saved before fingerprints: the F_A shapes still tell
    with pytest.raises(FisherStateError, match="adapter rank"):
        compress_peft_model(other, fisher=old, progress=False)


def test_fisher_of_another_model_of_the_same_shapes_is_refused(tmp_path):
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    a.config._name_or_path, b.config._name_or_path = "org/model-a", "org/model-b"
    c = collect_lora_fisher(mlp_fisher_lora(a))
    c.save(tmp_path / "fisher.safetensors")
    loaded = FisherState.load(tmp_path / "fisher.safetensors")
    assert loaded.fingerprint["adapter_rank"] == 4 and loaded.fingerprint["name_or_path"] == "org/model-a"
    pm_b = mlp_fisher_lora(b)
    with pytest.raises(FisherStateError, match="another model of the same shapes"):
        compress_peft_model(pm_b, fisher=loaded, progress=False)
    collector = FisherCollector("lora").attach(pm_b)
    with pytest.raises(FisherStateError, match="another model of the same shapes"):
        collector.load_state(tmp_path / "fisher.safetensors")
    collector.detach()
    # the same model, another dtype (bf16 training, fp32 compression): accepted
    same = make_tiny_llama(seed=0)
    same.config._name_or_path = "/local/copy/model-a"
    compress_peft_model(mlp_fisher_lora(same), fisher=loaded, progress=False)


def test_old_fisher_state_without_fingerprint_still_loads(tmp_path):
    from safetensors.torch import save_file

    pm = mlp_fisher_lora(make_tiny_llama(seed=0))
    c = collect_lora_fisher(pm)
    meta = {k: v for k, v in c.state.to_metadata().items() if k != "fingerprint"}
    save_file({k: v.contiguous() for k, v in c.state.tensors.items()}, str(tmp_path / "old.safetensors"), meta)
    old = FisherState.load(tmp_path / "old.safetensors")
    assert old.fingerprint is None
    model, report = compress_peft_model(pm, fisher=old, progress=False)
    assert report.method == "fisher_lora"
    fresh = FisherCollector("lora").attach(pm)
    fresh.load_state(old)
    fresh.detach()


def test_kronecker_state_keeps_its_grams_and_fingerprint(tmp_path):
    pm = mlp_fisher_lora(make_tiny_llama(seed=0), fisher_weighting="kronecker")
    c = collect_lora_fisher(pm)
    assert any(k.endswith(".gram_in") for k in c.state.tensors)
    c.save(tmp_path / "k.safetensors")
    loaded = FisherState.load(tmp_path / "k.safetensors")
    assert loaded.fingerprint and set(loaded.tensors) == set(c.state.tensors)
    _, report = compress_peft_model(pm, fisher=loaded, progress=False)
    assert report.info["fisher_weighting"] == "kronecker"
