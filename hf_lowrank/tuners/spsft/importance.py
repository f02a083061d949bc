"""The data-driven step of SPSFT: Taylor / quantile-mean Taylor row scores from calibration batches.

:func:`spsft_importance` runs forward + backward passes of the (still untrained, ``W_f = 0``) SPSFT model over a few
batches and accumulates, for every target Linear, ``s[i] = sum_batches W[i] . G[i]`` without ever forming the
``(out, in)`` gradient ``G``: a Linear's ``G = sum_tokens grad_y^T x``, hence
``W[i] . G[i] = sum_tokens grad_y[..., i] * (y - b)[..., i]``. A hook on the layer output receives ``grad_y``; the
layer records ``y - b`` during the forward.

Cost: one forward + backward per calibration batch with the activation memory of SPSFT training, plus one
``(tokens, out)`` copy of every target layer's output held from its forward until its gradient arrives. No weight
gradient of the base model is ever materialised (only the tiny ``(r, in)`` gradients of ``W_f``, discarded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from hf_lowrank.ops.importance import l2_importance, quantile_mean, row_dot_from_activations, top_rows

from .config import IMPORTANCE_METHODS, SPSFTConfig
from .layer import Linear

__all__ = ["SPSFTImportanceCallback", "spsft_importance"]

LabelSpec = Union[None, str, Callable[[Mapping[str, Any]], torch.Tensor]]


def _find_config(model: nn.Module, adapter_name: str) -> SPSFTConfig | None:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping):
        config = configs.get(adapter_name)
        if isinstance(config, SPSFTConfig):
            return config
    return None


def _class_labels(batch: Mapping[str, Any], labels: LabelSpec) -> torch.Tensor:
    if callable(labels):
        y = labels(batch)
        source = "the labels callable"
    else:
        key = labels or "labels"
        if key not in batch:
            raise ValueError(
                f"qm_taylor needs one class label per example but the batch has no '{key}' entry (keys: "
                f"{sorted(batch)}); pass labels='<key>' or labels=callable(batch) -> LongTensor (B,)."
            )
        y = batch[key]
        source = f"batch['{key}']"
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"qm_taylor needs integer class labels of shape (B,), but {source} has dtype {y.dtype} and shape "
            f"{tuple(y.shape)} (token labels of a causal LM are not classes); pass labels=callable(batch) -> (B,)."
        )
    return y.long()


def spsft_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    *,
    num_batches: int | None = None,
    labels: LabelSpec = None,
    importance: str | None = None,
    adapter_name: str = "default",
    reselect: bool = True,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Score the output rows of every SPSFT layer from calibration batches and (by default) re-select the top rows.

    Call it after ``get_peft_model(model, SPSFTConfig(importance="taylor" | "qm_taylor", ...))`` and before the first
    optimizer step (``W_f`` must still be zero; :class:`SPSFTImportanceCallback` does this inside a Trainer).

    - ``"taylor"``: ``|sum_batches W[i] . G_b[i]|`` with ``G_b`` the gradient of the model's own loss
      (``outputs.loss``, so batches must carry ``labels``).
    - ``"qm_taylor"`` (the quantile-mean Taylor importance of Li and Bhaskara, 2025, arXiv:2502.11439): per class ``t``, ``eta_t[i] = |W[i] . grad L(D_t)[i]|`` with ``L(D_t)`` the mean
      cross-entropy over the class's examples (computed from ``outputs.logits (B, C)``, one example at a time through
      a summed loss); the score is the mean of the 0, 10, ..., 100% quantiles of ``{eta_t[i]}_t``. Needs one class
      label per example.
    - ``"l2"``: the row norms again (no data used).

    Args:
        model: a ``PeftModel`` (or a model with SPSFT layers) whose adapter ``adapter_name`` is untrained.
        dataloader: iterable of dict batches (tensors) accepted by ``model(**batch)``.
        num_batches: number of batches to use (default: the whole dataloader).
        labels: for ``qm_taylor``, where the class labels are: a batch key (default ``"labels"``) or a callable
            ``batch -> LongTensor (B,)``. Entries named ``labels`` are not passed to the model for ``qm_taylor``.
        importance: override the config's importance method.
        adapter_name: the SPSFT adapter to score.
        reselect: write the top-``r`` rows into the adapter's index buffers.
        progress: show a progress bar.

    Returns:
        ``{module_name: scores (out,) float32}`` for every SPSFT layer holding ``adapter_name``.
    """
    config = _find_config(model, adapter_name)
    method = importance or (config.importance if config is not None else None)
    if method is None:
        raise ValueError("no SPSFT config found on the model; pass importance='taylor' or 'qm_taylor' explicitly.")
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"Unknown SPSFT importance {method!r}; choose one of {', '.join(IMPORTANCE_METHODS)}.")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and adapter_name in m.spsft_weight}
    if not layers:
        raise ValueError(f"no SPSFT layer holds adapter '{adapter_name}'; build the model with get_peft_model first.")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 (or None for the whole dataloader), got {num_batches}.")
    if reselect:
        for name, layer in layers.items():
            if bool((layer.spsft_weight[adapter_name] != 0).any()):
                raise ValueError(
                    f"W_f of adapter '{adapter_name}' in '{name}' is already non-zero: rows can only be re-selected "
                    "before training. Score a freshly created adapter, or pass reselect=False to only compute scores."
                )

    if method == "l2":
        scores = {n: l2_importance(m.base_weight_for_scoring()).cpu() for n, m in layers.items()}
    else:
        scores = _gradient_scores(model, dataloader, layers, method, num_batches, labels, adapter_name, progress)
    if reselect:
        for name, layer in layers.items():
            layer.set_rows(adapter_name, top_rows(scores[name], layer.spsft_indices[adapter_name].numel()))
    return scores


def _gradient_scores(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    layers: dict[str, Linear],
    method: str,
    num_batches: int | None,
    labels: LabelSpec,
    adapter_name: str,
    progress: bool,
) -> dict[str, torch.Tensor]:
    per_class = method == "qm_taylor"
    names = {id(m): n for n, m in layers.items()}
    totals: dict[str, torch.Tensor] = {}  # taylor: (out,) float64
    class_sums: dict[str, dict[int, torch.Tensor]] = {n: {} for n in layers}  # qm_taylor: class -> (out,)
    class_counts: dict[int, int] = {}
    current: dict[str, Any] = {}

    def record(layer: Linear, x: torch.Tensor, base_out: torch.Tensor, out: torch.Tensor) -> None:
        if not out.requires_grad:
            # e.g. the no-grad first pass of reentrant activation checkpointing: the recomputation records it
            return
        bias = getattr(layer.get_base_layer(), "bias", None)
        z = base_out if bias is None else base_out - bias.detach().to(base_out.dtype)
        name = names[id(layer)]

        def on_grad(grad: torch.Tensor) -> None:
            if per_class:
                dots = row_dot_from_activations(grad, z, per_example=True)  # (B, out)
                y = current["labels"]
                if dots.shape[0] != y.shape[0]:
                    raise ValueError(
                        f"'{name}' sees a leading dimension of {dots.shape[0]} but the batch has {y.shape[0]} "
                        "examples; qm_taylor needs layers whose inputs keep the batch dimension first."
                    )
                sums = class_sums[name]
                for c in y.unique().tolist():
                    part = dots[y.to(dots.device) == c].sum(dim=0).cpu()
                    sums[c] = sums[c] + part if c in sums else part
            else:
                dot = row_dot_from_activations(grad, z).cpu()
                totals[name] = totals[name] + dot if name in totals else dot

        out.register_hook(on_grad)

    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    w_fs = [m.spsft_weight[adapter_name] for m in layers.values()]
    w_f_flags = [w.requires_grad for w in w_fs]
    was_training = model.training
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    total = num_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)  # type: ignore[arg-type]
    seen = 0
    try:
        model.eval()
        for w in w_fs:  # the graph must reach every layer output even when the adapter was loaded frozen
            w.requires_grad_(True)
        for layer in layers.values():
            layer._spsft_recorder = record
        for batch in tqdm(dataloader, total=total, disable=not progress, desc=f"SPSFT {method} importance"):
            if num_batches is not None and seen >= num_batches:
                break
            if not isinstance(batch, Mapping):
                raise ValueError(f"spsft_importance needs dict batches (as HF collators yield), got {type(batch)}.")
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            with torch.enable_grad():
                if per_class:
                    y = _class_labels(batch, labels)
                    current["labels"] = y
                    inputs = {k: v for k, v in batch.items() if k != "labels" and k != labels}
                    logits = model(**inputs).logits
                    if logits.ndim != 2:
                        raise ValueError(
                            f"qm_taylor needs sequence-classification logits (B, num_classes), got shape "
                            f"{tuple(logits.shape)}; use importance='taylor' for language modelling."
                        )
                    loss = F.cross_entropy(logits.float(), y.to(logits.device), reduction="sum")
                    for c in y.unique().tolist():
                        class_counts[c] = class_counts.get(c, 0) + int((y == c).sum())
                else:
                    outputs = model(**batch)
                    loss = getattr(outputs, "loss", None)
                    if loss is None:
                        raise ValueError(
                            "taylor importance needs the model's loss: pass batches with 'labels' (for a causal LM the "
                            "token ids, as DataCollatorForLanguageModeling produces)."
                        )
                loss.backward()
            for p in params:
                p.grad = None
            for w in w_fs:
                w.grad = None
            seen += 1
    finally:
        for layer in layers.values():
            layer._spsft_recorder = None
        for w, flag in zip(w_fs, w_f_flags):
            w.requires_grad_(flag)
        for p, g in zip(params, saved_grads):
            p.grad = g
        model.train(was_training)
    if seen == 0:
        raise ValueError("the dataloader yielded no batch; spsft_importance needs at least one calibration batch.")

    if not per_class:
        missing = [n for n in layers if n not in totals]
        if missing:
            raise RuntimeError(f"no gradient reached {missing[:3]}; is the loss connected to these layers?")
        return {n: totals[n].abs().float() for n in layers}
    classes = sorted(class_counts)
    scores = {}
    for name in layers:
        sums = class_sums[name]
        if set(sums) != set(classes):
            raise RuntimeError(f"no gradient reached '{name}' for some classes; is the loss connected to it?")
        eta = torch.stack([(sums[c] / class_counts[c]).abs() for c in classes])  # (T, out)
        scores[name] = quantile_mean(eta)
    return scores


class SPSFTImportanceCallback(TrainerCallback):
    """Runs :func:`spsft_importance` once at the start of training (before the first optimizer step).

    Args:
        dataloader: calibration batches; default: the Trainer's train dataloader.
        num_batches: calibration batches to use.
        labels: see :func:`spsft_importance` (``qm_taylor``).
        adapter_name: the SPSFT adapter to score.
    """

    def __init__(
        self,
        dataloader: Iterable[Mapping[str, Any]] | None = None,
        *,
        num_batches: int = 8,
        labels: LabelSpec = None,
        adapter_name: str = "default",
        progress: bool = True,
    ) -> None:
        self.dataloader = dataloader
        self.num_batches = num_batches
        self.labels = labels
        self.adapter_name = adapter_name
        self.progress = progress
        self.scores: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):  # noqa: D401
        if state.global_step > 0 or self.scores is not None:
            return  # resumed run: the indices come from the checkpoint
        loader = self.dataloader if self.dataloader is not None else train_dataloader
        if model is None or loader is None:
            raise ValueError("SPSFTImportanceCallback needs the model and a dataloader.")
        self.scores = spsft_importance(
            model,
            loader,
            num_batches=self.num_batches,
            labels=self.labels,
            adapter_name=self.adapter_name,
            progress=self.progress,
        )
