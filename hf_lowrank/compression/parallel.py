"""Tensor parallelism of factorized checkpoints: transformers' per-module plan moved onto the factors.

``from_pretrained(folder, tp_plan="auto")`` shards each Linear as the model's plan says (``config.base_model_tp_plan``:
``q_proj: colwise``, ``o_proj: rowwise``, ...). A :class:`~hf_lowrank.modules.LowRankLinear` has no ``weight`` to
shard; it is ``y = up(down(x))`` with ``down: in -> r`` and ``up: r -> out`` (bias on ``up``), and each dense style
has an exact factor-level counterpart, as in Megatron-LM's pairing of column- and row-parallel layers (Shoeybi et al.
2019, arXiv:1909.08053):

- **output-split** (``colwise``: input replicated, each rank computes a slice of the outputs): ``down`` is replicated
  (every rank computes the whole ``h = down(x)``) and ``up`` takes the dense style (its rows, and its bias, are
  split by output). The rank ``r`` is never split.
- **input-split** (``rowwise``: input split by features, partial outputs all-reduced, bias added once): ``down``
  takes the dense style (its columns are split by input; its partial ``h`` is all-reduced, ``r`` values per token
  instead of the ``out`` of the dense layer) and ``up`` is replicated, so its bias is added once.

A replicated factor is held whole by every rank: a rank holds ``r * in / tp + r * out`` parameters of a colwise
layer (``r * in + r * out / tp`` of a rowwise one) where the dense shard is ``in * out / tp``.

The module keeps its own (dense) entry in the plan: its siblings in other layers may be dense (the same wildcard
names both), and transformers reads the entry of the key projection to size a static cache. transformers then hooks
the ``LowRankLinear`` itself with the dense style; :func:`unhook_factorized` removes that hook after loading, because
the factors' hooks already do that layer's communication.
"""

from __future__ import annotations

from torch import nn

from .._compat import remove_parallel_forward
from ..modules import LowRankLinear
from .checkpoint_checks import CompressedCheckpointError

__all__ = ["FACTOR_STYLES", "factor_parallel_plan", "unhook_factorized"]

#: dense style -> which factor takes it (the other one is replicated)
FACTOR_STYLES: dict[str, str] = {
    "colwise": "up",
    "colwise_gather_output": "up",
    "colwise_rep": "up",
    "unit_colwise": "up",
    "packed_colwise": "up",
    "rowwise": "down",
    "rowwise_split_input": "down",
    "rowwise_rep": "down",
    "unit_rowwise": "down",
}

# Styles that shard no parameter and only act on the module's input or output: they stay on the LowRankLinear and
# act on its input and output exactly as on the dense layer's (the factors, having no entry, are replicated).
_IO_ONLY_STYLES = frozenset({"replicate", "all_reduce", "mla_kv_a_proj"})


def _wildcard(name: str) -> str:
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    return replace_layer_number_by_wildcard(name)


def factor_parallel_plan(model: nn.Module, plan: dict[str, str]) -> set[str]:
    """Add to ``plan`` (a transformers TP or EP plan, wildcard names) the factor-level entries of every
    ``LowRankLinear`` in ``model`` whose dense name the plan shards, in place.

    Args:
        model: the model after its Linear layers were replaced by ``LowRankLinear`` (meta device is fine).
        plan: ``{generic module or parameter name: style name}``, as ``model.tp_plan``.

    Returns:
        The names of the ``LowRankLinear`` modules whose dense style was moved onto a factor (their own hook is to be
        removed once transformers installed it, :func:`unhook_factorized`).

    Raises:
        CompressedCheckpointError: a factorized module under a style with no factor-level counterpart here, or a
            plan entry naming its dense parameter (``<module>.weight``), which the factorized module no longer has.
    """
    moved: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        generic = _wildcard(name)
        for param in ("weight", "bias"):
            if f"{generic}.{param}" in plan:
                raise CompressedCheckpointError(
                    f"The tensor-parallel plan shards the parameter '{generic}.{param}', which the factorized module "
                    f"'{name}' does not have (it holds the factors '{name}.down' and '{name}.up'). Pass a tp_plan "
                    "that names the modules, or load without tp_plan (or decompress_model the model first)."
                )
        style = plan.get(generic)
        if style is None or style in _IO_ONLY_STYLES:
            continue
        factor = FACTOR_STYLES.get(style)
        if factor is None:
            raise CompressedCheckpointError(
                f"The tensor-parallel plan gives the factorized module '{name}' the style '{style}', which hf-lowrank "
                f"cannot yet split over its factors (it splits {sorted(FACTOR_STYLES)}). Load without tp_plan, or "
                "decompress_model the model, save it, and load that with tp_plan."
            )
        key = f"{generic}.{factor}"
        if plan.get(key, style) != style:
            raise CompressedCheckpointError(
                f"The tensor-parallel plan already gives '{key}' the style '{plan[key]}', not '{style}' as its "
                f"factorized module '{name}' needs."
            )
        plan[key] = style
        moved.add(name)
    return moved


def unhook_factorized(model: nn.Module, names: set[str]) -> None:
    """Remove the dense-style hook transformers put on each named ``LowRankLinear`` (a no-op where it put none:
    a plan resolved without tensor parallelism)."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            remove_parallel_forward(module)
