"""The one answer to "which rank for each module": a rank, a keep fraction and a ``rank_pattern``, for every entry point.

``rank_pattern`` has peft's meaning everywhere (``CompressionConfig.rank_pattern``, and so ``compress_model``,
``compress_peft_model``, ``compress_on_save`` and ``FisherLoRAConfig.compression``): a key is a regular expression
matched against the end of a module name on a dot boundary (:func:`hf_lowrank.targets.pattern_key`), the first
matching key wins, so a full module name and a suffix such as ``"up_proj"`` both work.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

from ..ops.rank_allocation import uniform_ranks
from ..ops.svd import RANK_MULTIPLE, break_even_rank
from ..targets import check_pattern_key, pattern_key

__all__ = ["plan_ranks", "resolve_ranks"]


def _as_int(value):
    # numpy integers (np.int64 from an array of ranks) are ranks too
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def check_pattern_keys(pattern: Mapping, names, what: str = "rank_pattern") -> None:
    """Every key of ``pattern`` is a valid peft pattern key matching at least one of ``names``; else ``ValueError``."""
    for key in pattern:
        check_pattern_key(key, what)
        if not any(pattern_key([key], n) for n in names):
            raise ValueError(
                f"Unknown target module: {what} key {key!r} matches no target module (targets end with e.g. "
                f"{sorted({n.rsplit('.', 1)[-1] for n in names})[:6]}). Fix the key or remove it."
            )


def plan_ranks(
    shapes: Mapping[str, tuple[int, int]],
    *,
    rank: int | None = None,
    keep: float | None = None,
    rank_pattern: Mapping[str, int | float] | None = None,
    multiple: int = RANK_MULTIPLE,
    what: str = "rank_pattern",
) -> dict[str, int | None]:
    """Rank of each module from a global rank or keep fraction and per-module overrides.

    Args:
        shapes: ``{name: (out, in)}`` of the candidate modules.
        rank: one rank for every module; exclusive with ``keep``.
        keep: fraction of each module's parameters kept, in ``(0, 1]``; the modules sharing one fraction fill its
            budget together (:func:`~hf_lowrank.ops.rank_allocation.uniform_ranks`), in multiples of ``multiple``.
        rank_pattern: ``{key: rank or keep}`` with peft's pattern-key rule (see the module doc).
        multiple: step of the ranks chosen from a keep fraction (explicit ranks are used as given).
        what: the argument's name in error messages.

    Returns:
        ``{name: rank}`` for the modules to compress, ``None`` where that rank would not save parameters (the module
        stays dense), also for a keep of 1.0 (all parameters kept: the exact weight, not a lossy pair of about the
        same size). Modules neither matched by a pattern nor covered by ``rank`` / ``keep`` are absent.

    Raises:
        ValueError: no target at all, both rank and keep, a pattern key that matches no module, a rank out of range.
    """
    pattern = dict(rank_pattern or {})
    if rank is not None and keep is not None:
        raise ValueError(f"Give a rank ({rank!r}) or a keep fraction ({keep!r}), not both.")
    if rank is None and keep is None and not pattern:
        raise ValueError(
            "Nothing says how much to compress: set keep=, rank= or rank_pattern= (a CompressionConfig, also as "
            "FisherLoRAConfig(compression=CompressionConfig(keep=0.8)))."
        )
    if not shapes:
        raise ValueError("No target modules matched: the model has no adapted Linear layer to compress.")
    check_pattern_keys(pattern, shapes, what)
    wanted: dict[str, int | float] = {}
    for name in shapes:
        key = pattern_key(pattern, name)
        value = _as_int(pattern[key] if key is not None else (rank if rank is not None else keep))
        if value is None:
            continue
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(
                f"Keep fraction {value!r} for module '{name}' must be in (0, 1]: a float is the fraction of "
                "parameters kept. Pass an int for an absolute rank."
            )
        wanted[name] = value
    whole = {n for n, v in wanted.items() if isinstance(v, float) and v == 1.0}
    for fraction in {v for v in wanted.values() if isinstance(v, float)}:
        group = {n: shapes[n] for n, v in wanted.items() if isinstance(v, float) and v == fraction}
        wanted.update(uniform_ranks(group, fraction, multiple=multiple))
    plan: dict[str, int | None] = {}
    for name, value in wanted.items():
        out_f, in_f = shapes[name]
        limit = min(out_f, in_f)
        if name in whole:  # keep 1.0: every parameter kept, so the exact dense weight (as the global allocation does)
            plan[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(
                f"Rank {value!r} for module '{name}' is out of range: it must be an integer in [1, {limit}] "
                f"for its ({out_f}, {in_f}) weight. Leave the module out (target_modules=), give it its own rank "
                f"({what}={{'{name.rsplit('.', 1)[-1]}': {limit}}}; a rank that saves no parameters keeps it dense) or "
                "pass a keep fraction (a float) instead."
            )
        plan[name] = value if value <= break_even_rank(out_f, in_f) else None
    return plan


def resolve_ranks(targets, ranks, *, rank_pattern=None, multiple: int = 1) -> dict[str, int | None]:
    """``compress_model``'s rank spec on ``{name: Linear}`` targets: an ``int`` rank or a ``float`` keep fraction in
    ``(0, 1]`` (with optional ``rank_pattern`` overrides), or a ``rank_pattern`` mapping alone (see
    :func:`plan_ranks`, whose result it returns)."""
    ranks = _as_int(ranks)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    if isinstance(ranks, Mapping):
        if rank_pattern:
            raise ValueError("Pass the rank pattern as ranks= or as rank_pattern=, not both.")
        return plan_ranks(shapes, rank_pattern=ranks, multiple=multiple, what="rank_pattern")
    if isinstance(ranks, bool) or not isinstance(ranks, int | float):
        raise ValueError(f"ranks must be an int, a float keep fraction or a dict, got {ranks!r}.")
    if isinstance(ranks, float) and not 0 < ranks <= 1:
        raise ValueError(
            f"A float `ranks` is the fraction of parameters kept and must be in (0, 1], got {ranks!r}. "
            "Pass an int for an absolute rank."
        )
    rank, keep = (ranks, None) if isinstance(ranks, int) else (None, ranks)
    return plan_ranks(shapes, rank=rank, keep=keep, rank_pattern=rank_pattern, multiple=multiple, what="rank_pattern")
