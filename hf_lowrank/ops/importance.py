"""Neuron (output row) importance for SPSFT: l2, Taylor and quantile-mean Taylor, and top-row selection.

Pure math on torch tensors. Conventions: a Linear weight ``W`` has shape ``(out, in)``; neuron ``i`` is row ``W[i]``;
every score is a float32 vector of shape ``(out,)`` where larger means more important.

SPSFT: Li and Bhaskara, 2025, "An Efficient Sparse Fine-Tuning with Low Quantization Error via Neural Network
Pruning" (first titled "Memory-Efficient Fine-Tuning via Structured Neural Network Pruning"), arXiv:2502.11439.
The Taylor scores are the paper's first-order Taylor importance, taken as ``eta_i = |W[i] . G[i]|`` (the absolute
value of the row-wise dot product of the weight with the loss gradient ``G``). Because this is linear in ``G``, it never
needs the ``(out, in)`` gradient itself: for a Linear layer ``G = sum_tokens grad_y^T x``, hence
``W[i] . G[i] = sum_tokens grad_y[:, i] * (x @ W[i])`` -- see :func:`row_dot_from_activations`, which is what
:func:`hf_lowrank.spsft_importance` accumulates with hooks.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "QUANTILE_LEVELS",
    "l2_importance",
    "quantile_mean",
    "quantile_mean_taylor_importance",
    "row_dot_from_activations",
    "rows_for_ratio",
    "taylor_importance",
    "top_rows",
]

# The 0%, 10%, ..., 100% quantiles of the quantile-mean Taylor importance (Li and Bhaskara, 2025, arXiv:2502.11439).
QUANTILE_LEVELS: tuple[float, ...] = tuple(k / 10 for k in range(11))


def _check_matrix(W: torch.Tensor, what: str = "W") -> None:
    if W.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (out, in) weight matrix, got shape {tuple(W.shape)}.")


@torch.no_grad()
def l2_importance(W: torch.Tensor) -> torch.Tensor:
    """Data-free magnitude importance: the l2 norm of every output row.

    Args:
        W: ``(out, in)`` weight.

    Returns:
        ``(out,)`` float32 scores ``||W[i, :]||_2``, computed in float64 (a float32 sum of squares overflows above
        ~1.8e19 and underflows below ~1e-19 although the norm itself fits float32); a norm beyond float32 is inf.
    """
    _check_matrix(W)
    return torch.linalg.vector_norm(W.double(), ord=2, dim=1).float()


@torch.no_grad()
def taylor_importance(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance of every output row, ``|sum_j W[i, j] * G[i, j]|``.

    Args:
        W: ``(out, in)`` weight.
        G: ``(out, in)`` gradient of the loss with respect to ``W`` (summed or averaged over calibration batches;
            the scale does not change the ranking).

    Returns:
        ``(out,)`` float32 scores.
    """
    _check_matrix(W)
    _check_matrix(G, "G")
    if G.shape != W.shape:
        raise ValueError(f"G must have the shape of W {tuple(W.shape)}, got {tuple(G.shape)}.")
    return (W.double() * G.double()).sum(dim=1).abs().float()


@torch.no_grad()
def quantile_mean(eta: torch.Tensor, levels: Sequence[float] = QUANTILE_LEVELS) -> torch.Tensor:
    """Mean of the quantiles of per-class scores (Li and Bhaskara, 2025, arXiv:2502.11439).

    Args:
        eta: ``(T, out)`` per-class importance, one row per class ``t``.
        levels: quantile levels in ``[0, 1]``; the paper uses 0, 0.1, ..., 1.

    Returns:
        ``(out,)`` float32: ``mean_k Q_k({eta[t, i]}_t)`` with linear interpolation between order statistics
        (``torch.quantile``'s default, as numpy's).
    """
    if eta.ndim != 2 or eta.shape[0] == 0 or eta.shape[1] == 0:
        raise ValueError(
            f"eta must be (T, out) with T >= 1 classes and out >= 1 rows, got shape {tuple(eta.shape)}."
        )
    if not levels or any(not 0.0 <= q <= 1.0 for q in levels):
        raise ValueError(f"quantile levels must be a non-empty sequence in [0, 1], got {list(levels)}.")
    q = torch.tensor(list(levels), dtype=torch.float64, device=eta.device)
    return torch.quantile(eta.double(), q, dim=0).mean(dim=0).float()


@torch.no_grad()
def quantile_mean_taylor_importance(
    W: torch.Tensor, class_grads: torch.Tensor | Sequence[torch.Tensor], levels: Sequence[float] = QUANTILE_LEVELS
) -> torch.Tensor:
    """Class-aware quantile-mean Taylor importance (Li and Bhaskara, 2025, arXiv:2502.11439).

    For every class ``t``: ``eta[t, i] = |W[i] . G_t[i]|`` with ``G_t`` the gradient of the mean loss over that
    class's examples; the score is the mean of the 0, 10, ..., 100% quantiles of ``{eta[t, i]}_t``.

    Args:
        W: ``(out, in)`` weight.
        class_grads: ``(T, out, in)`` tensor or a sequence of ``T`` ``(out, in)`` gradients, one per class.
        levels: quantile levels (see :func:`quantile_mean`).

    Returns:
        ``(out,)`` float32 scores.
    """
    _check_matrix(W)
    grads = list(class_grads.unbind(0)) if isinstance(class_grads, torch.Tensor) else list(class_grads)
    if isinstance(class_grads, torch.Tensor) and class_grads.ndim != 3:
        raise ValueError(f"class_grads must be (T, out, in), got shape {tuple(class_grads.shape)}.")
    if not grads:
        raise ValueError("class_grads is empty: qm_taylor needs the gradient of at least one class.")
    eta = torch.stack([taylor_importance(W, G) for G in grads])
    return quantile_mean(eta, levels)


@torch.no_grad()
def row_dot_from_activations(grad_out: torch.Tensor, z: torch.Tensor, *, per_example: bool = False) -> torch.Tensor:
    """``sum_j W[i, j] * G[i, j]`` of a Linear layer from its activations, without forming ``G``.

    With ``G = sum_tokens grad_out^T x`` and ``z = x @ W.T`` (the layer output without bias),
    ``W[i] . G[i] = sum_tokens grad_out[..., i] * z[..., i]``.

    Args:
        grad_out: ``(..., out)`` gradient of the loss with respect to the layer output.
        z: ``(..., out)`` layer output minus its bias, same shape.
        per_example: keep the leading (batch) dimension.

    Returns:
        ``(out,)`` float64, or ``(B, out)`` float64 when ``per_example``.
    """
    if grad_out.shape != z.shape:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and z {tuple(z.shape)} must have the same shape.")
    if grad_out.ndim == 0:
        raise ValueError(
            "grad_out and z must have shape (..., out) with at least one dimension, got 0-d tensors; pass the "
            "layer's output gradient and output as they come from the hooks."
        )
    prod = grad_out.double() * z.double()
    if per_example:
        if prod.ndim < 2:
            raise ValueError(f"per_example needs a leading batch dimension, got shape {tuple(prod.shape)}.")
        return prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(dim=1)
    return prod.reshape(-1, prod.shape[-1]).sum(dim=0)


def rows_for_ratio(out_features: int, ratio: float) -> int:
    """Number of rows kept for a fraction ``ratio`` in (0, 1] of ``out_features``: ``max(1, round(ratio * out))``.

    Raises:
        ValueError: ``out_features`` is not an integer >= 1, or ``ratio`` is outside ``(0, 1]``.
    """
    if isinstance(out_features, bool) or not isinstance(out_features, numbers.Integral) or out_features < 1:
        raise ValueError(f"out_features must be an integer >= 1 (the layer's output rows), got {out_features!r}.")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}; pass e.g. ratio=0.05 to train 5% of the rows.")
    return max(1, min(out_features, round(ratio * out_features)))


@torch.no_grad()
def top_rows(scores: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the ``r`` highest scores, sorted ascending.

    Ties are broken towards the lower index (stable sort), so the selection is deterministic.

    Args:
        scores: ``(out,)`` importance scores.
        r: number of rows to keep, ``1 <= r <= out``.

    Returns:
        ``(r,)`` int64 row indices in increasing order.
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D (out,) vector, got shape {tuple(scores.shape)}.")
    out = scores.shape[0]
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise ValueError(f"r={r!r} must be an integer number of rows to keep; pass e.g. rows_for_ratio(out, ratio).")
    if not 1 <= r <= out:
        raise ValueError(f"r={r} rows cannot be selected from {out} output rows; pass 1 <= r <= {out}.")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(
            "importance scores contain inf or NaN; check the weights and the calibration loss for overflow."
        )
    order = torch.argsort(scores.double(), descending=True, stable=True)[:r]
    return torch.sort(order).values.to(torch.int64)
