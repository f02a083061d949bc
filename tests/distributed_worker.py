"""Worker for ``tests/test_distributed.py``: trains each method on a tiny Llama with the Trainer, in 1 or N processes.

Launched twice by the test over the same global batches (global batch = 4 sequences per optimizer step):

- ``torchrun --nproc_per_node 2 tests/distributed_worker.py --out D2`` (DDP on the CPU, gloo; 2 sequences per
  process, no accumulation);
- ``python tests/distributed_worker.py --out D1 --grad-accum 2`` (one process; the same two micro-batches of 2
  sequences, accumulated).

Per method it writes what the main process saved (compressed model, Fisher state, adapters, ERE residual) into
``<out>/<method>/`` and a ``rank<i>.json`` per process saying what that process wrote, so the test can check that
only the main process writes. Methods: ``fisher_lora`` (LowRankTrainer, compress on save), ``fisher_callbacks``
(plain Trainer + FisherCollectorCallback + CompressOnSaveCallback), ``welore``, ``spsft`` (PEFT adapters saved by
the Trainer), ``ere`` (full fine-tuning, ERE residual written by CompressOnSaveCallback).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from testing_common import make_tiny_llama  # next to this file: on sys.path as a script and under pytest

MLP = ["gate_proj", "up_proj", "down_proj"]
METHODS = ("fisher_lora", "fisher_callbacks", "welore", "spsft", "ere", "fsdp")
GPU_METHODS = ("trainer_fsdp", "trainer_plain")  # need CUDA: accelerate runs FSDP only on accelerators


class Tokens(torch.utils.data.Dataset):
    """Fixed random sequences of equal length (every micro-batch holds the same number of tokens)."""

    def __init__(self, n: int = 16, seq: int = 12, vocab: int = 128) -> None:
        self.data = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(123))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def base_model():
    """The tiny Llama (seed 0, float32) that every method starts from, in train mode as a Trainer would set it."""
    return make_tiny_llama(seed=0, max_position_embeddings=64).train()


def training_args(out: Path, grad_accum: int, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=grad_accum, max_steps=4,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def run(method: str, out: Path, grad_accum: int) -> dict:
    from peft import get_peft_model
    from transformers import Trainer

    from hf_lowrank import (
        CompressOnSaveCallback,
        FisherCollectorCallback,
        FisherLoRAConfig,
        LowRankTrainer,
        SPSFTConfig,
        WeLoreLRCConfig,
    )

    if method in GPU_METHODS:
        return run_trainer_gpu(method, out, grad_accum)
    args = training_args(out, grad_accum)
    data = Tokens()
    record: dict = {"method": method, "world_size": args.world_size, "process_index": args.process_index}
    if method == "fisher_lora":
        model = get_peft_model(base_model(), FisherLoRAConfig(r=4, lora_alpha=8, target_modules=MLP, compress_rank=8))
        trainer = LowRankTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        trainer.save_model(str(out / "compressed"))
        record["wrote"] = trainer.compression_report is not None if hasattr(trainer, "compression_report") else False
    elif method == "fisher_callbacks":
        from peft import LoraConfig

        model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=MLP))
        fisher = FisherCollectorCallback("lora")
        compress = CompressOnSaveCallback("fwsvd", fisher=fisher, rank=8, output_subdir="compressed")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[fisher, compress])
        trainer.train()
        record["wrote"] = compress.last_output_dir is not None
    elif method in ("welore", "spsft"):
        config = (
            WeLoreLRCConfig(reduction=0.3, progress=False) if method == "welore" else SPSFTConfig(r=8, target_modules=MLP)
        )
        model = get_peft_model(base_model(), config)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        trainer.save_model(str(out / "adapter"))
        record["wrote"] = args.should_save
    elif method == "ere":
        base = base_model()
        model = copy.deepcopy(base)
        compress = CompressOnSaveCallback("ere", base_model=base, rank=4, output_subdir="residual", progress=False)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[compress])
        trainer.train()
        trainer.save_model(str(out / "full"))  # the dense fine-tuned weights, for the test's comparison
        record["wrote"] = compress.last_output_dir is not None
    elif method == "fsdp":
        return run_fsdp(out, args, record)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    record["loss"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return record


def run_trainer_gpu(method: str, out: Path, grad_accum: int) -> dict:
    """Full fine-tuning with the Trainer on CUDA, sharded by FSDP2 (``trainer_fsdp``) or not (``trainer_plain``), then
    plain-SVD compression on save from the gathered weights."""
    from transformers import Trainer

    from hf_lowrank import CompressOnSaveCallback
    from hf_lowrank.distributed import is_fsdp_model

    extra = {"use_cpu": False, "bf16": False}
    if method == "trainer_fsdp":
        extra.update(fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                             "reshard_after_forward": True})
    args = training_args(out, grad_accum, **extra)
    svd = CompressOnSaveCallback("svd", rank=8, output_subdir="compressed")
    trainer = Trainer(model=base_model(), args=args, train_dataset=Tokens(), callbacks=[svd])
    trainer.train()
    return {
        "method": method, "world_size": args.world_size, "process_index": args.process_index,
        "sharded": is_fsdp_model(trainer.model_wrapped), "wrote": svd.last_output_dir is not None,
        "loss": [log["loss"] for log in trainer.state.log_history if "loss" in log],
    }


def run_fsdp(out: Path, args, record: dict) -> dict:
    """Full fine-tuning with FSDP2 ``fully_shard`` (2 processes) or unsharded (1 process), plain SGD on 4 sequences
    per step, then the compress-on-save callbacks (plain SVD and ERE), which gather the sharded weights first."""
    import torch.distributed as dist

    from hf_lowrank import CompressOnSaveCallback, FisherCollectorCallback
    from hf_lowrank.distributed import is_fsdp_model

    world, rank = args.world_size, args.process_index
    model = base_model()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = Tokens().data
    per_process = 4 // world
    record["loss"] = []
    for step in range(3):
        ids = data[4 * step + rank * per_process: 4 * step + (rank + 1) * per_process]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        record["loss"].append(float(total) / world)
    record["sharded"] = is_fsdp_model(model)
    try:
        FisherCollectorCallback("full").on_train_begin(args, type("S", (), {"global_step": 0})(), None, model=model)
        record["fisher_error"] = None
    except NotImplementedError as exc:
        record["fisher_error"] = str(exc)
    svd = CompressOnSaveCallback("svd", rank=8, output_subdir="compressed")
    ere = CompressOnSaveCallback("ere", base_model=base_model(), rank=4, output_subdir="residual", progress=False)
    for callback in (svd, ere):
        callback.on_train_end(args, None, None, model=model)
    record["wrote"] = svd.last_output_dir is not None and ere.last_output_dir is not None
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {METHODS + GPU_METHODS}")
    ns = parser.parse_args(argv)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for method in ns.methods.split(","):
        folder = ns.out / method
        record = run(method, folder, ns.grad_accum)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
