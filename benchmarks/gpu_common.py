"""Shared by the GPU benchmarks: model shapes built from configs (random weights, no download), a fresh frozen base
per measurement (16-bit, or bitsandbytes NF4 through a temporary checkpoint), and one training measurement on the
CUDA caching allocator: bytes of the frozen model, peak of a no-grad forward above it, peak of training steps above
it, and the median step time.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
    ),
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
    ),
}
MiB = 2**20


def _config(shape: str):
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape])
    config._attn_implementation = "sdpa"
    return config


def _dense(shape: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(_config(shape), dtype=dtype)
    return model


class Bases:
    """Builds the frozen base for each measurement (fresh each time, so no state leaks between methods)."""

    def __init__(self, shape: str, bits: int, dtype: torch.dtype, workdir: Path) -> None:
        self.shape, self.bits, self.dtype = shape, bits, dtype
        self.folder = None
        if bits == 4:
            self.folder = workdir / f"{shape}-dense"
            model = _dense(shape, dtype)
            model.save_pretrained(self.folder)
            del model
            gc.collect()
            torch.cuda.empty_cache()

    def __call__(self):
        if self.bits == 16:
            return _dense(self.shape, self.dtype)
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype,
            bnb_4bit_use_double_quant=True,
        )
        return LlamaForCausalLM.from_pretrained(self.folder, quantization_config=quant, dtype=self.dtype,
                                                device_map={"": 0})


def measure(bases: Bases, wrap, ids: torch.Tensor, steps: int) -> dict:
    """Fresh base -> ``model, attach = wrap(base)`` -> one warm-up step and ``steps`` timed steps (AdamW on the
    parameters the model trains). ``attach`` (or None) is called on the model after the optimizer is built, as a
    Trainer callback would at ``on_train_begin`` (e.g. hooking a Fisher collector, which may unfreeze weights for their
    gradients only); what it returns is ``detach()``-ed after the steps."""
    gc.collect()
    torch.cuda.empty_cache()
    base = bases()
    base.config.use_cache = False
    torch.cuda.synchronize()
    model_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        base(input_ids=ids)
    torch.cuda.synchronize()
    infer = torch.cuda.max_memory_allocated() - model_bytes
    model, attach = wrap(base)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    extra = attach(model) if attach is not None else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1 + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step > 0:  # the first step creates the AdamW state and warms the kernels up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - model_bytes
    finite = bool(torch.isfinite(loss.detach()).item())
    if extra is not None:
        extra.detach()
    del model, base, optimizer, params, loss, extra
    return {
        "trainable_params": trainable,
        "model_mib": round(model_bytes / MiB, 1),
        "infer_mib": round(infer / MiB, 1),
        "mem_mib": round(peak / MiB, 1),
        "mem_minus_infer_mib": round((peak - infer) / MiB, 1),
        "step_ms": round(1000 * statistics.median(times), 2),
        "loss_finite": finite,
    }


def parser_with_common_args(doc: str, *, k: int, k_help: str) -> argparse.ArgumentParser:
    """The options every GPU benchmark takes (shapes, bits, sequence, batch, rank, steps, dtype)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama2-7b"], choices=list(SHAPES))
    parser.add_argument("--bits", nargs="+", type=int, default=[16], choices=[16, 4])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--k", type=int, default=k, help=k_help)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return parser


def start(name: str, args: argparse.Namespace, cpu_alternative: str) -> dict:
    """Exit with a pointer to the CPU benchmark when there is no GPU; else the result skeleton."""
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/{name}.py needs a CUDA GPU; on the CPU use benchmarks/{cpu_alternative}.py.")
    return {
        "benchmark": name, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "k": args.k, "dtype": args.dtype, "runs": {},
        "summary": {},
    }


def token_ids(shape: str, args: argparse.Namespace) -> torch.Tensor:
    """A fixed random batch of token ids for ``shape`` on the GPU."""
    return torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch_size, args.seq_len), device="cuda",
                         generator=torch.Generator("cuda").manual_seed(0))


def bases_for(args: argparse.Namespace) -> Iterator[tuple[str, int, Bases, torch.Tensor]]:
    """``(shape, bits, bases, token ids)`` for every requested shape and bit width (temporary checkpoints removed)."""
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            ids = token_ids(shape, args)
            for bits in args.bits:
                bases = Bases(shape, bits, dtype, Path(tmp))
                yield shape, bits, bases, ids
                if bases.folder is not None:
                    shutil.rmtree(bases.folder, ignore_errors=True)


def record(result: dict, key: str, rows: dict, summary: dict) -> None:
    """Store one measured group and print its summary line (progress on stderr)."""
    result["runs"][key] = rows
    result["summary"][key] = summary
    print(json.dumps({key: summary}), file=sys.stderr, flush=True)
