"""Collecting empirical Fisher information during training: per micro-batch squared gradients.

:class:`FisherCollector` registers gradient hooks on a model and accumulates ``grad**2`` of

- ``source="lora"``: the LoRA factors of every adapted Linear, ``F_A = sum grad(A)**2`` ``(r, in)`` and
  ``F_B = sum grad(B)**2`` ``(out, r)`` (the paper's FisherLoRA: memory of the order of the adapter);
- ``source="full"``: the dense weight of every target Linear, ``F_W = sum grad(W)**2`` ``(out, in)`` (the FWSVD
  baseline; a frozen weight, e.g. the base weight under a LoRA adapter, gets a gradient for the Fisher only: it is
  squared and dropped, so the optimizer, gradient clipping and the adapter training are unaffected).

Why tensor hooks: a hook registered with ``Tensor.register_hook`` on a parameter fires once per backward pass with
THAT backward's gradient, before it is added into ``param.grad``. So with gradient accumulation each micro-batch is
squared on its own (the empirical Fisher), never the sum of the micro-batches, and gradient clipping (which the
Trainer applies to the accumulated ``.grad`` after the last micro-batch) never touches what is squared.

Accumulators are float32 on the parameter's device. A gradient tensor of one micro-batch that contains inf/NaN (or
whose squares overflow float32) is dropped for that parameter and counted in ``skipped``. On an accelerator the hook
never synchronises with the host (the check is a masked add); on the CPU it checks on the host and adds in place
(``addcmul_``), allocating no gradient-sized temporary. The state (:class:`FisherState`) saves to and loads from a safetensors file, keyed by
module names of the base transformers model (``model.layers.0.mlp.up_proj``), so it applies to the merged model,
to a model reloaded with ``AutoModelForCausalLM`` and to the ``hf-lowrank compress --fisher`` command.

Scale: the accumulated values are sums over micro-batches of squared gradients of the loss as it is
back-propagated (the Trainer divides it by the number of accumulation steps or tokens). Any overall factor cancels
in the Fisher weights (:func:`hf_lowrank.ops.fisher.fisher_weights` normalises by the mean). An fp16 loss scale is
divided out when the collector knows the ``GradScaler`` (``LowRankTrainer`` sets it).

Distributed training (DDP): each process accumulates the gradients of its own micro-batches (the hooks fire before
DDP's all-reduce). What is squared is each micro-batch's contribution to the gradient the optimizer applies: DDP
averages the processes' gradients, so a process's local gradient is divided by the world size before squaring.
With that, the Fisher does not depend on how the micro-batches of a global batch are spread over processes: 2
processes with 1 micro-batch each give the Fisher of 1 process with 2 accumulation steps over the same batches (the
Trainer's loss normalisation, by accumulation steps or by tokens across devices, agrees in both). The world size is
read when the hooks are attached (``torch.distributed``, initialised by ``accelerate launch`` / ``torchrun`` before
the Trainer is built). :meth:`FisherCollector.reduced_state` sums the processes' states (a collective call: every
process must call it) and is what compression uses.

The state and its file live in :mod:`.state`, model walking (unwrapping, LoRA layers, fingerprints) in :mod:`.walk`;
the names they export are re-exported here.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..calibration.grams import GRAM_IN, GRAM_OUT, GramHooks
from ..distributed import all_reduce_sum_, is_fsdp_model, world_size
from .state import _KINDS, FISHER_STATE_NAME, SOURCES, FisherState, FisherStateError, fisher_state_filename
from .walk import (
    _full_targets,
    lora_linear_modules,
    model_fingerprint,
    unwrap_model,
    unwrap_wrappers,
)

__all__ = [
    "FISHER_STATE_NAME",
    "FisherCollector",
    "FisherState",
    "FisherStateError",
    "fisher_state_filename",
    "lora_linear_modules",
    "model_fingerprint",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


def _batch_size(args: tuple, kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_features", "labels"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0


# -------------------------------------------------------------------------------------------------- collector
def hidden_size(model: nn.Module) -> int:
    """The residual-stream width of a (peft-wrapped) transformers model: ``hidden_size``, ``d_model`` or ``n_embd``."""
    config = getattr(unwrap_wrappers(model), "config", None)  # a PeftModel forwards .config to its base model
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    raise ValueError(
        f"kronecker_max_dim='hidden_size' needs the model's hidden size, and {type(model).__name__} has no config with "
        "hidden_size, d_model or n_embd: pass kronecker_max_dim as an int (or None for full Grams)."
    )


class FisherCollector:
    """Accumulates per micro-batch squared gradients of a model's LoRA factors (or dense weights).

    Works in any training loop: ``collector.attach(model)`` before training, ``collector.detach()`` after;
    ``collector.state`` holds the result. ``FisherCollectorCallback`` drives it from a ``transformers.Trainer``.

    Args:
        source: ``"lora"`` or ``"full"`` (see the module docstring).
        adapter_name: LoRA adapter to collect (default: the active one).
        target_modules: for ``"full"`` on a model without LoRA layers: which Linears (see
            :func:`hf_lowrank.find_target_linears`; default every Linear in the transformer blocks).
    """

    def __init__(
        self,
        source: str = "lora",
        *,
        adapter_name: str | None = None,
        target_modules=None,
        kronecker: bool | None = None,
        gram_max_dim: int | None = None,
        gram_device: str | None = None,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(
                f"FisherCollector source must be 'lora' (LoRA factor gradients) or 'full' (dense weight gradients), "
                f"got {source!r}. For plain SVD ('none') no Fisher is collected."
            )
        self.source = source
        self.adapter_name = adapter_name
        self.target_modules = target_modules
        self.state = FisherState(source=source, adapter_name=adapter_name)
        # Kronecker-factored Fisher: Grams of each adapted layer's input and output gradient (None: from the config)
        self.kronecker, self.gram_max_dim, self.gram_device = kronecker, gram_max_dim, gram_device
        self._grams: GramHooks | None = None
        self.grad_scaler = None  # a torch GradScaler whose scale is divided out (set by LowRankTrainer)
        # None: sync-free masked accumulation on accelerators, a host-side finiteness check on the CPU (no
        # temporaries). True / False force one of the two paths.
        self.sync_free: bool | None = None
        self._inv_scale: float | None = None
        self._world_size = 1  # DDP: local gradients are divided by it (see the module docstring)
        self._skip: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._unfrozen: list[nn.Parameter] = []
        self._model: nn.Module | None = None
        self._fingerprint: dict | None = None  # of the model attached last ("lora" source)

    # ------------------------------------------------------------------------------------------- hooks
    @property
    def attached(self) -> bool:
        return self._model is not None

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        if self.source == "lora":
            modules, adapter = lora_linear_modules(model, self.adapter_name)
            if not modules:
                raise ValueError(
                    "FisherCollector(source='lora') found no LoRA-adapted Linear layer in the model"
                    + (f" for adapter '{self.adapter_name}'" if self.adapter_name else "")
                    + ". Wrap the model with get_peft_model(model, FisherLoRAConfig(target_modules=...)) first, or "
                    "use source='full' for a model trained without adapters."
                )
            self.adapter_name = adapter
            self.state.adapter_name = adapter
            self._fingerprint = model_fingerprint(model, modules, adapter)
            if self.state.fingerprint:
                self.state.check_fingerprint(self._fingerprint, what="the model the collector is attached to")
            else:
                self.state.fingerprint = self._fingerprint
            params = {}
            for name, m in modules.items():
                params[name + _KINDS["A"]] = m.lora_A[adapter].weight
                params[name + _KINDS["B"]] = m.lora_B[adapter].weight
            return params
        targets = _full_targets(model, self.target_modules)
        params = {}
        for name, m in targets.items():
            w = m.weight
            if not w.is_floating_point() or getattr(w, "quant_state", None) is not None:
                raise ValueError(
                    f"Full-gradient Fisher needs a floating-point weight, but '{name}' is quantized ({w.dtype}). "
                    "With a 4/8-bit base use fisher_source='lora' (FisherLoRA exists for this case)."
                )
            params[name + _KINDS["W"]] = w
        return params

    def attach(self, model: nn.Module) -> FisherCollector:
        """Register the gradient hooks (idempotent for the same model) and create missing accumulators.

        Raises:
            ValueError: no LoRA layer (``"lora"``), no target Linear (``"full"``), or a loaded state whose shapes
                do not fit this model.
        """
        if self._model is model:
            return self
        if is_fsdp_model(model):
            raise NotImplementedError(
                "Fisher collection under FSDP is not supported: FSDP reduce-scatters each gradient across processes "
                "before a parameter hook sees it, so the per-micro-batch squares that make the empirical Fisher are "
                "lost. Train FisherLoRA with DDP (the adapters are small; `accelerate launch` without FSDP), or "
                "collect the Fisher in a separate DDP or single-process pass with FisherCollector."
            )
        if self._model is not None:
            self.detach()
        params = self._params(model)
        self._world_size = world_size()
        for key, p in params.items():
            acc = self.state.tensors.get(key)
            if acc is not None and tuple(acc.shape) != tuple(p.shape):
                raise FisherStateError(
                    f"The Fisher state holds '{key}' of shape {tuple(acc.shape)} but the model's parameter is "
                    f"{tuple(p.shape)}: the state was collected on a model of another shape. Reset it "
                    "(collector.reset()) or load the state of this model."
                )
            if acc is None:
                acc = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            self.state.tensors[key] = acc.to(device=p.device, dtype=torch.float32)
            self._skip[key] = torch.zeros((), dtype=torch.int64, device=p.device)
            if p.requires_grad:
                self._handles.append(p.register_hook(self._tensor_hook(key)))
            else:
                # Frozen dense weight ("full" Fisher under an adapter): compute its gradient, square it, drop it.
                p.requires_grad_(True)
                self._unfrozen.append(p)
                self._handles.append(p.register_post_accumulate_grad_hook(self._drop_hook(key)))
        self._handles.append(model.register_forward_pre_hook(self._count_hook, with_kwargs=True))
        self._attach_grams(model)
        self._model = model
        return self

    def _kronecker_settings(self, model: nn.Module) -> tuple[bool, int | None, str | None]:
        if self.kronecker is not None or self.source != "lora":
            return bool(self.kronecker) and self.source == "lora", self.gram_max_dim, self.gram_device
        configs = getattr(unwrap_wrappers(model), "peft_config", None) or {}
        config = configs.get(self.adapter_name) if isinstance(configs, dict) else None
        if getattr(config, "fisher_weighting", None) == "kronecker":
            max_dim = getattr(config, "kronecker_max_dim", None)
            if max_dim == "hidden_size":
                max_dim = hidden_size(model)
            return True, max_dim, getattr(config, "kronecker_device", None)
        return False, None, None

    def _attach_grams(self, model: nn.Module) -> None:
        """Kronecker-factored Fisher: Gram accumulators (created now, so a resumed state restores into them)."""
        enabled, max_dim, device = self._kronecker_settings(model)
        if not enabled:
            return
        modules, _ = lora_linear_modules(model, self.adapter_name)
        for name, m in modules.items():
            dev = device or m.lora_A[self.adapter_name].weight.device
            for suffix, n in ((GRAM_IN, m.in_features), (GRAM_OUT, m.out_features)):
                key, shape = name + suffix, ((n,) if max_dim is not None and n > max_dim else (n, n))
                acc = self.state.tensors.get(key)
                if acc is not None and tuple(acc.shape) != shape:
                    raise FisherStateError(
                        f"The Fisher state holds '{key}' of shape {tuple(acc.shape)} but this model and "
                        f"kronecker_max_dim need {shape}. Reset it (collector.reset()) or load the state of this model."
                    )
                self.state.tensors[key] = (acc if acc is not None else torch.zeros(shape)).to(dev, torch.float32)

        def scale() -> float:
            return (self._inv_scale if self._inv_scale is not None else 1.0) / self._world_size

        self._grams = GramHooks(
            modules, inputs=True, outputs=True, store=self.state.tensors, max_dim=max_dim, device=device,
            active=lambda module: torch.is_grad_enabled() and module.training, grad_scale=scale,
        ).attach(model)

    def detach(self) -> None:
        """Remove the hooks (the accumulated state stays) and re-freeze weights unfrozen for ``"full"``."""
        self._commit_skipped()
        if self._grams is not None:
            self._grams.detach()
            self._grams = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._unfrozen:
            p.requires_grad_(False)
            p.grad = None
        self._unfrozen.clear()
        self._model = None

    def _tensor_hook(self, key: str):
        def hook(grad: torch.Tensor) -> None:
            self._accumulate(key, grad)

        return hook

    def _drop_hook(self, key: str):
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                self._accumulate(key, param.grad)
                param.grad = None

        return hook

    def _count_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and module.training:
            self.state.micro_batches += 1
            self.state.samples += _batch_size(args, kwargs)

    @torch.no_grad()
    def _accumulate(self, key: str, grad: torch.Tensor) -> None:
        g = grad.detach()
        scale = (self._inv_scale if self._inv_scale is not None else 1.0) / self._world_size
        acc = self.state.tensors[key]
        if not (self.sync_free if self.sync_free is not None else g.device.type != "cpu"):
            # Host: checking finiteness costs no synchronisation, and no gradient-sized temporary is allocated
            # (temporaries interleaved with the backward's own buffers fragment the CPU heap).
            if bool(torch.isfinite(torch.linalg.vector_norm(g))):
                acc.addcmul_(g, g, value=scale * scale)
            else:
                self._skip[key] += 1
            return
        # Accelerator: no host synchronisation per hook; a non-finite (or overflowing) square is masked to zero.
        sq = (g.float() * scale).square() if scale != 1.0 else g.float().square()
        ok = torch.isfinite(sq.sum())
        acc.add_(sq.masked_fill_(~ok, 0.0).to(acc.device))
        skip = self._skip[key]
        skip.add_((~ok).to(device=skip.device, dtype=skip.dtype))

    def update_loss_scale(self) -> None:
        """Read the current loss scale of ``grad_scaler`` (call once per optimizer step, before backward)."""
        scaler = self.grad_scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            scale = float(scaler.get_scale())
            self._inv_scale = 1.0 / scale if scale > 0 else None
        else:
            self._inv_scale = None

    # ------------------------------------------------------------------------------------------- state
    def _commit_skipped(self) -> None:
        if self._grams is not None and self._grams.skipped:
            self.state.skipped += self._grams.skipped
            self._grams.skipped = 0
        if self._skip:
            total = sum(int(t.item()) for t in self._skip.values())
            self.state.skipped += total
            for t in self._skip.values():
                t.zero_()

    def snapshot(self) -> FisherState:
        """The live state with the skip counters brought up to date (tensors are not copied)."""
        self._commit_skipped()
        return self.state

    def reset(self) -> None:
        """Zero the accumulators and counters (keeps the hooks)."""
        for t in self.state.tensors.values():
            t.zero_()
        for t in self._skip.values():
            t.zero_()
        self.state.micro_batches = self.state.samples = self.state.skipped = 0
        self.state.global_step = 0
        if self._model is None:
            self.state.tensors.clear()

    def load_state(self, state: FisherState | str | os.PathLike) -> None:
        """Replace the accumulated state (e.g. from a checkpoint on resume); keeps the hooks.

        Raises:
            FisherStateError: the state's source or shapes do not match this collector's model.
        """
        if not isinstance(state, FisherState):
            state = FisherState.load(state)
        if state.source != self.source:
            raise FisherStateError(
                f"Cannot load a '{state.source}' Fisher state into a '{self.source}' collector; use a collector "
                f"with source='{state.source}'."
            )
        state.check_fingerprint(self._fingerprint, what="the model the collector is attached to")
        for t in self._skip.values():
            t.zero_()
        if self._model is not None:
            missing = [k for k in self.state.tensors if k not in state.tensors]
            if missing:
                raise FisherStateError(
                    f"The Fisher state lacks {len(missing)} tensors this model needs (e.g. '{missing[0]}'): it "
                    "belongs to another model or other target modules."
                )
            for key, acc in self.state.tensors.items():
                new = state.tensors[key]
                if tuple(new.shape) != tuple(acc.shape):
                    raise FisherStateError(
                        f"Fisher state tensor '{key}' has shape {tuple(new.shape)}, the model needs "
                        f"{tuple(acc.shape)}: it was collected on a model of another shape."
                    )
                acc.copy_(new.to(acc.device))
            extra = [k for k in state.tensors if k not in self.state.tensors]
            if extra:
                logger.warning("Fisher state has %d tensors this model does not use (e.g. %s).", len(extra), extra[0])
        else:
            self.state.tensors = {k: v.detach().clone().float() for k, v in state.tensors.items()}
        self.state.micro_batches = state.micro_batches
        self.state.samples = state.samples
        self.state.skipped = state.skipped
        self.state.global_step = state.global_step
        if state.adapter_name:
            self.state.adapter_name = state.adapter_name
        if state.fingerprint or self._fingerprint is None:
            self.state.fingerprint = dict(state.fingerprint) if state.fingerprint else None

    def save(self, path: str | os.PathLike, *, global_step: int | None = None) -> None:
        """Write the state to ``path`` (a safetensors file), atomically."""
        state = self.snapshot()
        if global_step is not None:
            state.global_step = int(global_step)
        state.save(path)

    def reduced_state(self) -> FisherState:
        """The state summed over all processes (a collective: every process must call it); a copy.

        Single process: a copy of the local state. This is the one place where distributed Fisher is combined.
        """
        state = self.snapshot().clone()
        if world_size() == 1:
            return state
        all_reduce_sum_(state.tensors[key] for key in sorted(state.tensors))
        device = next(iter(state.tensors.values())).device if state.tensors else torch.device("cpu")
        counts = torch.tensor([state.micro_batches, state.samples, state.skipped], dtype=torch.int64, device=device)
        all_reduce_sum_([counts])
        state.micro_batches, state.samples, state.skipped = (int(x) for x in counts.tolist())
        return state
