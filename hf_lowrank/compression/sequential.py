"""Sequential calibration: compress block by block, each block's input Grams measured on the outputs of the blocks
already compressed before it, so that approximation errors do not compound and one block's Grams are in memory at a
time (the practice of GPTQ, Frantar et al. 2022, arXiv:2210.17323, and SVD-LLM, Wang et al. 2024, arXiv:2403.07378).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.grams import (
    GRAM_IN,
    GramHooks,
    _batch_inputs,
    _row_mask,
    _token_count,
    as_batches,
    check_model_ready,
    reduce_grams,
)
from .config import CompressionConfig
from .pipeline import factorize_plan, restore_modules, swap_modules, weighting_sides
from .report import CompressionReport

__all__ = ["BlockStream", "compress_sequential", "split_into_blocks"]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the first block's inputs are captured."""


def split_into_blocks(names: Iterable[str]) -> dict[str, list[str]]:
    """``{block path: [target names]}`` in model order, a block being the path up to the first numeric component.

    ``model.layers.3.mlp.up_proj`` belongs to ``model.layers.3``. Raises ValueError for a name outside any block.
    """
    blocks: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None:
            raise ValueError(
                f"sequential calibration compresses block by block, but '{name}' is not inside a repeated block "
                "(no numeric index in its path). Leave it out of target_modules or use sequential=False."
            )
        blocks.setdefault(".".join(parts[: idx + 1]), []).append(name)
    return blocks


class BlockStream:
    """The calibration activations entering one transformer block at a time (sequential calibration).

    :meth:`capture` runs the model up to the first block and keeps, per batch, the block's positional and keyword
    inputs (hidden states, attention mask, rotary embeddings, ...) and the batch's 2-D token mask. :meth:`run` passes
    every batch through a block and (``advance=True``) replaces the hidden states by its outputs, so the next block
    sees the outputs of the blocks before it as they are now (e.g. already compressed). Under ``torch.distributed``
    each process captures its own shard of the batches (:meth:`capture` is a collective); ``tokens`` counts those of
    all processes.
    """

    def __init__(self) -> None:
        self.items: list[tuple[list, dict, torch.Tensor | None]] = []
        self.tokens = 0

    @torch.no_grad()
    def capture(self, model: nn.Module, first_block: nn.Module, calibration, *, progress: bool = True) -> BlockStream:
        param = next(model.parameters(), None)
        target = param.device if param is not None else torch.device("cpu")

        def grab(module, args, kwargs):
            self.items.append((list(args), dict(kwargs), self._mask))
            raise _StopForward

        check_model_ready(model)
        calibration = as_batches(calibration)
        handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
        tokens, error = 0, None
        try:
            for batch in tqdm(calibration, desc="calibration inputs", unit="batch", disable=not progress):
                inputs = _batch_inputs(batch, target, model)
                mask = inputs.get("attention_mask")
                self._mask = _row_mask(mask)
                tokens += _token_count(mask, inputs["input_ids"])
                try:
                    model(**inputs)
                except _StopForward:
                    pass
        except Exception as exc:  # raised by reduce_grams, on every process under torch.distributed
            error = exc
        finally:
            handle.remove()
        _, (batches, tokens) = reduce_grams({}, (len(self.items), tokens), error=error)
        self.tokens += tokens
        if not batches:
            raise ValueError("The calibration data held no batch; pass batches with input_ids.")
        return self

    @torch.no_grad()
    def run(self, block: nn.Module, *, hooks: GramHooks | None = None, advance: bool = False) -> None:
        """Every batch through ``block`` (``hooks`` see each batch's token mask); ``advance`` keeps the outputs."""
        for i, (args, kwargs, mask) in enumerate(self.items):
            if hooks is not None:
                hooks._mask, hooks._last = mask, None
            out = block(*args, **kwargs)
            if advance:
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                self.items[i] = ([hidden, *args[1:]], kwargs, mask)



def compress_sequential(model, targets, plan, calibration, report: CompressionReport, config: CompressionConfig,
                        progress: bool, *, row_weights=None, col_weights=None, grams_out=None):
    """Factorize ``plan`` block by block (see the module doc); returns ``(sides, calibration tokens)``. Explicit
    diagonal weights and output Grams, when given, weigh their sides as usual. On any failure every module already
    replaced is put back."""
    blocks = split_into_blocks(targets)
    parents = {name.rpartition(".")[0] for name in blocks}
    if len(parents) != 1:
        raise ValueError(
            f"sequential calibration needs the targets in ONE list of repeated blocks; they are in {sorted(parents)}. "
            "Restrict target_modules to one stack (e.g. the decoder) or use sequential=False."
        )
    parent_name = parents.pop()
    stack = model.get_submodule(parent_name)
    indices = sorted(int(name.rpartition(".")[2]) for name in blocks)
    stream = BlockStream().capture(model, stack[indices[0]], calibration, progress=progress)
    originals: dict[str, nn.Module] = {}
    sides: dict = {}
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(indices[0], indices[-1] + 1), desc="sequential blocks", disable=not progress,
                          unit="block"):
            block = stack[index]
            names = blocks.get(f"{parent_name}.{index}", [])
            if names:
                sub = {n: targets[n] for n in names}
                hooks = GramHooks(sub, share=True, max_dim=config.max_gram_dim).attach()
                error = None
                try:
                    stream.run(block, hooks=hooks)
                except Exception as exc:  # raised by reduce_grams, on every process under torch.distributed
                    error = exc
                finally:
                    hooks.detach()
                param = next(block.parameters(), None)
                store, _ = reduce_grams(hooks.store, device=param.device if param is not None else None, error=error)
                grams = {n: store[n + GRAM_IN] for n in names if n + GRAM_IN in store}
                block_sides = weighting_sides(sub, _only(row_weights, names), _only(col_weights, names), grams,
                                              _only(grams_out, names), config.damping,
                                              exponent=config.fisher_exponent, eps=config.fisher_eps,
                                              tokens=stream.tokens)
                sides.update(block_sides)
                replacements = factorize_plan(sub, {n: plan[n] for n in names}, block_sides, report, "uniform",
                                              config, progress=False)
                originals.update(swap_modules(model, replacements))
                del grams, store, block_sides, hooks
            stream.run(block, advance=True)
    except BaseException:
        restore_modules(model, originals)  # all or nothing
        raise
    finally:
        model.train(was_training)
    return sides, stream.tokens


def _only(weights, names):
    return {n: weights[n] for n in names if n in weights} if weights else None
