"""Multi-process glue: which process writes, waiting for it, and gathering FSDP-sharded weights for compression.

DDP (``accelerate launch`` / ``torchrun`` with the Trainer) keeps a full replica on every process, so compression
works on the main process's replica; only the Fisher has to be combined (``FisherCollector.reduced_state``).
FSDP shards the weights, so compressing needs them gathered first: :func:`gather_full_model` is a collective that
gives the main process an unsharded CPU copy of a transformers model (FSDP2 ``fully_shard`` or FSDP1
``FullyShardedDataParallel``) and the other processes ``None``.

Calibration (``calibration_grams``, ``compress_model(..., calibration=...)``) runs on every process over its own
shard of the batches; the Grams are summed with :func:`all_reduce_sum_` after an exchange of which Grams each process
holds (:func:`all_gather_objects`), so that a process with no batch still takes part.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ._compat import model_from_config, tied_weights_keys

__all__ = [
    "all_gather_objects",
    "all_reduce_sum_",
    "barrier",
    "gather_full_model",
    "is_fsdp_model",
    "is_main_process",
    "unwrap_wrappers",
    "world_size",
]

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Number of processes (1 without an initialised process group)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_main_process() -> bool:
    """True on global rank 0 (and without a process group)."""
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size() > 1:
        _dist().barrier()


def all_gather_objects(obj) -> list:
    """``[obj of process 0, obj of process 1, ...]`` for a small picklable ``obj`` (a collective: every process calls
    it); ``[obj]`` in a single process."""
    if world_size() == 1:
        return [obj]
    dist = _dist()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place (no-op in a single process).

    A collective: every process passes tensors of the same shapes and dtypes in the same order. A tensor object
    passed more than once (one storage shared by several entries) is summed once. With a pure NCCL process group a
    CPU tensor is summed through a copy on the current CUDA device.
    """
    if world_size() == 1:
        return
    dist = _dist()
    nccl = str(dist.get_backend()) == "nccl"
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if nccl and not t.is_cuda:
            buf = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def unwrap_wrappers(model: nn.Module) -> nn.Module:
    """The model under DDP / DataParallel / DeepSpeed and ``torch.compile`` wrappers (a ``PeftModel`` stays one).

    The one unwrap rule of the package: ``unwrap_model``, the compress-on-save path and calibration start from it.
    """
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _fsdp_classes() -> tuple[type | None, type | None]:
    """``(FSDPModule, FullyShardedDataParallel)``: the FSDP2 mix-in and the FSDP1 wrapper (None where torch lacks it;
    ``FSDPModule`` is public in ``torch.distributed.fsdp`` from torch 2.6)."""
    import torch.distributed.fsdp as fsdp

    return getattr(fsdp, "FSDPModule", None), getattr(fsdp, "FullyShardedDataParallel", None)


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is sharded by FSDP (FSDP2 ``fully_shard`` or FSDP1)."""
    classes = tuple(c for c in _fsdp_classes() if c is not None)
    return bool(classes) and any(isinstance(m, classes) for m in model.modules())


def _original_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 swaps in a subclass ``FSDP<Name>(FSDPModule, <Name>)``; FSDP1 wraps."""
    fsdp2, fsdp1 = _fsdp_classes()
    while fsdp1 is not None and isinstance(model, fsdp1):
        model = model.module
    cls = type(model)
    while fsdp2 is not None and issubclass(cls, fsdp2):
        cls = next(b for b in cls.__bases__ if not issubclass(b, fsdp2))
    return cls


def gather_full_model(model: nn.Module) -> nn.Module | None:
    """An unsharded CPU copy of an FSDP-sharded transformers model on the main process; ``None`` on the others.

    A collective: every process must call it (at the same point). The full state dict is gathered to the main
    process on the CPU (``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``), so the accelerators never hold the whole model; the copy is built
    from ``model.config`` on the meta device and takes the gathered tensors. A model that is not sharded is
    returned as it is, on every process.

    Raises:
        TypeError: the sharded model is not a transformers ``PreTrainedModel`` (nothing to rebuild it from), e.g. a
            ``PeftModel`` under FSDP: merge or save the adapter with the Trainer, or train with DDP.
    """
    if not is_fsdp_model(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import PreTrainedModel

    cls = _original_class(model)
    config = getattr(model, "config", None)
    if config is None or not issubclass(cls, PreTrainedModel):
        raise TypeError(
            f"gather_full_model rebuilds transformers models from their config, but the FSDP-sharded model is a "
            f"{cls.__name__}. Compress a PreTrainedModel (full fine-tuning), or train adapters with DDP, where "
            "each process holds the whole model."
        )
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process():
        return None
    dtype = next(iter(state.values())).dtype if state else torch.float32
    with torch.device("meta"):
        copy = model_from_config(cls, config, dtype=dtype)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    tied = tied_weights_keys(copy)
    really_missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if really_missing or unexpected:
        raise RuntimeError(
            f"The gathered state dict does not fit {cls.__name__}: missing {really_missing[:3]}, unexpected "
            f"{unexpected[:3]}."
        )
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the state dict; FSDP does not shard buffers, so each
    # process has them whole: take the main process's.
    sources = {_strip_fsdp_prefix(n): b for n, b in model.named_buffers()}
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta:
            if name not in sources:
                raise RuntimeError(f"buffer '{name}' was not restored; cannot rebuild the model for compression.")
            owner_name, _, attr = name.rpartition(".")
            owner = copy.get_submodule(owner_name) if owner_name else copy
            owner._buffers[attr] = sources[name].detach().to("cpu").clone()
    return copy.train(model.training)


def _strip_fsdp_prefix(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"))
