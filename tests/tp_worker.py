"""Worker for ``tests/test_tensor_parallel.py``: loads compressed checkpoints with transformers' tensor parallelism.

``torchrun --nproc_per_node 2 tests/tp_worker.py --out OUT CHECKPOINT...`` (gloo, CPU): every process loads each
checkpoint with tensor parallelism, ``from_pretrained(folder, tp_plan="auto")`` for the Llama (the form the issue
reports; transformers deprecates it) and ``distributed_config=DistributedConfig(tp_plan="auto")`` for the others,
and runs the test's fixed batch (``use_cache=False``) and a short greedy ``generate`` (with the KV cache); rank 0
writes the logits and tokens to ``OUT/<name>.pt``, and each rank writes ``OUT/<name>.rank<i>.json``: for each
factor of each ``LowRankLinear``, whether it is a tensor-parallel shard and the shape this rank holds, and whether
the ``LowRankLinear`` itself still carries a tensor-parallel hook. The sharded model is then saved again
(``save_pretrained`` from every rank) to ``OUT/<name>.resaved``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from hf_lowrank.modules import LowRankLinear

INPUT_IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))
NEW_TOKENS = 6


def run(folder: Path) -> tuple[dict, dict, torch.nn.Module]:
    """(outputs, layout, model) of the checkpoint at ``folder`` as this process loads it."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if folder.name == "llama":
            kwargs = {"tp_plan": "auto"}
        else:
            from transformers.distributed import DistributedConfig

            kwargs = {"distributed_config": DistributedConfig(tp_plan="auto")}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        logits = model(INPUT_IDS, use_cache=False).logits
        tokens = model.generate(INPUT_IDS, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            entry = {"hooked": "forward" in module.__dict__}
            for factor in ("down", "up"):
                for pname, param in getattr(module, factor).named_parameters(recurse=False):
                    data = param.data
                    sharded = type(data) is not torch.Tensor
                    local = data.to_local() if sharded else data
                    entry[f"{factor}.{pname}"] = {"sharded": sharded, "local_shape": list(local.shape)}
            layout[name] = entry
    return {"logits": logits.detach().clone(), "tokens": tokens.clone()}, layout, model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in args.checkpoints:
        outputs, layout, model = run(folder)
        model.save_pretrained(args.out / f"{folder.name}.resaved")  # every rank: transformers gathers the shards
        if rank == 0:
            torch.save(outputs, args.out / f"{folder.name}.pt")
        (args.out / f"{folder.name}.rank{rank}.json").write_text(json.dumps(layout, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
