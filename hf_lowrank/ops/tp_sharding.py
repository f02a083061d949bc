"""Tensor-parallel sharding of factor pairs ``W ~ up @ down`` (torch only).

Megatron-style tensor parallelism (Shoeybi et al., 2019, arXiv:1909.08053) splits a column-parallel Linear by output
rows and a row-parallel Linear by input columns; the row-parallel outputs are summed by an all-reduce. A factor pair
follows the same split without any new communication:

- column-parallel (``q/k/v``, ``gate/up``): rank ``p`` computes ``up[rows_p] @ (down @ x)``, so ``up`` is split by
  output rows and ``down`` is replicated;
- row-parallel (``o``, ``down``): rank ``p`` computes ``up @ (down[:, cols_p] @ x[cols_p])`` and the all-reduce sums
  ``sum_p up @ down[:, cols_p] @ x[cols_p] = up @ down @ x``, so ``down`` is split by input columns and ``up`` is
  replicated.

The replicated factor is not divided by the tensor-parallel size, so a rank holds ``r * in + r * out / tp``
(column) or ``r * in / tp + r * out`` (row) parameters against ``out * in / tp`` for the dense shard:
:func:`factor_params_per_rank` gives the figure.

A fused layer (``qkv_proj``, ``gate_up_proj``) is a list of sub-shards, each split on its own; a key/value shard
with fewer heads than tensor-parallel ranks is replicated over ``tp / heads`` ranks, as the serving engine does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "RowSpan",
    "column_spans",
    "factor_params_per_rank",
    "row_parallel_span",
    "take_rows",
]


@dataclass(frozen=True)
class RowSpan:
    """Rows ``[source, source + size)`` of a full (unsharded) tensor that one rank keeps."""

    source: int
    size: int


def column_spans(
    full_sizes: Sequence[int], local_sizes: Sequence[int], tp_rank: int, tp_size: int
) -> list[RowSpan]:
    """The output rows rank ``tp_rank`` keeps of each sub-shard of a column-parallel (possibly fused) Linear.

    Args:
        full_sizes: output size of each sub-shard in the checkpoint (e.g. ``[q, k, v]`` widths), in fused order.
        local_sizes: output size of each sub-shard on one rank.
        tp_rank: this rank, ``0 <= tp_rank < tp_size``.
        tp_size: the tensor-parallel world size.

    Returns:
        One :class:`RowSpan` per sub-shard, ``source`` counted from the start of the fused full output. A sub-shard
        whose ``local * tp_size`` exceeds its full size is replicated over ``local * tp_size / full`` consecutive
        ranks (key/value heads fewer than ranks).

    Raises:
        ValueError: sizes that no split produces (the layer and the checkpoint disagree).
    """
    if len(full_sizes) != len(local_sizes):
        raise ValueError(f"{len(full_sizes)} full sub-shard sizes but {len(local_sizes)} local ones.")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"Tensor-parallel rank {tp_rank} is outside [0, {tp_size}).")
    spans, offset = [], 0
    for full, local in zip(full_sizes, local_sizes):
        if local <= 0 or full <= 0 or (local * tp_size) % full or full % local:
            raise ValueError(
                f"A sub-shard of {full} output rows cannot have {local} rows on each of {tp_size} ranks: the "
                "checkpoint and the model configuration disagree."
            )
        replicas = local * tp_size // full
        spans.append(RowSpan(offset + (tp_rank // replicas) * local, local))
        offset += full
    return spans


def row_parallel_span(in_features: int, tp_rank: int, tp_size: int) -> RowSpan:
    """The input columns ``[source, source + size)`` rank ``tp_rank`` keeps of a row-parallel Linear."""
    if in_features % tp_size:
        raise ValueError(f"{in_features} input features do not split over {tp_size} tensor-parallel ranks.")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"Tensor-parallel rank {tp_rank} is outside [0, {tp_size}).")
    size = in_features // tp_size
    return RowSpan(tp_rank * size, size)


def take_rows(full: torch.Tensor, spans: Sequence[RowSpan], dim: int = 0) -> torch.Tensor:
    """The rows (``dim=0``) or columns (``dim=1``) of ``full`` named by ``spans``, concatenated in order."""
    parts = [full.narrow(dim, span.source, span.size) for span in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def factor_params_per_rank(out_features: int, in_features: int, rank: int, tp_size: int, parallel: str) -> dict:
    """Parameters one rank holds for a factor pair and for the dense shard it replaces.

    Args:
        parallel: ``"column"`` (``up`` split, ``down`` replicated) or ``"row"`` (``down`` split, ``up`` replicated).

    Returns:
        ``{"factors": ..., "dense": ..., "ratio": factors / dense}``. The ratio grows with ``tp_size``, since the
        replicated factor is not divided: above ``1.0`` the factorized layer costs more memory per rank than dense.
    """
    if parallel == "column":
        factors = rank * in_features + rank * out_features // tp_size
    elif parallel == "row":
        factors = rank * in_features // tp_size + rank * out_features
    else:
        raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}.")
    dense = out_features * in_features // tp_size
    return {"factors": factors, "dense": dense, "ratio": factors / dense}
