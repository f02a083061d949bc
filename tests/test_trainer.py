"""FisherLoRA inside transformers.Trainer / trl.SFTTrainer: Fisher per micro-batch, resume, compress on save."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from tiny_models import TINY_MLP, make_tiny_fisher_lora
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_lowrank.modules import LowRankLinear
from hf_lowrank.trainer import (
    CompressOnSaveCallback,
    FisherCollectorCallback,
    LowRankTrainer,
)
from hf_lowrank.tuners.fisher_lora import (
    FISHER_STATE_NAME,
    FisherLoRAConfig,
    FisherState,
    FisherStateError,
    compress_peft_model,
    lora_linear_modules,
)


class _Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences of equal length (every micro-batch has the same number of tokens)."""

    def __init__(self, n=16, seq=12, vocab=128):
        g = torch.Generator().manual_seed(123)
        self.data = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=5e-3, max_grad_norm=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    base.update(kw)
    return TrainingArguments(**base)


def _peft_model(config, **kw):
    torch.manual_seed(0)
    return make_tiny_fisher_lora(LlamaForCausalLM(config), **kw)


def _lora_params(model):
    modules, adapter = lora_linear_modules(model)
    out = {}
    for name, m in modules.items():
        out[name + ".fisher_A"] = m.lora_A[adapter].weight
        out[name + ".fisher_B"] = m.lora_B[adapter].weight
    return out


class _HandFisher(LowRankTrainer):
    """Reference: per micro-batch gradient = change of the accumulated .grad over one training_step (no hooks)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        params = _lora_params(model)
        if not hasattr(self, "hand"):
            self.hand = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
            self.step_sums = {k: torch.zeros_like(p) for k, p in params.items()}
            self.squared_sums = {k: torch.zeros_like(p) for k, p in params.items()}
        before = {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
        loss = super().training_step(model, inputs, num_items_in_batch)
        for k, p in params.items():
            g = p.grad - before[k]
            self.hand[k] += g.float() ** 2
            self.step_sums[k] += g
        self.micro = getattr(self, "micro", 0) + 1
        if self.micro % self.args.gradient_accumulation_steps == 0:
            for k in params:
                self.squared_sums[k] += self.step_sums[k] ** 2
                self.step_sums[k].zero_()
        return loss


def test_fisher_equals_squared_per_micro_batch_gradients(tiny_llama_config, tmp_path):
    model = _peft_model(tiny_llama_config)
    trainer = _HandFisher(model=model, args=_args(tmp_path), train_dataset=_Tokens())
    assert isinstance(trainer.fisher_callback, FisherCollectorCallback)
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and min(norms) > 10 * trainer.args.max_grad_norm  # clipping really happened
    state = trainer.fisher_callback.state
    assert state.micro_batches == 6 and state.samples == 12 and state.skipped == 0
    assert set(state.tensors) == set(trainer.hand)
    for k, ref in trainer.hand.items():
        assert ref.any()
        torch.testing.assert_close(state.tensors[k], ref, rtol=1e-4, atol=1e-12 + 1e-6 * float(ref.max()))
    # squaring the accumulated (summed) gradient would give something else: the check can fail
    k = next(iter(trainer.hand))
    assert not torch.allclose(trainer.squared_sums[k], trainer.hand[k], rtol=1e-2)
    # the trained model still has its adapter after training (Trainer left it alone)
    assert isinstance(trainer.model, PeftModel)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("plain", [False, True], ids=["LowRankTrainer", "Trainer+callback"])
def test_resume_gives_identical_fisher(tiny_llama_config, tmp_path, plain):
    def make(out, extra=()):
        model = _peft_model(tiny_llama_config)
        args = _args(tmp_path, output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=2)
        if plain:
            cb = FisherCollectorCallback()
            t = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[cb, *extra])
            return t, cb
        t = LowRankTrainer(model=model, args=args, train_dataset=_Tokens(), callbacks=list(extra))
        return t, t.fisher_callback

    full, full_cb = make(tmp_path / "full")
    full.train()
    ref = full_cb.state

    first, first_cb = make(tmp_path / "resumed", extra=[_StopAt(2)])
    first.train()
    ckpt = tmp_path / "resumed" / "checkpoint-2"
    assert (ckpt / FISHER_STATE_NAME).is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "compression_report.json").exists()  # checkpoints stay ordinary
    saved = FisherState.load(ckpt)
    assert saved.global_step == 2 and saved.micro_batches == 4

    second, second_cb = make(tmp_path / "resumed")
    second.train(resume_from_checkpoint=True if plain else str(ckpt))
    got = second_cb.state
    assert got.micro_batches == ref.micro_batches == 8 and got.samples == ref.samples
    for k, v in ref.tensors.items():
        assert torch.equal(got.tensors[k], v), k  # bit-identical
    a, _ = compress_peft_model(full.model, fisher=full_cb, progress=False)
    b, _ = compress_peft_model(second.model, fisher=second_cb, progress=False)
    x = _Tokens().data[:2]
    torch.testing.assert_close(b(input_ids=x).logits, a(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_resume_without_fisher_state_is_refused(tiny_llama_config, tmp_path):
    model = _peft_model(tiny_llama_config)
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    Trainer(model=model, args=args, train_dataset=_Tokens()).train()  # no callback: no Fisher in the checkpoint
    ckpt = tmp_path / "run" / "checkpoint-2"
    trainer = LowRankTrainer(model=_peft_model(tiny_llama_config), args=_args(tmp_path, max_steps=3),
                             train_dataset=_Tokens())
    with pytest.raises(FisherStateError, match="no Fisher state"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_low_rank_trainer_save_model_writes_compressed_model(tiny_llama_config, tmp_path):
    model = _peft_model(tiny_llama_config, compress_keep=0.5, compress_rank=None, fisher_weighting="two_sided")
    trainer = LowRankTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens())
    trainer.train()
    x = _Tokens().data[:2]
    with torch.no_grad():
        before = trainer.model(input_ids=x).logits
    out = tmp_path / "compressed"
    trainer.save_model(str(out))
    assert isinstance(trainer.model, PeftModel)  # the trainer's model keeps its adapter, unchanged
    with torch.no_grad():
        assert torch.equal(trainer.model(input_ids=x).logits, before)
    report = json.loads((out / "compression_report.json").read_text())
    assert report["method"] == "fisher_lora" and report["info"]["fisher_weighting"] == "two_sided"
    assert report["info"]["micro_batches"] == 6 and len(report["modules"]) == 6
    assert (out / FISHER_STATE_NAME).is_file() and not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, LowRankLinear)
    expected, _ = compress_peft_model(trainer.model, fisher=trainer.fisher_callback, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, expected(input_ids=x).logits, rtol=0, atol=0)
    assert trainer.compression_report is not None


def test_full_fine_tune_baseline_with_compress_on_save(tiny_llama_config, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config)
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    fisher = FisherCollectorCallback(source="full", target_modules=TINY_MLP)
    saver = CompressOnSaveCallback("fwsvd", fisher=fisher, keep=0.5)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_Tokens(),
                      callbacks=[fisher, saver])
    trainer.train()
    state = fisher.state
    assert state.source == "full" and len(state.modules) == 6 and state.micro_batches == 4
    assert all(v.any() for v in state.tensors.values())
    out = tmp_path / "run" / "compressed"
    report = json.loads((out / "compression_report.json").read_text())
    assert report["method"] == "fwsvd" and report["kept_fraction"] < 0.55
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, LowRankLinear)
    assert not isinstance(trainer.model.model.layers[1].mlp.down_proj, LowRankLinear)  # trained model untouched


def _char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz .,:")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _sft_data():
    from datasets import Dataset

    words = ["a cat is an animal.", "red is a colour.", "an oak is a tree.", "rain is water."]
    return Dataset.from_dict({"text": [words[i % 4] for i in range(8)]})


@pytest.mark.parametrize("use_mixin", [True, False], ids=["LowRankSFTTrainer", "SFTTrainer+callback"])
def test_sft_trainer_paths(tiny_llama_config, tmp_path, use_mixin):
    trl = pytest.importorskip("trl")
    from hf_lowrank.trainer import LowRankSFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config)
    cfg = FisherLoRAConfig(r=4, target_modules=TINY_MLP, init_lora_weights=False, compress_rank=8, task_type="CAUSAL_LM")
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        max_length=24, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1,
    )
    tok = _char_tokenizer()
    kwargs = dict(model=model, args=args, train_dataset=_sft_data(), processing_class=tok, peft_config=cfg)
    if use_mixin:
        trainer = LowRankSFTTrainer(**kwargs)
        callback = trainer.fisher_callback
    else:
        callback = FisherCollectorCallback()
        trainer = trl.SFTTrainer(callbacks=[callback], **kwargs)
    assert isinstance(trainer.model.peft_config["default"], FisherLoRAConfig)
    trainer.train()
    assert callback.state.micro_batches == 4 and all(v.any() for v in callback.state.tensors.values())
    out = tmp_path / "out"
    if use_mixin:
        trainer.save_model(str(out))
        assert (out / "tokenizer.json").is_file()
        expected, _ = compress_peft_model(trainer.model, fisher=callback, progress=False)
    else:
        from hf_lowrank import save_compressed

        expected, report = compress_peft_model(trainer.model, fisher=callback, progress=False)
        save_compressed(expected, out, tokenizer=tok, report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("a cat is a tree.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)


def test_inplace_compression_and_svd_on_save(tiny_llama_config, tmp_path):
    model = _peft_model(tiny_llama_config, fisher_source="none", compress_rank=6)
    saver = CompressOnSaveCallback("svd", rank=4)
    trainer = LowRankTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_Tokens(),
                             callbacks=[saver], inplace=True)
    assert trainer.fisher_callback is None  # plain SVD needs no Fisher
    trainer.train()
    svd_report = json.loads((tmp_path / "run" / "compressed" / "compression_report.json").read_text())
    assert svd_report["method"] == "svd" and {m["rank"] for m in svd_report["modules"]} == {4}
    trainer.save_model(str(tmp_path / "out"))
    assert not isinstance(trainer.model, PeftModel)  # inplace: the trainer's model became the compressed one
    assert trainer.model.model.layers[0].mlp.up_proj.rank == 6
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = _Tokens().data[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, trainer.model(input_ids=x).logits)
