"""Replace Linear layers of a model by ``LowRankLinear`` factor pairs and report what that cost."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import atomic_write_json
from ..modules import LowRankLinear, dense_weight
from ..ops.svd import break_even_rank, factorized_params, rank_for_keep, relative_error

__all__ = [
    "CompressionReport",
    "ModuleReport",
    "compress_model",
    "find_target_linears",
    "resolve_ranks",
    "set_submodule",
]

RankSpec = int | float | Mapping[str, int]

_BLOCK_INDEX = re.compile(r"(^|\.)\d+\.")


@dataclass
class ModuleReport:
    """What compression did to one module."""

    name: str
    shape: tuple[int, int]
    rank: int | None
    params_before: int
    params_after: int
    rel_error: float | None = None
    weighted_rel_error: float | None = None
    skipped: str | None = None


@dataclass
class CompressionReport:
    """Per-module ranks, parameters and reconstruction errors of one compression."""

    modules: list[ModuleReport] = field(default_factory=list)
    method: str = "svd"
    info: dict = field(default_factory=dict)
    """Method-specific facts (FWSVD: the Fisher weighting, exponent and the Fisher state's counters)."""

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules if m.skipped is None}

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / max(self.params_before, 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "kept_fraction": self.kept_fraction,
            "modules": [asdict(m) for m in self.modules],
            **({"info": dict(self.info)} if self.info else {}),
        }

    def save(self, path) -> None:
        """Write the report as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    def summary(self) -> str:
        done = [m for m in self.modules if m.skipped is None]
        errs = [m.rel_error for m in done if m.rel_error is not None]
        mean_err = sum(errs) / len(errs) if errs else float("nan")
        return (
            f"{self.method}: {len(done)}/{len(self.modules)} modules factorized, target parameters "
            f"{self.params_before:,} -> {self.params_after:,} ({self.kept_fraction:.1%} kept), "
            f"mean relative error {mean_err:.4f}"
        )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def find_target_linears(
    model: nn.Module, target_modules: str | Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """Linear layers of ``model`` to compress.

    Args:
        model: any torch module (a transformers model, or a peft model's base model).
        target_modules: ``None`` for every Linear inside the repeated transformer blocks (a module path with a
            numeric index such as ``model.layers.3.mlp.up_proj``): embeddings, the LM head, poolers and
            classification heads are left alone. A string is a regular expression matched against the full
            module name (peft's convention); a list matches a module whose name equals an entry or ends with
            ``"." + entry``. Every list entry must match at least one Linear.

    Returns:
        ``{qualified_name: module}`` in model order (bitsandbytes 4/8-bit Linears included).

    Raises:
        ValueError: when nothing matches, a list entry names no Linear of the model, ``target_modules`` is not a
            string, a list/tuple/set of strings or ``None``, is an empty list, or is a regex that does not compile.
    """
    _check_target_modules(target_modules)
    linears: dict[str, nn.Module] = {}
    owned = set()
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            owned.update({f"{name}.down", f"{name}.up"})
        elif _is_linear(module) and name not in owned:
            linears[name] = module
    if target_modules is None:
        chosen = {n: m for n, m in linears.items() if _BLOCK_INDEX.search(n)}
        if not chosen:
            raise ValueError(
                "No Linear layer inside repeated transformer blocks was found; pass target_modules explicitly "
                f"(Linear layers of this model: {_preview(linears)})."
            )
        return chosen
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return find_target_linears(model, None)
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(
                f"target_modules {target_modules!r} is not a valid regular expression ({exc}). Pass a valid regex "
                "matched against full module names, or a list of module names."
            ) from None
        chosen = {n: m for n, m in linears.items() if pattern.fullmatch(n)}
        if not chosen:
            raise ValueError(
                f"target_modules regex {target_modules!r} matches no Linear layer. Linear layers of this model: "
                f"{_preview(linears)}."
            )
        return chosen
    chosen = {}
    for entry in target_modules:
        hits = {n: m for n, m in linears.items() if n == entry or n.endswith("." + entry)}
        if not hits:
            raise ValueError(
                f"Unknown target module {entry!r}: no Linear layer is named so or ends with '.{entry}'. "
                f"Linear layers of this model: {_preview(linears)}."
            )
        chosen.update(hits)
    return {n: m for n, m in linears.items() if n in chosen}


def _check_target_modules(target_modules: object) -> None:
    if target_modules is None or isinstance(target_modules, str):
        return
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise ValueError(
            f"target_modules must be None, a regex string or a list of module names, got "
            f"{type(target_modules).__name__} {target_modules!r}."
        )
    if not target_modules:
        raise ValueError(
            "target_modules is an empty list, which selects nothing to compress; name at least one module (e.g. "
            "['q_proj', 'v_proj']) or pass None for every Linear in the transformer blocks."
        )
    bad = [e for e in target_modules if not isinstance(e, str) or not e]
    if bad:
        raise ValueError(
            f"target_modules entries must be non-empty module names (str), got {bad[:5]!r}. Pass e.g. ['q_proj']."
        )


def _check_rank_keys(ranks: Mapping) -> None:
    bad = [k for k in ranks if not isinstance(k, str)]
    if bad:
        raise ValueError(
            f"A rank dict maps module names (str) to ranks, got key(s) {bad[:5]!r}. Use the full module names from "
            "model.named_modules(), e.g. {'model.layers.0.mlp.up_proj': 16}."
        )


def _preview(names: Mapping[str, object], limit: int = 8) -> str:
    keys = list(names)
    suffixes = sorted({k.rsplit(".", 1)[-1] for k in keys})
    text = ", ".join(suffixes[:limit]) + (", ..." if len(suffixes) > limit else "")
    return f"{len(keys)} in all, short names: {text}" if keys else "none"


def resolve_ranks(targets: Mapping[str, nn.Module], ranks: RankSpec) -> dict[str, int | None]:
    """Turn a rank spec into ``{name: rank or None}``; ``None`` marks a module where factorizing saves nothing.

    Args:
        targets: ``{name: Linear}`` from :func:`find_target_linears`.
        ranks: an ``int`` rank for every module, a ``float`` fraction of each module's parameters kept in
            ``(0, 1]``, or a ``{name: rank}`` mapping (names must be among the targets).

    Raises:
        ValueError: rank below 1 or above ``min(out, in)``, keep outside ``(0, 1]``, unknown or non-str names.
    """
    resolved: dict[str, int | None] = {}
    if isinstance(ranks, Mapping):
        _check_rank_keys(ranks)
        unknown = [n for n in ranks if n not in targets]
        if unknown:
            raise ValueError(
                f"Rank given for {len(unknown)} module(s) that are not target Linear layers: {unknown[:5]}. "
                "Use the full module names from model.named_modules()."
            )
        items = {n: ranks[n] for n in targets if n in ranks}
    elif isinstance(ranks, bool):
        raise ValueError(f"ranks must be an int, a float keep fraction or a dict, got {ranks!r}.")
    elif isinstance(ranks, int):
        items = dict.fromkeys(targets, ranks)
    elif isinstance(ranks, float):
        if not 0 < ranks <= 1:
            raise ValueError(
                f"A float `ranks` is the fraction of parameters kept and must be in (0, 1], got {ranks!r}. "
                "Pass an int for an absolute rank."
            )
        items = {n: rank_for_keep(m.out_features, m.in_features, ranks) for n, m in targets.items()}
    else:
        raise ValueError(f"ranks must be an int, a float keep fraction or a dict, got {type(ranks).__name__}.")
    for name, rank in items.items():
        module = targets[name]
        limit = min(module.out_features, module.in_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(
                f"Rank {rank!r} for module '{name}' is out of range: it must be an integer in [1, {limit}] "
                f"for its ({module.out_features}, {module.in_features}) weight."
            )
        resolved[name] = rank if rank <= break_even_rank(module.out_features, module.in_features) else None
    return resolved


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def compress_model(
    model: nn.Module,
    ranks: RankSpec,
    *,
    row_weights: Mapping[str, torch.Tensor] | None = None,
    col_weights: Mapping[str, torch.Tensor] | None = None,
    target_modules: str | Sequence[str] | None = None,
    method: str = "auto",
    exponent: float = 0.5,
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
    report_method: str | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Replace target Linear layers of ``model`` in place by ``LowRankLinear`` factor pairs.

    Plain truncated SVD by default; with ``row_weights`` / ``col_weights`` (accumulated Fisher per output row /
    input column, keyed by module name) the Fisher-weighted SVD of METHODS.md section 1. A module whose rank would
    not save parameters (``rank >= out*in/(out+in)``) is left dense and listed as skipped. A transformers model
    is then marked so that ``save_pretrained`` writes a factorized checkpoint that ``from_pretrained`` rebuilds.

    Args:
        model: the model to compress (modified in place).
        ranks: ``int`` rank, ``float`` fraction of parameters kept per module, or ``{name: rank}``.
        row_weights: optional ``{name: (out,) importance}``.
        col_weights: optional ``{name: (in,) importance}``.
        target_modules: see :func:`find_target_linears`; with a ``{name: rank}`` dict and no target_modules,
            the dict's names are the targets.
        method: SVD method, ``"auto"``, ``"exact"`` or ``"randomized"``.
        exponent, eps: Fisher weighting, ``D = diag((fisher / mean + eps) ** exponent)``.
        dtype: dtype of the factors (default: the replaced weight's dtype). It may differ from the rest of the
            model: ``LowRankLinear.forward`` casts its input to the factor dtype and its output back to the
            input's dtype.
        report_method: label recorded in the report and the checkpoint (default ``"svd"`` or ``"fwsvd"``).
        progress: show a progress bar.

    Returns:
        A :class:`CompressionReport`.
    """
    if isinstance(ranks, Mapping):
        _check_rank_keys(ranks)
    if isinstance(ranks, Mapping) and target_modules is None:
        if not ranks:
            raise ValueError("An empty rank map compresses nothing; name at least one module.")
        targets = find_target_linears(model, list(ranks))
    else:
        targets = find_target_linears(model, target_modules)
    plan = resolve_ranks(targets, ranks)
    weighted = bool(row_weights) or bool(col_weights)
    report = CompressionReport(method=report_method or ("fwsvd" if weighted else "svd"))
    for name in tqdm(list(plan), desc=f"compress ({report.method})", disable=not progress, unit="module"):
        module, rank = targets[name], plan[name]
        out_f, in_f = module.out_features, module.in_features
        bias = 0 if getattr(module, "bias", None) is None else out_f
        before = out_f * in_f + bias
        if rank is None:
            report.modules.append(
                ModuleReport(name, (out_f, in_f), None, before, before, skipped="rank saves no parameters")
            )
            continue
        row = _lookup(row_weights, name, (out_f,), "row_weights")
        col = _lookup(col_weights, name, (in_f,), "col_weights")
        W = dense_weight(module)
        new = LowRankLinear.from_dense(
            module, rank, row_weights=row, col_weights=col, exponent=exponent, eps=eps, method=method,
            dtype=dtype or (W.dtype if W.is_floating_point() and W.dtype != torch.uint8 else torch.float32),
            name=name,
        )
        W_hat = new.up.weight.float() @ new.down.weight.float()
        err = relative_error(W.float(), W_hat)
        werr = None
        if row is not None or col is not None:
            from ..ops.fisher import fisher_weights, weighted_relative_error

            rw = fisher_weights(row.float(), exponent=exponent, eps=eps) if row is not None else None
            cw = fisher_weights(col.float(), exponent=exponent, eps=eps) if col is not None else None
            werr = weighted_relative_error(W.float(), W_hat, rw, cw)
        new.train(module.training)
        set_submodule(model, name, new)
        report.modules.append(
            ModuleReport(name, (out_f, in_f), rank, before, factorized_params(out_f, in_f, rank) + bias, err, werr)
        )
    from .checkpoint import mark_compressed

    mark_compressed(model, report.ranks, method=report.method)
    return report


def _lookup(weights: Mapping[str, torch.Tensor] | None, name: str, shape: tuple[int], what: str):
    if not weights or name not in weights:
        return None
    w = weights[name]
    if tuple(w.shape) != shape:
        raise ValueError(
            f"{what}['{name}'] has shape {tuple(w.shape)} but the module needs {shape}: the Fisher was collected on "
            "a model of another shape. Collect it again on this model."
        )
    return w
