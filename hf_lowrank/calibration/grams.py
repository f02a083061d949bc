"""What data-aware compression weighs by: Grams of Linear inputs and of the gradients at their outputs.

:class:`GramHooks` registers hooks on a set of Linear-like modules and accumulates, in float32,

- ``G_in = sum_t x_t x_t^T`` ``(in, in)`` over the tokens ``t`` that reach a module (forward pre-hook; for a peft
  LoRA layer this is the input of the base Linear, before LoRA dropout, which peft applies on the LoRA path only);
- ``G_out = sum_t g_t g_t^T`` ``(out, out)`` of the gradient ``g`` at the module's output (a tensor hook on the
  output; the same for base and LoRA paths since they are summed), optionally scaled per micro-batch (the
  contribution to the averaged gradient under DDP, an fp16 loss scale divided out).

A side wider than ``max_dim`` keeps only the diagonal (``(n,)``): memory ``in^2 + out^2`` floats per module is what
the full Grams cost. Padded tokens are left out when the root model is called with an ``attention_mask`` whose shape
matches the activations. Modules fed the same input tensor in one forward (q/k/v, gate/up) compute its Gram once:
with ``share=True`` they also share one storage (calibration), else the product is added to each (states that are
saved with safetensors, which refuses shared tensors).

:func:`calibration_grams` runs a model over calibration batches and returns the input Grams (the SVD-LLM
"truncation-aware whitening" statistics: Wang et al. 2024, arXiv:2403.07378) and, with ``outputs=True``, the
output-gradient Grams of the model's loss on the same batches (the Kronecker-factored Fisher of K-FAC, Martens and
Grosse 2015, arXiv:1503.05671, without a training run). Under
``torch.distributed`` each process passes its own shard of the batches and :func:`reduce_grams` sums the Grams and the
token count over the processes, so every process ends with the Grams of all the batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_gather_objects, all_reduce_sum_, unwrap_wrappers, world_size
from ..ops.gram import contribution_is_finite, gram, gram_accumulate_
from .inputs import (
    _batch_inputs,
    _is_encoder_decoder,
    _language_model_labels,
    as_batches,
    check_model_ready,
    is_causal_lm,
)

__all__ = [
    "CalibrationGrams",
    "GRAM_IN",
    "as_batches",
    "check_model_ready",
    "GRAM_OUT",
    "GramHooks",
    "calibration_grams",
    "gram_memory_bytes",
    "is_causal_lm",
    "reduce_grams",
]

logger = logging.getLogger(__name__)

GRAM_IN = ".gram_in"
GRAM_OUT = ".gram_out"


def gram_memory_bytes(shapes: Mapping[str, tuple[int, int]], *, inputs=True, outputs=False, max_dim=None) -> int:
    """Bytes of float32 Grams for modules of ``{name: (out, in)}`` (no sharing counted)."""

    def side(n: int) -> int:
        return n if max_dim is not None and n > max_dim else n * n

    total = 0
    for out_f, in_f in shapes.values():
        total += (side(in_f) if inputs else 0) + (side(out_f) if outputs else 0)
    return 4 * total


def _tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(tokens, n)`` rows of an activation ``(..., n)``, padded tokens dropped when the mask fits."""
    if mask is not None and t.ndim == mask.ndim + 1 and tuple(t.shape[:-1]) == tuple(mask.shape):
        t = t[mask.to(device=t.device, dtype=torch.bool)]
    return t.reshape(-1, t.shape[-1])


def _row_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 2-D attention mask as the boolean row selector of :func:`_tokens` (``None`` when every token counts)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return None
    keep = mask.to(torch.bool)
    return None if bool(keep.all()) else keep


def _token_count(mask, input_ids) -> int:
    """Tokens of a batch: the 2-D attention mask's ones, else every input id."""
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        return int(mask.sum())
    return int(input_ids.numel()) if isinstance(input_ids, torch.Tensor) else 0


class GramHooks:
    """Accumulate Grams of module inputs (and output gradients) into ``store`` (see the module docstring).

    Args:
        modules: ``{name: module}`` to watch (Linear, bitsandbytes Linear, peft LoRA layer).
        inputs: collect ``G_in`` under key ``name + ".gram_in"``.
        outputs: collect ``G_out`` under ``name + ".gram_out"`` (needs a backward pass).
        store: dict that receives the accumulators (default: a new one, ``self.store``).
        max_dim: a side wider than this keeps the diagonal only.
        device: where accumulators live (default: the module's device; ``"cpu"`` keeps them off the accelerator).
        share: modules fed the same tensor share one input Gram storage.
        active: callable ``(module) -> bool``; hooks only accumulate when it is true (default: always).
        grad_scale: callable returning the factor applied to each output gradient before squaring.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        inputs: bool = True,
        outputs: bool = False,
        store: dict[str, torch.Tensor] | None = None,
        max_dim: int | None = None,
        device: torch.device | str | None = None,
        share: bool = False,
        active: Callable[[nn.Module], bool] | None = None,
        grad_scale: Callable[[], float] | None = None,
    ) -> None:
        if max_dim is not None and (isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1):
            raise ValueError(f"max_dim must be None or an int >= 1 (a wider side keeps its diagonal), got {max_dim!r}.")
        self.modules = dict(modules)
        self.inputs, self.outputs = inputs, outputs
        self.store = store if store is not None else {}
        self.max_dim, self.device, self.share = max_dim, device, share
        self.active = active or (lambda module: True)
        self.grad_scale = grad_scale or (lambda: 1.0)
        self.skipped = 0
        self.tokens = 0
        self._mask: torch.Tensor | None = None
        self._last: tuple | None = None  # (input tensor, its version, key, product) of the last input hook
        self._alias: set[str] = set()
        self._handles: list = []

    # ------------------------------------------------------------------------------------------------ hooks
    def attach(self, root: nn.Module | None = None) -> GramHooks:
        """Register the hooks (``root``: the model called with ``attention_mask``, for masking padded tokens)."""
        self.detach()
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(self._root_hook, with_kwargs=True))
        for name, module in self.modules.items():
            if self.inputs:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            if self.outputs:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def _root_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = _row_mask(mask)  # None when no token is padded: the rows are then a view, not a copy
        self._last = None
        if self.active(module):
            self.tokens += _token_count(mask, kwargs.get("input_ids", args[0] if args else None))

    def _product(self, rows: torch.Tensor, n: int) -> torch.Tensor | None:
        """The Gram (or its diagonal) of ``rows``; ``None`` when it would not be finite."""
        rows = rows.float()
        if self.max_dim is not None and n > self.max_dim:
            prod = rows.square().sum(dim=0)
            return prod if bool(torch.isfinite(prod).all()) else None
        return gram(rows) if contribution_is_finite(rows) else None

    def _store(self, key: str, prod: torch.Tensor | None) -> None:
        """Add a finite product to ``key``'s accumulator (created on first use, on :attr:`device`); ``None`` (a
        product that was not finite) is counted as skipped."""
        if prod is None:
            self.skipped += 1
            return
        acc = self.store.get(key)
        target = self.device if self.device is not None else prod.device
        if acc is None:
            self.store[key] = prod.to(device=target, dtype=torch.float32).clone()
        else:
            acc.add_(prod.to(acc.device))

    def _accumulate(self, key: str, rows: torch.Tensor, n: int) -> None:
        """Add the Gram of ``rows`` to ``key``: in place (``addmm_``) when its full accumulator is on their device."""
        acc = self.store.get(key)
        full = self.max_dim is None or n <= self.max_dim
        if full and acc is not None and acc.device == rows.device and acc.ndim == 2:
            if not gram_accumulate_(acc, rows):
                self.skipped += 1
            return
        self._store(key, self._product(rows, n))

    def _input_hook(self, name: str):
        key = name + GRAM_IN

        def hook(module, args):
            if key in self._alias or not args or not isinstance(args[0], torch.Tensor) or not self.active(module):
                return
            x = args[0]
            last = self._last
            # the same tensor OBJECT as the previous call (q/k/v, gate/up): held by reference, so its memory cannot
            # have been reused by another activation in between
            hit = last is not None and last[0] is x and last[1] == x._version
            if hit:
                if self.share and key not in self.store and last[2] in self.store:
                    self.store[key] = self.store[last[2]]  # one storage for modules fed the same tensor
                    self._alias.add(key)
                    return
                if not self.share:  # the product of the first module fed this tensor (None: it was not finite)
                    self._store(key, last[3])
                    return
            rows = _tokens(x.detach(), self._mask)
            if self.share:  # later modules fed this tensor alias the storage: nothing to keep for them
                self._accumulate(key, rows, x.shape[-1])
                self._last = (x, x._version, key, None)
                return
            prod = self._product(rows, x.shape[-1])  # kept for the next modules fed the same tensor
            self._last = (x, x._version, key, prod)
            self._store(key, prod)

        return hook

    def _output_hook(self, name: str):
        key = name + GRAM_OUT

        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not (isinstance(out, torch.Tensor) and out.requires_grad and self.active(module)):
                return
            mask = self._mask

            def grad_hook(g: torch.Tensor) -> None:
                scale = float(self.grad_scale())
                rows = _tokens(g.detach(), mask)
                self._accumulate(key, rows * scale if scale != 1.0 else rows, g.shape[-1])

            out.register_hook(grad_hook)

        return hook


def reduce_grams(
    store: Mapping[str, torch.Tensor],
    counts: Iterable[int] = (),
    *,
    device: torch.device | str | None = None,
    error: BaseException | None = None,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The Grams and counts of every process summed, on every process (a collective: every process calls it).

    Under ``torch.distributed`` with more than one process, the processes first exchange which Grams they hold
    (their keys, shapes and which keys share one tensor), so that a process that saw no batch, or none that reached
    a module, takes part with zeros; each tensor (a storage shared by several keys once) is then all-reduced (SUM),
    and so are the integer ``counts`` (e.g. the token count). Keys shared on every process that holds them stay
    shared; a key that no process holds stays absent. In a single process ``store`` and ``counts`` come back as they
    are (the tensors are not copied). ``store``'s tensors are summed in place.

    Args:
        store: ``{key: float32 Gram}`` of this process.
        counts: integers to sum over the processes.
        device: where a process that lacks a Gram creates its zeros (default: the CPU).
        error: an exception this process met while collecting: every process raises (this one its own error, the
            others a RuntimeError naming the process) instead of the others waiting for it forever.

    Returns:
        ``(store, counts)`` summed over the processes.
    """
    counts = [int(c) for c in counts]
    if world_size() == 1:
        if error is not None:
            raise error
        return dict(store), counts
    leaders: dict[str, str] = {}
    first: dict[int, str] = {}
    for key, t in store.items():
        leaders[key] = first.setdefault(id(t), key)
    shapes = {key: tuple(t.shape) for key, t in store.items()}
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered = all_gather_objects((message, leaders, shapes, counts))
    failed = [(rank, g[0]) for rank, g in enumerate(gathered) if g[0] is not None]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(f"Gram collection failed on process {failed[0][0]} ({failed[0][1]}); all processes stop.")
    shape_of: dict[str, tuple] = {}
    for _, _, their_shapes, _ in gathered:
        for key, shape in their_shapes.items():
            if shape_of.setdefault(key, shape) != shape:
                raise ValueError(f"The Gram '{key}' has shape {shape} on one process and {shape_of[key]} on another: "
                                 "the processes collected on different models.")
    # keys share one tensor in the result when they do on every process that holds either of them
    groups: dict[tuple, list[str]] = {}
    for key in shape_of:
        groups.setdefault(tuple(g[1].get(key) for g in gathered), []).append(key)
    reduced: dict[str, torch.Tensor] = {}
    tensors: list[torch.Tensor] = []
    used: set[int] = set()
    for members in groups.values():
        t = store.get(members[0])
        if t is None:
            t = torch.zeros(shape_of[members[0]], dtype=torch.float32, device=device)
        elif id(t) in used:  # shared here, not on another process
            t = t.clone()
        used.add(id(t))
        tensors.append(t)
        reduced.update(dict.fromkeys(members, t))
    all_reduce_sum_(tensors)
    return reduced, [sum(g[3][i] for g in gathered) for i in range(len(counts))]


def calibration_grams(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration: Iterable[Mapping[str, torch.Tensor]],
    *,
    outputs: bool = False,
    max_dim: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Grams of ``modules`` over calibration batches, in eval mode, no KV cache, the weights left unchanged.

    With ``outputs=False`` only forward passes run and the input Grams are returned (SVD-LLM whitening). With
    ``outputs=True`` each batch also runs a backward pass of the model's loss (its ``labels``, or for a causal
    language model the next-token loss on ``input_ids``; the mean loss times the batch's number of labels, so batches
    weigh by their size) with every parameter frozen, and the
    Grams of the gradients at the modules' outputs are returned too: the Kronecker-factored (empirical) Fisher of
    the calibration data, no training run needed. No parameter gradient is formed.

    Under ``torch.distributed`` (an initialised process group of more than one process), each process passes its own
    shard of the calibration batches (e.g. ``batches[rank::world_size]``; a process may have none) and every process
    must call this function: the Grams and the token count are all-reduced (:func:`reduce_grams`), so every process
    returns those of all the batches, the same as one process over all of them (the output-gradient Grams are sums
    over tokens, as above, so summing the processes' Grams is exact). A DDP / ``torch.compile`` wrapped model is run
    unwrapped (DDP's own collectives in its forward would wait for processes with fewer batches).

    Args:
        model: the model to run (its ``forward`` takes the batch's keys, e.g. ``input_ids``, ``attention_mask``).
        modules: ``{name: Linear}`` of ``model``.
        calibration: iterable of batches (dicts of tensors with ``input_ids`` and optionally ``attention_mask`` and
            ``labels``; a ``DataLoader`` works); under ``torch.distributed``, this process's shard.
        outputs: also collect the output-gradient Grams (a backward pass per batch).
        max_dim, device: see :class:`GramHooks`.
        progress: show a progress bar.

    Returns:
        ``({name: G_in}, tokens)``, or with ``outputs=True`` ``({name: G_in}, {name: G_out}, tokens)``; modules fed
        the same input share one ``G_in`` tensor. Under ``torch.distributed``: over all processes.

    Raises:
        ValueError: a batch that is not a dict with ``input_ids``, no token at all (over all processes), or
            (``outputs``) no loss to differentiate. Under ``torch.distributed`` an error on one process is raised on
            every process (a RuntimeError on the others).
    """
    model = unwrap_wrappers(model)
    check_model_ready(model)
    calibration = as_batches(calibration)
    hooks = GramHooks(modules, inputs=True, outputs=outputs, max_dim=max_dim, device=device, share=True)
    param = next(model.parameters(), None)
    target = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad] if outputs else []
    handles = []
    if outputs:
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        if embeddings is None:
            raise ValueError(
                f"weighting='kronecker' needs the input embeddings of {type(model).__name__} "
                "(get_input_embeddings()) to start the backward pass; use weighting='whitened'."
            )
        # parameters frozen, the embedding output made a leaf that requires grad: backward reaches every module's
        # output without forming a single weight gradient. Every module that embeds with the input embedding's
        # weight is hooked: an encoder-decoder (T5) calls its encoder's and decoder's embed_tokens, which share the
        # weight of the `shared` module that get_input_embeddings() returns but are other modules.
        weight = getattr(embeddings, "weight", None)
        embedders = [embeddings] + [m for m in model.modules() if m is not embeddings and weight is not None
                                    and isinstance(m, (nn.Embedding, type(embeddings)))
                                    and getattr(m, "weight", None) is weight]  # not a tied lm_head
        for module in embedders:
            handles.append(module.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    model.eval()
    hooks.attach(model)
    error, unused_labels = None, False
    try:
        for p in frozen:
            p.requires_grad_(False)
        for batch in tqdm(calibration, desc="calibration", unit="batch", disable=not progress):
            inputs = _batch_inputs(batch, target, model, labels=outputs)
            if not outputs and not unused_labels and isinstance(batch, Mapping) and "labels" in batch:
                unused_labels = True
                logger.warning(
                    "calibration: the batches carry 'labels', but whitening (weighting='whitened', the "
                    "default for a model that is not a causal language model) weighs by the module inputs only, so "
                    "the labels are not used%s. Pass weighting='kronecker' to compress_model to weigh "
                    "by the gradients of the loss on them.",
                    " (but to build the decoder inputs)" if _is_encoder_decoder(model) else "")
            if not outputs:
                with torch.no_grad():
                    model(**inputs)
                continue
            _language_model_labels(model, inputs)
            with torch.enable_grad():
                loss = model(**inputs).loss
                if loss is None or not loss.requires_grad:
                    given = "labels" in batch
                    raise ValueError(
                        f"{type(model).__name__} returned "
                        + ("a loss that does not depend on its input embeddings" if loss is not None else "no loss")
                        + (" although the batch carries 'labels'" if given else "")
                        + ", so weighting='kronecker' has no gradient to weigh by: "
                        + ("use weighting='whitened'." if given else
                           "pass batches with 'labels' or use weighting='whitened'."))
                counted = int((inputs["labels"] != -100).sum())
                (loss * max(counted, 1)).backward()
    except Exception as exc:  # raised below, on every process under torch.distributed
        error = exc
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        hooks.detach()
        model.train(was_training)
    store, (tokens, skipped) = reduce_grams(hooks.store, (hooks.tokens, hooks.skipped), device=device or target,
                                            error=error)
    if tokens == 0:
        raise ValueError("The calibration data held no token; pass batches with input_ids.")
    if skipped:
        logger.warning("calibration: %d non-finite Gram contributions were skipped.", skipped)
    grams = {name: store[name + GRAM_IN] for name in modules if name + GRAM_IN in store}
    if not outputs:
        return grams, tokens
    grads = {name: store[name + GRAM_OUT] for name in modules if name + GRAM_OUT in store}
    return grams, grads, tokens


class CalibrationGrams(NamedTuple):
    """Calibration statistics collected once, to compress with several times (``compress_model(model, keep,
    calibration=CalibrationGrams(...))`` at several keeps, or from Grams summed over several collections: Grams are
    sums over tokens, so those of two sets of batches add up to those of their union, and so do the token counts).

    Attributes:
        inputs: ``{module name: input Gram}`` (:func:`calibration_grams`' first result).
        outputs: ``{module name: output-gradient Gram}`` (its second result with ``outputs=True``), or ``None`` for
            whitening only.
        tokens: the calibration tokens the Grams were summed over (their last result).
    """

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] | None
    tokens: int
