"""The Fisher state is part of each checkpoint before ``save_total_limit`` rotation deletes the previous one (J)."""

from __future__ import annotations

import pytest
import torch
import transformers.trainer as hf_trainer
from peft import get_peft_model
from transformers import LlamaForCausalLM, TrainingArguments

from hf_lowrank.peft_configs.fisher_lora import FISHER_STATE_NAME, FisherLoRAConfig, FisherState
from hf_lowrank.trainer_mixins import LowRankTrainer


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
