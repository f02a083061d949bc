"""Argument checks shared by the rank allocations (:mod:`.rank_allocation`, :mod:`.welore_allocation`)."""

from __future__ import annotations

import torch


def _check_shape(name: str, shape: tuple[int, int]) -> tuple[int, int]:
    try:
        out_f, in_f = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape of '{name}' must be an (out, in) pair of ints, got {shape!r}.") from None
    if out_f < 1 or in_f < 1:
        raise ValueError(f"shape of '{name}' must have positive sizes, got {shape!r}.")
    return out_f, in_f


def _check_spectrum(name: str, S: torch.Tensor) -> torch.Tensor:
    if not isinstance(S, torch.Tensor) or S.ndim != 1 or S.numel() == 0:
        shape = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(
            f"spectrum of '{name}' must be a non-empty 1-D tensor of singular values, got {shape}. "
            "Compute it with hf_lowrank.ops.svd.singular_values(W)."
        )
    S = S.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(S).all()) or bool((S < 0).any()):
        raise ValueError(f"spectrum of '{name}' must hold finite non-negative singular values.")
    return torch.sort(S, descending=True).values
