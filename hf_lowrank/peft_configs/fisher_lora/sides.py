"""The check of a LoRA Fisher state against the adapter being compressed (its weighting sides, and the warnings on
an all-zero or non-finite Fisher, are :mod:`hf_lowrank.compression.fisher_sides`, shared by every entry point)."""

from __future__ import annotations

from ...fisher_state import FisherState, FisherStateError


def _check_adapter_rank(state: FisherState, names, adapter_rank: int) -> None:
    """A LoRA Fisher has the adapter's rank in its shapes: ``F_A`` is ``(r, in)``, checked even without metadata."""
    for name in names:
        a = state.module_fisher(name).get("A")
        if a is not None and a.ndim == 2 and a.shape[0] != adapter_rank:
            raise FisherStateError(
                f"The Fisher of '{name}' was collected with LoRA adapter rank r={a.shape[0]} (F_A {tuple(a.shape)}) "
                f"but the adapter being compressed has r={adapter_rank}: the Fisher of the LoRA factors belongs to "
                "the adapter it was collected with. Collect it again with this adapter."
            )
