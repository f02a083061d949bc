"""SPSFT tuner layer: a frozen Linear plus trainable rows ``W_f (r, in)`` at fixed row indices.

``y = base(x); y[..., idx] += x @ W_f.T``. The addition runs in :class:`SelectedRowsAdd`, a custom autograd function
whose backward keeps only ``x`` (plus the parameter ``W_f`` and the index buffer, which cost nothing extra): no
``x @ W_f.T`` activation, no dropout copy, no ``(out, in)`` gradient. LoRA, for comparison, keeps ``A x`` for the
gradient of ``B`` and, with dropout, a dropped-out copy of ``x`` and its mask in every adapted layer.

A GPT-2-style ``transformers.pytorch_utils.Conv1D`` (weight stored ``(in, out)``, ``y = x @ W + b``) is the Linear of
weight ``W.T``: its rows are its output units, scored on the ``(out, in)`` view
(:func:`hf_lowrank.modules.dense_weight`), and a merge adds ``W_f`` to the COLUMNS ``idx`` of the stored weight, so a
merged GPT-2 keeps the stock Conv1D layout.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn

from hf_lowrank.ops.importance import l2_importance, top_rows

from ..._compat import BufferDict, get_in_out_features, move_adapter_to_device_of_base_layer
from ...errors import QuantizedMergeError
from ...modules import dense_weight, is_conv1d
from .config import SPSFTConfig

__all__ = ["Linear", "QuantizedMergeError", "SPSFTLayer", "SelectedRowsAdd", "selected_rows_add"]


class SelectedRowsAdd(torch.autograd.Function):
    """``y[..., idx] += x @ W_f.T`` in place, saving only ``x`` for backward.

    Shapes: ``y (..., out)``, ``x (..., in)``, ``W_f (r, in)``, ``idx (r,)`` int64.
    Backward: ``g = grad_y[..., idx]`` (``(..., r)``, transient), ``grad_x = g @ W_f``, ``grad_W_f = g^T x``
    (``(r, in)``), ``grad_y`` passes through unchanged.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        delta = x.to(weight.dtype) @ weight.t()
        y.index_add_(-1, idx, delta.to(y.dtype))
        ctx.mark_dirty(y)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            ctx.save_for_backward(x, weight, idx)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, idx = ctx.saved_tensors
        g = grad_y.index_select(-1, idx).to(weight.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_x = (g @ weight).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_y, grad_x, grad_w, None


def selected_rows_add(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Functional form of :class:`SelectedRowsAdd`: returns ``y`` with ``x @ weight.T`` added to columns ``idx``.

    ``y`` is modified in place (it must be a fresh tensor nobody saved for backward, e.g. a Linear's output).

    Args:
        y: ``(..., out)`` base output.
        x: ``(..., in)`` layer input.
        weight: ``(r, in)`` trainable rows ``W_f``.
        idx: ``(r,)`` int64 row indices into ``out``.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or y.requires_grad):
        return SelectedRowsAdd.apply(y, x, weight, idx)
    delta = x.to(weight.dtype) @ weight.t()
    return y.index_add_(-1, idx, delta.to(y.dtype))


class SPSFTLayer(BaseTunerLayer):
    """Mixin holding, per adapter, the trainable rows ``spsft_weight[name] (r, in)`` and their row indices
    ``spsft_indices[name] (r,)`` (int64, persistent buffer, saved with the adapter)."""

    adapter_layer_names = ("spsft_weight",)
    other_param_names = ("spsft_indices",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.spsft_weight = nn.ParameterDict({})
        self.spsft_indices = BufferDict({}, persistent=True)
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self._disable_adapters = False
        self.merged_adapters = []
        # Set by hf_lowrank.spsft_importance while it scores rows: called with (layer, x, base_output, output).
        self._spsft_recorder: Callable[..., None] | None = None
        in_features, out_features = get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(
                f"SPSFT supports torch.nn.Linear layers (optionally bitsandbytes-quantized) and GPT-2-style Conv1D "
                f"layers, got {type(self.get_base_layer()).__name__}; remove it from target_modules."
            )
        #: the base layer is a Conv1D: its stored weight is (in, out), the selected rows are its columns
        self._conv1d = is_conv1d(self.get_base_layer())
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    # ------------------------------------------------------------------ creation
    def base_weight_for_scoring(self) -> torch.Tensor | None:
        """The base weight ``(out, in)`` as a float tensor (dequantized when quantized), or None on ``meta``."""
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        if weight is None or weight.device.type == "meta":
            return None
        return dense_weight(base).float()

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        config: SPSFTConfig,
        *,
        module_name: str = "",
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add adapter ``adapter_name`` with ``r`` rows chosen by l2 norm (the data-driven importances re-select them
        later with :func:`hf_lowrank.spsft_importance`)."""
        where = f" in module '{module_name}'" if module_name else ""
        if r < 1:
            raise ValueError(f"SPSFT needs r >= 1 rows{where}, got r={r}.")
        if r > self.out_features:
            raise ValueError(
                f"SPSFT r={r} exceeds out_features={self.out_features}{where}; pass r <= {self.out_features}, "
                "use ratio=... (a fraction of each module's rows), or exclude the module with exclude_modules."
            )
        weight = self.base_weight_for_scoring()
        if weight is not None:
            idx = top_rows(l2_importance(weight), r)
        else:  # meta device (low_cpu_mem_usage loading): the checkpoint provides the indices
            idx = torch.arange(r, dtype=torch.int64)
        base_device = next((p.device for p in self.get_base_layer().parameters()), torch.device("cpu"))
        self.spsft_indices[adapter_name] = idx.to(base_device if base_device.type != "meta" else "cpu")
        w_f = torch.zeros(r, self.in_features)
        if not config.init_weights:
            w_f.normal_(0.0, 0.02)
        self.spsft_weight[adapter_name] = nn.Parameter(w_f)
        move_adapter_to_device_of_base_layer(self, adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_rows(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Replace the row indices of ``adapter_name`` (same count ``r``), e.g. after data-driven scoring.

        Refuses once ``W_f`` is non-zero: trained rows belong to the indices they were trained for.
        """
        if adapter_name not in self.spsft_indices:
            raise KeyError(f"adapter '{adapter_name}' not found in this SPSFT layer")
        old = self.spsft_indices[adapter_name]
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if indices.shape != old.shape:
            raise ValueError(f"new indices must have shape {tuple(old.shape)}, got {tuple(indices.shape)}.")
        if bool((self.spsft_weight[adapter_name] != 0).any()):
            raise ValueError(
                "SPSFT rows can only be re-selected while W_f is still zero (before training); build a fresh adapter "
                "with get_peft_model and score it before the first optimizer step."
            )
        if self.merged:
            raise ValueError("unmerge the adapter before re-selecting SPSFT rows.")
        old.copy_(indices.to(old.device))

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense update ``M @ W_f`` of ``adapter`` in the base layer's layout, as peft's LoRA gives it: ``(out, in)``,
        or ``(in, out)`` for a ``Conv1D`` (so that ``base.weight + delta`` is the merged weight)."""
        w_f = self.spsft_weight[adapter]
        idx = self.spsft_indices[adapter].to(w_f.device)
        delta = torch.zeros(self.out_features, self.in_features, device=w_f.device, dtype=w_f.dtype)
        delta.index_add_(0, idx, w_f.detach())
        return delta.T if self._conv1d else delta

    def _add_rows(self, weight: torch.Tensor, idx: torch.Tensor, w_f: torch.Tensor, alpha: float = 1.0) -> None:
        """``W[idx] += alpha * W_f`` in place on a weight in the base layer's layout (for a ``Conv1D``, whose weight
        is ``(in, out)``: on its columns ``idx``)."""
        w_f = w_f.to(weight.device, weight.dtype)
        if self._conv1d:
            weight.index_add_(1, idx, w_f.T, alpha=alpha)
        else:
            weight.index_add_(0, idx, w_f, alpha=alpha)

    def _refuse_quantized_merge(self) -> None:
        if self.quantization_backend is not None:
            raise QuantizedMergeError(
                f"SPSFT will not merge into a {self.quantization_backend.backend_name} weight in place: re-quantizing "
                "would round the fine-tuned rows away. Use `model.merge_and_unload(dequantize=True)` to get dense "
                "Linear layers holding dequantize(W) + M @ W_f, or keep the adapter unmerged."
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' rows into the base weight: ``W[idx] += W_f``."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._refuse_quantized_merge()
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.spsft_weight:
                continue
            w_f = self.spsft_weight[name].detach()
            idx = self.spsft_indices[name].to(base.weight.device)
            if safe_merge:
                stored = base.weight.data.T if self._conv1d else base.weight.data  # (out, in)
                rows = stored.index_select(0, idx) + w_f.to(base.weight.device, base.weight.dtype)
                if not bool(torch.isfinite(rows).all()):
                    raise ValueError(f"NaNs or infs in the merged weights: adapter '{name}' seems broken.")
            self._add_rows(base.weight.data, idx, w_f)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters' rows again: ``W[idx] -= W_f``."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.spsft_weight:
                continue
            w_f = self.spsft_weight[name].detach()
            idx = self.spsft_indices[name].to(base.weight.device)
            self._add_rows(base.weight.data, idx, w_f, alpha=-1)

    def dequantized_merged_linear(self, adapter_names: list[str] | None = None) -> nn.Module:
        """A new dense ``nn.Linear`` with ``dequantize(W) + sum M @ W_f`` over ``adapter_names`` (default: active).

        The base layer is untouched. Works for quantized and dense bases alike; a ``Conv1D`` base gives a ``Conv1D``
        (weight ``(in, out)``), the layout stock transformers loads.
        """
        names = [n for n in (adapter_names or self.active_adapters) if n in self.spsft_weight]
        base = self.get_base_layer()
        weight = self.base_weight_for_scoring()
        if weight is None:
            raise ValueError("cannot merge an SPSFT layer whose base weight is on the meta device; load it first.")
        if self.merged:
            raise ValueError("unmerge the adapter before building a dequantized merged copy.")
        dtype = self.spsft_weight[names[0]].dtype if names else weight.dtype
        weight = weight.to(dtype, copy=True)  # a dense base's weight is read in place: leave it untouched
        for name in names:
            weight.index_add_(0, self.spsft_indices[name].to(weight.device), self.spsft_weight[name].detach())
        bias = getattr(base, "bias", None)
        if self._conv1d:
            from transformers.pytorch_utils import Conv1D

            linear = Conv1D(self.out_features, self.in_features).to(device=weight.device, dtype=dtype)
            weight = weight.T
        else:
            linear = nn.Linear(
                self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype
            )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.detach().to(dtype))
        linear.requires_grad_(False)
        return linear

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """What peft's ``BaseTuner`` unloading puts in this layer's place.

        ``merge=False``: the base layer as it is (as peft's default unloading). ``merge=True``: the base layer
        with ``W[idx] += W_f`` written in (:meth:`merge`); for a quantized base, a new dense ``nn.Linear`` holding
        ``dequantize(W) + M @ W_f`` (:meth:`dequantized_merged_linear`): ``SPSFTModel.merge_and_unload`` only gets
        here with ``dequantize=True`` and refuses before unloading anything otherwise.

        Args:
            merge: merge the rows instead of dropping them.
            safe_merge: check the merged rows for inf/NaN before writing them.
            adapter_names: adapters to merge (default: the active ones).
        """
        if not merge:
            return self.get_base_layer()
        if self.quantization_backend is not None:
            return self.dequantized_merged_linear(adapter_names)
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # Exactly a LoRA with one-hot B and A = W_f: see hf_lowrank.save_as_lora.
        return True


class Linear(nn.Module, SPSFTLayer):
    """SPSFT on a ``torch.nn.Linear`` (or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) or a GPT-2-style
    ``Conv1D`` base layer."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SPSFTConfig,
        r: int,
        module_name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SPSFTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, config, module_name=module_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        base_out = result.detach().clone() if self._spsft_recorder is not None else None
        for name in self.active_adapters:
            if name not in self.spsft_weight:
                continue
            result = selected_rows_add(result, x, self.spsft_weight[name], self.spsft_indices[name])
        if self._spsft_recorder is not None:
            self._spsft_recorder(self, x, base_out, result)
        return result

    def __repr__(self) -> str:
        return "spsft." + super().__repr__()
