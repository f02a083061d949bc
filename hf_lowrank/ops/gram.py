"""Gram matrices ``X^T X`` of activation rows, accumulated in place.

Calibration and the Kronecker-factored Fisher add one ``(n, n)`` Gram per module and micro-batch. Two things make
that cheaper than ``acc.add_(rows.T @ rows)``:

- the product is accumulated by ``addmm_`` straight into the accumulator (no ``(n, n)`` temporary to allocate,
  check and add: with hundreds of accumulators those passes over cold memory cost as much as the GEMM);
- for a wide side and many rows only the blocks on and above the diagonal are multiplied and the rest mirrored
  (the Gram is symmetric): 4 column blocks do 10 of the 16 block products, in less time than one GEMM for a wide side
  (``benchmarks/gram_accumulate.py``); below :data:`BLOCKED_MIN_DIM` / :data:`BLOCKED_MIN_ROWS` one GEMM is faster.

Non-finite rows would poison the accumulator for good, so :func:`gram_accumulate_` leaves it untouched and returns
``False`` when the contribution is not finite (decided from the rows, with an overflow bound, before any write).
"""

from __future__ import annotations

import torch

__all__ = ["BLOCKED_MIN_DIM", "BLOCKED_MIN_ROWS", "contribution_is_finite", "gram", "gram_accumulate_"]

#: Sides at least this wide use the blocked symmetric product (with at least :data:`BLOCKED_MIN_ROWS` rows).
BLOCKED_MIN_DIM = 1024
BLOCKED_MIN_ROWS = 1024
_BLOCKS = 4


def _edges(n: int) -> list[int]:
    return [n * i // _BLOCKS for i in range(_BLOCKS + 1)]


def _blocked(rows: torch.Tensor) -> bool:
    return rows.shape[1] >= BLOCKED_MIN_DIM and rows.shape[0] >= BLOCKED_MIN_ROWS


def _add_blocked_(acc: torch.Tensor, rows: torch.Tensor) -> None:
    e = _edges(rows.shape[1])
    for i in range(_BLOCKS):
        a = rows[:, e[i] : e[i + 1]]
        for j in range(i, _BLOCKS):
            acc[e[i] : e[i + 1], e[j] : e[j + 1]].addmm_(a.T, rows[:, e[j] : e[j + 1]])
    for i in range(_BLOCKS):  # the blocks below the diagonal mirror those above
        for j in range(i + 1, _BLOCKS):
            acc[e[j] : e[j + 1], e[i] : e[i + 1]].copy_(acc[e[i] : e[i + 1], e[j] : e[j + 1]].T)


def contribution_is_finite(rows: torch.Tensor) -> bool:
    """Whether ``rows.T @ rows`` is finite, decided from ``rows`` alone (a sufficient overflow bound).

    ``|G_ij| <= t * max|x|^2`` for ``t`` rows, so a finite maximum under ``sqrt(float_max / t)`` guarantees a finite
    product; a larger one (or a non-finite entry) returns ``False``.
    """
    if rows.numel() == 0:
        return True
    peak = float(rows.abs().amax())
    limit = (torch.finfo(rows.dtype).max / max(1, rows.shape[0])) ** 0.5
    return peak <= limit  # NaN compares False


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows.T @ rows`` of ``(t, n)`` rows in float32 (float64 kept), blocked and symmetric for a wide side."""
    if rows.ndim != 2:
        raise ValueError(f"gram needs (tokens, features) rows, got shape {tuple(rows.shape)}.")
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    if not _blocked(rows):
        return rows.T @ rows
    out = torch.zeros(rows.shape[1], rows.shape[1], dtype=rows.dtype, device=rows.device)
    _add_blocked_(out, rows)
    return out


def gram_accumulate_(acc: torch.Tensor, rows: torch.Tensor) -> bool:
    """``acc += rows.T @ rows`` in place (``acc`` ``(n, n)``, ``rows`` ``(t, n)``, same device), if finite.

    Returns:
        ``True`` when added; ``False`` when the contribution would not be finite (``acc`` untouched, see
        :func:`contribution_is_finite`; a product that overflows only because ``acc`` is huge is not caught).

    Raises:
        ValueError: if the shapes or devices do not match.
    """
    if rows.ndim != 2 or acc.shape != (rows.shape[1], rows.shape[1]) or acc.device != rows.device:
        raise ValueError(
            f"gram_accumulate_ needs rows (t, n) and an (n, n) accumulator on the same device, got rows "
            f"{tuple(rows.shape)} on {rows.device} and acc {tuple(acc.shape)} on {acc.device}."
        )
    rows = rows.to(acc.dtype)
    if not contribution_is_finite(rows):
        return False
    if _blocked(rows):
        _add_blocked_(acc, rows)
    else:
        acc.addmm_(rows.T, rows)
    return True
