"""Model surgery for compression: a weight-sharing copy, the effective weight of a LoRA layer, dense stand-ins and
casts, and removing what is left of peft (and of bitsandbytes quantization) once the adapted layers are replaced."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..._compat import clear_peft_config_loaded
from ...compression.compress import set_submodule
from ...modules import dense_weight

__all__ = ["shared_weight_copy"]


def shared_weight_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers ARE the original tensors (no weight memory).

    Replacing modules of the copy (e.g. by compression) leaves the original untouched; changing a shared tensor in
    place would change both. Instance-level ``forward`` overrides (trainer wrappers) are dropped from the copy.
    """
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as exc:  # deepcopy fails on exotic attributes (locks, handles)
        raise RuntimeError(
            f"Could not make a weight-sharing copy of the model for compression ({exc}). Pass inplace=True to "
            "compress the model itself (the adapter model is then consumed)."
        ) from exc
    # Trainers patch `forward` on the instance (accelerate's autocast wrapper, trl's fused-loss forward); such a
    # wrapper closes over the ORIGINAL model's forward, so the copy would silently run the original. Use the class's.
    for module in clone.modules():
        module.__dict__.pop("forward", None)
    return clone


def _float_dtype(model: nn.Module) -> torch.dtype:
    for name, p in model.named_parameters():
        if p.is_floating_point() and "lora_" not in name:
            return p.dtype
    return torch.float32


def _cast_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters to ``dtype`` by REPLACING them (shared tensors of the original stay untouched)."""
    new_of: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in new_of:
                new_of[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            module._parameters[pname] = new_of[id(p)]


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


def _linear_view(base_layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain Linear whose weight IS ``weight`` (an effective weight, no copy) with ``base_layer``'s bias: the
    stand-in through which the compression pipeline reads an adapted layer."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    bias = getattr(base_layer, "bias", None)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer.train(base_layer.training)


def _settle_dense(work: nn.Module, stand_ins, originals, *, quantized: bool, dtype, out_dtype) -> None:
    """Stand-ins the pipeline left dense become the original base layer (its weight unchanged and of the right
    dtype) or a dense Linear of ``out_dtype``."""
    for name, layer in stand_ins.items():
        if work.get_submodule(name) is not layer:
            continue  # factorized
        base_layer = originals[name].get_base_layer()
        W = layer.weight
        unchanged = not quantized and W.data_ptr() == base_layer.weight.data_ptr()
        if unchanged and (dtype is None or W.dtype == out_dtype):
            set_submodule(work, name, base_layer)
        elif W.dtype != out_dtype:
            set_submodule(work, name, _dense_linear(W, layer.bias, out_dtype))


def _drop_bnb_quantization(model: nn.Module) -> None:
    """Forget a bitsandbytes quantization config on a model whose layers were all dequantized."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None) if config is not None else None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is None or str(getattr(method, "value", method)) != "bitsandbytes":
        return
    del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass


def _effective_weight(wrapper: nn.Module, adapter: str, merge: bool, name: str) -> torch.Tensor:
    """``W + s B A`` (``merge``) or ``W`` of a LoRA layer, dequantized when its base is 4/8-bit."""
    W = dense_weight(wrapper.get_base_layer())
    if merge and not getattr(wrapper, "merged", False):
        delta = wrapper.get_delta_weight(adapter)  # in the base layer's layout: (in, out) for a Conv1D
        if getattr(wrapper, "fan_in_fan_out", False):
            delta = delta.T
        return W.float() + delta.float().to(W.device)
    if not merge and getattr(wrapper, "merged", False):
        raise ValueError(
            f"Module '{name}' has its adapter merged into the base weight, so the original W is gone; "
            "unmerge it (model.unmerge_adapter()) before compressing with merge_before_compress=False."
        )
    return W


def _finish_unload(work: nn.Module, adapter: str, *, inplace: bool, merge: bool) -> None:
    """Remove what is left of peft from ``work``: other LoRA layers, ``modules_to_save`` wrappers, peft attributes."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    for name, module in list(work.named_modules()):
        if not name:
            continue
        try:
            current = work.get_submodule(name)
        except AttributeError:
            continue  # inside a module replaced earlier in this loop
        if current is not module:
            continue
        if isinstance(module, BaseTunerLayer):
            base_layer = module.get_base_layer()
            lora_a = getattr(module, "lora_A", {})
            if merge and adapter in lora_a and not getattr(module, "merged", False) and hasattr(base_layer, "weight"):
                # A non-Linear LoRA layer (e.g. an embedding): merge its delta into a new weight tensor.
                merged = copy.copy(base_layer)
                merged._parameters = dict(base_layer._parameters)
                delta = module.get_delta_weight(adapter).to(base_layer.weight.dtype)
                merged.weight = nn.Parameter(base_layer.weight.detach() + delta, requires_grad=False)
                set_submodule(work, name, merged)
            else:
                set_submodule(work, name, base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            set_submodule(work, name, module.unload_and_optionally_merge_module(False, False, None))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            if not inplace:
                raise ValueError(
                    f"Module '{name}' is a {type(module).__name__} (trainable_token_indices); compressing a copy "
                    "cannot merge it without changing the trained model. Pass inplace=True."
                )
            set_submodule(work, name, module.unload_and_optionally_merge_module(True, False, None))
    for attr in ("peft_config",):
        if attr in work.__dict__:
            del work.__dict__[attr]
    clear_peft_config_loaded(work)
